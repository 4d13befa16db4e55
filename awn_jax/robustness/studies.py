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

All evaluations run through the run's :class:`awn_jax.evaluation.Evaluator` (every group
of examples with its own batch statistics, spread over the devices). Every study uses the
same first ``N`` examples of the fixed test order, with ``N`` a multiple of the largest
batch size of the study.
"""

from __future__ import annotations

import functools

import numpy as np

from awn_jax import reports
from awn_jax.errors import UserError
from awn_jax.nn.batchnorm import check_bn_modes
from awn_jax.robustness import attacks

# The paper's sweeps (Fig. 2a: PGD-7 at eps 0.01..0.1; Fig. 2b: PGD steps at eps 8/255).
SWEEP_EPS = tuple(round(0.01 * i, 2) for i in range(1, 11))
SWEEP_STEPS = (1, 2, 5, 10, 20, 50)
BATCH_SIZES = (1, 8, 32, 128, 512)


def single_class_order(labels, batch_size: int) -> np.ndarray:
    """Indices putting ``labels`` into batches of ``batch_size`` holding one class each
    (each class cut to a multiple of the batch): the batch modes' worst composition."""
    rows = [idx[:len(idx) - len(idx) % batch_size]
            for idx in (np.flatnonzero(labels == c) for c in np.unique(labels))]
    rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    if not len(rows):
        raise UserError(f"no class has {batch_size} of the {len(labels)} examples for "
                        "single-class batches; use a smaller batch")
    return rows


def predictions(run, images, labels, *, attack: str | None = None, eps=None, step_size=None,
                steps=None, key=None, **kwargs) -> np.ndarray:
    """``run.evaluator.predictions`` with the attack given by name and settings (the
    paper's for those left None) and the keys drawn from ``key`` (None: the evaluator's
    default)."""
    configured = (None, ()) if attack is None else attacks.configured(
        attack, eps=eps, step_size=step_size, steps=steps)
    return run.evaluator.predictions(images, labels, attack=configured[0],
                                     attack_args=configured[1], key=key, **kwargs)


def accuracy(run, images, labels, **kwargs) -> float:
    """Accuracy of :func:`predictions` on the examples it scores."""
    predicted = predictions(run, images, labels, **kwargs)
    scored = labels.reshape(-1, kwargs["batch_size"])[:, :predicted.shape[1]]
    return float(np.mean(predicted == scored))


# ----------------------------------------------------------------------------- sweeps

def eps_sweep(run, bn_modes, eps_values=SWEEP_EPS, *, steps=7, batch_size=500,
              num_examples=None, seed=0, cache_dir: str | None = None) -> list[dict]:
    """PGD accuracy against eps (Fig. 2a), step size eps/7 as in the paper's sweep (so 7
    steps can cross the ball once; PGD starts at a random point inside it)."""
    settings = [dict(eps=float(eps), steps=steps, step_size=float(eps) / 7)
                for eps in eps_values]
    return _pgd_sweep(run, bn_modes, settings, batch_size, num_examples, seed, cache_dir)


def steps_sweep(run, bn_modes, steps_values=SWEEP_STEPS, *, eps=attacks.DEFAULT_EPS,
                step_size=attacks.DEFAULT_STEP_SIZE, batch_size=500, num_examples=None,
                seed=0, cache_dir: str | None = None) -> list[dict]:
    """PGD accuracy against the number of steps (Fig. 2b) at the paper's eps and step;
    each steps value is its own PGD run from the same random start."""
    settings = [dict(eps=eps, steps=int(steps), step_size=step_size) for steps in steps_values]
    return _pgd_sweep(run, bn_modes, settings, batch_size, num_examples, seed, cache_dir)


def _pgd_sweep(run, bn_modes, settings, batch_size, num_examples, seed, cache_dir):
    """One row per (BN mode, PGD settings), with the mode's clean accuracy beside it; with
    a ``cache_dir`` every point is saved when done and reused by a later sweep of the same
    weights and settings (a killed sweep loses one point; sweeps sharing points share
    them)."""
    images, labels = run.test_set(num_examples, multiple_of=batch_size)
    common_key = {"run": run.label, "weights_sha256": run.weights_sha256,
                  "bn_stats": run.bn_stats.label(), "num_examples": len(images),
                  "batch_size": batch_size, "seed": seed}

    def point(mode, values):
        """Accuracy under ``mode``: clean (``values`` None) or under PGD with ``values``."""
        attack = {} if values is None else dict(attack="pgd", key=attacks.root_key(seed),
                                                  **values)
        compute = functools.partial(accuracy, run, images, labels, batch_size=batch_size,
                                    bn_mode=mode, **attack)
        if cache_dir is None:
            return compute()
        name = "clean" if values is None else "pgd-eps{eps:g}-steps{steps}-step{step_size:g}"
        stem = reports.portable_stem(f"{run.label}-{mode}-{name.format(**values or {})}")
        return reports.cached(cache_dir, stem, {"settings": {**common_key, "bn_mode": mode,
                                                             "pgd": values}}, compute)

    rows = []
    for mode in check_bn_modes(bn_modes):
        clean = point(mode, None)
        for values in settings:
            rows.append(_sweep_row(run, mode, len(images), batch_size, clean,
                                   **values, accuracy=point(mode, values)))
    return rows


def _sweep_row(run, mode, num_examples, batch_size, clean, **values):
    return {"run": run.label, "model": run.architecture, "workdir": run.workdir,
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


def plot_sweep(rows, x: str, xlabel: str, title: str):
    """PGD accuracy (%) against ``x``, one line per (run, BN mode)."""
    fig, ax = reports.new_figure(figsize=(5.5, 4))
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
    return fig


# ------------------------------------------------------------------------ batch study

def batch_size_rows(run, images, labels, bn_modes, batch_sizes=BATCH_SIZES, *,
                    attack="pgd", seed=0) -> list[dict]:
    """Clean and joint-attack accuracy at each evaluation batch size."""
    rows = []
    for batch_size in batch_sizes:
        for mode in check_bn_modes(bn_modes):
            common = dict(batch_size=batch_size, bn_mode=mode)
            rows.append({"run": run.label, "bn_mode": mode,
                         "batch_size": batch_size, "num_examples": len(images),
                         "clean": accuracy(run, images, labels, **common),
                         attack: accuracy(run, images, labels, attack=attack,
                                          key=attacks.root_key(seed),
                                          **common)})
    return rows


def shuffle_rows(run, images, labels, bn_modes, *, batch_size=128, partitions=5,
                 attack="pgd", seed=0) -> list[dict]:
    """The same examples in ``partitions`` random partitions into batches: mean and std of
    accuracy over the partitions, and the fraction of examples whose predicted class is the
    same in every partition. Under ``tracked`` the clean agreement must be 1; its attacked
    agreement measures what the attack's random start alone changes."""
    orders = [np.random.default_rng([seed, 7, p]).permutation(len(images))
              for p in range(partitions)]
    rows = []
    for mode in check_bn_modes(bn_modes):
        row = {"run": run.label, "bn_mode": mode, "batch_size": batch_size,
               "partitions": partitions, "num_examples": len(images)}
        for name in ("clean", attack):
            predicted = np.empty((partitions, len(images)), np.int64)
            for p, order in enumerate(orders):
                predicted[p, order] = predictions(
                    run, images[order], labels[order], batch_size=batch_size, bn_mode=mode,
                    attack=None if name == "clean" else attack, key=pass_key(seed, p)
                ).reshape(-1)
            accuracies = np.mean(predicted == labels, axis=1)
            row[name] = {"mean": float(accuracies.mean()), "std": float(accuracies.std()),
                         "agreement": float(np.mean(np.all(predicted == predicted[0],
                                                           axis=0)))}
        rows.append(row)
    return rows


def threat_rows(run, images, labels, bn_modes, *, batch_size=128, attacked=None,
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
                clean.append(predictions(run, rolled, rolled_labels, **common) == scored)
                robust.append(predictions(run, rolled, rolled_labels, attack=attack,
                                          key=pass_key(seed, p), **common) == scored)
            rows.append(_threat_row(run, mode, batch_size,
                                    "whole batch" if k == batch_size else f"{k} per batch",
                                    np.concatenate(clean), np.concatenate(robust), attack))
        if mode != "tracked":
            clean = predictions(run, images, labels, batch_size=batch_size,
                                bn_mode=mode) == labels.reshape(-1, batch_size)
            robust = predictions(run, images, labels, batch_size=batch_size, bn_mode=mode,
                                 attack=attack, attack_bn_mode="tracked",
                                 key=attacks.root_key(seed))
            rows.append(_threat_row(run, mode, batch_size,
                                    "whole batch, crafted under tracked", clean,
                                    robust == labels.reshape(-1, batch_size), attack))
    return rows


def pass_key(seed: int, p: int):
    """The key of pass ``p`` (a partition, a rotation of the attacked slots) of the batch
    study: named, as every study's keys (``attacks.named_key``)."""
    return attacks.named_key(seed, f"pass-{p}")


def _rolled(array, batch_size, shift):
    batches = array.reshape(-1, batch_size, *array.shape[1:])
    return np.roll(batches, -shift, axis=1).reshape(array.shape)


def _threat_row(run, mode, batch_size, attacker, clean, robust, attack):
    return {"run": run.label, "bn_mode": mode, "batch_size": batch_size,
            "attacker": attacker, "num_attacked": int(robust.size),
            "clean": float(np.mean(clean)), attack: float(np.mean(robust))}


def batch_study(run, bn_modes, *, num_examples=None, batch_sizes=BATCH_SIZES,
                batch_size=128, partitions=5, attacked=None, max_passes=8, attack="pgd",
                seed=0) -> dict:
    """All three parts on the first ``N`` test examples, ``N`` a multiple of every batch
    size used."""
    multiple = int(np.lcm.reduce([*batch_sizes, batch_size]))
    images, labels = run.test_set(num_examples, multiple_of=multiple)
    return {
        "run": run.label, "model": run.architecture,
        "workdir": run.workdir, "epoch": run.epoch, "attack": attack,
        "num_examples": len(images),
        "batch_size": batch_size_rows(run, images, labels, bn_modes, batch_sizes,
                                      attack=attack, seed=seed),
        "shuffle": shuffle_rows(run, images, labels, bn_modes, batch_size=batch_size,
                                partitions=partitions, attack=attack, seed=seed),
        "threat": threat_rows(run, images, labels, bn_modes, batch_size=batch_size,
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


def plot_batch_sizes(studies):
    """Clean (dashed) and attacked (solid) accuracy against the batch size, log2 axis."""
    fig, ax = reports.new_figure(figsize=(5.5, 4))
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
    return fig


SWEEPS = {  # x key, axis label, title
    "eps": ("eps", "PGD-7 eps (L-inf), step eps/7", "PGD accuracy vs eps (Fig. 2a)"),
    "steps": ("steps", "PGD steps (eps 8/255, step 2/255)", "PGD accuracy vs steps (Fig. 2b)"),
}


def write_sweep(rows, x: str, output_dir: str) -> str:
    """``<x>_sweep.json``, ``.md`` and ``.png`` into ``output_dir``; returns the table."""
    key, xlabel, title = SWEEPS[x]
    table = format_sweep(rows, key)
    reports.write(output_dir, f"{x}_sweep", rows, table)
    reports.save_figure(plot_sweep(rows, key, xlabel, title), output_dir, f"{x}_sweep", dpi=120)
    return table


def write_batch_study(studies, output_dir: str) -> str:
    """``batch.json``, ``batch.md`` and ``batch_size.png`` into ``output_dir``; returns
    the tables."""
    tables = format_batch_study(studies)
    reports.write(output_dir, "batch", studies, tables)
    reports.save_figure(plot_batch_sizes(studies), output_dir, "batch_size", dpi=120)
    return tables


