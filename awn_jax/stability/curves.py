"""Test loss and accuracy per epoch of several runs (the paper's Fig. 1a and 2d), read
from their ``metrics.jsonl``, with how much each curve jumps between epochs."""

from __future__ import annotations

import numpy as np

from awn_jax import names
from awn_jax.errors import UserError
from awn_jax.reports import new_figure
from awn_jax.stability.common import unique_labels
from awn_jax.training import checkpointing
from awn_jax.training.metrics import read_metrics

SERIES = ("train_loss", "test_loss", "test_accuracy", "bn_mean_drift", "bn_var_drift")


def _jumps(values) -> dict:
    """Epoch-to-epoch changes: the paper's "fluctuation" of a test curve in numbers."""
    steps = np.diff(np.asarray(values, dtype=np.float64))
    if not len(steps):
        return {"mean_abs_change": None, "largest_rise": None, "largest_fall": None}
    return {"mean_abs_change": float(np.mean(np.abs(steps))),
            "largest_rise": float(max(steps.max(), 0.0)),
            "largest_fall": float(max(-steps.min(), 0.0))}


def collect(workdirs) -> list[dict]:
    """One entry per run: its per-epoch series and their jumps."""
    labels, metrics = [], []
    for workdir in workdirs:
        labels.append(names.paper_name(checkpointing.load_config_dict(workdir)["layer_type"]))
        metrics.append(read_metrics(workdir))
        if not metrics[-1]:
            raise UserError(f"{workdir} has no metrics.jsonl (or it is empty)")
    out = []
    for label, workdir, rows in zip(unique_labels(labels, workdirs), workdirs, metrics):
        series = {key: [row.get(key) for row in rows] for key in ("epoch",) + SERIES}
        out.append({"model": label, "workdir": workdir, **series,
                    "test_loss_jumps": _jumps(series["test_loss"]),
                    "test_accuracy_jumps": _jumps(series["test_accuracy"])})
    return out


def plot(results):
    """Train (dashed) and test (solid) loss, test accuracy, BN running-mean drift."""
    fig, axes = new_figure(1, 3, figsize=(14, 4))
    for r in results:
        line, = axes[0].plot(r["epoch"], r["test_loss"], "-o", ms=3, label=f"{r['model']} test")
        axes[0].plot(r["epoch"], r["train_loss"], "--", color=line.get_color(),
                     label=f"{r['model']} train")
        axes[1].plot(r["epoch"], [100 * a for a in r["test_accuracy"]], "-o", ms=3,
                     color=line.get_color(), label=r["model"])
        if all(v is not None for v in r["bn_mean_drift"]):
            axes[2].plot(r["epoch"], r["bn_mean_drift"], "-o", ms=3, color=line.get_color(),
                         label=r["model"])
    axes[0].set(xlabel="epoch", ylabel="loss", title="Loss")
    axes[1].set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy")
    axes[2].set(xlabel="epoch", ylabel="||m_e - m_(e-1)|| / ||m_e||", yscale="log",
                title="BN running-mean drift over the epoch")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig
