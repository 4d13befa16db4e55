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
