"""Attacks and the robustness evaluations built on them.

* :mod:`.attacks` -- the attacks, pure functions of a logits function.
* :mod:`.batch_attacks` -- attacks through the batch: harm to batch mates, EOT over partners.
* :mod:`.table` -- the paper's Table 1: clean and attacked accuracy per BatchNorm mode.
* :mod:`.studies` -- sweeps of eps and steps (Fig. 2a-b) and the batch-composition study.
* :mod:`.strict` -- the strict evaluation of the batch modes (checklist, harm, controls).
"""

from awn_jax.robustness.table import evaluate_run, format_table, write_report

__all__ = ["evaluate_run", "format_table", "write_report"]
