"""The evaluation stages of the campaign, each a thin call into the library's studies on
the four finished runs; every stage's results are plain JSON.

* ``table`` -- Table 1 (clean + the attacks x the three BN modes), per run; Table 3 is
  its WS/AWN rows under ``running``/``running-mean``.
* ``sweeps`` -- PGD against eps and against steps under ``running-mean`` (Fig. 2a/2b).
* ``interpolation`` -- accuracy between epochs 1-2 and the last two epochs, and from 100
  epochs on the paper's pairs scaled to the budget (Fig. 2c).
* ``distributions`` -- features before BN, weights and BN statistics at the first, middle
  and last epoch (Fig. 3).
"""

from __future__ import annotations

import os

from awn_jax import reports, robustness
from awn_jax.config import PAPER_EPOCHS
from awn_jax.nn.batchnorm import EVAL_BN_MODES
from awn_jax.robustness import studies
from awn_jax.stability import distributions, interpolation
from awn_jax.training.runs import load_run


# Each table cell, sweep point and interpolation path is kept in the run's workdir as it
# finishes, so a stage killed after hours (a CPU budget) resumes where it stopped.
TABLE_PARTS, SWEEP_PARTS, PATH_PARTS = "table-parts", "sweep-parts", "interpolation-parts"


def table(workdir, budget) -> list[dict]:
    return robustness.evaluate_run(
        load_run(workdir).with_bn_stats(budget.bn_stats), budget.attacks, EVAL_BN_MODES,
        steps=budget.attack_steps, batch_size=budget.eval_batch_size,
        num_examples=budget.test_examples or None, show_progress=False,
        cache_dir=os.path.join(workdir, TABLE_PARTS))


def sweeps(workdir, budget) -> dict:
    # One run: its evaluator's compiled clean pass serves both sweeps.
    run = load_run(workdir).with_bn_stats(budget.bn_stats)
    common = dict(batch_size=min(budget.eval_batch_size, budget.sweep_examples or 10_000),
                  num_examples=budget.sweep_examples or None,
                  cache_dir=os.path.join(workdir, SWEEP_PARTS))
    return {"eps": studies.eps_sweep(run, ("running-mean",), budget.eps_values,
                                     steps=budget.attack_steps or 7, **common),
            "steps": studies.steps_sweep(run, ("running-mean",), budget.steps_values,
                                         **common)}


# Fig. 2c's pairs of the paper (Sec. 5, "Stability evaluation through linear
# interpolation"), out of the paper's 400 epochs: early and late, ANN and ANN-AWN. ANN-WS takes
# ANN-AWN's, the CNN the ANN's.
PAPER_PAIRS = {"adder": ((160, 164), (290, 294)), "adder-awn": ((125, 135), (283, 294))}
PAPER_PAIRS["adder-ws"], PAPER_PAIRS["conv"] = PAPER_PAIRS["adder-awn"], PAPER_PAIRS["adder"]


def epoch_pairs(epochs: int, layer_type: str | None = None) -> list[tuple[int, int]]:
    """The pairs of Fig. 2c at this budget: the first two epochs and the last two; from 100
    epochs on also the paper's pairs of ``layer_type`` (all runs' when None) scaled by
    ``epochs / PAPER_EPOCHS`` (each epoch rounded, the second at least one after the first)."""
    pairs = {(1, 2), (epochs - 1, epochs)} if epochs >= 2 else set()
    if epochs >= 100:
        scale = epochs / PAPER_EPOCHS
        for kind in ([layer_type] if layer_type else list(PAPER_PAIRS)):
            for a, b in PAPER_PAIRS[kind]:
                first = max(1, round(a * scale))
                pairs.add((first, min(epochs, max(first + 1, round(b * scale)))))
    return sorted(pairs)


def interpolation_study(workdir, budget) -> list[dict]:
    results = []
    layer_type = load_run(workdir).config.layer_type
    for epoch_a, epoch_b in epoch_pairs(budget.epochs, layer_type):
        run_a, run_b = load_run(workdir, epoch_a), load_run(workdir, epoch_b)
        for bn_stats in budget.interpolation_bn_stats:
            settings = dict(num_points=budget.interpolation_points, bn_stats=bn_stats,
                            batch_size=budget.eval_batch_size,
                            num_examples=budget.test_examples or None)
            results.append(reports.cached(
                os.path.join(workdir, PATH_PARTS), f"epochs{epoch_a}-{epoch_b}-{bn_stats}",
                {"weights_sha256": [run_a.weights_sha256, run_b.weights_sha256],
                 "settings": settings},
                lambda a=run_a, b=run_b, s=settings: interpolation.interpolate_run(a, b, **s)))
    return results


def feature_epochs(epochs: int) -> tuple[int, ...]:
    return tuple(sorted({1, max(1, epochs // 2), epochs}))


def distributions_study(workdir, budget) -> dict:
    runs = (load_run(workdir, epoch) for epoch in feature_epochs(budget.epochs))
    return distributions.analyze_run(runs, num_images=budget.feature_images)
