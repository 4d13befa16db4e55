"""Stability and variance studies of training runs (the paper's Fig. 1-3, Sec. 3).

    python analyze.py --study all --workdir workdirs/cpu/r20_ann --workdir workdirs/cpu/r20_awn \
        --data_dir /work/data --num_examples 1000 --output_dir docs/figures

Studies (``--study``, comma-separated, or ``all``: the paper's, the first four):
  interpolation    accuracy/loss between checkpoints --epoch_a and --epoch_b of each run
  curves           test loss/accuracy per epoch from each run's metrics.jsonl
  distributions    weights, features before BN and BN statistics over saved epochs
  variance-theory  Monte Carlo check of Sec. 3 (needs no workdir)
  bn-diagnostics   why "-R" collapses: per BN layer the fit of the stored variances and the
                   variance gain, accuracy against scaled variances and the evaluation batch
                   (workdirs and --pretrained models; --bn_stats picks the statistics)
  epoch-records    per saved epoch: clean accuracy under every BN mode with the trained and
                   re-estimated statistics, AWN's nu/upsilon movement (--num_examples test
                   images, default 2000; statistics re-estimated as --bn_stats asks, by
                   default on 2000 images; kept in <workdir>/records/, and read from
                   there for epochs whose checkpoint is gone)
  layer-variance   Sec. 3 on a trained adder network: per adder layer the kernel, input and
                   output statistics against Eq. 7-8 (workdirs and --pretrained models)
Each writes stability_<study>.json and .png into --output_dir (default: the first workdir);
bn-diagnostics writes bn_diagnostics[+<statistics>].json/.md/.png.
"""

import dataclasses
import os

from absl import flags

from awn_jax import cli, pretrained, reports
from awn_jax.errors import UserError
from awn_jax.stability import (bn_diagnostics, common, curves, distributions, epoch_records,
                               interpolation, layer_variance, theory)
from awn_jax.training import checkpointing
from awn_jax.training.runs import load_run

STUDIES = ("interpolation", "curves", "distributions", "variance-theory", "bn-diagnostics",
           "epoch-records", "layer-variance")
# Studies of a model rather than a training run: they also take --pretrained models.
MODEL_STUDIES = ("bn-diagnostics", "layer-variance")

_STUDY = flags.DEFINE_list("study", ["all"], f"Studies to run: {', '.join(STUDIES)} or all.")
_WORKDIRS = flags.DEFINE_multi_string("workdir", [], "Training workdir(s), compared in one figure.")
_PRETRAINED = flags.DEFINE_multi_string("pretrained", [], "bn-diagnostics: shipped model(s) "
                                        "(awn_jax.pretrained), beside the workdirs.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Data location, if it moved since training.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where to write (default: first workdir).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 500, "Test batch size.", lower_bound=1)
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", None, "Test examples (default: all).",
                                     lower_bound=1)
_BN_MODE = flags.DEFINE_string("bn_mode", "tracked", "BN mode for scoring and features.")
_EPOCH_A = flags.DEFINE_integer("epoch_a", None, "Interpolation start (default: second last).",
                                lower_bound=1)
_EPOCH_B = flags.DEFINE_integer("epoch_b", None, "Interpolation end (default: last epoch).",
                                lower_bound=1)
_NUM_POINTS = flags.DEFINE_integer("num_points", 9, "Interpolated models between the ends.",
                                   lower_bound=0)
_PATH_BN_STATS = flags.DEFINE_enum(
    "path_bn_stats", "both", ["interpolate", "reestimate", "both"],
    "interpolation: BN statistics along the path (see stability.interpolation).")
_REESTIMATE_BATCHES = flags.DEFINE_integer("reestimate_batches", 10,
                                           "Training batches per BN re-estimation.", lower_bound=1)
_EPOCHS = flags.DEFINE_list("epochs", None, "Epochs for distributions (default: all saved).")
_LAYERS = flags.DEFINE_list("layers", None, "Layers for feature histograms, e.g. "
                            "stages.0.0.conv1 (default: first and last in the stages).")
_FEATURE_IMAGES = flags.DEFINE_integer("feature_images", 256, "Test images for features.",
                                       lower_bound=1)
_BINS = flags.DEFINE_integer("bins", 60, "Histogram bins.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of feature sampling and the Monte Carlo.",
                             lower_bound=0)
_BN_STATS = cli.define_bn_stats_flags()  # bn-diagnostics: the statistics diagnosed
flags.adopt_module_key_flags(cli)  # --help lists the shared flags defined there
_BN_MODES = flags.DEFINE_list("diagnostic_bn_modes", ["tracked", "running-mean"],
                              "bn-diagnostics: the BN modes whose variance ratios are measured.")
_SINGLE_CLASS_BATCH = flags.DEFINE_integer(
    "single_class_batch", 100, "bn-diagnostics: batch of the single-class (and mixed) "
    "control batches.", lower_bound=2)
_THEORY_SAMPLES = flags.DEFINE_integer("theory_samples", 20_000, "Monte Carlo draws per check.",
                                       lower_bound=1)


def _studies() -> list[str]:
    names = ([s for s in STUDIES if s not in ("bn-diagnostics", "epoch-records",
                                              "layer-variance")]
             if _STUDY.value == ["all"]
             else _STUDY.value)
    unknown = [n for n in names if n not in STUDIES]
    if unknown:
        raise UserError(f"unknown study {', '.join(unknown)}; expected one of "
                        f"{', '.join(STUDIES)} or all")
    return names


def _write(output_dir, stem, results, *figures, markdown=None) -> None:
    print(reports.write(output_dir, f"stability_{stem}", results, markdown))
    for suffix, fig in figures:
        print(reports.save_figure(fig, output_dir, f"stability_{stem}{suffix}"))


def _interpolation(workdirs, output_dir) -> None:
    modes = (interpolation.BN_STATS if _PATH_BN_STATS.value == "both"
             else (_PATH_BN_STATS.value,))
    results = []
    for workdir in workdirs:
        epochs = checkpointing.saved_epochs(workdir)
        epoch_b = _EPOCH_B.value if _EPOCH_B.value is not None else epochs[-1]
        epoch_a = _EPOCH_A.value if _EPOCH_A.value is not None else max(
            [e for e in epochs if e < epoch_b], default=None)
        if epoch_a is None:
            raise UserError(f"{workdir}: interpolation needs two checkpoints; saved: {epochs}")
        run_a = load_run(workdir, epoch_a, _DATA_DIR.value)
        run_b = load_run(workdir, epoch_b, _DATA_DIR.value)
        for mode in modes:
            results.append(interpolation.interpolate_run(
                run_a, run_b, num_points=_NUM_POINTS.value, bn_stats=mode,
                bn_mode=_BN_MODE.value, batch_size=_BATCH_SIZE.value,
                num_examples=_NUM_EXAMPLES.value, reestimate_batches=_REESTIMATE_BATCHES.value))
            r = results[-1]
            print(f"{r['model']} {r['epoch_a']}->{r['epoch_b']} BN {mode}: accuracy % "
                  + " ".join(f"{a:.2f}" for a in r["test_accuracy_pct"])
                  + f"; variance of the interior {r['accuracy_var_interior']}, detrended "
                  f"{r['accuracy_detrended_msd']}")
    _write(output_dir, "interpolation", results, ("", interpolation.plot(results)))


def _distributions(workdirs, output_dir) -> None:
    results = []
    for workdir in workdirs:
        epochs = ([int(e) for e in _EPOCHS.value] if _EPOCHS.value
                  else checkpointing.saved_epochs(workdir))
        runs = (load_run(workdir, epoch, _DATA_DIR.value) for epoch in epochs)
        results.append(distributions.analyze_run(
            runs, layers=_LAYERS.value, num_images=_FEATURE_IMAGES.value,
            bn_mode=_BN_MODE.value, bins=_BINS.value, seed=_SEED.value))
    results = common.relabel(results)
    _write(output_dir, "distributions", results,
           ("_weights", distributions.plot_weights(results)),
           ("_features", distributions.plot_features(results)),
           ("_bn", distributions.plot_bn(results)))


def _models(workdirs):
    """The latest checkpoint of each workdir and the --pretrained models, with the BN
    statistics --bn_stats asks for."""
    loaded = [load_run(w, data_dir=_DATA_DIR.value) for w in workdirs]
    loaded += [pretrained.load(name, data_dir=_DATA_DIR.value) for name in _PRETRAINED.value]
    return [run.with_bn_stats(_BN_STATS(_BATCH_SIZE.value)) for run in loaded]


def _layer_variance(workdirs, output_dir) -> None:
    results = []
    for run in _models(workdirs):
        images, _ = run.test_set(_NUM_EXAMPLES.value or 2000)
        results.append(layer_variance.analyze(run, images, bn_mode=_BN_MODE.value,
                                              batch_size=_BATCH_SIZE.value))
    markdown = layer_variance.format_markdown(results)
    print(reports.write(output_dir, "stability_layer_variance", results, markdown))
    print(markdown)


def _bn_diagnostics(workdirs, output_dir) -> None:
    results = []
    for run in _models(workdirs):
        images, labels = run.test_set(_NUM_EXAMPLES.value or 2000, multiple_of=_BATCH_SIZE.value)
        results.append(bn_diagnostics.diagnose(
            run, images, labels, bn_modes=_BN_MODES.value, batch_size=_BATCH_SIZE.value,
            single_class_batch=_SINGLE_CLASS_BATCH.value))
    markdown = bn_diagnostics.format_markdown(results)
    stem = "bn_diagnostics" + ("" if results[0]["bn_stats"] == "trained"
                               else f"+{results[0]['bn_stats']}")
    print(reports.write(output_dir, stem, results, markdown))
    print(reports.save_figure(bn_diagnostics.plot(results), output_dir, stem))
    print(markdown)


def _epoch_records(workdirs, output_dir) -> None:
    chosen = _BN_STATS(_BATCH_SIZE.value)  # re-estimated ones as asked, else 2,000 images
    settings = epoch_records.RecordSettings(
        test_examples=_NUM_EXAMPLES.value or 2000, batch_size=_BATCH_SIZE.value,
        bn_stats=chosen if chosen.reestimated else dataclasses.replace(
            epoch_records.RecordSettings().bn_stats, batch_size=_BATCH_SIZE.value))
    epochs = [int(e) for e in _EPOCHS.value] if _EPOCHS.value else None
    results = common.relabel([
        epoch_records.collect(w, settings, epochs, _DATA_DIR.value,
                              progress=lambda e, w=w: print(f"{w}: epoch {e}", flush=True))
        for w in workdirs])
    markdown = epoch_records.format_markdown(results)
    _write(output_dir, "epoch_records", results, ("", epoch_records.plot(results)),
           markdown=markdown)
    print(markdown)


def main(argv):
    del argv
    studies = _studies()
    workdirs = _WORKDIRS.value
    for workdir in workdirs:
        if not os.path.isdir(workdir):
            raise UserError(f"no such workdir: {workdir}")
        checkpointing.load_config_dict(workdir)  # fails on a directory that is no workdir
    needing = [s for s in studies if s != "variance-theory"
               and not (s in MODEL_STUDIES and _PRETRAINED.value)]
    if not workdirs and needing:
        raise UserError(f"the studies {', '.join(needing)} need at least one --workdir"
                        + (f" ({', '.join(s for s in needing if s in MODEL_STUDIES)}: or "
                           "--pretrained)" if set(needing) & set(MODEL_STUDIES) else ""))
    output_dir = _OUTPUT_DIR.value or (workdirs[0] if workdirs else None)
    if output_dir is None:
        raise UserError("pass --output_dir (or a --workdir to write into)")
    for name, study in RUNNERS.items():   # in this order, whatever order --study lists
        if name in studies:
            study(workdirs, output_dir)


def _curves(workdirs, output_dir) -> None:
    results = curves.collect(workdirs)
    _write(output_dir, "curves", results, ("", curves.plot(results)))


def _variance_theory(workdirs, output_dir) -> None:
    del workdirs
    results = theory.run(seed=_SEED.value, samples=_THEORY_SAMPLES.value)
    _write(output_dir, "variance_theory", results, ("", theory.plot(results)))
    print(results["markdown"])


# Each study: (workdirs, output_dir) -> None, writing its report into output_dir.
RUNNERS = {"curves": _curves, "interpolation": _interpolation,
           "distributions": _distributions, "bn-diagnostics": _bn_diagnostics,
           "layer-variance": _layer_variance, "epoch-records": _epoch_records,
           "variance-theory": _variance_theory}
assert set(RUNNERS) == set(STUDIES)


if __name__ == "__main__":
    cli.run(main)
