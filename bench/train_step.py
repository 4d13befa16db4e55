"""Images/s of one jit-compiled train step: ResNet-20 CNN vs ANN vs ANN-WS vs ANN-AWN.

Every layer type runs the same step (forward, the adder layers' custom backward,
optimizer update) on the same random CIFAR-shaped batch in one process, so the ratios
against the CNN are comparable. Compile time is excluded; the median of ``--repeats``
timed steps is reported, and the step's compiled memory (XLA's buffer assignment: arguments,
outputs and the temp arena of all intermediates, ``memory_analysis()``), the whole network's
counterpart of ``adder_memory.py``'s per-layer figures.

    python bench/train_step.py --batch 128 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/
from awn_jax import data  # noqa: E402
from awn_jax.distributed import make_mesh  # noqa: E402
from awn_jax.training.loop import Trainer  # noqa: E402
from configs import default  # noqa: E402

LAYER_TYPES = ("conv", "adder", "adder-ws", "adder-awn")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def time_train_step(layer_type: str, batch: int, repeats: int, model: str):
    """(median seconds per step, compile seconds, compiled MB: temp, total) of one layer
    type."""
    config = default.get_config()
    config.update(dict(dataset="synthetic", synthetic_num_train=batch, synthetic_num_test=batch,
                       image_size=32, batch_size=batch, layer_type=layer_type, model=model,
                       num_devices=1))
    dataset = data.get_dataset(config)
    trainer = Trainer(config, dataset, make_mesh(1))
    images = trainer.global_batch(next(dataset.train_batches(0, batch)), trainer.sharded)
    return time_compiled_step(trainer, images, repeats)


def time_compiled_step(trainer, inputs, repeats: int):
    """(median seconds per step, compile seconds, compiled MB: temp, total) of
    ``trainer.train_step`` (classification or detection) on ``inputs``."""
    state = trainer.initial_state
    start = time.perf_counter()
    state, metrics = trainer.train_step(state, inputs)
    jax.block_until_ready(metrics)
    compile_seconds = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        state, metrics = trainer.train_step(state, inputs)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    with jax.set_mesh(trainer.mesh):  # trainer.train_step wraps the jitted step (__wrapped__)
        stats = trainer.train_step.__wrapped__.lower(state, inputs).compile().memory_analysis()
    temp = stats.temp_size_in_bytes / 2 ** 20
    total = temp + (stats.argument_size_in_bytes + stats.output_size_in_bytes
                    - stats.alias_size_in_bytes) / 2 ** 20
    return statistics.median(times), compile_seconds, temp, total


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--layer-types", nargs="+", default=list(LAYER_TYPES))
    args = parser.parse_args()
    print(f"# train step, {args.model}, batch {args.batch}, median of {args.repeats}")
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; jax {jax.__version__}, "
          f"{jax.devices()[0].platform}; load average at start {os.getloadavg()[0]:.2f}")
    print("| layer type | ms / step | images/s | step time vs conv | compile s "
          "| temp MB | total MB | total vs conv |")
    print("|---|---|---|---|---|---|---|---|")
    baseline = None
    for layer_type in args.layer_types:
        seconds, compile_seconds, temp, total = time_train_step(
            layer_type, args.batch, args.repeats, args.model)
        baseline = baseline or (seconds, total)
        print(f"| {layer_type} | {1e3 * seconds:.1f} | {args.batch / seconds:.1f} | "
              f"{seconds / baseline[0]:.2f}x | {compile_seconds:.0f} | {temp:.1f} | {total:.1f} "
              f"| {total / baseline[1]:.2f}x |", flush=True)
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
