"""Images/s of one jit-compiled Faster R-CNN + FPN train step: CNN vs ANN vs ANN-AWN.

The VOC configuration (configs/voc_frcnn_default.py: ResNet-18, a 1024-pixel canvas,
256-wide neck, 2000/1000 proposals, 256 anchor and 512 RoI samples per image) on one
device, every layer type on the same random batch in one process, so the ratios against
the CNN compare. The batch holds images of the VOC input size (a 600 x 800 image on the
canvas) with three boxes each. Compile time is excluded; the median of ``--repeats``
timed steps is reported, with the step's compiled memory (``memory_analysis()``).

    python bench/detection.py --batch 2 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/
from awn_jax.detection import data, training  # noqa: E402
from awn_jax.distributed import make_mesh  # noqa: E402
from bench.train_step import cpu_name, time_compiled_step  # noqa: E402
from configs import voc_frcnn_default  # noqa: E402

LAYER_TYPES = ("conv", "adder", "adder-awn")


class RandomVocSplit:
    """``count`` random 600 x 800 images with three boxes each: VOC's size after resizing
    (its typical 375 x 500 image, scaled by 1.6)."""

    def __init__(self, count: int):
        rng = np.random.default_rng(0)
        self._images = rng.integers(0, 256, (count, 600, 800, 3), dtype=np.uint8)
        self._boxes = np.array([[50, 60, 300, 400], [400, 100, 780, 580], [10, 10, 90, 120]],
                               np.float32)

    def __len__(self):
        return len(self._images)

    def __getitem__(self, index):
        return {"image": self._images[index], "boxes": self._boxes,
                "labels": np.array([3, 14, 7], np.int32), "difficult": np.zeros(3, bool)}


def time_train_step(layer_type: str, batch: int, repeats: int):
    """(median seconds per step, compile seconds, compiled MB: temp, total)."""
    config = voc_frcnn_default.get_config()
    config.update(dict(layer_type=layer_type, batch_size=batch, eval_batch_size=batch,
                       num_devices=1, min_size=600, max_size=1000,
                       warmup_steps=0))  # a one-step epoch: no room for the warmup
    split = RandomVocSplit(batch)
    info = data.DetectionInfo("random-voc", 20, tuple(f"class{i}" for i in range(20)),
                              config.image_size, config.max_boxes, batch, batch)
    dataset = data.DetectionDataset(info, split, split, seed=0, min_size=600, max_size=1000,
                                    random_flip=False)
    trainer = training.DetectionTrainer(config, dataset, make_mesh(1))
    inputs = trainer.global_batch(next(dataset.train_batches(0, batch)))
    return time_compiled_step(trainer, inputs, repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layer-types", nargs="+", default=list(LAYER_TYPES))
    args = parser.parse_args()
    print(f"# Faster R-CNN + FPN train step, ResNet-18, VOC size (600 x 800 on a 1024 canvas), "
          f"batch {args.batch}, median of {args.repeats}")
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; jax {jax.__version__}, "
          f"{jax.devices()[0].platform}; load average at start {os.getloadavg()[0]:.2f}")
    print("| layer type | s / step | images/s | step time vs conv | compile s "
          "| temp MB | total MB |")
    print("|---|---|---|---|---|---|---|")
    baseline = None
    for layer_type in args.layer_types:
        seconds, compile_seconds, temp, total = time_train_step(layer_type, args.batch,
                                                                args.repeats)
        baseline = baseline or seconds
        print(f"| {layer_type} | {seconds:.2f} | {args.batch / seconds:.3f} | "
              f"{seconds / baseline:.2f}x | {compile_seconds:.0f} | {temp:.0f} | {total:.0f} |",
              flush=True)
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
