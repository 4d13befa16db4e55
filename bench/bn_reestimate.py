"""Re-estimating BN statistics: a ResNet's forward segment by segment against from the images.

    python bench/bn_reestimate.py --num_images 2000 --batch_size 500

Times ``awn_jax.bn_statistics.reestimate`` on a ResNet (random weights: the work does not
depend on them) over random images, once keeping the activations between the model's
segments (the default) and once with ``cache_bytes=0`` (a forward from the images for every
BN, as before segments). Each is run once to compile, then timed; the two results are
compared, and the ratio is the one to read.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from awn_jax import bn_statistics  # noqa: E402
from awn_jax.model import named_leaves, split_model  # noqa: E402
from awn_jax.nn import create_model  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--layer_type", default="adder-awn")
    parser.add_argument("--num_images", type=int, default=2000)
    parser.add_argument("--batch_size", type=int, default=500)
    parser.add_argument("--source", default="reestimate", choices=["reestimate",
                                                                   "reestimate-running-mean"])
    args = parser.parse_args()

    model = create_model(args.model, num_classes=10, layer_type=args.layer_type,
                         mean=(0.5,) * 3, std=(0.25,) * 3, rngs=nnx.Rngs(0))
    graphdef, params, batch_stats = split_model(model)
    rng = np.random.default_rng(0)
    images = rng.random((args.num_images, 32, 32, 3), dtype=np.float32)
    batches = [images[i:i + args.batch_size] for i in range(0, len(images), args.batch_size)]

    results, seconds = {}, {}
    for label, cache_bytes in (("segments", bn_statistics.CACHE_BYTES), ("from images", 0)):
        def run():
            return bn_statistics.reestimate(graphdef, params, batch_stats,
                                            lambda: iter(batches), source=args.source,
                                            cache_bytes=cache_bytes)
        jax.block_until_ready(run())  # compile
        start = time.perf_counter()
        results[label] = jax.block_until_ready(run())
        seconds[label] = time.perf_counter() - start
    a, b = (named_leaves(results[k]) for k in ("segments", "from images"))
    worst = max(float(np.max(np.abs(a[n] - b[n]) / (np.abs(b[n]) + 1e-6))) for n in a)
    print(f"{args.model} {args.layer_type}, {args.num_images} images in batches of "
          f"{args.batch_size}, {args.source}, {jax.device_count()} device(s) "
          f"({jax.devices()[0].platform})")
    for label, s in seconds.items():
        print(f"  {label:12s} {s:8.2f} s")
    print(f"  ratio (from images / segments): {seconds['from images'] / seconds['segments']:.2f}x;"
          f" largest relative difference of a statistic: {worst:.2e}")


if __name__ == "__main__":
    main()
