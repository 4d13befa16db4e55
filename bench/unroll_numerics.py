"""Looped vs unrolled attack iterations on real models: accuracy and how many predictions
differ, for PGD-7 and MIM-5 under ``running-mean`` and ``tracked``, on the first 500 JPEG
test images (one batch of 500), for the imported ResNet-20 CNN and the official ANN.

Unrolling (``attack_core.iterate``) performs the same operations; only float32 rounding can
differ. Each setting of ``attack_core.UNROLL_MAX_STEPS`` gets a freshly loaded model (its own
compilations); every call is timed twice (the first includes compilation).

    python bench/unroll_numerics.py --data_dir ~/awn-data/cifar10
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from awn_jax import pretrained  # noqa: E402
from awn_jax.robustness import attack_core, attacks  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", required=True, help="CIFAR-10 image folder")
    parser.add_argument("--models", nargs="+",
                        default=["cifar10_r20_cnn_ref", "cifar10_r20_ann_official"])
    args = parser.parse_args()
    for name in args.models:
        out = {}
        for limit in (0, attack_core.UNROLL_MAX_STEPS):
            attack_core.UNROLL_MAX_STEPS = limit
            run = pretrained.load(name, data_dir=args.data_dir)
            images, labels = run.test_set(500)
            for mode in ("running-mean", "tracked"):
                for attack_name in ("pgd", "mim"):
                    attack, attack_args = attacks.configured(attack_name)
                    common = dict(batch_size=500, bn_mode=mode, attack=attack,
                                  attack_args=attack_args)
                    start = time.perf_counter()
                    run.evaluator.predictions(images, labels, **common)
                    first = time.perf_counter() - start
                    start = time.perf_counter()
                    predicted = run.evaluator.predictions(images, labels, **common)
                    out[limit, mode, attack_name] = predicted
                    print(f"{name} unrolled up to {limit} {mode} {attack_name}: first call "
                          f"{first:.1f} s, second {time.perf_counter() - start:.1f} s, "
                          f"accuracy {np.mean(predicted.reshape(-1) == labels):.4f}",
                          flush=True)
        loop, unrolled = 0, max(limit for limit, _, _ in out)
        for mode in ("running-mean", "tracked"):
            for attack_name in ("pgd", "mim"):
                differ = int(np.sum(out[loop, mode, attack_name]
                                    != out[unrolled, mode, attack_name]))
                print(f"{name} {mode} {attack_name}: predictions differing {differ} of 500")


if __name__ == "__main__":
    main()
