# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: -all
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Reproducing *Towards Stable and Robust AdderNets*: the whole pipeline
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/awn-jax/blob/main/notebooks/reproduce_paper.ipynb)
#
# *The badge and `REPO_URL` below are placeholders: replace `OWNER/awn-jax` with the
# GitHub location of your copy of this repository.*
#
# The paper's ResNet-20 / CIFAR-10 experiments (Zhu et al., NeurIPS 2021), each a call
# into `awn_jax`:
#
# 1. train the CNN, the AdderNet (ANN), ANN with weight standardization (ANN-WS) and ANN
#    with Adaptive Weight Normalization (ANN-AWN);
# 2. **Table 1**: clean accuracy and FGSM / BIM-7 / PGD-7 / MIM-5 / RFGSM-5 accuracy under
#    each BatchNorm statistics mode (`tracked`; `running-mean`, the paper's robust
#    inference "-R"; `running`, the ablation "-r"), with #Mul / #Add;
# 3. **Table 3**: WS against AWN under "-r" and "-R";
# 4. **Fig. 2**: PGD accuracy against eps (a) and against the number of steps (b);
#    accuracy between two checkpoints (c); test-loss curves (d);
# 5. **Fig. 3**: distributions of the features before BatchNorm across epochs.
#
# `MODE = "full"` runs the paper's settings unchanged: the `configs/cifar10_r20_*.py`
# recipes (400 epochs each, batch 256), CIFAR-10 through TFDS or an image folder, the
# attacks' paper settings on the whole test set. It wants a GPU runtime and days of GPU
# time (four 400-epoch runs); a rerun resumes from the checkpoints in `WORKDIR`.
#
# `MODE = "small"` (the default) runs the same code on a CPU in a couple of minutes: tiny
# synthetic 8x8 images, 2 epochs, 128 test images, PGD alone with 2 steps, short sweeps.
# **Its numbers check that the pipeline runs; they reproduce nothing** (after 2 epochs on
# 8x8 images the adder networks are still near chance). The paper's numbers are printed
# beside them only to show where each one belongs.

# %% [markdown]
# ## 0. Install
#
# Inside a clone of the repository, `pip install -e .` from its root is all it takes; the
# next cell runs it for you when the dependencies are missing. On Colab it first clones
# `REPO_URL` (the notebook uses the repository's `configs/`, which
# `pip install git+<REPO_URL>` alone would not bring). If Colab asks to restart the runtime
# after the install, restart and run the cells again.

# %%
REPO_URL = "https://github.com/OWNER/awn-jax.git"  # <- EDIT: where your copy of the repository lives

import importlib.util
import os
import pathlib
import subprocess
import sys
import time

IN_COLAB = "google.colab" in sys.modules


def find_repo_root():
    """The clone: the working directory, one of its parents, or ./awn-jax (Colab's clone)."""
    cwd = pathlib.Path.cwd()
    for path in (cwd, *cwd.parents, cwd / "awn-jax"):
        if (path / "awn_jax").is_dir() and (path / "configs").is_dir():
            return path
    return None


ROOT = find_repo_root()
if ROOT is None and IN_COLAB:
    subprocess.run(["git", "clone", "--depth", "1", REPO_URL, "awn-jax"], check=True)
    ROOT = pathlib.Path("awn-jax").resolve()
if ROOT is None:
    raise RuntimeError("run this notebook from a clone of the repository (or on Colab)")

# The clone goes first on the path: `configs` lives there, and the running kernel imports
# `awn_jax` from it even right after an editable install (which only takes effect on restart).
sys.path.insert(0, str(ROOT))
if IN_COLAB or importlib.util.find_spec("flax") is None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", str(ROOT)], check=True)
print("repository:", ROOT)

# %% [markdown]
# **Settings.** `MODE` picks the scale; the environment variables only exist so that the
# test suite can run this notebook unattended (`tests/test_notebooks.py`).
#
# In small mode nearly all the time goes into compiling (each BN mode x attack x model is
# its own XLA program, and the programs run in milliseconds on 8x8 images), so small mode
# lowers XLA's CPU optimization level, which roughly halves compile times. It must be set
# before JAX starts; in a kernel that already imported JAX it has no effect (only on speed).

# %%
MODE = os.environ.get("AWN_REPRODUCE_MODE", "small")  # "small": CPU minutes | "full": GPU, paper
assert MODE in ("small", "full"), MODE
# Full mode reads CIFAR-10 through TFDS (downloaded on first use), or an image folder
# <DATA_DIR>/{train,test}/<class>/*.jpg when DATA_DIR is set.
DATA_DIR = os.environ.get("AWN_REPRODUCE_DATA_DIR", "")
# Checkpoints, metrics, tables and figures; a rerun resumes training from what is there.
WORKDIR = pathlib.Path(os.environ.get("AWN_REPRODUCE_WORKDIR",
                                      ROOT / "workdirs" / f"reproduce-{MODE}"))
FIGURES = WORKDIR / "figures"

if MODE == "small" and "jax" not in sys.modules:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_backend_optimization_level=0").strip()

import jax
import matplotlib.pyplot as plt

from awn_jax import reports, robustness
from awn_jax.nn import counting
from awn_jax.robustness import studies
from awn_jax.stability import curves, distributions, interpolation
from awn_jax.training import train_and_evaluate
from awn_jax.training.metrics import read_metrics
from awn_jax.training.runs import load_run, saved_epochs
from configs import cifar10_r20_ann, cifar10_r20_awn, cifar10_r20_cnn, cifar10_r20_ws

print("JAX", jax.__version__, "on", jax.devices(), "| mode:", MODE)
summary = {"mode": MODE, "seconds": {}}  # what this run obtains, printed at the end
FIGURES.mkdir(parents=True, exist_ok=True)
summary["figures"] = []
_clock = time.perf_counter()


def lap(stage):
    """Wall-clock seconds of each stage, kept in the summary."""
    global _clock
    now = time.perf_counter()
    summary["seconds"][stage] = round(now - _clock, 1)
    _clock = now


def show(fig, name):
    """Save a figure under FIGURES (the test checks the files) and show it inline.

    `awn_jax.stability` switches matplotlib to the file-only Agg backend when imported, so
    inline display goes through IPython's `display` instead of `plt.show()`."""
    path = FIGURES / f"{name}.png"
    fig.savefig(path, dpi=90, bbox_inches="tight")
    summary["figures"].append(str(path))
    show_file(path)
    plt.close(fig)


def show_file(path):
    try:
        from IPython import get_ipython
        from IPython.display import Image, display
    except ImportError:
        return
    if get_ipython() is not None:
        display(Image(filename=str(path)))

# %% [markdown]
# ## 1. Training the four ResNet-20s
#
# `train_and_evaluate(config, workdir)` is the whole training loop (official AdderNet SGD
# recipe, a checkpoint and a `metrics.jsonl` line per epoch, resumption from the latest
# checkpoint). Full mode takes the four configs as they are; small mode shrinks a copy of
# each to synthetic 8x8 images (a noisy colour pattern per class; no crop or flip, which
# would destroy the pattern at this size) and 2 epochs, so that the studies below that
# compare epochs (Fig. 2c, Fig. 3) have two checkpoints.

# %%
CONFIGS = {"conv": cifar10_r20_cnn, "adder": cifar10_r20_ann, "adder-ws": cifar10_r20_ws,
           "adder-awn": cifar10_r20_awn}
SMALL_DATA = dict(dataset="synthetic", normalization="dataset", image_size=8, crop_padding=0, random_flip=False,
                  synthetic_num_train=512, synthetic_num_test=128, batch_size=64,
                  num_epochs=2, eval_batch_size=128, log_every_steps=8)

workdirs, histories = {}, {}
for layer_type, module in CONFIGS.items():
    config = module.get_config()
    if MODE == "small":
        config.update(SMALL_DATA)
    elif DATA_DIR:
        config.update(dict(dataset="image_folder", data_dir=DATA_DIR))
    assert config.layer_type == layer_type
    workdirs[layer_type] = str(WORKDIR / layer_type)
    train_and_evaluate(config, workdirs[layer_type])
    histories[layer_type] = read_metrics(workdirs[layer_type])
summary["train"] = histories
lap("train")

PAPER_CLEAN = {"conv": 92.68, "adder": 91.72}  # Table 1, BN tracked
for layer_type, history in histories.items():
    last = history[-1]
    print(f"{layer_type:<10} {len(history)} epochs, test accuracy "
          f"{100 * last['test_accuracy']:6.2f}% (BN tracked)"
          + (f"   paper: {PAPER_CLEAN[layer_type]:.2f}%" if layer_type in PAPER_CLEAN else ""))

# %% [markdown]
# ## 2. Table 1: white-box attacks under each BatchNorm mode
#
# `robustness.evaluate_run` gives one row per BN mode: clean accuracy and accuracy under
# each attack, the attacker seeing the model as deployed (gradients through the same BN
# mode, on the same batch; see `awn_jax/robustness/attacks.py` for the pinned attack definitions).
# `evaluate.py --attack all --bn-mode all` is the same call from the command line.
#
# Full mode: the paper's five attacks at their settings (eps 8/255, step 2/255; BIM and
# PGD 7 steps, MIM and RFGSM 5), the whole test set in batches of 500. Small mode: PGD
# alone, 2 steps, on the 128 test images: every (model, BN mode, attack) is its own
# program to compile (about 2-3 s each on a CPU), and the five attacks would multiply the
# notebook's CPU time by three.

# %%
if MODE == "full":
    ATTACKS, ATTACK_STEPS, EVAL_BATCH, EVAL_EXAMPLES = ("fgsm", "bim", "pgd", "mim", "rfgsm"), None, 500, None
else:
    ATTACKS, ATTACK_STEPS, EVAL_BATCH, EVAL_EXAMPLES = ("pgd",), 2, 128, 128
PAPER_ATTACKS = ("fgsm", "bim", "pgd", "mim", "rfgsm")
BN_SUFFIX = {"tracked": "", "running-mean": "-R", "running": "-r"}
BASE_NAME = {"conv": "CNN", "adder": "ANN", "adder-ws": "ANN-WS", "adder-awn": "ANN-AWN"}
# ResNet-20 on CIFAR-10: clean, FGSM, BIM7, PGD7, MIM5, RFGSM5 (%); Table 1, and Table 3
# for WS and "-r".
PAPER_ROWS = {
    "CNN": (92.68, 16.33, 0.00, 0.00, 0.01, 0.00),
    "ANN": (91.72, 18.42, 0.00, 0.00, 0.04, 0.00),
    "CNN-R": (90.62, 17.23, 3.46, 3.67, 4.23, 0.06),
    "ANN-R": (90.95, 29.93, 29.30, 29.72, 32.25, 3.38),
    "ANN-R-AWN": (90.55, 45.93, 42.62, 43.39, 46.52, 18.36),
    "ANN-r-WS": (88.10, 49.24, 21.46, 22.96, 32.26, 7.31),
    "ANN-r-AWN": (89.81, 49.85, 22.54, 24.27, 32.54, 8.26),
    "ANN-R-WS": (89.38, 40.65, 31.35, 36.08, 42.30, 7.78),
}
PAPER_COUNTS = {"conv": (41.17, 41.17), "adder": (0.45, 81.89)}  # #Mul, #Add (M), 32x32


def paper_name(layer_type, bn_mode):
    """The paper's label of a row: CNN, ANN-R, ANN-r-WS, ANN-R-AWN, ..."""
    base = BASE_NAME[layer_type]
    head, _, tail = base.partition("-")
    return head + BN_SUFFIX[bn_mode] + (f"-{tail}" if tail else "")


table_rows = []
for layer_type, workdir in workdirs.items():
    rows = robustness.evaluate_run(load_run(workdir), ATTACKS, robustness.EVAL_BN_MODES,
                                   steps=ATTACK_STEPS, batch_size=EVAL_BATCH,
                                   num_examples=EVAL_EXAMPLES, show_progress=False)
    for row in rows:
        row["layer_type"], row["paper_name"] = layer_type, paper_name(layer_type, row["bn_mode"])
    table_rows += rows
print(robustness.write_report(table_rows, ATTACKS, str(WORKDIR)))
summary["table1"] = {"attacks": list(ATTACKS), "rows": table_rows}
lap("table1")

# %% [markdown]
# The same numbers next to the paper's (obtained / paper, %). The paper's ResNet-20 rows
# exist for CNN, ANN, CNN-R, ANN-R and ANN-R-AWN (Table 1) and for the WS/AWN ablation
# (Table 3); a dash marks a combination it does not report.

# %%
label = "obtained" if MODE == "full" else "SMALL-MODE PIPELINE CHECK, not a reproduction"
print(f"Table 1 / Table 3, {label}: obtained % / paper %")
print(f"{'row':<11}" + "".join(f"{name:>16}" for name in ("clean", *ATTACKS)))
for row in table_rows:
    paper = PAPER_ROWS.get(row["paper_name"])
    cells = []
    for name in ("clean", *ATTACKS):
        expected = "-" if paper is None else (
            f"{paper[0]:.2f}" if name == "clean" else f"{paper[1 + PAPER_ATTACKS.index(name)]:.2f}")
        cells.append(f"{100 * row[name]:7.2f} / {expected:>6}")
    print(f"{row['paper_name']:<11}" + "".join(f"{c:>16}" for c in cells))

# #Mul / #Add at the paper's 32x32 input (the rows above count the images they ran on).
print(f"\n{'ResNet-20':<10} {'#Mul':>8} {'#Add':>8}   paper #Mul / #Add (32x32)")
counts = {}
for layer_type in ("conv", "adder"):
    cost = counting.count_architecture("resnet20", layer_type)
    counts[layer_type] = {"mul": cost.mul, "add": cost.add}
    print(f"{layer_type:<10} {cost.mul / 1e6:>7.2f}M {cost.add / 1e6:>7.2f}M   "
          f"{PAPER_COUNTS[layer_type][0]:.2f}M / {PAPER_COUNTS[layer_type][1]:.2f}M")
summary["counts_32x32"] = counts

# %% [markdown]
# ## 3. Table 3: weight standardization against AWN
#
# The ablation reads rows of the same evaluation: ANN-WS and ANN-AWN under "-r" (batch
# mean and variance) and "-R" (batch mean, tracked variance).

# %%
table3 = [row for row in table_rows if row["layer_type"] in ("adder-ws", "adder-awn")
          and row["bn_mode"] in ("running", "running-mean")]
print(f"Table 3, {label}: obtained % / paper %")
for row in table3:
    paper = PAPER_ROWS[row["paper_name"]]
    print(f"{row['paper_name']:<11} clean {100 * row['clean']:6.2f} / {paper[0]:.2f}   "
          + "   ".join(f"{name} {100 * row[name]:6.2f} / "
                       f"{paper[1 + PAPER_ATTACKS.index(name)]:.2f}" for name in ATTACKS))
summary["table3"] = table3

# %% [markdown]
# ## 4. Fig. 2a and 2b: PGD against eps and against the number of steps
#
# `robustness_studies.eps_sweep` (PGD-7, eps from 0.01 to 0.1, step eps/7) and
# `steps_sweep` (PGD at eps 8/255, step 2/255, 1 to 50 steps) under the paper's robust
# inference (`running-mean`); `evaluate.py --study eps-sweep|steps-sweep` runs the same.
# Full mode sweeps the four models as the paper does (CNN-R, ANN-R, ANN-R-WS, ANN-R-AWN);
# small mode sweeps ANN-R-AWN only, at three eps values and two step counts.

# %%
if MODE == "full":
    SWEEP_RUNS, EPS_VALUES, STEPS_VALUES = tuple(workdirs), studies.SWEEP_EPS, studies.SWEEP_STEPS
    SWEEP_STEPS_PGD = 7
else:
    # steps=2 in both sweeps: the compiled PGD-2 of the eps sweep serves the steps sweep.
    SWEEP_RUNS, EPS_VALUES, STEPS_VALUES, SWEEP_STEPS_PGD = ("adder-awn",), (0.01, 0.05, 0.1), (1, 2), 2
sweep_kwargs = dict(batch_size=EVAL_BATCH, num_examples=EVAL_EXAMPLES)
eps_rows, steps_rows = [], []
for layer_type in SWEEP_RUNS:
    # One run object: its evaluator's compiled clean pass serves both sweeps.
    run = load_run(workdirs[layer_type])
    eps_rows += studies.eps_sweep(run, ("running-mean",), EPS_VALUES,
                                  steps=SWEEP_STEPS_PGD, **sweep_kwargs)
    steps_rows += studies.steps_sweep(run, ("running-mean",), STEPS_VALUES, **sweep_kwargs)
print(studies.write_sweep(eps_rows, "eps", str(FIGURES)))
print(studies.write_sweep(steps_rows, "steps", str(FIGURES)))
for name in ("eps_sweep", "steps_sweep"):
    summary["figures"].append(str(FIGURES / f"{name}.png"))
    show_file(FIGURES / f"{name}.png")
print(f"({label}) the paper, in words (Sec. 5.1): at eps 0.06 CNN-R falls to 2.96%, ANN-R to "
      "27.67%, ANN-R-WS to 28.66%; ANN-R-AWN keeps 32.67% at eps 0.1. Under PGD-50 ANN-R "
      "keeps 26.48%, ANN-R-AWN 36.52%.")
summary["eps_sweep"], summary["steps_sweep"] = eps_rows, steps_rows
lap("sweeps")

# %% [markdown]
# ## 5. Fig. 2c: accuracy between two checkpoints
#
# `stability.interpolation.interpolate_run` scores `num_points` models on the straight line
# between two checkpoints of a run (BN running statistics interpolated too, so the ends are
# the checkpoints; full mode also re-estimates them on training batches), and the variance
# of the interior accuracies is the paper's number. The paper's epoch pairs: ANN 160->164
# and 290->294, ANN-AWN 125->135 and 283->294 (it writes "283 - 294"). Small mode: epoch 1
# to 2 with 3 points.

# %%
if MODE == "full":
    PAIRS = {"adder": ((160, 164), (290, 294)), "adder-awn": ((125, 135), (283, 294))}
    NUM_POINTS, BN_STATS, INTERP_EXAMPLES = 9, interpolation.BN_STATS, None
else:
    PAIRS = {"adder": ((1, 2),), "adder-awn": ((1, 2),)}
    NUM_POINTS, BN_STATS, INTERP_EXAMPLES = 3, ("interpolate",), None
PAPER_VARIANCE = {("adder", 0): 587.28, ("adder", 1): 627.54,
                  ("adder-awn", 0): 336.00, ("adder-awn", 1): 41.67}
interp_results = []
for layer_type, pairs in PAIRS.items():
    for index, (epoch_a, epoch_b) in enumerate(pairs):
        run_a, run_b = (load_run(workdirs[layer_type], epoch) for epoch in (epoch_a, epoch_b))
        for bn_stats in BN_STATS:
            result = interpolation.interpolate_run(
                run_a, run_b, num_points=NUM_POINTS, bn_stats=bn_stats, batch_size=EVAL_BATCH,
                num_examples=INTERP_EXAMPLES)
            interp_results.append(result)
            print(f"{result['model']:<8} epochs {epoch_a}->{epoch_b}, BN {bn_stats}: accuracy % "
                  + " ".join(f"{a:.1f}" for a in result["test_accuracy_pct"])
                  + f"; variance {result['accuracy_var_interior']:.2f}"
                  + f"   paper ({label}): {PAPER_VARIANCE[layer_type, index]:.2f}")
print(reports.write(str(FIGURES), "stability_interpolation", interp_results))
show(interpolation.plot(interp_results), "stability_interpolation")
summary["interpolation"] = interp_results
lap("interpolation")

# %% [markdown]
# ## 6. Fig. 2d: test-loss curves
#
# `stability.curves.collect` reads each run's `metrics.jsonl` and measures how much the
# test curves jump between epochs (the paper shows the curves only: ANN's test loss is
# unstable before epoch 300, CNN, ANN-WS and ANN-AWN are smooth, ANN-WS ends higher).

# %%
curve_results = curves.collect([workdirs[t] for t in workdirs])
for r in curve_results:
    jumps = r["test_loss_jumps"]
    print(f"{r['model']:<8} final test loss {r['test_loss'][-1]:.3f}, mean |change| per epoch "
          + ("-" if jumps["mean_abs_change"] is None else f"{jumps['mean_abs_change']:.3f}"))
show(curves.plot(curve_results), "stability_curves")
summary["curves"] = [{k: r[k] for k in ("model", "epoch", "test_loss", "test_accuracy")}
                     for r in curve_results]
lap("curves")

# %% [markdown]
# ## 7. Fig. 3: features before BatchNorm across epochs
#
# `stability.distributions.analyze_run` collects, at each saved epoch, the outputs of the
# layers inside the residual stages (each feeds a BatchNorm) on the same test images, with
# histograms of the paper's 2nd and 19th layers (the first and last layer in the stages),
# plus weight fits and BN running-statistic drift. `analyze.py --study distributions` runs
# the same. Full mode uses epochs near the paper's (it names 21, 385 and 386).

# %%
if MODE == "full":
    FEATURE_EPOCHS = {"adder": (21, 100, 200, 300, 386), "adder-awn": (21, 100, 200, 300, 385)}
    FEATURE_IMAGES = 256
else:
    FEATURE_EPOCHS = {t: tuple(saved_epochs(workdirs[t])) for t in ("adder", "adder-awn")}
    FEATURE_IMAGES = 64
# Sec. 5.2: mean / std of the sampled 19th-layer features.
PAPER_FEATURES = {("adder", 21): (-2738.58, 1042.44), ("adder", 386): (-1476.52, 266.97),
                  ("adder-awn", 21): (-940.89, 269.39), ("adder-awn", 385): (-564.59, 60.65)}
dist_results = []
for layer_type, epochs in FEATURE_EPOCHS.items():
    result = distributions.analyze_run(
        (load_run(workdirs[layer_type], epoch) for epoch in epochs), num_images=FEATURE_IMAGES)
    dist_results.append(result)
    last_layer = result["feature_layers"][-1]
    for features in result["features"]:
        stats = next(s for s in features["layers"] if s["layer"] == last_layer)
        paper = PAPER_FEATURES.get((layer_type, features["epoch"]))
        print(f"{result['model']:<8} epoch {features['epoch']:>3} {last_layer}: mean "
              f"{stats['mean']:9.2f} std {stats['std']:8.2f}"
              + ("" if paper is None else f"   paper: mean {paper[0]:.2f} std {paper[1]:.2f}"))
dist_results = distributions.relabel(dist_results)
print(reports.write(str(FIGURES), "stability_distributions", dist_results))
show(distributions.plot_features(dist_results), "stability_features")
show(distributions.plot_weights(dist_results), "stability_weights")
summary["distributions"] = [
    {"model": r["model"], "epochs": r["epochs"], "feature_layers": r["feature_layers"],
     "features": r["features"],
     "histogram_epochs": {layer: [h["epoch"] for h in hists]
                          for layer, hists in r["feature_histograms"].items()}}
    for r in dist_results]
lap("distributions")

# %% [markdown]
# ## Summary
#
# Where everything went, and how long each stage took. In small mode the numbers come from
# 2 epochs on synthetic 8x8 images and 2-step attacks on 128 images: they show that every
# stage runs and produces its table or figure, nothing about CIFAR-10. `docs/RESULTS.md`
# collects the results obtained with this code so far, apart from the paper's numbers.

# %%
print(f"mode: {MODE}" + ("" if MODE == "full" else " (pipeline check, not a reproduction)"))
print("workdir:", WORKDIR)
print("Table 1 rows:", len(table_rows), "| figures:", len(summary["figures"]))
print("seconds per stage:", summary["seconds"])
