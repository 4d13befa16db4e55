"""Images/s of the attacks (each + the scoring forward pass) on ResNet-20 CNN vs ANN, under
BatchNorm ``tracked`` and ``running-mean``: PGD-7 (the paper's), APGD-CE, APGD-DLR, Square,
and the strict study's batch attacks (harm to batch mates, EOT over batch partners).

Randomly initialized CIFAR models (32x32x3, 10 classes) and one random batch: the cost of
an attack does not depend on the weights (Square's does a little: it stops proposing for
misclassified images, but keeps querying the whole batch). Everything runs in one process,
so the ratios (ANN vs CNN, running-mean vs tracked, one attack vs PGD-7) are comparable.
Compile time is excluded; the median of ``--repeats`` timed batches is reported. Budgets
are small by default; every attack's time grows linearly with its iterations (queries,
steps x draws), so other budgets follow from the "ms / iteration" column.

images/s counts the images an attack is scored on: the whole batch for PGD, APGD and
Square; the ``batch - k`` clean mates for the batch-mate attack (``k = batch/4``); the
``k = batch/10`` crafted images for EOT (each batch also holds ``batch - k`` partners).

    python bench/attacks.py --batch 128 --repeats 3
    python bench/attacks.py --attacks pgd square --square-queries 500 --layer-types adder
    python bench/attacks.py --attacks pgd --unroll-max-steps 0 10   # loop vs unrolled

``--unroll-max-steps`` sets ``attack_core.UNROLL_MAX_STEPS`` (0: every attack loop rolled; the
default unrolls the paper's short attacks on the CPU), each value a block of rows; "time vs
first" compares a row with the same row under the first value.
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
from awn_jax.data import DatasetInfo  # noqa: E402
from awn_jax.model import apply_model, build_model, split_model, with_bn_mode  # noqa: E402
from awn_jax.ops.adder import resolve_implementation  # noqa: E402
from awn_jax.robustness import attack_core, attacks  # noqa: E402
from awn_jax.robustness.batch_attacks import BatchMate, EOTPartners  # noqa: E402
from bench.train_step import cpu_name  # noqa: E402
from configs import default  # noqa: E402

CIFAR10 = DatasetInfo(name="cifar10", num_classes=10, image_shape=(32, 32, 3), num_train=50000,
                      num_test=10000, mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010))
ATTACKS = ("pgd", "apgd-ce", "apgd-dlr", "square", "batch-mate", "eot")


def attack_call(name, args, batch):
    """``(fn(logits_fn, images, labels, key) -> correct count, scored images, iterations)``
    for attack ``name`` with the budgets of ``args``."""
    eps, step = attacks.DEFAULT_EPS, attacks.DEFAULT_STEP_SIZE
    if name == "batch-mate":
        k = batch // 4

        def run(logits_fn, images, labels, key):
            def mates(x):
                return logits_fn(images.at[:k].set(x))[k:]
            x = BatchMate(args.mate_steps)(mates, images[:k], labels[k:], key, eps, eps / 4)
            return jnp.sum(jnp.argmax(mates(x), -1) == labels[k:])
        return run, batch - k, args.mate_steps

    if name == "eot":
        k = max(1, batch // 10)
        attack = EOTPartners(k, args.eot_draws, args.eot_steps)

        def run(logits_fn, images, labels, key):
            adversarial = attack(logits_fn, images, labels, key, eps, step, images)
            return jnp.sum(jnp.argmax(logits_fn(adversarial)[:k], -1) == labels[:k])
        return run, k, args.eot_steps * args.eot_draws

    steps = {"pgd": 7, "apgd-ce": args.apgd_steps, "apgd-dlr": args.apgd_steps,
             "square": args.square_queries}[name]

    def run(logits_fn, images, labels, key):
        adversarial = attacks.attack(name, logits_fn, images, labels, key=key, steps=steps)
        return jnp.sum(jnp.argmax(logits_fn(adversarial), -1) == labels)
    return run, batch, steps


def time_attack(name, layer_type, bn_mode, args):
    """(median seconds per batch, compile seconds, scored images, iterations)."""
    config = ml_collections.ConfigDict(default.get_config().to_dict())
    config.layer_type = layer_type
    graphdef, params, batch_stats = split_model(build_model(config, CIFAR10))
    graphdef = with_bn_mode(graphdef, params, batch_stats, bn_mode)
    run, scored, iterations = attack_call(name, args, args.batch)

    @jax.jit
    def correct(params, batch_stats, images, labels, key):
        def logits_fn(x):
            return apply_model(graphdef, params, batch_stats, x)[0]
        return run(logits_fn, images, labels, key)

    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.uniform(size=(args.batch, 32, 32, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, args.batch), jnp.int32)
    key = jax.random.key(0)
    start = time.perf_counter()
    jax.block_until_ready(correct(params, batch_stats, images, labels, key))
    compile_seconds = time.perf_counter() - start
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        jax.block_until_ready(correct(params, batch_stats, images, labels, key))
        times.append(time.perf_counter() - start)
    return statistics.median(times), compile_seconds, scored, iterations


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layer-types", nargs="+", default=["conv", "adder"])
    parser.add_argument("--bn-modes", nargs="+", default=["tracked", "running-mean"])
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS)
    parser.add_argument("--apgd-steps", type=int, default=20)
    parser.add_argument("--square-queries", type=int, default=200)
    parser.add_argument("--mate-steps", type=int, default=10)
    parser.add_argument("--eot-draws", type=int, default=2)
    parser.add_argument("--eot-steps", type=int, default=5)
    parser.add_argument("--unroll-max-steps", type=int, nargs="+",
                        default=[attack_core.UNROLL_MAX_STEPS])
    args = parser.parse_args()
    device = jax.devices()[0]
    print(f"# attacks + scoring, resnet20, batch {args.batch}, median of {args.repeats}; "
          f"PGD-7, APGD {args.apgd_steps} iterations, Square {args.square_queries} queries, "
          f"batch-mate {args.mate_steps} steps (k = batch/4), EOT {args.eot_steps} steps x "
          f"{args.eot_draws} draws (k = batch/10)")
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; jax {jax.__version__}, "
          f"{device.platform} ({device.device_kind}); adder implementation "
          f"{resolve_implementation()}; load average at start {os.getloadavg()[0]:.2f}")
    print("| unrolled up to | attack | layer type | BN mode | ms / batch | ms / iteration | "
          "images/s | time vs conv | time vs tracked | time vs first | compile s |")
    print("|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    seconds = {}
    first = args.unroll_max_steps[0]
    for unroll in args.unroll_max_steps:
        attack_core.UNROLL_MAX_STEPS = unroll
        for name in args.attacks:
            for layer_type in args.layer_types:
                for mode in args.bn_modes:
                    s, compile_seconds, scored, iterations = time_attack(name, layer_type,
                                                                         mode, args)
                    seconds[unroll, name, layer_type, mode] = s
                    nan = float("nan")
                    vs_conv = s / seconds.get((unroll, name, "conv", mode), nan)
                    vs_tracked = s / seconds.get((unroll, name, layer_type, "tracked"), nan)
                    vs_first = s / seconds.get((first, name, layer_type, mode), nan)
                    print(f"| {unroll} | {name} | {layer_type} | {mode} | {1e3 * s:.0f} | "
                          f"{1e3 * s / iterations:.0f} | {scored / s:.2f} | {vs_conv:.2f}x | "
                          f"{vs_tracked:.2f}x | {vs_first:.2f}x | {compile_seconds:.0f} |",
                          flush=True)
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
