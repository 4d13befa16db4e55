# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: -all
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
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
# All of it is one call, `awn_jax.reproduction.run_campaign(budget, ...)`, the function
# behind `python reproduce.py` (the same campaign from the command line); this notebook
# runs it and then shows each part of what it returns. The budget says how long the runs
# train and how much of each study is evaluated.
#
# `MODE = "full"` runs the paper's settings: the `configs/cifar10_r20_*.py` recipes (400
# epochs each, batch 256), CIFAR-10 through TFDS or an image folder, the attacks' paper
# settings on the whole test set. It wants a GPU runtime and days of GPU time (four
# 400-epoch runs); a rerun resumes from the checkpoints in `WORKDIR` and skips every stage
# already done.
#
# `MODE = "small"` (the default) runs the same code on a CPU in a few minutes: tiny
# synthetic 8x8 images, 2 epochs, 128 test images, PGD alone with 2 steps, short sweeps.
# **Its numbers check that the pipeline runs; they reproduce nothing** (after 2 epochs on
# 8x8 images the adder networks are still near chance). The paper's numbers are printed
# beside them only to show where each one belongs. The project's own results at a real
# budget are in `docs/REPRODUCTION.md`.

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
    # A JAX already installed (Colab's) is kept: pip picks the Flax that runs with it.
    keep = []
    if importlib.util.find_spec("jax") is not None:
        from importlib.metadata import version
        keep = [f"jax=={version('jax')}", f"jaxlib=={version('jaxlib')}"]
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", str(ROOT), *keep],
                   check=True)
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
# Checkpoints, metrics, report and figures; a rerun resumes from what is there.
WORKDIR = pathlib.Path(os.environ.get("AWN_REPRODUCE_WORKDIR",
                                      ROOT / "workdirs" / f"reproduce-{MODE}"))

if MODE == "small" and "jax" not in sys.modules:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_backend_optimization_level=0").strip()

import dataclasses

import jax

from awn_jax import names, reproduction
from awn_jax.reproduction import report
from awn_jax.training.metrics import read_metrics

print("JAX", jax.__version__, "on", jax.devices(), "| mode:", MODE)

# %% [markdown]
# **The budget.** Full mode: the paper's 400 epochs and the whole test set. Small mode:
# 2 epochs on synthetic 8x8 images (a noisy colour pattern per class; no crop or flip,
# which would destroy the pattern at this size), PGD-2 alone, 128 test images. In small
# mode nearly all the time goes into compiling (each BN mode x attack x model is its own
# XLA program), so it also lowers XLA's CPU optimization level (set before JAX starts).

# %%
if MODE == "full":
    BUDGET = dataclasses.replace(reproduction.BUDGETS["gpu"], name="paper", epochs=400)
    OVERRIDES = {}
else:
    BUDGET = reproduction.Budget(
        "small", epochs=2, test_examples=128, attacks=("pgd",), attack_steps=2,
        sweep_examples=128, eps_values=(0.01, 0.05, 0.1), steps_values=(1, 2),
        interpolation_points=3, interpolation_bn_stats=("interpolate",), feature_images=64,
        eval_batch_size=128)
    OVERRIDES = dict(dataset="synthetic", normalization="dataset", image_size=8,
                     crop_padding=0, random_flip=False, synthetic_num_train=512,
                     synthetic_num_test=128, batch_size=64, eval_batch_size=128,
                     log_every_steps=8)
print(BUDGET.describe())

# %% [markdown]
# ## 1. The campaign
#
# Trains the CNN, the AdderNet (ANN), ANN with weight standardization (ANN-WS) and ANN
# with Adaptive Weight Normalization (ANN-AWN) (the official AdderNet SGD recipe, a
# checkpoint and a `metrics.jsonl` line per epoch), then evaluates every stage below and
# writes `report.md` / `report.json` with the figures into `WORKDIR/<budget>/report`.

# %%
start = time.perf_counter()
result = reproduction.run_campaign(BUDGET, str(WORKDIR), DATA_DIR, overrides=OVERRIDES,
                                   command="notebooks/reproduce_paper.py")
REPORT_DIR = pathlib.Path(result["workdirs"]["conv"]).parent / "report"
histories = {t: read_metrics(w) for t, w in result["workdirs"].items()}
summary = {"mode": MODE, "seconds": round(time.perf_counter() - start, 1),
           "train": histories, "report_dir": str(REPORT_DIR)}
for layer_type, history in histories.items():
    print(f"{names.PAPER_NAMES[layer_type]:<8} {len(history)} epochs, test accuracy "
          f"{100 * history[-1]['test_accuracy']:6.2f}% (BN tracked)")


def show(name):
    """A figure of the report, inline in a notebook."""
    path = REPORT_DIR / f"{name}.png"
    summary.setdefault("figures", []).append(str(path))
    try:
        from IPython import get_ipython
        from IPython.display import Image, display
    except ImportError:
        return
    if get_ipython() is not None:
        display(Image(filename=str(path)))

# %% [markdown]
# ## 2. Table 1 and Table 3
#
# Clean accuracy and accuracy under each attack for every model x BatchNorm mode
# (`tracked`; `running-mean`, the paper's robust inference "-R"; `running`, the ablation
# "-r"), the attacker seeing the model as deployed (see `awn_jax/robustness/attacks.py` for
# the pinned attack definitions), ± the binomial standard error, the paper's number beside
# each. Table 3 is the WS/AWN rows under the two batch modes.

# %%
rows = report.named_rows(result["table"])
print(report.format_table(rows, [n for n in report.TABLE1 if n in rows], BUDGET))
print()
print(report.format_table(rows, report.TABLE3, BUDGET))
summary["table"] = result["table"]

# %% [markdown]
# **The claims**, each judged on the difference and its standard error (`holds` beyond two
# standard errors, `does not hold` below minus two, else `cannot tell`).

# %%
found = report.claims(rows)
print(report.format_claims(found))
summary["claims"] = found

# %% [markdown]
# ## 3. Fig. 2a and 2b: PGD against eps and against the number of steps
#
# Under the paper's robust inference (`running-mean`), every model.

# %%
print(report.format_sweeps(result["sweeps"]))
summary["sweeps"] = result["sweeps"]
show("eps_sweep")
show("steps_sweep")

# %% [markdown]
# ## 4. Fig. 2c: accuracy between two checkpoints
#
# Models on the straight line between the first two epochs' checkpoints and between the
# last two (BN statistics interpolated; full mode also re-estimates them on training
# batches); the variance of the interior accuracies is the paper's number.

# %%
print(report.format_interpolation(result["interpolation"]))
summary["interpolation"] = result["interpolation"]
show("interpolation")

# %% [markdown]
# ## 5. Fig. 2d: curves, and Fig. 3: features before BatchNorm
#
# The per-epoch test curves, and the outputs of the first and the last layer inside the
# residual stages (each feeds a BatchNorm; the paper's 2nd and 19th layers) at the first,
# middle and last epoch, with the weight distributions.

# %%
print(report.format_features(result["distributions"]))
summary["distributions"] = {
    t: {"epochs": d["epochs"], "feature_layers": d["feature_layers"], "features": d["features"]}
    for t, d in result["distributions"].items()}
for name in ("curves", "features", "weights"):
    show(name)

# %% [markdown]
# ## Summary
#
# The whole report is `report.md` in `REPORT_DIR`. In small mode its numbers come from 2
# epochs on synthetic 8x8 images: they show that every stage runs, nothing about CIFAR-10.

# %%
print(f"mode: {MODE}" + ("" if MODE == "full" else " (pipeline check, not a reproduction)"))
print("report:", REPORT_DIR / "report.md", "| figures:", len(summary["figures"]))
print("seconds:", summary["seconds"])
