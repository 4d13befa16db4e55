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
# # awn-jax quickstart: adder networks, AWN and robust BatchNorm
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/awn-jax/blob/main/notebooks/quickstart.ipynb)
#
# *The badge and `REPO_URL` below are placeholders: replace `OWNER/awn-jax` with the
# GitHub location of your copy of this repository.*
#
# A tour of the library behind *Towards Stable and Robust AdderNets* (Zhu et al.,
# NeurIPS 2021), in six steps:
#
# 1. build an adder ResNet-20 (AdderNet layers with Adaptive Weight Normalization, AWN);
# 2. count its multiplications and additions;
# 3. look at the gradients of one adder layer next to those of a convolution;
# 4. train it for a few epochs;
# 5. switch its BatchNorm statistics mode (the paper's robust inference);
# 6. attack it with PGD and plot the results.
#
# Every step is a call into `awn_jax`; the notebook only wires them together and plots.
# `MODE = "small"` (the default) runs top to bottom on a CPU in a few minutes, on tiny
# synthetic images; `MODE = "full"` trains on CIFAR-10 at 32x32 and wants a GPU runtime.

# %% [markdown]
# ## 0. Install
#
# Inside a clone of the repository, `pip install -e .` from its root is all it takes; the
# next cell runs it for you when the dependencies are missing. On Colab it first clones
# `REPO_URL`: the notebook uses the repository's `configs/` (the training recipes), which
# `pip install git+<REPO_URL>` alone would not bring (it installs the `awn_jax` package only).
# If Colab asks to restart the runtime after the install, restart and run the cells again.

# %%
REPO_URL = "https://github.com/OWNER/awn-jax.git"  # <- EDIT: where your copy of the repository lives

import functools
import importlib.util
import os
import pathlib
import subprocess
import sys

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
    # Installs the dependencies; the same as `pip install -e .` in the clone. A JAX already
    # installed (Colab's, built for its GPU or TPU) is kept: pip then picks the Flax that
    # runs with it (JAX 0.7 -> Flax 0.12.0) instead of upgrading JAX for the newest Flax.
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

# %%
MODE = os.environ.get("AWN_QUICKSTART_MODE", "small")  # "small": CPU minutes | "full": GPU
assert MODE in ("small", "full"), MODE
# Full mode reads CIFAR-10 through TFDS (downloaded on first use), or an image folder
# <DATA_DIR>/{train,test}/<class>/*.jpg when DATA_DIR is set.
DATA_DIR = os.environ.get("AWN_QUICKSTART_DATA_DIR", "")
# Checkpoints and metrics; a rerun resumes from what is there.
WORKDIR = pathlib.Path(os.environ.get("AWN_QUICKSTART_WORKDIR",
                                      ROOT / "workdirs" / f"quickstart-{MODE}"))

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

from awn_jax.nn import Conv2d, counting, create_model, set_bn_mode
from awn_jax.nn.batchnorm import EVAL_BN_MODES
from awn_jax.ops import adder_conv2d
from awn_jax.ops.reference import adder_conv2d_reference
from awn_jax.robustness import attacks
from awn_jax.training.loop import train_and_evaluate
from awn_jax.training.metrics import read_metrics
from awn_jax.training.runs import load_run
from configs import default as default_config

print("JAX", jax.__version__, "on", jax.devices())
summary = {"mode": MODE}  # the numbers this notebook obtains, printed at the end

# %% [markdown]
# ## 1. An adder ResNet-20
#
# `create_model` builds the official AdderNet ResNet-20: a multiplying 3x3 stem, three
# stages of residual blocks whose layers are all of one `layer_type`, and a multiplying
# 1x1 classifier. The layer types are `conv` (the CNN baseline), `adder` (AdderNet:
# `Y = -sum |X_patch - W|`), `adder-ws` (weight standardization of the kernel) and
# `adder-awn` (AWN, the paper's Eq. 11: standardized kernel times a learned per-channel
# scale `nu`, plus a learned shift `upsilon`). The model takes images in [0, 1] and
# normalizes them itself with `mean`/`std`, so attacks work in pixel space.

# %%
model = create_model("resnet20", num_classes=10, layer_type="adder-awn",
                     mean=(0.49, 0.48, 0.45), std=(0.20, 0.20, 0.20), rngs=nnx.Rngs(0))
params = nnx.state(model, nnx.Param)
print(f"{sum(p.size for p in jax.tree.leaves(params)):,} parameters")
first_block = model.stages[0][0]
print("stem:", model.stem_conv.layer_type, "| first block:", first_block.conv1.layer_type,
      "| classifier:", model.classifier.layer_type)
# The output shape of a CIFAR batch, traced without computing anything (a real forward
# pass comes in section 5, compiled with nnx.jit).
print("logits:", nnx.eval_shape(lambda model, images: model(images), model,
                                jnp.zeros((2, 32, 32, 3))))

# %% [markdown]
# ## 2. Counting operations
#
# `count_architecture` runs a shape-only forward pass and counts every layer: a multiplying
# layer costs one multiplication and one addition per kernel term, an adder layer two
# additions (subtract, accumulate) and no multiplication. Only the stem and the classifier
# of the adder network multiply. Energy uses 45 nm float32 costs (3.7 pJ per
# multiplication, 0.9 pJ per addition). The README explains the small differences from the
# paper's figures.

# %%
costs = {layer_type: counting.count_architecture("resnet20", layer_type)
         for layer_type in ("conv", "adder")}
print(counting.format_table(costs["adder"]))
paper = {"conv": "41.17M / 41.17M", "adder": "0.45M / 81.89M"}  # Table 1 of the paper
print(f"\n{'ResNet-20':<10} {'#Mul':>8} {'#Add':>8} {'energy':>10}   paper #Mul / #Add")
for layer_type, cost in costs.items():
    print(f"{layer_type:<10} {cost.mul / 1e6:>7.2f}M {cost.add / 1e6:>7.2f}M "
          f"{cost.energy_pj / 1e6:>8.1f}uJ   {paper[layer_type]}")
summary["counts"] = {k: {"mul": c.mul, "add": c.add} for k, c in costs.items()}

# %% [markdown]
# ## 3. Gradients of an adder layer next to a convolution's
#
# The l1 distance has a useless derivative: `d(-|x - w|)/dx = sign(w - x)`, whatever the
# distance. AdderNet (Chen et al., CVPR 2020) trains with two substitutes, which
# `adder_conv2d` implements as its backward pass:
#
# * the **input gradient** is `HardTanh(w - x) = clip(w - x, -1, 1)`: proportional to the
#   distance near the kernel, bounded far from it, so it cannot blow up through depth;
# * the **weight gradient** is the full-precision `x - w` instead of `sign(x - w)`;
# * the whole weight gradient of a layer is then rescaled to the norm
#   `eta * sqrt(numel(W))` (adaptive scaling, `eta = 0.2`; `eta=None` turns it off).
#
# First, one weight `w` and one input value `x`: a 1x1 layer with one channel, swept
# over `x`. The true derivatives come from `jax.grad` through the plain reference forward
# (`awn_jax.ops.reference`), which has no custom gradient.

# %%
W = 0.5
xs = jnp.linspace(-2.0, 3.0, 201)


def one_weight_grads(layer_type, x_values):
    """d(output)/dx and d(output)/dw of a 1x1 one-channel layer with kernel W, per x."""
    layer = Conv2d(1, 1, 1, padding=0, layer_type=layer_type, eta=None, rngs=nnx.Rngs(0))
    layer.kernel[...] = jnp.full((1, 1, 1, 1), W)
    graphdef, layer_params = nnx.split(layer)

    def output(layer_params, x):
        return nnx.merge(graphdef, layer_params)(x.reshape(1, 1, 1, 1)).sum()

    dparams, dx = jax.vmap(jax.grad(output, argnums=(0, 1)), in_axes=(None, 0))(
        layer_params, x_values)
    return np.asarray(dx), np.asarray(dparams["kernel"][...]).ravel()


def true_l1_grads(x_values):
    def output(kernel, x):
        return adder_conv2d_reference(x.reshape(1, 1, 1, 1), kernel, 1, 0).sum()

    dw, dx = jax.vmap(jax.grad(output, argnums=(0, 1)), in_axes=(None, 0))(
        jnp.full((1, 1, 1, 1), W), x_values)
    return np.asarray(dx), np.asarray(dw).ravel()


grads = {"adder (official)": one_weight_grads("adder", xs), "adder (true l1)": true_l1_grads(xs),
         "conv": one_weight_grads("conv", xs)}
fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
for (name, (dx, dw)), style in zip(grads.items(), ("-", "--", ":")):
    axes[0].plot(xs, dx, style, label=name)
    axes[1].plot(xs, dw, style, label=name)
axes[0].set(title=f"input gradient, w = {W}", xlabel="x", ylabel="d output / dx")
axes[1].set(title=f"weight gradient, w = {W}", xlabel="x", ylabel="d output / dw")
for ax in axes:
    ax.axvline(W, color="gray", lw=0.5)
    ax.legend()
plt.tight_layout()
plt.show()
summary["one_weight_grads"] = {"w": W, "x": np.asarray(xs).tolist(),
                               **{name: {"dx": dx.tolist(), "dw": dw.tolist()}
                                  for name, (dx, dw) in grads.items()}}

# %% [markdown]
# Now a real 3x3 layer of the network's shape (16 -> 16 channels, standard normal kernel
# as in the official initialization) on standard normal inputs, with a random upstream
# gradient `g`. Most `|w - x|` exceed 1 here, so HardTanh mostly saturates to the sign and
# the two input gradients are close; they differ where inputs come near the kernel values.
# The weight gradients differ in scale: the full-precision one grows with the distances,
# and adaptive scaling sets its norm to `eta * sqrt(numel(W))` whatever the layer.

# %%
key_x, key_w, key_g = jax.random.split(jax.random.key(0), 3)
x = jax.random.normal(key_x, (2, 8, 8, 16))
kernel = jax.random.normal(key_w, (3, 3, 16, 16))
g = jax.random.normal(key_g, (2, 8, 8, 16))


@functools.partial(jax.jit, static_argnums=0)
def vjp(fn, x, kernel, g):
    """(dL/dx, dL/dW) of L = sum(g * fn(x, kernel))."""
    _, pullback = jax.vjp(fn, x, kernel)
    return pullback(g)


layer_grads = {
    "adder, official (eta=0.2)": vjp(functools.partial(adder_conv2d, eta=0.2), x, kernel, g),
    "adder, official (eta=None)": vjp(functools.partial(adder_conv2d, eta=None), x, kernel, g),
    "adder, true l1": vjp(adder_conv2d_reference, x, kernel, g),
}


def cosine(a, b):
    return float(jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))


true_dx, true_dw = layer_grads["adder, true l1"]
print(f"{'':<28} {'|dL/dx| max':>12} {'||dL/dW||':>10}  cosine to the true dL/dx, dL/dW")
for name, (dx, dw) in layer_grads.items():
    print(f"{name:<28} {float(jnp.abs(dx).max()):>12.2f} {float(jnp.linalg.norm(dw)):>10.2f}"
          f"  {cosine(dx, true_dx):.3f}, {cosine(dw, true_dw):.3f}")
print(f"eta * sqrt(numel(W)) = {0.2 * np.sqrt(kernel.size):.2f}")

fig, ax = plt.subplots(figsize=(5, 3.5))
for name in ("adder, true l1", "adder, official (eta=0.2)"):
    ax.hist(np.asarray(layer_grads[name][0]).ravel(), bins=60, alpha=0.6, label=name)
ax.set(title="input gradients of one 3x3 adder layer", xlabel="dL/dx", ylabel="count")
ax.legend()
plt.show()
summary["layer_grad_norms"] = {name: float(jnp.linalg.norm(dw))
                               for name, (_, dw) in layer_grads.items()}
summary["layer_grad_norm_expected"] = float(0.2 * np.sqrt(kernel.size))

# %% [markdown]
# ## 4. Training
#
# `train_and_evaluate(config, workdir)` is the whole training loop: the official SGD
# recipe, data-parallel over every local device, a checkpoint and a line of
# `metrics.jsonl` per epoch, resumption from the latest checkpoint. The configs in
# `configs/` hold the paper's recipes (`configs/default.py`: ResNet-20 ANN-AWN on
# CIFAR-10, 400 epochs); here a copy of it is shrunk.
#
# In small mode the data are synthetic 8x8 images (a noisy colour pattern per class, from
# `awn_jax.data.synthetic`), without the random crop and flip: the class patterns are not
# flip-invariant, and at 8x8 a one-pixel shift moves the whole pattern. Small mode trains
# ANN-AWN only; full mode trains the CNN, the plain ANN and ANN-AWN on CIFAR-10 for 30
# epochs each (not timed on a GPU yet; the paper trains 400 epochs: use `train.py` for that).

# %%
config = default_config.get_config()
if MODE == "small":
    config.update(dict(dataset="synthetic", normalization="dataset", image_size=8,
                       crop_padding=0, random_flip=False, synthetic_num_train=1024, synthetic_num_test=256, batch_size=32,
                       num_epochs=5, eval_batch_size=256, log_every_steps=8))
    LAYER_TYPES = ("adder-awn",)
else:
    if DATA_DIR:
        config.update(dict(dataset="image_folder", data_dir=DATA_DIR))
    config.update(dict(num_epochs=30, batch_size=256))
    LAYER_TYPES = ("conv", "adder", "adder-awn")

histories = {}
for layer_type in LAYER_TYPES:
    config.layer_type = layer_type
    config.workdir = str(WORKDIR / layer_type)
    train_and_evaluate(config, config.workdir)
    histories[layer_type] = read_metrics(config.workdir)

fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
for layer_type, history in histories.items():
    epochs = [m["epoch"] for m in history]
    axes[0].plot(epochs, [m["train_loss"] for m in history], "o-", label=layer_type)
    axes[1].plot(epochs, [100 * m["test_accuracy"] for m in history], "o-", label=layer_type)
axes[0].set(title="training loss", xlabel="epoch")
axes[1].set(title="test accuracy (%), BN tracked", xlabel="epoch")
for ax in axes:
    ax.legend()
plt.tight_layout()
plt.show()
summary["train"] = histories

# %% [markdown]
# ## 5. BatchNorm statistics modes
#
# A trained model's BatchNorm layers can normalize with different statistics at test time
# (`awn_jax.nn.BN_MODES`):
#
# | mode | mean | variance | in the paper |
# |---|---|---|---|
# | `train` | batch | batch (and updates the running averages) | training |
# | `tracked` | running | running | ordinary inference |
# | `running-mean` | **batch** | running | robust inference "-R" (Eq. 17) |
# | `running` | batch | batch | ablation "-r" (Table 3) |
#
# The paper's observation: adversarial perturbations shift the mean of the adder layers'
# outputs; normalizing with the current batch's mean removes much of that shift. The price
# is that an image's logits then depend on the other images of its batch. `load_run` reads
# a trained model back from its workdir; `set_bn_mode` switches a model in place.

# %%
run = load_run(str(WORKDIR / "adder-awn"))
test_batches = run.dataset.test_batches(128)
first, second = next(test_batches), next(test_batches)
images, labels = jnp.asarray(first["image"]), jnp.asarray(first["label"])
# The same first 16 images, with other companions in the batch.
mixed = jnp.concatenate([images[:16], jnp.asarray(second["image"])[16:]])

# nnx.jit compiles a function of NNX modules (a model is a Python object holding its state);
# eager execution would dispatch the many small operations of the adder layers one by one.
forward = nnx.jit(lambda model, images: model(images))
trained = nnx.merge(run.graphdef, run.params, run.batch_stats)
batch_dependence = {}
for mode in EVAL_BN_MODES:
    set_bn_mode(trained, mode)
    change = jnp.abs(forward(trained, images)[:16] - forward(trained, mixed)[:16]).max()
    batch_dependence[mode] = float(change)
    print(f"{mode:<13} max |logit change| of 16 images when their batch-mates change: "
          f"{batch_dependence[mode]:.4f}")
summary["bn_batch_dependence"] = batch_dependence

# %% [markdown]
# ## 6. PGD
#
# `attacks.attack(name, logits_fn, images, labels, key=...)` runs a white-box L-inf attack
# on any `images -> logits` function (defaults: the paper's settings, eps = 8/255, PGD with
# 7 steps of 2/255 from a random start). The attacker sees the model as deployed: the
# gradients go through the same BatchNorm mode that scores the adversarial batch, and
# `run.logits_fn(mode)` is that function. `eps` may be a traced value, so one compiled
# function per BN mode serves the whole sweep; the step is eps/4 (2/255 at eps = 8/255,
# the paper's Table 1 setting), and eps = 0 leaves the images clean.
#
# `evaluate.py` runs the full Table-1 grid (five attacks x BN modes, whole test set) on
# trained workdirs; the library call behind it is `awn_jax.robustness.evaluate_run`.

# %%
EPS_VALUES = [0.0, 2 / 255, 4 / 255, 8 / 255]


def pgd(logits_fn, images, labels, key, eps):
    """The adversarial batch and the model's predictions on it."""
    adversarial = attacks.attack("pgd", logits_fn, images, labels, key=key, eps=eps,
                                 step_size=eps / 4)
    return adversarial, jnp.argmax(logits_fn(adversarial), -1)


pgd_accuracy, pgd_examples = {}, {}
for mode in EVAL_BN_MODES:
    attack_fn = jax.jit(functools.partial(pgd, run.logits_fn(mode)))
    outcomes = [attack_fn(images, labels, jax.random.key(1), eps) for eps in EPS_VALUES]
    pgd_accuracy[mode] = [float(jnp.mean(predicted == labels)) for _, predicted in outcomes]
    pgd_examples[mode] = outcomes
    print(f"{mode:<13}", " ".join(f"{100 * a:6.2f}" for a in pgd_accuracy[mode]),
          "(% correct at eps*255 =", ", ".join(f"{255 * e:g}" for e in EPS_VALUES) + ")")

fig, ax = plt.subplots(figsize=(5, 3.5))
for mode, accuracies in pgd_accuracy.items():
    ax.plot(np.asarray(EPS_VALUES) * 255, 100 * np.asarray(accuracies), "o-", label=mode)
ax.set(title=f"PGD-7 on ResNet-20 ANN-AWN ({MODE} mode)", xlabel="eps x 255",
       ylabel="accuracy (%)")
ax.legend(title="BN mode")
plt.show()
summary["pgd"] = {"eps": EPS_VALUES, "accuracy": pgd_accuracy}

# %% [markdown]
# One test image before and after the attack at eps = 8/255, as the `tracked` model sees it:

# %%
(_, clean_pred), (adversarial, adv_pred) = pgd_examples["tracked"][0], pgd_examples["tracked"][-1]
perturbation = adversarial[0] - images[0]
fig, axes = plt.subplots(1, 3, figsize=(8, 3))
for ax, picture, title in zip(
        axes, (images[0], adversarial[0], 0.5 + perturbation * 0.5 / EPS_VALUES[-1]),
        (f"clean: predicted {int(clean_pred[0])} (label {int(labels[0])})",
         f"PGD: predicted {int(adv_pred[0])}", "perturbation (scaled)")):
    ax.imshow(np.asarray(jnp.clip(picture, 0, 1)), interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.axis("off")
plt.show()

# %% [markdown]
# ## Summary
#
# What this run obtained. In small mode these are toy numbers on synthetic 8x8 images after
# a few epochs: they show the pipeline working, not the paper's results, and which BN mode
# resists PGD best on this toy problem says nothing about CIFAR-10. For comparison, the
# paper's Table 1 (ResNet-20 on CIFAR-10, 400 epochs, PGD-7 at eps = 8/255): ANN 0.00%
# (clean 91.72%), ANN-R 29.72% (90.95%), ANN-R-AWN 43.39% (90.55%). `docs/RESULTS.md`
# collects the results obtained with this code so far; `evaluate.py` produces Table-1 rows
# for your own trained runs.

# %%
print(f"mode: {MODE}")
for layer_type, history in histories.items():
    print(f"{layer_type}: {len(history)} epochs, final test accuracy "
          f"{100 * history[-1]['test_accuracy']:.2f}% (BN tracked)")
print("PGD-7 accuracy at eps = 8/255:",
      ", ".join(f"{mode} {100 * acc[-1]:.2f}%" for mode, acc in pgd_accuracy.items()))
