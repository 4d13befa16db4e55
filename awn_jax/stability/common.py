"""What the stability studies share: telling runs of one model apart in a figure."""

from __future__ import annotations

import os


def unique_labels(labels, workdirs) -> list[str]:
    """``labels``, with the workdir's base name appended where two runs share one."""
    return [f"{label} ({os.path.basename(os.path.normpath(w))})" if labels.count(label) > 1
            else label for label, w in zip(labels, workdirs)]
