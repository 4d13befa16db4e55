"""The evaluation stages of the campaign, each a thin call into the library's studies on
the four finished runs; every stage's results are plain JSON.

* ``table`` -- Table 1 (clean + the attacks x the three BN modes), per run; Table 3 is
  its WS/AWN rows under ``running``/``running-mean``.
* ``sweeps`` -- PGD against eps and against steps under ``running-mean`` (Fig. 2a/2b).
* ``interpolation`` -- accuracy between epochs 1-2 and the last two epochs (Fig. 2c).
* ``distributions`` -- features before BN, weights and BN statistics at the first, middle
  and last epoch (Fig. 3).
"""

from __future__ import annotations

from awn_jax import robustness
from awn_jax.robustness import studies
from awn_jax.stability import distributions, interpolation
from awn_jax.training.runs import load_run


def table(workdir, budget) -> list[dict]:
    return robustness.evaluate_run(
        load_run(workdir).with_bn_stats(budget.bn_stats), budget.attacks, robustness.EVAL_BN_MODES,
        steps=budget.attack_steps, batch_size=budget.eval_batch_size,
        num_examples=budget.test_examples or None, show_progress=False)


def sweeps(workdir, budget) -> dict:
    # One run: its evaluator's compiled clean pass serves both sweeps.
    run = load_run(workdir).with_bn_stats(budget.bn_stats)
    common = dict(batch_size=min(budget.eval_batch_size, budget.sweep_examples or 10_000),
                  num_examples=budget.sweep_examples or None)
    return {"eps": studies.eps_sweep(run, ("running-mean",), budget.eps_values,
                                     steps=budget.attack_steps or 7, **common),
            "steps": studies.steps_sweep(run, ("running-mean",), budget.steps_values,
                                         **common)}


def epoch_pairs(epochs: int) -> list[tuple[int, int]]:
    """The two pairs of Fig. 2c at this budget: the first two epochs and the last two."""
    return sorted({(1, 2), (epochs - 1, epochs)}) if epochs >= 2 else []


def interpolation_study(workdir, budget) -> list[dict]:
    results = []
    for epoch_a, epoch_b in epoch_pairs(budget.epochs):
        run_a, run_b = load_run(workdir, epoch_a), load_run(workdir, epoch_b)
        for bn_stats in budget.interpolation_bn_stats:
            results.append(interpolation.interpolate_run(
                run_a, run_b, num_points=budget.interpolation_points, bn_stats=bn_stats,
                batch_size=budget.eval_batch_size,
                num_examples=budget.test_examples or None))
    return results


def feature_epochs(epochs: int) -> tuple[int, ...]:
    return tuple(sorted({1, max(1, epochs // 2), epochs}))


def distributions_study(workdir, budget) -> dict:
    runs = (load_run(workdir, epoch) for epoch in feature_epochs(budget.epochs))
    return distributions.analyze_run(runs, num_images=budget.feature_images)
