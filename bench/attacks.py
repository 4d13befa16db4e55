"""Images/s of PGD-7 (7 gradient steps + the scoring forward pass) on ResNet-20 CNN vs ANN,
under BatchNorm ``tracked`` and ``running-mean``.

Randomly initialized CIFAR models (32x32x3, 10 classes) and one random batch: the cost of
an attack does not depend on the weights. Everything runs in one process, so the ratios
(ANN vs CNN, running-mean vs tracked) are comparable. Compile time is excluded; the median
of ``--repeats`` timed batches is reported.

    python bench/attacks.py --batch 128 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/
from awn_jax import attacks  # noqa: E402
from awn_jax.data import DatasetInfo  # noqa: E402
from awn_jax.model import apply_model, build_model, split_model, with_bn_mode  # noqa: E402
from awn_jax.ops.adder import resolve_implementation  # noqa: E402
from bench.train_step import _cpu_name  # noqa: E402
from configs import default  # noqa: E402

CIFAR10 = DatasetInfo(name="cifar10", num_classes=10, image_shape=(32, 32, 3), num_train=50000,
                      num_test=10000, mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010))


def time_pgd(layer_type: str, bn_mode: str, batch: int, repeats: int) -> tuple[float, float]:
    """(median seconds per batch, compile seconds) of PGD-7 + scoring on one batch."""
    config = ml_collections.ConfigDict(default.get_config().to_dict())
    config.layer_type = layer_type
    graphdef, params, batch_stats = split_model(build_model(config, CIFAR10))
    graphdef = with_bn_mode(graphdef, params, batch_stats, bn_mode)

    @jax.jit
    def correct(params, batch_stats, images, labels, key):
        def logits_fn(x):
            return apply_model(graphdef, params, batch_stats, x)[0]
        adversarial = attacks.attack("pgd", logits_fn, images, labels, key=key)
        return jnp.sum(jnp.argmax(logits_fn(adversarial), -1) == labels)

    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.uniform(size=(batch, 32, 32, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
    key = jax.random.key(0)
    start = time.perf_counter()
    jax.block_until_ready(correct(params, batch_stats, images, labels, key))
    compile_seconds = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(correct(params, batch_stats, images, labels, key))
        times.append(time.perf_counter() - start)
    return statistics.median(times), compile_seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layer-types", nargs="+", default=["conv", "adder"])
    parser.add_argument("--bn-modes", nargs="+", default=["tracked", "running-mean"])
    args = parser.parse_args()
    device = jax.devices()[0]
    print(f"# PGD-7 (eps 8/255, step 2/255) + scoring, resnet20, batch {args.batch}, "
          f"median of {args.repeats}")
    print(f"machine: {_cpu_name()}, {os.cpu_count()} cores; jax {jax.__version__}, "
          f"{device.platform} ({device.device_kind}); adder implementation "
          f"{resolve_implementation()}; load average at start {os.getloadavg()[0]:.2f}")
    print("| layer type | BN mode | ms / batch | images/s | time vs conv (same mode) | "
          "time vs tracked (same layer) | compile s |")
    print("|---|---|---|---|---|---|---|")
    seconds = {}
    for layer_type in args.layer_types:
        for mode in args.bn_modes:
            seconds[layer_type, mode], compile_seconds = time_pgd(layer_type, mode, args.batch,
                                                                  args.repeats)
            vs_conv = seconds[layer_type, mode] / seconds.get(("conv", mode), float("nan"))
            vs_tracked = seconds[layer_type, mode] / seconds.get((layer_type, "tracked"),
                                                                 float("nan"))
            print(f"| {layer_type} | {mode} | {1e3 * seconds[layer_type, mode]:.0f} | "
                  f"{args.batch / seconds[layer_type, mode]:.1f} | {vs_conv:.2f}x | "
                  f"{vs_tracked:.2f}x | {compile_seconds:.0f} |", flush=True)
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
