"""Where a BatchNorm mode's effect on a trained run comes from, layer by layer.

    python bench/bn_layers.py --workdir ~/awn-runs/cpu-10ep/adder-awn --mode running-mean

Switching every BatchNorm to ``running-mean`` (the paper's "-R": batch mean, running
variance) can cost a model far more accuracy than switching any single one. For each BN
layer this prints, on one test batch (the evaluation batch is the unit of the batch modes):

* how far the batch's statistics are from the running ones there, with every layer in
  ``train`` statistics (batch mean and variance, as under ``running``):
  ``|batch mean - running mean| / running sd`` and ``batch var / running var``;
* the accuracy with ``--mode`` in that layer only (the others ``tracked``), and in every
  layer but that one (that one ``tracked``).

A diagnostic, not a timing: the model runs eagerly (one forward per row), no jit.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from awn_jax.model import apply_model, named_leaves, with_bn_mode  # noqa: E402
from awn_jax.nn.batchnorm import BatchNorm  # noqa: E402
from awn_jax.training.runs import load_run  # noqa: E402


def accuracy(run, images, labels, modes: dict, default: str) -> float:
    """Accuracy with BN layer ``name`` in ``modes[name]`` and every other in ``default``."""
    model = nnx.merge(run.graphdef, run.params, run.batch_stats)
    for path, module in nnx.iter_graph(model):
        if isinstance(module, BatchNorm):
            module.mode = modes.get(".".join(map(str, path)), default)
    return float(np.mean(np.argmax(np.asarray(model(images)), -1) == labels))


def batch_statistics(run, images) -> dict:
    """Per BN layer: the batch's mean and (unbiased) variance under ``train`` statistics,
    recovered from the running-average update of :class:`BatchNorm` (momentum 0.1)."""
    graphdef = with_bn_mode(run.graphdef, run.params, run.batch_stats, "train")
    _, updated = apply_model(graphdef, run.params, run.batch_stats, images)
    old, new = named_leaves(run.batch_stats), named_leaves(updated)
    out = {}
    for name in old:
        if name.endswith(".mean"):
            layer = name[:-len(".mean")]
            mean = (np.asarray(new[name]) - 0.9 * np.asarray(old[name])) / 0.1
            var = (np.asarray(new[layer + ".var"]) - 0.9 * np.asarray(old[layer + ".var"])) / 0.1
            out[layer] = (mean, var, np.asarray(old[name]), np.asarray(old[layer + ".var"]))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--mode", default="running-mean", choices=("running-mean", "running"))
    parser.add_argument("--batch", type=int, default=500, help="the one test batch")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    run = load_run(os.path.expanduser(args.workdir), data_dir=args.data_dir)
    images, labels = run.test_set(args.batch)
    print(f"# {run.workdir}, epoch {run.epoch}: BN layers under {args.mode}, one batch of "
          f"{len(labels)} test images")
    print(f"all tracked: {100 * accuracy(run, images, labels, {}, 'tracked'):.1f}%, "
          f"all {args.mode}: {100 * accuracy(run, images, labels, {}, args.mode):.1f}%")
    print("| BN layer | \\|bm - rm\\| / sd: median, max | bv / rv: min, median, max "
          f"| acc. {args.mode} here only | acc. {args.mode} all but here |")
    print("|---|---|---|---|---|")
    for layer, (bm, bv, rm, rv) in sorted(batch_statistics(run, images).items()):
        z, ratio = np.abs(bm - rm) / np.sqrt(rv + 1e-5), bv / rv
        only = accuracy(run, images, labels, {layer: args.mode}, "tracked")
        but = accuracy(run, images, labels, {layer: "tracked"}, args.mode)
        print(f"| {layer} | {np.median(z):.3f}, {z.max():.3f} | {ratio.min():.2f}, "
              f"{np.median(ratio):.2f}, {ratio.max():.2f} | {100 * only:.1f} | {100 * but:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
