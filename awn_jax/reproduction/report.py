"""The campaign's report: the paper's tables with the obtained numbers beside them, the
stability figures, and a verdict on each claim, in Markdown + JSON + PNG.

Standard errors are binomial, ``sqrt(p (1 - p) / n)`` over the ``n`` test images. Under
the batch modes the images of one batch are not independent, so they are approximate.
A claim "a > b" is judged on ``d = a - b`` against ``se = sqrt(se_a^2 + se_b^2)``
(conservative: both sides are measured on the same images): **holds** if ``d > 2 se``,
**does not hold** if ``d < -2 se``, **cannot tell** otherwise. The paper states its
claims for 400-epoch models; a verdict is about this budget only.
"""

from __future__ import annotations

import collections
import dataclasses
import math

from awn_jax import names, reports
from awn_jax.reproduction import paper
from awn_jax.robustness import studies
from awn_jax.stability import curves, distributions, interpolation
from awn_jax.training import checkpointing

COLUMNS = ("clean",) + names.PAPER_ATTACKS
HEADERS = {"clean": "clean", "fgsm": "FGSM", "bim": "BIM-7", "pgd": "PGD-7", "mim": "MIM-5",
           "rfgsm": "RFGSM-5"}


def named_rows(table_rows: dict[str, list[dict]]) -> dict[str, dict]:
    """The Table-1 rows of every run and BN mode, keyed by the paper's row name."""
    return {names.row_name(layer_type, row["bn_mode"]): {**row, "layer_type": layer_type}
            for layer_type, rows in table_rows.items() for row in rows}


def _cell(row, column):
    if column not in row:
        return "-"
    return reports.percent_cell(row[column], row["num_examples"])


def _paper_cell(name, column):
    values = paper.ROWS.get(name)
    return "-" if values is None else f"{values[COLUMNS.index(column)]:.2f}"


def format_table(rows: dict[str, dict], names, budget) -> str:
    """Obtained (± SE) and the paper's accuracy, %, one line per row name."""
    lines = [f"*{budget.describe()}.*", "", "| row | BN mode | "
             + " | ".join(f"{HEADERS[c]} | paper" for c in COLUMNS)
             + " | #Mul / #Add (M) | paper |", "|" + "---|" * (4 + 2 * len(COLUMNS))]
    for name in names:
        row = rows[name]
        cells = [f"{_cell(row, c)} | {_paper_cell(name, c)}" for c in COLUMNS]
        kind = "conv" if row["layer_type"] == "conv" else "adder"
        counts = "{:.2f} / {:.2f} | {:.2f} / {:.2f}".format(
            row["mul"] / 1e6, row["add"] / 1e6, *paper.COUNTS[kind])
        lines.append(f"| {name} | {row['bn_mode']} | " + " | ".join(cells) + f" | {counts} |")
    return "\n".join(lines)


TABLE1 = ("CNN", "ANN", "ANN-WS", "ANN-AWN", "CNN-R", "ANN-R", "ANN-R-WS", "ANN-R-AWN",
          "CNN-r", "ANN-r", "ANN-r-WS", "ANN-r-AWN")
TABLE3 = ("ANN-r-WS", "ANN-r-AWN", "ANN-R-WS", "ANN-R-AWN")

# (claim, a, b, column): "row a beats row b in column", the paper's Table 1 / 3 readings.
CLAIMS = (
    ("Robust inference makes the ANN robust: ANN-R beats ANN under PGD-7", "ANN-R", "ANN",
     "pgd"),
    ("ANN-R beats CNN-R under PGD-7 (29.72 vs 3.67)", "ANN-R", "CNN-R", "pgd"),
    ("AWN adds robustness: ANN-R-AWN beats ANN-R under PGD-7 (43.39 vs 29.72)",
     "ANN-R-AWN", "ANN-R", "pgd"),
    ("AWN beats WS under -R, PGD-7 (43.39 vs 36.08)", "ANN-R-AWN", "ANN-R-WS", "pgd"),
    ("AWN beats WS under -R, clean (90.55 vs 89.38)", "ANN-R-AWN", "ANN-R-WS", "clean"),
    ("-R beats -r for AWN under PGD-7 (43.39 vs 24.27)", "ANN-R-AWN", "ANN-r-AWN", "pgd"),
    ("-R beats -r for WS under PGD-7 (36.08 vs 22.96)", "ANN-R-WS", "ANN-r-WS", "pgd"),
    ("-R beats -r for WS, clean (89.38 vs 88.10)", "ANN-R-WS", "ANN-r-WS", "clean"),
)


def verdict(a: dict, b: dict, column: str) -> dict:
    d = a[column] - b[column]
    se = math.hypot(reports.standard_error(a[column], a["num_examples"]),
                    reports.standard_error(b[column], b["num_examples"]))
    word = "holds" if d > 2 * se else "does not hold" if d < -2 * se else "cannot tell"
    return {"difference": d, "se": se, "verdict": word}


WAITING = "waits for training"


def claims(rows: dict[str, dict]) -> list[dict]:
    """Every claim's verdict; ``WAITING`` where a run it compares has not finished."""
    out = []
    for text, a, b, column in CLAIMS:
        claim = {"claim": text, "a": a, "b": b, "column": column}
        if a in rows and b in rows:
            claim.update(a_value=rows[a][column], b_value=rows[b][column],
                         **verdict(rows[a], rows[b], column))
        else:
            claim["verdict"] = WAITING
        out.append(claim)
    return out


def table_claims(rows: list[dict]) -> list[dict]:
    """The claims one Table-1 report (``evaluate.py``'s rows, any runs) can judge: those
    whose two paper rows it holds, each from one run only (two ANNs, or one model with two
    kinds of statistics, leave their rows' claims out)."""
    named = [(names.row_name(row["layer_type"], row["bn_mode"]), row) for row in rows]
    counts = collections.Counter(name for name, _ in named)
    unique = {name: row for name, row in named if counts[name] == 1}
    return [c for c in claims(unique) if c["verdict"] != WAITING]


def format_claims(found) -> str:
    lines = ["| claim | obtained (%) | difference ± SE (pp) | verdict |", "|---|---|---|---|"]
    for c in found:
        if c["verdict"] == WAITING:
            lines.append(f"| {c['claim']} | - | - | {WAITING} |")
            continue
        lines.append(f"| {c['claim']} | {c['a']} {100 * c['a_value']:.2f} vs {c['b']} "
                     f"{100 * c['b_value']:.2f} | {100 * c['difference']:+.2f} ± "
                     f"{100 * c['se']:.2f} | **{c['verdict']}** |")
    return "\n".join(lines)


def format_sweeps(sweeps: dict) -> str:
    parts = []
    for x in ("eps", "steps"):
        rows = [{**row, "run": names.row_name(t, row["bn_mode"])}
                for t, result in sweeps.items() for row in result[x]]
        if rows:
            parts += [f"PGD accuracy (%) against {x} under `running-mean` "
                      f"({rows[0]['num_examples']} test images):", "",
                      studies.format_sweep(rows, x), ""]
    quoted = [f"{name} at {x} {value:g}: {acc:.2f}%" for (x, value), entries
              in paper.SWEEPS.items() for name, acc in entries.items()]
    parts.append("The paper (Sec. 5.1): " + "; ".join(quoted) + ".")
    return "\n".join(parts)


def format_interpolation(results: dict) -> str:
    lines = ["| model | epochs | BN statistics | accuracy along the path (%) | variance of "
             "the interior (%²) | paper (%², its epochs) |", "|---|---|---|---|---|---|"]
    for layer_type, entries in results.items():
        name = names.PAPER_NAMES[layer_type]
        pairs = sorted({(e["epoch_a"], e["epoch_b"]) for e in entries})
        for e in entries:
            index = pairs.index((e["epoch_a"], e["epoch_b"]))
            quoted = paper.INTERPOLATION_VARIANCE.get(name)
            reference = "-" if quoted is None else f"{quoted[min(index, 1)]:.2f}"
            path = " ".join(f"{a:.1f}" for a in e["test_accuracy_pct"])
            var = e["accuracy_var_interior"]
            lines.append(f"| {name} | {e['epoch_a']}->{e['epoch_b']} | {e['bn_stats']} | "
                         f"{path} | {'-' if var is None else f'{var:.2f}'} | {reference} |")
    return "\n".join(lines)


def format_curves(found) -> str:
    lines = ["| model | final test accuracy (%) | final test loss | mean abs change of the "
             "test loss per epoch | largest rise |", "|---|---|---|---|---|"]
    for r in found:
        jumps = r["test_loss_jumps"]
        lines.append(f"| {r['model']} | {100 * r['test_accuracy'][-1]:.2f} | "
                     f"{r['test_loss'][-1]:.3f} | {_num(jumps['mean_abs_change'])} | "
                     f"{_num(jumps['largest_rise'])} |")
    return "\n".join(lines)


def format_epochs(found) -> str:
    """Per-epoch test accuracy (%, BN tracked) and train loss of every run, side by side."""
    names = [r["model"] for r in found]
    lines = ["| epoch | " + " | ".join(f"{n} test acc | {n} train loss" for n in names) + " |",
             "|" + "---|" * (1 + 2 * len(names))]
    for i in range(max(len(r["epoch"]) for r in found)):  # a run still training: "-"
        cells = [f"{100 * r['test_accuracy'][i]:.2f} | {r['train_loss'][i]:.3f}"
                 if i < len(r["epoch"]) else "- | -" for r in found]
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _num(value):
    return "-" if value is None else f"{value:.3f}"


def format_features(results: dict) -> str:
    lines = ["| model | layer | epoch | mean | std |", "|---|---|---|---|---|"]
    for layer_type, result in results.items():
        layer = result["feature_layers"][-1]
        for entry in result["features"]:
            stats = next(s for s in entry["layers"] if s["layer"] == layer)
            lines.append(f"| {names.PAPER_NAMES[layer_type]} | {layer} | {entry['epoch']} | "
                         f"{stats['mean']:.2f} | {stats['std']:.2f} |")
    quoted = [f"{name} epoch {epoch}: mean {m:.2f}, std {s:.2f}"
              for name, entries in paper.FEATURES.items() for epoch, (m, s) in entries.items()]
    return "\n".join(lines) + "\n\nThe paper (Sec. 5.2, 19th layer): " + "; ".join(quoted) + "."


def training_summary(workdir: str) -> str:
    """What a run trained on, from its saved config and dataset info."""
    config = checkpointing.load_config_dict(workdir)
    info = checkpointing.load_dataset_info(workdir) or {}
    subset = config["num_train_examples"] or info.get("num_train", "?")
    return (f"training data `{info.get('name', config['dataset'])}` ({subset} images), batch "
            f"{config['batch_size']}, lr {config['learning_rate']} {config['lr_schedule']}, "
            f"weight decay {config['weight_decay']}, seed {config['seed']}")


def write(report_dir: str, budget, epochs: dict, workdirs: dict, results: dict,
          command: str) -> str:
    """``report.md``, ``report.json`` and the figures into ``report_dir``; returns the
    Markdown. A run short of ``budget.epochs`` (``epochs``) is still training: its curves
    so far are shown, its rows and the claims that need them wait."""
    rows = named_rows(results["table"])
    found = claims(rows)
    training = {t: e for t, e in epochs.items() if e < budget.epochs}
    curve_results = curves.collect([w for t, w in workdirs.items() if epochs[t]])
    status = ("" if not training else "**Partial report**: still training "
              + ", ".join(f"{names.PAPER_NAMES[t]} ({e} of {budget.epochs} epochs)"
                          for t, e in training.items())
              + "; their rows and the claims that need them wait for a later call.")
    figures = {
        "curves": reports.save_figure(curves.plot(curve_results), report_dir, "curves"),
        "interpolation": reports.save_figure(
            interpolation.plot([e for v in results["interpolation"].values() for e in v]),
            report_dir, "interpolation"),
        "features": reports.save_figure(
            distributions.plot_features(list(results["distributions"].values())),
            report_dir, "features"),
        "weights": reports.save_figure(
            distributions.plot_weights(list(results["distributions"].values())),
            report_dir, "weights"),
    }
    for x, (key, xlabel, title) in studies.SWEEPS.items():
        sweep_rows = [{**row, "run": names.row_name(t, row["bn_mode"])}
                      for t, result in results["sweeps"].items() for row in result[x]]
        figures[f"{x}_sweep"] = reports.save_figure(
            studies.plot_sweep(sweep_rows, key, xlabel, title), report_dir, f"{x}_sweep")
    markdown = "\n".join([
        f"# Reproduction report: ResNet-20 on CIFAR-10, budget `{budget.name}`", "",
        f"Command: `{command}`", "", *([status, ""] if status else []),
        f"{budget.describe()}; "
        f"{training_summary(next(w for t, w in workdirs.items() if t not in training))}.", "",
        "Runs: " + ", ".join(f"{names.PAPER_NAMES[t]} `{w}` ({epochs[t]} epochs)"
                             for t, w in workdirs.items()), "",
        "## Table 1 (accuracy %, obtained ± SE | paper)", "",
        format_table(rows, [n for n in TABLE1 if n in rows], budget), "",
        "## Table 3 (WS against AWN, -r against -R)", "",
        format_table(rows, [n for n in TABLE3 if n in rows], budget), "",
        "## Claims", "", format_claims(found), "",
        "## Fig. 2a/2b: PGD sweeps", "", format_sweeps(results["sweeps"]), "",
        "![eps sweep](eps_sweep.png) ![steps sweep](steps_sweep.png)", "",
        "## Fig. 2c: between two checkpoints", "",
        format_interpolation(results["interpolation"]), "",
        "![interpolation](interpolation.png)", "",
        "## Fig. 2d: curves", "", format_curves(curve_results), "",
        format_epochs(curve_results), "", "![curves](curves.png)", "",
        "## Fig. 3: features before BatchNorm (the last layer inside the stages)", "",
        format_features(results["distributions"]), "",
        "![features](features.png) ![weights](weights.png)", "",
    ])
    reports.write(report_dir, "report", {
        "budget": dataclasses.asdict(budget), "command": command, "epochs": epochs,
        "training": training,
        "workdirs": workdirs, "claims": found, "curves": curve_results,
        "figures": figures, **results}, markdown)
    return markdown
