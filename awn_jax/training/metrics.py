"""Per-epoch metrics: one JSON line each in ``metrics.jsonl`` and TensorBoard scalars.

On resume the lines of epochs past the restored checkpoint are dropped (a run killed
between writing metrics and finishing the checkpoint), so the file of a resumed run equals
that of an uninterrupted one.
"""

from __future__ import annotations

import json
import os

import jax
from tensorboardX import SummaryWriter


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsWriter:
    """Writes on process 0 only."""

    def __init__(self, workdir: str, restored_epoch: int):
        self._active = jax.process_index() == 0
        self._path = os.path.join(workdir, "metrics.jsonl")
        if not self._active:
            return
        kept = [m for m in read_metrics(workdir) if m["epoch"] <= restored_epoch]
        with open(self._path, "w") as f:
            f.writelines(json.dumps(m) + "\n" for m in kept)
        self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, metrics: dict) -> None:
        if not self._active:
            return
        with open(self._path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        for name, value in metrics.items():
            if name != "epoch":
                self._tensorboard.add_scalar(name, value, metrics["epoch"])
        self._tensorboard.flush()

    def close(self) -> None:
        if self._active:
            self._tensorboard.close()


def plot_curves(metrics: list[dict]):
    """Loss (train dashed, test solid) and accuracy per epoch of one run: the figure every
    run writes when it stops (``curves.png``)."""
    from awn_jax.reports import new_figure

    fig, (ax_loss, ax_acc) = new_figure(1, 2, figsize=(10, 3.6))
    epochs = [m["epoch"] for m in metrics]
    for key, ax, style in (("train_loss", ax_loss, "--"), ("test_loss", ax_loss, "-"),
                           ("train_accuracy", ax_acc, "--"), ("test_accuracy", ax_acc, "-")):
        values = [m.get(key) for m in metrics]
        if all(v is not None for v in values):
            ax.plot(epochs, [100 * v if "accuracy" in key else v for v in values], style,
                    marker="o", ms=3, label=key.replace("_", " "))
    ax_loss.set(xlabel="epoch", ylabel="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def summary(metrics: list[dict]) -> str:
    """One line of a run's metrics: last and best test accuracy, total training time."""
    if not metrics:
        return "no epoch finished yet"
    last = metrics[-1]
    tested = [m for m in metrics if "test_accuracy" in m]
    text = f"{last['epoch']} epochs"
    if tested:
        best = max(tested, key=lambda m: m["test_accuracy"])
        text += (f"; test accuracy {100 * tested[-1]['test_accuracy']:.2f}% at the last epoch, "
                 f"best {100 * best['test_accuracy']:.2f}% (epoch {best['epoch']})")
    seconds = sum(m.get("epoch_seconds", 0.0) for m in metrics)
    return text + f"; {seconds / 60:.1f} min of training"
