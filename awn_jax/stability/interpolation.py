"""Linear interpolation between two checkpoints of one run (the paper's Fig. 2c).

``theta(alpha) = (1 - alpha) theta_a + alpha theta_b`` for all trainable parameters (AWN's
nu/upsilon included), scored on a fixed set of test images. BatchNorm running statistics
are not parameters; two treatments are offered:

* ``interpolate``: the running mean and variance are interpolated like the parameters.
  At alpha = 0 and 1 the model is exactly the saved checkpoint, so the ends reproduce
  the checkpoints' test accuracies.
* ``reestimate``: for every alpha the statistics are re-estimated on a fixed set of
  (un-augmented) training images, layer by layer (:func:`awn_jax.bn_statistics.reestimate`).
  This separates a bad region of the weights from running statistics that merely do not
  fit the interpolated weights; the ends then differ from the checkpoints. (Before
  2026-12-06 this averaged per-batch statistics of augmented training batches in ``train``
  mode, as SWA's ``update_bn`` does; the 10-epoch report was made that way.)

The paper reports the variance of the accuracies of the 9 interpolated models; here the
accuracy is in percent, the variance the population variance (ddof=0), given over the
interior points and over all points with the ends.
"""

from __future__ import annotations


import jax
import numpy as np

from awn_jax import bn_statistics
from awn_jax.errors import UserError
from awn_jax.evaluation import Evaluator
from awn_jax.reports import new_figure

BN_STATS = ("interpolate", "reestimate")


def lerp(tree_a, tree_b, alpha: float):
    """``(1 - alpha) a + alpha b`` leaf by leaf; exactly ``a`` at 0 and ``b`` at 1."""
    return jax.tree.map(lambda a, b: (1.0 - alpha) * np.asarray(a) + alpha * np.asarray(b),
                        tree_a, tree_b)


def interpolate_run(run_a, run_b, *, num_points: int = 9, bn_stats: str = "interpolate",
                    bn_mode: str = "tracked", batch_size: int = 500,
                    num_examples: int | None = None, reestimate_batches: int = 10) -> dict:
    """Test accuracy and loss at ``num_points`` interpolated models plus the two ends.

    ``run_a``, ``run_b``: two :class:`awn_jax.training.runs.Run` of the same workdir (two epochs).
    Re-estimation uses ``reestimate_batches`` batches of the run's own batch size of the
    fixed training images of :meth:`Dataset.statistics_batches`.
    """
    if bn_stats not in BN_STATS:
        raise UserError(f"unknown bn_stats {bn_stats!r}; expected one of {BN_STATS}")
    if num_points < 0:
        raise UserError(f"num_points must be >= 0, got {num_points}")
    if dict(run_a.config) != dict(run_b.config):
        raise UserError("interpolation needs two checkpoints of the same run (same config)")
    alphas = np.linspace(0.0, 1.0, num_points + 2)
    evaluator = Evaluator(run_a.graphdef, run_a.params, run_a.batch_stats)
    test = list(run_a.dataset.test_batches(batch_size, num_examples=num_examples))
    train = []
    if bn_stats == "reestimate":
        size = run_a.config.batch_size
        train = [batch["image"] for batch in run_a.dataset.statistics_batches(
            min(reestimate_batches * size, run_a.dataset.info.num_train), size)]
    points = []
    for alpha in alphas:
        params = lerp(run_a.params, run_b.params, float(alpha))
        if bn_stats == "interpolate":
            stats = lerp(run_a.batch_stats, run_b.batch_stats, float(alpha))
        else:
            stats = bn_statistics.reestimate(run_a.graphdef, params, run_a.batch_stats,
                                             lambda: iter(train), mesh=evaluator.mesh)
        points.append(evaluator.loss_and_accuracy(test, bn_mode=bn_mode, params=params,
                                                  batch_stats=stats))
    return {
        "model": run_a.paper_name, "workdir": run_a.workdir,
        "epoch_a": run_a.epoch, "epoch_b": run_b.epoch, "bn_stats": bn_stats,
        "bn_mode": bn_mode, "num_examples": points[0]["num_examples"],
        "reestimate_batches": len(train),
        **summarize(alphas, [100.0 * p["test_accuracy"] for p in points],
                    [p["test_loss"] for p in points]),
    }


def summarize(alphas, accuracy_pct, loss) -> dict:
    """The path and its spread: variances over the interior points (the paper's number)
    and over all points, and the mean squared deviation of the interior accuracies from
    the chord between the ends (what is left when the trend from one checkpoint to the
    other is taken out)."""
    alphas, accuracy, loss = (np.asarray(v, np.float64) for v in (alphas, accuracy_pct, loss))
    chord = accuracy[0] + alphas * (accuracy[-1] - accuracy[0])
    interior = len(alphas) > 2
    return {
        "alphas": alphas.tolist(), "test_accuracy_pct": accuracy.tolist(),
        "test_loss": loss.tolist(),
        "accuracy_var_interior": float(np.var(accuracy[1:-1])) if interior else None,
        "accuracy_var_all": float(np.var(accuracy)),
        "accuracy_detrended_msd": (float(np.mean((accuracy - chord)[1:-1] ** 2))
                                   if interior else None),
        "loss_var_interior": float(np.var(loss[1:-1])) if interior else None,
        "loss_var_all": float(np.var(loss)),
        "accuracy_min_pct": float(accuracy.min()),
    }


def plot(results):
    """Accuracy and loss against alpha: a colour per run and epoch pair, solid lines for
    interpolated BN statistics, dashed for re-estimated ones."""
    fig, (ax_acc, ax_loss) = new_figure(1, 2, figsize=(12, 4.2))
    colors = {}
    for r in results:
        key = (r["model"], r["workdir"], r["epoch_a"], r["epoch_b"])
        colors.setdefault(key, f"C{len(colors)}")
        style = "-" if r["bn_stats"] == "interpolate" else "--"
        var = r["accuracy_var_interior"]
        label = (f"{r['model']} ep {r['epoch_a']}->{r['epoch_b']}, BN {r['bn_stats']}"
                 + ("" if var is None else f" (var {var:.2f})"))
        for ax, key_ in ((ax_acc, "test_accuracy_pct"), (ax_loss, "test_loss")):
            ax.plot(r["alphas"], r[key_], style, color=colors[key], marker="o", ms=3,
                    label=label)
    ax_acc.set(xlabel="alpha", ylabel="test accuracy (%)",
               title="Between two checkpoints (var: of the interior accuracies, %²)")
    ax_loss.set(xlabel="alpha", ylabel="test loss")
    ax_loss.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
    return fig
