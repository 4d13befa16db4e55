"""Per-epoch records of a run beyond ``metrics.jsonl``, computed from its saved checkpoints:
does the "-R" collapse of normalized adder kernels persist as training lengthens, and how
far have AWN's ``nu``/``upsilon`` moved?

For each saved epoch: clean accuracy on a fixed set of test images in mixed batches under
every evaluation BN mode with the trained statistics, the same under ``tracked`` and
``running-mean`` with statistics re-estimated (:mod:`awn_jax.bn_statistics`), and AWN's
``|nu - 1|`` and ``|upsilon|`` per layer (mean and max). Each epoch's record is kept in
``<workdir>/records/`` keyed by the weights and the settings, so records are added while
a run trains and a killed collection loses at most one epoch. For AWN, a plain
extrapolation of that movement to the paper's 400 epochs (:func:`extrapolate_awn_movement`).
"""

from __future__ import annotations

import dataclasses
import json
import os

import ml_collections
import numpy as np

from awn_jax import names, reports
from awn_jax.bn_statistics import BNStats
from awn_jax.config import PAPER_EPOCHS
from awn_jax.model import named_leaves
from awn_jax.nn.batchnorm import EVAL_BN_MODES
from awn_jax.reports import new_figure
from awn_jax.training import checkpointing
from awn_jax.training.optimizer import learning_rate_schedule
from awn_jax.training.runs import load_run

REESTIMATED_MODES = ("tracked", "running-mean")
MOVEMENT_MEASURES = {"nu_max": "max abs(nu - 1)", "upsilon_max": "max abs(upsilon)",
                     "nu_mean": "mean abs(nu - 1)", "upsilon_mean": "mean abs(upsilon)"}


@dataclasses.dataclass(frozen=True)
class RecordSettings:
    """What every epoch's record measures: the first ``test_examples`` of the fixed test
    order in batches of ``batch_size``; ``bn_stats`` the re-estimated statistics."""

    test_examples: int = 2000
    batch_size: int = 500
    bn_stats: BNStats = BNStats("reestimate", num_images=2000)


def awn_movement(params) -> dict | None:
    """``|nu - 1|`` and ``|upsilon|`` per AWN layer (mean and max over channels) and their
    maxima over all layers; None for a model without AWN."""
    leaves = named_leaves(params)
    layers = sorted(name[: -len(".nu")] for name in leaves if name.endswith(".nu"))
    if not layers:
        return None
    rows = []
    for layer in layers:
        nu = np.abs(np.asarray(leaves[f"{layer}.nu"], np.float64) - 1)
        upsilon = np.abs(np.asarray(leaves[f"{layer}.upsilon"], np.float64))
        rows.append({"layer": layer, "nu_mean": float(nu.mean()), "nu_max": float(nu.max()),
                     "upsilon_mean": float(upsilon.mean()),
                     "upsilon_max": float(upsilon.max())})
    return {"layers": rows, "nu_max": max(r["nu_max"] for r in rows),
            "upsilon_max": max(r["upsilon_max"] for r in rows),
            "nu_mean": float(np.mean([r["nu_mean"] for r in rows])),
            "upsilon_mean": float(np.mean([r["upsilon_mean"] for r in rows]))}


def record_epoch(run, settings: RecordSettings = RecordSettings(), evaluator=None) -> dict:
    """One epoch's record (accuracies in [0, 1]). ``evaluator``: one of another checkpoint
    of the same run, whose compiled programs then serve this one too."""
    evaluator = evaluator or run.evaluator
    images, labels = run.test_set(settings.test_examples, multiple_of=settings.batch_size)
    reestimated = run.with_bn_stats(settings.bn_stats)

    def accuracy(model, mode):
        return evaluator.accuracy(images, labels, batch_size=settings.batch_size,
                                  bn_mode=mode, params=model.params,
                                  batch_stats=model.batch_stats)

    return {
        "epoch": run.epoch, "num_examples": len(images),
        "trained": {mode: accuracy(run, mode) for mode in EVAL_BN_MODES},
        "reestimated": {mode: accuracy(reestimated, mode) for mode in REESTIMATED_MODES},
        "awn": awn_movement(run.params),
    }


def records_dir(workdir: str) -> str:
    """Where a run's per-epoch records are kept, one ``epoch-<N>.json`` each."""
    return os.path.join(workdir, "records")


def is_recorded(workdir: str, epoch: int) -> bool:
    return os.path.exists(os.path.join(records_dir(workdir), f"epoch-{epoch}.json"))


def collect(workdir: str, settings: RecordSettings = RecordSettings(), epochs=None,
            data_dir: str | None = None, progress=None) -> dict:
    """The records of ``epochs`` (default: every saved or recorded one) of a run, each
    computed once and then read from ``<workdir>/records/``. An epoch whose checkpoint is
    gone (a fresh machine holds only the resume archive's) keeps the record made from it
    with these settings."""
    key = {"settings": dataclasses.asdict(settings)}
    saved = checkpointing.saved_epochs(workdir)
    recorded = _recorded(workdir, key)
    epochs = sorted(set(saved) | set(recorded)) if epochs is None else list(epochs)
    records, evaluator = [], None
    for epoch in epochs:
        if epoch not in saved and epoch in recorded:
            records.append(recorded[epoch])
            continue
        run = load_run(workdir, epoch, data_dir)
        evaluator = evaluator or run.evaluator
        records.append(reports.cached(
            records_dir(workdir), f"epoch-{epoch}",
            {**key, "weights_sha256": run.weights_sha256},
            lambda run=run: record_epoch(run, settings, evaluator)))
        if progress is not None:
            progress(epoch)
    config = checkpointing.load_config_dict(workdir)
    return {"model": names.paper_name(config["layer_type"]), "workdir": workdir,
            "settings": dataclasses.asdict(settings), "records": records,
            "awn_extrapolation": extrapolate_awn_movement(records, config)}


def _recorded(workdir: str, key: dict) -> dict[int, dict]:
    """The records kept in ``<workdir>/records/`` with ``key``'s settings, by epoch."""
    folder = records_dir(workdir)
    settings = json.loads(json.dumps(key["settings"]))  # as the saved JSON reads back
    found = {}
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        if name.startswith("epoch-") and name.endswith(".json"):
            with open(os.path.join(folder, name)) as f:
                saved = json.load(f)
            if saved.get("settings") == settings:
                found[saved["results"]["epoch"]] = saved["results"]
    return found


def cumulative_learning_rate(config: dict, num_epochs: int | None = None,
                             resolution: int = 100) -> np.ndarray:
    """The learning rate summed over training up to the end of each epoch, in units of
    rate x epochs (the schedule of ``config``, over ``num_epochs`` when given), sampled
    ``resolution`` times an epoch: exact for the official per-epoch cosine."""
    config = ml_collections.ConfigDict(dict(config))
    if num_epochs is not None:
        config.num_epochs = num_epochs
    schedule = learning_rate_schedule(config, resolution)
    rates = np.asarray(schedule(np.arange(config.num_epochs * resolution)), np.float64)
    return np.cumsum(rates.reshape(config.num_epochs, resolution).mean(axis=1))


def extrapolate_awn_movement(records, config: dict, target_epochs: int = PAPER_EPOCHS,
                             first_epoch: int = 10) -> dict | None:
    """A plain extrapolation, to be labelled as one: each measure of AWN's movement (max and
    mean of ``|nu - 1|`` and ``|upsilon|``) fitted as a power of the cumulative learning rate
    (least squares in log-log over the records from ``first_epoch`` on: nu and upsilon step
    by the rate times their gradient, so the cumulative rate is their clock), then read at
    the cumulative rate of ``target_epochs`` of the same schedule. It assumes that movement
    depends on the rate's sum only, not on when the rate was spent. None without AWN or
    with fewer than three records to fit."""
    fitted = sorted((r for r in records if r["awn"] and r["epoch"] >= first_epoch),
                    key=lambda r: r["epoch"])
    if len(fitted) < 3:
        return None
    clock = cumulative_learning_rate(config)
    x = np.log([clock[r["epoch"] - 1] for r in fitted])
    target = float(cumulative_learning_rate(config, target_epochs)[-1])
    measures = {}
    for measure in MOVEMENT_MEASURES:
        exponent, intercept = np.polyfit(x, np.log([r["awn"][measure] for r in fitted]), 1)
        measures[measure] = {
            "exponent": float(exponent), "measured": fitted[-1]["awn"][measure],
            "fitted": float(np.exp(intercept + exponent * x[-1])),
            "extrapolated": float(np.exp(intercept) * target ** exponent)}
    return {"fit_epochs": [fitted[0]["epoch"], fitted[-1]["epoch"]],
            "target_epochs": target_epochs,
            "cumulative_learning_rate": {"last": float(clock[fitted[-1]["epoch"] - 1]),
                                         "target": target},
            "measures": measures}


def _gapped(epochs, values):
    """``(epochs, values)`` with a NaN between epochs that do not follow each other, so a
    plotted line breaks where records are missing instead of bridging them."""
    xs, ys = [], []
    for epoch, value in zip(epochs, values):
        if xs and epoch > xs[-1] + 1:
            xs.append(np.nan)
            ys.append(np.nan)
        xs.append(epoch)
        ys.append(value)
    return xs, ys


def plot(results):
    """One panel per run: accuracy per epoch under each mode with the trained statistics
    and "-R" with re-estimated ones (lines broken where epochs have no record); and a panel
    of AWN's largest ``|nu - 1|`` and ``|upsilon|``. Two panels to a row, the accuracy axes
    shared."""
    rows = (len(results) + 2) // 2
    fig, axes = new_figure(rows, 2, figsize=(14, 4.5 * rows), squeeze=False)
    axes = list(axes.flat)
    run_axes, ax_awn = axes[:len(results)], axes[len(results)]
    for ax in axes[len(results) + 1:]:
        ax.remove()
    styles = {"tracked": "-", "running-mean": "--", "running": ":"}
    for i, (r, ax) in enumerate(zip(results, run_axes)):
        color, epochs = f"C{i}", [rec["epoch"] for rec in r["records"]]
        for mode, style in styles.items():
            ax.plot(*_gapped(epochs, [100 * rec["trained"][mode] for rec in r["records"]]),
                    style, color=color, lw=1.5, marker=".", ms=2, label=mode)
        ax.plot(*_gapped(epochs, [100 * rec["reestimated"]["running-mean"]
                                  for rec in r["records"]]),
                "-.", color=color, lw=1, marker=".", label="running-mean, re-estimated statistics")
        ax.set(xlabel="epoch", ylabel="clean test accuracy (%)",
               title=f"{r['model']} per epoch, by BN mode and statistics")
        if all(rec["awn"] for rec in r["records"]):
            ax_awn.plot(*_gapped(epochs, [rec["awn"]["nu_max"] for rec in r["records"]]), "-",
                        color=color, label=f"{r['model']} max |nu - 1|")
            ax_awn.plot(*_gapped(epochs, [rec["awn"]["upsilon_max"] for rec in r["records"]]),
                        "--", color=color, label=f"{r['model']} max |upsilon|")
    for ax in run_axes[1:]:
        ax.sharex(run_axes[0])
        ax.sharey(run_axes[0])
    ax_awn.set(xlabel="epoch", ylabel="distance from the start (nu = 1, upsilon = 0)",
               title="AWN's adaptive parameters")
    for ax in (*run_axes, ax_awn):
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def defense_gaps(results, parts: int = 4) -> list[dict]:
    """How far "-R" (``running-mean``) lies from ``tracked``, in points, with the trained and
    with re-estimated statistics, over each of ``parts`` equal stretches of the longest run.
    Only the epochs every run has a record of count, so the runs are compared on the same
    epochs. Per stretch and run: the mean, the range and on how many epochs "-R" is below."""
    if not all(r["records"] for r in results):
        return []
    last = max(rec["epoch"] for r in results for rec in r["records"])
    by_epoch = [{rec["epoch"]: rec for rec in r["records"]} for r in results]
    common = sorted(set.intersection(*(set(records) for records in by_epoch)))
    rows = []
    for part in range(parts):
        first, end = part * last // parts + 1, (part + 1) * last // parts
        epochs = [e for e in common if first <= e <= end]
        if not epochs:
            continue
        runs = {}
        for r, records in zip(results, by_epoch):
            runs[r["model"]] = {stats: _gap_stats(
                [100 * (records[e][stats]["running-mean"] - records[e][stats]["tracked"])
                 for e in epochs]) for stats in ("trained", "reestimated")}
        rows.append({"epochs": [first, end], "recorded": epochs, "runs": runs})
    return rows


def _gap_stats(gaps) -> dict:
    return {"mean": float(np.mean(gaps)), "min": float(min(gaps)), "max": float(max(gaps)),
            "below": sum(g < 0 for g in gaps)}


def format_defense_gaps(rows) -> list[str]:
    """:func:`defense_gaps` as a Markdown table: a stretch of training a line."""
    if not rows:
        return []
    models = list(rows[0]["runs"])
    head = [f"{m}, {label}" for label in ("running averages", "re-estimated") for m in models]
    lines = ['"-R" minus `tracked` (points: mean over the epochs, range, epochs below):', "",
             "| epochs (records) | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    for row in rows:
        cells = [row["runs"][m][stats] for stats in ("trained", "reestimated") for m in models]
        lines.append(f"| {row['epochs'][0]}-{row['epochs'][1]} ({len(row['recorded'])}) | "
                     + " | ".join(f"{c['mean']:+.2f} ({c['min']:+.2f} to {c['max']:+.2f}), "
                                  f"{c['below']} below" for c in cells) + " |")
    return lines + [""]


def format_markdown(results) -> str:
    """One table per run (an epoch a line), then :func:`defense_gaps` of the runs."""
    lines = []
    for r in results:
        awn = all(rec["awn"] for rec in r["records"])
        lines += [f"### {r['model']} (`{r['workdir']}`)", "",
                  "| epoch | tracked | running-mean | running | tracked, re-est. "
                  "| running-mean, re-est. |"
                  + (" max abs(nu-1) | max abs(upsilon) |" if awn else ""),
                  "|" + "---|" * (6 + 2 * awn)]
        for rec in r["records"]:
            cells = [rec["trained"][m] for m in EVAL_BN_MODES] + [
                rec["reestimated"][m] for m in REESTIMATED_MODES]
            lines.append(f"| {rec['epoch']} | " + " | ".join(f"{100 * c:.2f}" for c in cells)
                         + (f" | {rec['awn']['nu_max']:.4f} | {rec['awn']['upsilon_max']:.4f} |"
                            if awn else " |"))
        lines.append("")
        if r.get("awn_extrapolation"):
            lines += format_extrapolation(r["awn_extrapolation"])
    return "\n".join(lines + format_defense_gaps(defense_gaps(results)))


def format_extrapolation(extrapolation) -> list[str]:
    """The extrapolation's Markdown lines, saying what it is."""
    first, last = extrapolation["fit_epochs"]
    clock = extrapolation["cumulative_learning_rate"]
    lines = [f"A plain extrapolation, not a measurement: each measure fitted as a power of the "
             f"cumulative learning rate over epochs {first}-{last} (cumulative rate "
             f"{clock['last']:.2f} at epoch {last}), read at {clock['target']:.2f}, the "
             f"cumulative rate of {extrapolation['target_epochs']} epochs of the same schedule.",
             "", "| measure | at epoch %d | fit | exponent | extrapolated to %d epochs |" % (
                 last, extrapolation["target_epochs"]), "|---|---|---|---|---|"]
    for measure, m in extrapolation["measures"].items():
        lines.append(f"| {MOVEMENT_MEASURES[measure]} | {m['measured']:.4f} | {m['fitted']:.4f} | "
                     f"{m['exponent']:.2f} | {m['extrapolated']:.3f} |")
    return lines + [""]
