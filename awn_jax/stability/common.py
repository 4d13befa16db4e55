"""What the stability studies share: telling runs of one model apart in a figure or table."""

from __future__ import annotations

import os


def unique_labels(labels, workdirs) -> list[str]:
    """``labels``, with the workdir's base name appended where two runs share one."""
    return [f"{label} ({os.path.basename(os.path.normpath(w))})" if labels.count(label) > 1
            else label for label, w in zip(labels, workdirs)]


def relabel(results) -> list[dict]:
    """``results`` (dicts with ``model`` and ``workdir``) with distinct ``model`` labels where
    two runs share a layer type."""
    labels = unique_labels([r["model"] for r in results], [r["workdir"] for r in results])
    return [{**r, "model": label} for r, label in zip(results, labels)]
