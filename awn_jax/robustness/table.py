"""Accuracy under white-box attacks for trained runs x BatchNorm statistics modes.

The attacker sees the model as deployed: gradients go through the same BN mode that scores
the adversarial images, on the same batch (in ``running-mean``/``running`` the logits of
one image depend on the whole batch, for the attacker and for the scorer alike). Each
(BN mode, attack, settings) is compiled once and reused for every batch.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import tqdm

from awn_jax import attacks, counting
from awn_jax.nn.batchnorm import BN_MODES
from awn_jax.state import apply_model, with_bn_mode

# Every mode but "train", which would update the running statistics while evaluating.
EVAL_BN_MODES = tuple(mode for mode in BN_MODES if mode != "train")


def check_bn_modes(bn_modes) -> tuple[str, ...]:
    """``bn_modes`` as a tuple, or a clear error for a mode that is not an evaluation mode."""
    for mode in bn_modes:
        if mode not in EVAL_BN_MODES:
            raise ValueError(f"unknown evaluation BN mode {mode!r}; expected one of "
                             f"{EVAL_BN_MODES}")
    return tuple(bn_modes)


def _correct(graphdef, attack_name, settings, params, batch_stats, images, labels, key):
    """Number of examples still classified correctly after the attack (None: clean)."""
    def logits_fn(x):
        return apply_model(graphdef, params, batch_stats, x)[0]

    if attack_name is not None:
        images = attacks.attack(attack_name, logits_fn, images, labels, key=key, **settings)
    return jnp.sum(jnp.argmax(logits_fn(images), -1) == labels)


def evaluate_run(run, attack_names, bn_modes, *, eps=None, steps=None, step_size=None,
                 batch_size=500, num_examples=None, seed=0, show_progress=True) -> list[dict]:
    """One row per BN mode: clean accuracy and accuracy under each attack, in [0, 1]."""
    settings = {"eps": eps, "steps": steps, "step_size": step_size}
    for name in attack_names:
        attacks.check_attack_name(name)
    check_bn_modes(bn_modes)
    compiled = {
        (mode, name): jax.jit(functools.partial(
            _correct, with_bn_mode(run.graphdef, run.params, run.batch_stats, mode), name,
            settings))
        for mode in bn_modes for name in (None, *attack_names)}
    counts = {mode: {name: 0 for name in ("clean", *attack_names)} for mode in bn_modes}
    total = 0
    batches = run.dataset.test_batches(batch_size, num_examples=num_examples)
    num_batches = -(-min(num_examples or run.dataset.info.num_test,
                         run.dataset.info.num_test) // batch_size)
    cost = counting.count_architecture(run.config.model, run.config.layer_type,
                                       num_classes=run.dataset.info.num_classes,
                                       image_size=run.config.image_size)
    with tqdm.tqdm(total=num_batches * len(compiled), disable=not show_progress,
                   desc=run.name, unit="eval") as progress:
        for index, batch in enumerate(batches):
            images, labels = jnp.asarray(batch["image"]), jnp.asarray(batch["label"])
            total += len(labels)
            for mode in bn_modes:
                for position, name in enumerate((None, *attack_names)):
                    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), index),
                                             position)
                    correct = compiled[mode, name](run.params, run.batch_stats, images, labels,
                                                   key)
                    counts[mode][name or "clean"] += int(correct)
                    progress.update()
    return [{"model": run.name, "workdir": run.workdir, "epoch": run.epoch, "bn_mode": mode,
             "num_examples": total, "mul": cost.mul, "add": cost.add,
             **{name: counts[mode][name] / total for name in counts[mode]},
             "settings": {k: v for k, v in settings.items() if v is not None}}
            for mode in bn_modes]


def format_table(rows, attack_names) -> str:
    """A Markdown table like the paper's Table 1 (accuracies in %)."""
    header = ["model", "BN mode", "clean", *attack_names, "#Mul", "#Add"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["model"], row["bn_mode"], f"{100 * row['clean']:.2f}",
                 *(f"{100 * row[name]:.2f}" for name in attack_names),
                 f"{row['mul'] / 1e6:.2f}M", f"{row['add'] / 1e6:.2f}M"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(rows, attack_names, output_dir: str, stem: str = "robustness") -> str:
    """Write ``<stem>.json`` and ``<stem>.md`` into ``output_dir``; returns the table."""
    table = format_table(rows, attack_names)
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, f"{stem}.json"), "w") as f:
        json.dump(rows, f, indent=2)
    with open(os.path.join(output_dir, f"{stem}.md"), "w") as f:
        f.write(table + "\n")
    return table
