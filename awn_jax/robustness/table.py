"""Accuracy under white-box attacks for trained runs x BatchNorm statistics modes.

The attacker sees the model as deployed: gradients go through the same BN mode that scores
the adversarial images, on the same batch (in ``running-mean``/``running`` the logits of
one image depend on the whole batch, for the attacker and for the scorer alike). Each
(BN mode, attack, settings) is compiled once and reused for every batch.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import tqdm

from awn_jax import reports
from awn_jax.model import architecture_options
from awn_jax.nn import counting
from awn_jax.nn.batchnorm import check_bn_modes
from awn_jax.robustness import attacks, autoattack

__all__ = ["evaluate_run", "format_table", "write_report"]

# Each column's random key (attacks.named_key): frozen, the column's position in the full
# table when keys were positional, so a table of one attack gets the numbers it has there.
KEY_IDS = {"clean": 0, "fgsm": 1, "bim": 2, "pgd": 3, "mim": 4, "rfgsm": 5}


def evaluate_run(run, attack_names, bn_modes, *, eps=None, steps=None, step_size=None,
                 batch_size=500, num_examples=None, seed=0, show_progress=True,
                 cache_dir: str | None = None) -> list[dict]:
    """One row per BN mode: clean accuracy and accuracy under each attack, in [0, 1], on
    the first ``num_examples`` test examples in batches of ``batch_size`` (the last one
    smaller when they do not divide). With a ``cache_dir``, each cell (BN mode, attack) is
    saved when done and reused by a later call with the same weights and settings, so a
    killed table loses only the cell in progress."""
    settings = {"eps": eps, "steps": steps, "step_size": step_size}
    configured = {name: attacks.configured(attacks.check_attack_name(name), **settings)
                  for name in attack_names}
    check_bn_modes(bn_modes)
    images, labels = run.test_set(num_examples)
    full = len(images) - len(images) % batch_size
    parts = [(slice(0, full), batch_size), (slice(full, None), len(images) - full)]
    cost = counting.count_architecture(run.config.model, run.config.layer_type,
                                       num_classes=run.dataset.info.num_classes,
                                       image_size=run.config.image_size,
                                       **architecture_options(run.config))
    batches = sum(len(labels[rows]) // size for rows, size in parts if labels[rows].size)

    def cell(mode, name, progress):
        """Accuracy of one (BN mode, attack) cell; ``name`` None: clean."""
        attack, args = configured.get(name, (None, ()))
        key = attacks.named_key(seed, name or "clean", KEY_IDS)
        correct = 0
        for part, (rows, size) in enumerate(parts):
            if labels[rows].size:  # the smaller last batch gets keys of its own
                predictions = run.evaluator.predictions(
                    images[rows], labels[rows], batch_size=size, bn_mode=mode,
                    attack=attack, attack_args=args, key=jax.random.fold_in(key, part),
                    on_batches=progress.update)
                correct += int(np.sum(predictions.reshape(-1) == labels[rows]))
        return correct / len(images)

    def cell_settings(name) -> dict:
        """What a cached cell's number depends on besides its BN mode."""
        attack, args = configured.get(name, (None, ()))
        settings = {"run": run.label, "weights_sha256": run.weights_sha256,
                    "bn_stats": run.bn_stats.label(), "num_examples": len(images),
                    "batch_size": batch_size, "seed": seed,
                    "attack": None if attack is None else {
                        "name": attack.name, "steps": attack.steps, "eps": args[0],
                        "step_size": args[1]}}
        if name == "square":
            settings["square_corners"] = autoattack.SQUARE_CORNERS
        return settings

    def cached_cell(mode, name, progress):
        if cache_dir is None:
            return cell(mode, name, progress)
        computed = []

        def compute():
            computed.append(name)
            return cell(mode, name, progress)

        accuracy = reports.cached(
            cache_dir, reports.portable_stem(f"{run.label}-{mode}-{name or 'clean'}"),
            {"settings": cell_settings(name)}, compute)
        if not computed:  # read back: the bar moves as if it had been evaluated
            progress.update(batches)
        return accuracy

    accuracy = {mode: {} for mode in bn_modes}
    with tqdm.tqdm(total=len(bn_modes) * (1 + len(attack_names)) * batches,
                   disable=not show_progress, desc=run.label, unit="batch") as progress:
        for mode in bn_modes:
            for name in (None, *attack_names):
                progress.set_postfix_str(f"{mode}: {name or 'clean'}")
                accuracy[mode][name or "clean"] = cached_cell(mode, name, progress)
    return [{"model": run.architecture, "layer_type": run.config.layer_type,
             "workdir": run.workdir, "epoch": run.epoch,
             "bn_stats": run.bn_stats.label(), "bn_mode": mode,
             "num_examples": len(images), "mul": cost.mul, "add": cost.add,
             **accuracy[mode], "settings": {k: v for k, v in settings.items() if v is not None}}
            for mode in bn_modes]


def run_label(workdir: str) -> str:
    """A short name of the run a row is about: a shipped model's name, or a workdir's last
    two path components (``cpu-10ep/adder-awn``)."""
    if workdir.startswith("pretrained:"):
        return workdir.removeprefix("pretrained:")
    return "/".join(os.path.normpath(workdir).split(os.sep)[-2:])


def format_table(rows, attack_names) -> str:
    """A Markdown table like the paper's Table 1: accuracies in % with their binomial
    standard errors, one line per run x BN mode; a column names the BN statistics when some
    row's are not the trained ones."""
    stats = any(row.get("bn_stats", "trained") != "trained" for row in rows)
    header = ["run", "model", *(["BN stats"] if stats else []), "BN mode", "clean",
              *attack_names, "#Mul", "#Add"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        n = row["num_examples"]
        cells = [run_label(row["workdir"]), row["model"],
                 *([row.get("bn_stats", "trained")] if stats else []), row["bn_mode"],
                 *(reports.percent_cell(row[name], n) for name in ("clean", *attack_names)),
                 f"{row['mul'] / 1e6:.2f}M", f"{row['add'] / 1e6:.2f}M"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(rows, attack_names, output_dir: str, stem: str = "robustness",
                 appendix: str = "") -> str:
    """Write ``<stem>.json`` and ``<stem>.md`` (the table, then ``appendix``) into
    ``output_dir``; returns the Markdown."""
    markdown = format_table(rows, attack_names) + (f"\n\n{appendix}" if appendix else "")
    reports.write(output_dir, stem, rows, markdown)
    return markdown
