"""What the stability studies share: the paper's names of runs."""

from __future__ import annotations

import os

LAYER_TYPE_LABELS = {"conv": "CNN", "adder": "ANN", "adder-ws": "ANN-WS", "adder-awn": "ANN-AWN"}


def run_label(config) -> str:
    """The paper's name of a run's model (CNN, ANN, ANN-WS, ANN-AWN)."""
    return LAYER_TYPE_LABELS.get(config["layer_type"], config["layer_type"])


def unique_labels(labels, workdirs) -> list[str]:
    """``labels``, with the workdir's base name appended where two runs share one."""
    return [f"{label} ({os.path.basename(os.path.normpath(w))})" if labels.count(label) > 1
            else label for label, w in zip(labels, workdirs)]
