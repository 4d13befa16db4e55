"""Robustness beyond the single table: PGD sweeps (the paper's Fig. 2a/2b) and how much of
the robustness of the batch-statistics BatchNorm modes comes from the batch.

Under ``running-mean`` (the paper's robust inference, Eq. 17) and ``running`` an image's
logits depend on every other image of its evaluation batch; under ``tracked`` they do not,
so ``tracked`` is the control in every study here. What an accuracy "under attack" means
then depends on what the attacker controls. The threat models measured:

* **joint** (the standard evaluation, ``awn_jax.robustness``): the attacker perturbs the
  whole batch at once and differentiates through the shared batch statistics. Each
  example's perturbation is optimized together with those of its batch mates.
* **partial** (:func:`batch_study`, ``attacked`` < batch size): the attacker controls only
  ``k`` images of each batch; the other images stay clean, as when a deployment batches one
  user's query with other users' clean traffic. The attack is the unchanged white-box
  attack on the logits of its ``k`` images *as computed inside the full batch* (gradients
  still pass through the batch statistics, which the clean images dominate), and accuracy
  is measured on those ``k`` images only.
* **transfer from tracked** (``attack_bn_mode="tracked"``): the perturbation is crafted on
  the per-example model (tracked statistics) and scored under the batch mode, as by an
  attacker who does not model the batch; if this is stronger than the white-box attack,
  the batch mode hides gradients rather than removing adversarial directions.

And two properties of the deployment itself, without an attacker: accuracy as a function
of the evaluation batch size (at batch size 1 the classifier's BatchNorm under a batch mode
subtracts the image's own logits, so every image gets the same prediction), and the
spread of accuracy and per-example predictions over random re-partitions of the same
examples into batches.

All evaluations run through :class:`Evaluator`: a chunk of the test set is reshaped into
``(groups, batch, ...)`` and the per-batch attack-and-score function is ``jax.vmap``-ed over
the groups, so every group has its own batch statistics and small batches still run as one
large computation. Every study uses the same first ``N`` examples of the fixed test order,
with ``N`` a multiple of the largest batch size of the study.
"""

from __future__ import annotations

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from awn_jax import attacks
from awn_jax.robustness import check_bn_modes
from awn_jax.state import apply_model, with_bn_mode

SWEEP_EPS = tuple(np.round(np.linspace(0.01, 0.1, 10), 4))
SWEEP_STEPS = (1, 2, 5, 10, 20, 50)
BATCH_SIZES = (1, 8, 32, 128, 512)


def run_label(run) -> str:
    """The workdir's last component: distinguishes two runs of the same architecture."""
    return os.path.basename(os.path.normpath(run.workdir))


def load_test_set(run, num_examples: int | None, multiple_of: int = 1):
    """The first ``num_examples`` test examples (all when None) of the fixed test order as
    numpy arrays, cut to a multiple of ``multiple_of`` so every batch is full."""
    total = min(num_examples or run.dataset.info.num_test, run.dataset.info.num_test)
    total -= total % multiple_of
    if total == 0:
        raise ValueError(f"need at least {multiple_of} test examples for batches of "
                         f"{multiple_of}")
    batches = list(run.dataset.test_batches(min(total, 1000), num_examples=total))
    return (np.concatenate([b["image"] for b in batches]),
            np.concatenate([b["label"] for b in batches]))


class Evaluator:
    """Predictions of one run, per example, under a BN mode and an attack, batch by batch.

    One compilation per (BN mode, attack, steps, attacked per batch, attack BN mode) and
    batch shape; parameters, eps and step size are traced arguments, so an eps sweep
    compiles once.
    """

    def __init__(self, run, chunk_size: int = 512):
        self.run = run
        self.chunk_size = chunk_size
        self._compiled = {}

    def _batch_fn(self, bn_mode, attack, steps, attacked, attack_bn_mode):
        key = (bn_mode, attack, steps, attacked, attack_bn_mode)
        if key not in self._compiled:
            run = self.run
            score_graph = with_bn_mode(run.graphdef, run.params, run.batch_stats, bn_mode)
            attack_graph = with_bn_mode(run.graphdef, run.params, run.batch_stats,
                                        attack_bn_mode or bn_mode)

            def one_batch(params, batch_stats, images, labels, key, eps, step_size):
                k = images.shape[0] if attacked is None else attacked

                def logits(graph, x):
                    # The attacker's k images replace the first k of the clean batch.
                    return apply_model(graph, params, batch_stats, images.at[:k].set(x))[0][:k]

                x = images[:k]
                if attack is not None:
                    x = attacks.attack(attack, functools.partial(logits, attack_graph), x,
                                       labels[:k], key=key, eps=eps, step_size=step_size,
                                       steps=steps)
                return jnp.argmax(logits(score_graph, x), axis=-1)

            self._compiled[key] = jax.jit(jax.vmap(
                one_batch, in_axes=(None, None, 0, 0, 0, None, None)))
        return self._compiled[key]

    def predictions(self, images, labels, *, batch_size: int, bn_mode: str,
                    attack: str | None = None, eps=None, step_size=None, steps=None,
                    attacked: int | None = None, attack_bn_mode: str | None = None,
                    seed: int = 0) -> np.ndarray:
        """Predicted classes, shape ``(num_batches, k)``: the batches are consecutive
        ``batch_size`` slices of ``images`` and ``k`` is ``attacked`` (the first ``k`` of
        each batch, the only ones attacked and scored) or the whole batch. The attack's
        key of batch ``i`` is ``fold_in(key(seed), i)``."""
        check_bn_modes([bn_mode] + ([attack_bn_mode] if attack_bn_mode else []))
        if len(images) % batch_size:
            raise ValueError(f"{len(images)} examples do not fill batches of {batch_size}")
        if attacked is not None and not 1 <= attacked <= batch_size:
            raise ValueError(f"attacked must be in [1, {batch_size}], got {attacked}")
        settings = {"eps": eps, "step_size": step_size, "steps": steps}
        if attack is not None:
            settings = attacks.default_settings(attack)
            settings.update({k: v for k, v in (("eps", eps), ("step_size", step_size),
                                               ("steps", steps)) if v is not None})
        fn = self._batch_fn(bn_mode, attack, settings["steps"],
                            None if attacked == batch_size else attacked, attack_bn_mode)
        groups = max(1, self.chunk_size // batch_size)
        num_batches = len(images) // batch_size
        base = jax.random.key(seed)
        start = time.perf_counter()
        out = []
        for first in range(0, num_batches, groups):
            count = min(groups, num_batches - first)
            rows = slice(first * batch_size, (first + count) * batch_size)
            keys = jax.vmap(functools.partial(jax.random.fold_in, base))(
                jnp.arange(first, first + count))
            out.append(np.asarray(fn(
                self.run.params, self.run.batch_stats,
                jnp.asarray(images[rows]).reshape(count, batch_size, *images.shape[1:]),
                jnp.asarray(labels[rows]).reshape(count, batch_size), keys,
                settings["eps"], settings["step_size"])))
        logging.info("%s: %d examples, batch %d, BN %s, attack %s %s, attacked %s, crafted "
                     "under %s: %.1f s", run_label(self.run), len(images), batch_size, bn_mode,
                     attack, settings, attacked, attack_bn_mode or bn_mode,
                     time.perf_counter() - start)
        return np.concatenate(out)

    def accuracy(self, images, labels, **kwargs) -> float:
        """Accuracy of :meth:`predictions` on the examples it scores."""
        predictions = self.predictions(images, labels, **kwargs)
        batch_size = kwargs["batch_size"]
        scored = labels.reshape(-1, batch_size)[:, :predictions.shape[1]]
        return float(np.mean(predictions == scored))


# ----------------------------------------------------------------------------- sweeps

def eps_sweep(evaluator, bn_modes, eps_values=SWEEP_EPS, *, steps=7, batch_size=500,
              num_examples=None, seed=0) -> list[dict]:
    """PGD accuracy against eps (Fig. 2a), step size eps/7 as in the paper's sweep (so 7
    steps can cross the ball once; PGD starts at a random point inside it)."""
    settings = [dict(eps=float(eps), steps=steps, step_size=float(eps) / 7)
                for eps in eps_values]
    return _pgd_sweep(evaluator, bn_modes, settings, batch_size, num_examples, seed)


def steps_sweep(evaluator, bn_modes, steps_values=SWEEP_STEPS, *, eps=attacks.DEFAULT_EPS,
                step_size=attacks.DEFAULT_STEP_SIZE, batch_size=500, num_examples=None,
                seed=0) -> list[dict]:
    """PGD accuracy against the number of steps (Fig. 2b) at the paper's eps and step;
    each steps value is its own PGD run from the same random start."""
    settings = [dict(eps=eps, steps=int(steps), step_size=step_size) for steps in steps_values]
    return _pgd_sweep(evaluator, bn_modes, settings, batch_size, num_examples, seed)


def _pgd_sweep(evaluator, bn_modes, settings, batch_size, num_examples, seed):
    """One row per (BN mode, PGD settings), with the mode's clean accuracy beside it."""
    images, labels = load_test_set(evaluator.run, num_examples, multiple_of=batch_size)
    rows = []
    for mode in check_bn_modes(bn_modes):
        common = dict(batch_size=batch_size, bn_mode=mode)
        clean = evaluator.accuracy(images, labels, **common)
        for values in settings:
            accuracy = evaluator.accuracy(images, labels, attack="pgd", seed=seed, **values,
                                          **common)
            rows.append(_sweep_row(evaluator.run, mode, len(images), batch_size, clean,
                                   **values, accuracy=accuracy))
    return rows


def _sweep_row(run, mode, num_examples, batch_size, clean, **values):
    return {"run": run_label(run), "model": run.name, "workdir": run.workdir,
            "epoch": run.epoch, "bn_mode": mode, "num_examples": num_examples,
            "batch_size": batch_size, "clean": clean, **values}


def format_sweep(rows, x: str) -> str:
    """Markdown: one row per (run, BN mode), one column per value of ``x``."""
    xs = sorted({row[x] for row in rows})
    lines = ["| run | BN mode | clean | " + " | ".join(f"{x}={v:g}" for v in xs) + " |",
             "|" + "---|" * (3 + len(xs))]
    for (label, mode), group in _grouped(rows).items():
        by_x = {row[x]: row["accuracy"] for row in group}
        lines.append(f"| {label} | {mode} | {100 * group[0]['clean']:.2f} | "
                     + " | ".join(f"{100 * by_x[v]:.2f}" if v in by_x else "" for v in xs)
                     + " |")
    return "\n".join(lines)


def _grouped(rows):
    groups = {}
    for row in rows:
        groups.setdefault((row["run"], row["bn_mode"]), []).append(row)
    return groups


def plot_sweep(rows, x: str, path: str, xlabel: str, title: str) -> None:
    """PGD accuracy (%) against ``x``, one line per (run, BN mode), saved as PNG."""
    from matplotlib.figure import Figure  # not pyplot: leaves the caller's backend alone

    fig = Figure(figsize=(5.5, 4))
    ax = fig.subplots()
    for (label, mode), group in _grouped(rows).items():
        group = sorted(group, key=lambda row: row[x])
        ax.plot([row[x] for row in group], [100 * row["accuracy"] for row in group],
                marker="o", label=f"{label} ({mode})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("PGD accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ------------------------------------------------------------------------ batch study

def batch_size_rows(evaluator, images, labels, bn_modes, batch_sizes=BATCH_SIZES, *,
                    attack="pgd", seed=0) -> list[dict]:
    """Clean and joint-attack accuracy at each evaluation batch size."""
    rows = []
    for batch_size in batch_sizes:
        for mode in check_bn_modes(bn_modes):
            common = dict(batch_size=batch_size, bn_mode=mode)
            rows.append({"run": run_label(evaluator.run), "bn_mode": mode,
                         "batch_size": batch_size, "num_examples": len(images),
                         "clean": evaluator.accuracy(images, labels, **common),
                         attack: evaluator.accuracy(images, labels, attack=attack, seed=seed,
                                                    **common)})
    return rows


def shuffle_rows(evaluator, images, labels, bn_modes, *, batch_size=128, partitions=5,
                 attack="pgd", seed=0) -> list[dict]:
    """The same examples in ``partitions`` random partitions into batches: mean and std of
    accuracy over the partitions, and the fraction of examples whose predicted class is the
    same in every partition. Under ``tracked`` the clean agreement must be 1; its attacked
    agreement measures what the attack's random start alone changes."""
    orders = [np.random.default_rng([seed, 7, p]).permutation(len(images))
              for p in range(partitions)]
    rows = []
    for mode in check_bn_modes(bn_modes):
        row = {"run": run_label(evaluator.run), "bn_mode": mode, "batch_size": batch_size,
               "partitions": partitions, "num_examples": len(images)}
        for name in ("clean", attack):
            predictions = np.empty((partitions, len(images)), np.int64)
            for p, order in enumerate(orders):
                predictions[p, order] = evaluator.predictions(
                    images[order], labels[order], batch_size=batch_size, bn_mode=mode,
                    attack=None if name == "clean" else attack, seed=seed + 1000 * (p + 1)
                ).reshape(-1)
            accuracies = np.mean(predictions == labels, axis=1)
            row[name] = {"mean": float(accuracies.mean()), "std": float(accuracies.std()),
                         "agreement": float(np.mean(np.all(predictions == predictions[0],
                                                           axis=0)))}
        rows.append(row)
    return rows


def threat_rows(evaluator, images, labels, bn_modes, *, batch_size=128, attacked=None,
                max_passes=8, attack="pgd", seed=0) -> list[dict]:
    """Attacker controlling ``k`` images per batch (each ``k`` of ``attacked``; default 1,
    10% and the whole batch), and the transfer attack crafted under ``tracked``.

    For ``k`` < batch size the batches are rotated ``min(batch/k, max_passes)`` times so
    different slots are attacked in each pass (BN statistics do not depend on the order
    within a batch); ``clean`` is the accuracy of the same examples in the same batches."""
    attacked = attacked or (1, -(-batch_size // 10), batch_size)
    rows = []
    for mode in check_bn_modes(bn_modes):
        for k in attacked:
            passes = min(batch_size // k, max_passes)
            clean, robust = [], []
            for p in range(passes):
                rolled = _rolled(images, batch_size, p * k)
                rolled_labels = _rolled(labels, batch_size, p * k)
                common = dict(batch_size=batch_size, bn_mode=mode, attacked=k)
                scored = rolled_labels.reshape(-1, batch_size)[:, :k]
                clean.append(evaluator.predictions(rolled, rolled_labels, **common) == scored)
                robust.append(evaluator.predictions(rolled, rolled_labels, attack=attack,
                                                    seed=seed + 1000 * (p + 1), **common)
                              == scored)
            rows.append(_threat_row(evaluator.run, mode, batch_size,
                                    "whole batch" if k == batch_size else f"{k} per batch",
                                    np.concatenate(clean), np.concatenate(robust), attack))
        if mode != "tracked":
            clean = evaluator.predictions(images, labels, batch_size=batch_size,
                                          bn_mode=mode) == labels.reshape(-1, batch_size)
            robust = evaluator.predictions(images, labels, batch_size=batch_size, bn_mode=mode,
                                           attack=attack, attack_bn_mode="tracked", seed=seed)
            rows.append(_threat_row(evaluator.run, mode, batch_size,
                                    "whole batch, crafted under tracked", clean,
                                    robust == labels.reshape(-1, batch_size), attack))
    return rows


def _rolled(array, batch_size, shift):
    batches = array.reshape(-1, batch_size, *array.shape[1:])
    return np.roll(batches, -shift, axis=1).reshape(array.shape)


def _threat_row(run, mode, batch_size, attacker, clean, robust, attack):
    return {"run": run_label(run), "bn_mode": mode, "batch_size": batch_size,
            "attacker": attacker, "num_attacked": int(robust.size),
            "clean": float(np.mean(clean)), attack: float(np.mean(robust))}


def batch_study(evaluator, bn_modes, *, num_examples=None, batch_sizes=BATCH_SIZES,
                batch_size=128, partitions=5, attacked=None, max_passes=8, attack="pgd",
                seed=0) -> dict:
    """All three parts on the first ``N`` test examples, ``N`` a multiple of every batch
    size used."""
    multiple = int(np.lcm.reduce([*batch_sizes, batch_size]))
    images, labels = load_test_set(evaluator.run, num_examples, multiple_of=multiple)
    return {
        "run": run_label(evaluator.run), "model": evaluator.run.name,
        "workdir": evaluator.run.workdir, "epoch": evaluator.run.epoch, "attack": attack,
        "num_examples": len(images),
        "batch_size": batch_size_rows(evaluator, images, labels, bn_modes, batch_sizes,
                                      attack=attack, seed=seed),
        "shuffle": shuffle_rows(evaluator, images, labels, bn_modes, batch_size=batch_size,
                                partitions=partitions, attack=attack, seed=seed),
        "threat": threat_rows(evaluator, images, labels, bn_modes, batch_size=batch_size,
                              attacked=attacked, max_passes=max_passes, attack=attack,
                              seed=seed),
    }


def format_batch_study(studies) -> str:
    """Markdown: the three tables of :func:`batch_study`, for one or more runs."""
    attack = studies[0]["attack"]
    sizes = sorted({row["batch_size"] for s in studies for row in s["batch_size"]})
    lines = [f"Accuracy (%) against the evaluation batch size, clean / {attack} (joint "
             "attack on the whole batch):", "",
             "| run | BN mode | N | " + " | ".join(f"B={b}" for b in sizes) + " |",
             "|" + "---|" * (3 + len(sizes))]
    for study in studies:
        for mode in dict.fromkeys(row["bn_mode"] for row in study["batch_size"]):
            cells = {row["batch_size"]: f"{100 * row['clean']:.2f} / {100 * row[attack]:.2f}"
                     for row in study["batch_size"] if row["bn_mode"] == mode}
            lines.append(f"| {study['run']} | {mode} | {study['num_examples']} | "
                         + " | ".join(cells.get(b, "") for b in sizes) + " |")
    lines += ["", "Random partitions of the same examples into batches (accuracy mean +- std "
              "over partitions, %; agreement: examples with the same prediction in every "
              "partition, %):", "",
              f"| run | BN mode | B | partitions | clean | clean agreement | {attack} | "
              f"{attack} agreement |", "|" + "---|" * 8]
    for study in studies:
        for row in study["shuffle"]:
            c, a = row["clean"], row[attack]
            lines.append(f"| {study['run']} | {row['bn_mode']} | {row['batch_size']} | "
                         f"{row['partitions']} | {100 * c['mean']:.2f} +- {100 * c['std']:.2f}"
                         f" | {100 * c['agreement']:.2f} | {100 * a['mean']:.2f} +- "
                         f"{100 * a['std']:.2f} | {100 * a['agreement']:.2f} |")
    lines += ["", "Threat models (accuracy %, on the attacked examples only):", "",
              f"| run | BN mode | B | attacker controls | attacked examples | clean | {attack} |",
              "|" + "---|" * 7]
    for study in studies:
        for row in study["threat"]:
            lines.append(f"| {study['run']} | {row['bn_mode']} | {row['batch_size']} | "
                         f"{row['attacker']} | {row['num_attacked']} | "
                         f"{100 * row['clean']:.2f} | {100 * row[attack]:.2f} |")
    return "\n".join(lines)


def plot_batch_sizes(studies, path: str) -> None:
    """Clean (dashed) and attacked (solid) accuracy against the batch size, log2 axis."""
    from matplotlib.figure import Figure  # not pyplot: leaves the caller's backend alone

    fig = Figure(figsize=(5.5, 4))
    ax = fig.subplots()
    for study in studies:
        attack = study["attack"]
        for mode in dict.fromkeys(row["bn_mode"] for row in study["batch_size"]):
            rows = [row for row in study["batch_size"] if row["bn_mode"] == mode]
            sizes = [row["batch_size"] for row in rows]
            line, = ax.plot(sizes, [100 * row[attack] for row in rows], marker="o",
                            label=f"{study['run']} ({mode}) {attack}")
            ax.plot(sizes, [100 * row["clean"] for row in rows], linestyle="--",
                    color=line.get_color())
    ax.set_xscale("log", base=2)
    ax.set_xlabel("evaluation batch size")
    ax.set_ylabel("accuracy (%), dashed: clean")
    ax.set_title("Batch dependence of BN modes")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


SWEEPS = {  # x key, axis label, title
    "eps": ("eps", "PGD-7 eps (L-inf), step eps/7", "PGD accuracy vs eps (Fig. 2a)"),
    "steps": ("steps", "PGD steps (eps 8/255, step 2/255)", "PGD accuracy vs steps (Fig. 2b)"),
}


def write_sweep(rows, x: str, output_dir: str) -> str:
    """``<x>_sweep.json``, ``.md`` and ``.png`` into ``output_dir``; returns the table."""
    key, xlabel, title = SWEEPS[x]
    stem = os.path.join(output_dir, f"{x}_sweep")
    table = format_sweep(rows, key)
    _write(stem, rows, table)
    plot_sweep(rows, key, stem + ".png", xlabel, title)
    return table


def write_batch_study(studies, output_dir: str) -> str:
    """``batch.json``, ``batch.md`` and ``batch_size.png`` into ``output_dir``; returns
    the tables."""
    tables = format_batch_study(studies)
    _write(os.path.join(output_dir, "batch"), studies, tables)
    plot_batch_sizes(studies, os.path.join(output_dir, "batch_size.png"))
    return tables


def _write(stem, obj, markdown):
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump(obj, f, indent=2)
    with open(stem + ".md", "w") as f:
        f.write(markdown + "\n")
