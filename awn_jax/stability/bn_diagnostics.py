"""Why "-R" collapses on normalized adder kernels: diagnostics of a model's BatchNorms.

"-R" (``running-mean``, Eq. 17) subtracts each batch's mean but divides by the stored
variance, so nothing pulls a layer's variance back to what the next layer expects. Four
measurements locate where it goes wrong (docs/REPRODUCTION.md, "Why -R collapses"):

* :func:`variance_ratios` -- per BN, in the order the forward calls them: the mean square
  of what it normalizes (the input minus the mean it uses) over the variance it divides
  by, channel by channel. 1 where the statistics fit the inputs.
* :func:`variance_gains` -- scale one BN's output about its shift (the ``bias`` it adds
  after normalizing) by ``s``, which is what a stored variance off by ``1/s**2`` does under
  "-R", and measure the input variance of the next BN that depends on it, relative to the
  unscaled forward: ``s**2`` through a linear path (elasticity ``log gain / log s**2`` =
  1), more where the layers between amplify the change (> 1: a mismatch grows from layer
  to layer), less where they damp it (< 1).
* :func:`variance_scale_accuracy` -- accuracy with every stored variance multiplied by a
  factor: how close to a knife edge a mode sits.
* :func:`batch_accuracy` -- accuracy against the evaluation batch size, and on
  single-class batches against mixed batches of the same size and images.
* :func:`augmentation_trigger` -- the test images given the training augmentation
  (zero-padded random crop, flip): how much wider the first BN's input gets, and the
  accuracy per mode, i.e. whether the trained statistics fit augmented images better.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from awn_jax.bn_statistics import bn_layers, bn_paths
from awn_jax.data import transforms
from awn_jax.nn.batchnorm import check_bn_modes
from awn_jax.model import fill_named, named_leaves, with_bn_mode
from awn_jax.nn.batchnorm import intercept
from awn_jax.reports import new_figure
from awn_jax.robustness.studies import single_class_order

VARIANCE_FACTORS = (0.9, 0.95, 1.0, 1.05, 1.1)
BATCH_SIZES = (50, 100, 200, 500, 2000)


def _batches(images, batch_size):
    return [images[i:i + batch_size] for i in range(0, len(images) - batch_size + 1,
                                                   batch_size)]


@functools.partial(jax.jit, static_argnums=0)
def _ratios(graphdef, params, batch_stats, images):
    model = nnx.merge(graphdef, params, batch_stats, copy=True)
    path_of, out = bn_paths(model), {}

    def record(module, x, y):
        axes = tuple(range(x.ndim - 1))
        mean = module.mean[...] if module.mode == "tracked" else jnp.mean(x, axis=axes)
        out[path_of[id(module)]] = jnp.mean(jnp.square(x - mean), axis=axes) / module.var[...]
        return y

    with intercept(record):
        model(images)
    return out


def variance_ratios(run, images, *, bn_mode: str, batch_size: int = 500) -> list[dict]:
    """Per BN (call order): mean, median, min and max over channels of the mean square of
    what it normalizes over the variance it divides by, averaged over the batches."""
    check_bn_modes([bn_mode])
    graphdef = with_bn_mode(run.graphdef, run.params, run.batch_stats, bn_mode)
    per_batch = [jax.device_get(_ratios(graphdef, run.params, run.batch_stats, batch))
                 for batch in _batches(images, batch_size)]
    rows = []
    for name in _call_order(graphdef, run, images[:2]):
        ratio = np.mean([np.asarray(b[name], np.float64) for b in per_batch], axis=0)
        rows.append({"layer": name, "mean": float(ratio.mean()),
                     "median": float(np.median(ratio)), "min": float(ratio.min()),
                     "max": float(ratio.max())})
    return rows


def _call_order(graphdef, run, images) -> list[str]:
    return [name for name, _ in bn_layers(graphdef, run.params, run.batch_stats,
                                          np.shape(images)[1:])]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _input_variances(graphdef, scaled, params, batch_stats, images, scale):
    """Every BN's per-channel input variance over the batch, with the output of the BN
    ``scaled`` (a name, or None) scaled by ``scale`` about the BN's shift (its ``bias``)."""
    model = nnx.merge(graphdef, params, batch_stats, copy=True)
    path_of, out = bn_paths(model), {}

    def record(module, x, y):
        name = path_of[id(module)]
        out[name] = jnp.var(x, axis=tuple(range(x.ndim - 1)))
        if name != scaled:
            return y
        shift = module.bias[...]  # what the BN adds after normalizing: kept
        return shift + scale * (y - shift)

    with intercept(record):
        model(images)
    return out


def variance_gains(run, images, *, bn_mode: str = "running-mean", scale: float = 1.1,
                   batch_size: int = 500, tolerance: float = 1e-4) -> list[dict]:
    """Per BN but the last: its output scaled by ``scale`` about its shift, the input variance
    of the first later BN that changes by more than ``tolerance`` (the next one it feeds)
    over its unscaled value, mean over channels and batches (``scale**2`` for a linear
    path)."""
    check_bn_modes([bn_mode])
    graphdef = with_bn_mode(run.graphdef, run.params, run.batch_stats, bn_mode)
    order = _call_order(graphdef, run, images[:2])
    batches = _batches(images, batch_size)

    def variances(scaled):
        per_batch = [jax.device_get(_input_variances(graphdef, scaled, run.params,
                                                     run.batch_stats, b, scale))
                     for b in batches]
        return {name: np.mean([np.asarray(v[name], np.float64) for v in per_batch], axis=0)
                for name in order}

    base = variances(None)
    rows = []
    for index, name in enumerate(order[:-1]):
        scaled = variances(name)
        for later in order[index + 1:]:
            ratio = scaled[later] / base[later]
            if np.max(np.abs(ratio - 1)) > tolerance:
                gain = float(ratio.mean())
                rows.append({"layer": name, "next": later, "gain": gain,
                             "elasticity": float(np.log(gain) / np.log(scale ** 2)),
                             "min": float(ratio.min()), "max": float(ratio.max())})
                break
    return rows


def variance_scale_accuracy(run, images, labels, *, bn_modes=("tracked", "running-mean"),
                            factors=VARIANCE_FACTORS, batch_size: int = 500) -> list[dict]:
    """Accuracy with every stored BN variance multiplied by each factor."""
    rows = []
    for mode in check_bn_modes(bn_modes):
        for factor in factors:
            stats = fill_named(run.batch_stats, {
                name: np.asarray(v) * factor if name.endswith(".var") else np.asarray(v)
                for name, v in named_leaves(run.batch_stats).items()})
            rows.append({"bn_mode": mode, "factor": factor, "accuracy": run.evaluator.accuracy(
                images, labels, batch_size=batch_size, bn_mode=mode, batch_stats=stats)})
    return rows


def batch_accuracy(run, images, labels, *, bn_modes=("running-mean",),
                   batch_sizes=BATCH_SIZES, single_class_batch: int = 100) -> dict:
    """Accuracy at each evaluation batch size (the first multiple of it of ``images``), and
    on single-class batches of ``single_class_batch`` against the same images in mixed
    batches of that size."""
    sizes, single = [], {}
    rows = single_class_order(labels, single_class_batch)
    mixed = np.random.default_rng(17).permutation(rows)
    for mode in check_bn_modes(bn_modes):
        for size in batch_sizes:
            n = len(images) - len(images) % size
            if n:
                sizes.append({"bn_mode": mode, "batch_size": size, "num_examples": n,
                              "accuracy": run.evaluator.accuracy(
                                  images[:n], labels[:n], batch_size=size, bn_mode=mode)})
        single[mode] = {name: run.evaluator.accuracy(
            images[order], labels[order], batch_size=single_class_batch, bn_mode=mode)
            for name, order in (("single-class", rows), ("mixed", mixed))}
    return {"batch_sizes": sizes, "single_class_batch": single_class_batch,
            "num_single_class": len(rows), "single_class": single}


def augmentation_trigger(run, images, labels, *, bn_modes=("tracked", "running-mean"),
                         batch_size: int = 500, seed: int = 0) -> dict | None:
    """The test images padded-cropped and flipped as in training (``run.config``'s
    padding; draws from ``seed``): the first BN's mean-square ratio (``tracked``) over that of
    the clean images, and the accuracy per mode on both. None without crop augmentation."""
    padding = run.config.get("crop_padding", 0)
    if not padding:
        return None
    rng = np.random.default_rng(seed)
    offsets = rng.integers(0, 2 * padding + 1, size=(len(images), 2))
    flips = (rng.random(len(images)) < 0.5) & bool(run.config.get("random_flip", True))
    augmented = transforms.pad_crop_flip(images, offsets, flips, padding)
    first = {name: variance_ratios(run, x, bn_mode="tracked", batch_size=batch_size)[0]["mean"]
             for name, x in (("clean", images), ("augmented", augmented))}
    return {"first_bn_widening": first["augmented"] / first["clean"],
            "accuracy": {mode: {name: run.evaluator.accuracy(x, labels, batch_size=batch_size,
                                                            bn_mode=mode)
                                for name, x in (("clean", images), ("augmented", augmented))}
                         for mode in check_bn_modes(bn_modes)}}


def diagnose(run, images, labels, *, bn_modes=("tracked", "running-mean"),
             batch_size: int = 500, gain_scale: float = 1.1,
             factors=VARIANCE_FACTORS, batch_sizes=BATCH_SIZES,
             single_class_batch: int = 100) -> dict:
    """All the diagnostics of ``run`` on ``images``: ratios per mode, gains under
    ``running-mean``, variance-scale sensitivity, the batch dependence of the batch modes
    among ``bn_modes`` and the augmentation trigger."""
    batch_modes = [m for m in bn_modes if m != "tracked"] or ["running-mean"]
    return {
        "run": run.label, "model": run.paper_name, "epoch": run.epoch,
        "bn_stats": run.bn_stats.label(), "bn_stats_description": run.bn_stats.describe(),
        "num_examples": len(images), "batch_size": batch_size,
        "ratios": {mode: variance_ratios(run, images, bn_mode=mode, batch_size=batch_size)
                   for mode in check_bn_modes(bn_modes)},
        "gain_scale": gain_scale,
        "gains": variance_gains(run, images, scale=gain_scale, batch_size=batch_size),
        "variance_scale": variance_scale_accuracy(run, images, labels, bn_modes=bn_modes,
                                                  factors=factors, batch_size=batch_size),
        "batch": batch_accuracy(run, images, labels, bn_modes=batch_modes,
                                batch_sizes=batch_sizes,
                                single_class_batch=single_class_batch),
        "augmentation": augmentation_trigger(run, images, labels, bn_modes=bn_modes,
                                             batch_size=batch_size),
    }


def format_markdown(results) -> str:
    """Per run: the ratio and gain per layer, the variance-scale and batch tables."""
    lines = []
    for r in results:
        lines += [f"### {r['run']} ({r['model']}, epoch {r['epoch']})", "",
                  f"{r['bn_stats_description']}; {r['num_examples']} test images, batches "
                  f"of {r['batch_size']}.", ""]
        modes = list(r["ratios"])
        gains = {g["layer"]: g for g in r["gains"]}
        lines += ["| BN layer | " + " | ".join(f"ratio, {m}" for m in modes)
                  + f" | gain (x{r['gain_scale']}) | elasticity | into |",
                  "|" + "---|" * (len(modes) + 4)]
        for i, row in enumerate(r["ratios"][modes[0]]):
            name = row["layer"]
            cells = [f"{r['ratios'][m][i]['mean']:.3g}" for m in modes]
            gain = gains.get(name)
            lines.append(f"| {name} | " + " | ".join(cells) + " | "
                         + (f"{gain['gain']:.3f} | {gain['elasticity']:.2f} | {gain['next']}"
                            if gain else "- | - | -")
                         + " |")
        factors = sorted({row["factor"] for row in r["variance_scale"]})
        lines += ["", "| BN mode | " + " | ".join(f"var x{f:g}" for f in factors) + " |",
                  "|" + "---|" * (1 + len(factors))]
        for mode in dict.fromkeys(row["bn_mode"] for row in r["variance_scale"]):
            by = {row["factor"]: row["accuracy"] for row in r["variance_scale"]
                  if row["bn_mode"] == mode}
            lines.append(f"| {mode} | " + " | ".join(f"{100 * by[f]:.2f}" for f in factors)
                         + " |")
        batch = r["batch"]
        sizes = sorted({row["batch_size"] for row in batch["batch_sizes"]})
        size = batch["single_class_batch"]
        lines += ["", "| BN mode | " + " | ".join(f"batch {s}" for s in sizes)
                  + f" | single-class {size} | mixed {size} |", "|" + "---|" * (3 + len(sizes))]
        for mode, controls in batch["single_class"].items():
            by = {row["batch_size"]: row["accuracy"] for row in batch["batch_sizes"]
                  if row["bn_mode"] == mode}
            lines.append(f"| {mode} | " + " | ".join(
                f"{100 * by[s]:.2f}" if s in by else "-" for s in sizes)
                + f" | {100 * controls['single-class']:.2f} | {100 * controls['mixed']:.2f} |")
        trigger = r.get("augmentation")
        if trigger:
            lines += ["", f"Test images padded-cropped and flipped as in training: the first "
                      f"BN's input is {trigger['first_bn_widening']:.2f}x as wide (mean "
                      "square about its stored mean).", "",
                      "| BN mode | clean images | augmented images |", "|---|---|---|"]
            lines += [f"| {mode} | {100 * a['clean']:.2f} | {100 * a['augmented']:.2f} |"
                      for mode, a in trigger["accuracy"].items()]
        lines.append("")
    return "\n".join(lines)


def plot(results):
    """Four panels: ratio per layer (log scale), gain per layer, accuracy against the
    variance factor, accuracy against the evaluation batch size."""
    fig, axes = new_figure(2, 2, figsize=(13, 9))
    (ax_ratio, ax_gain), (ax_scale, ax_batch) = axes
    for i, r in enumerate(results):
        color = f"C{i}"
        for mode, style in zip(r["ratios"], ("-", "--", ":")):
            ax_ratio.plot([row["mean"] for row in r["ratios"][mode]], style, color=color,
                          marker="o", ms=3, label=f"{r['run']} ({mode})")
        ax_gain.plot([g["gain"] for g in r["gains"]], color=color, marker="o", ms=3,
                     label=r["run"])
        for mode, style in zip(dict.fromkeys(row["bn_mode"] for row in r["variance_scale"]),
                               ("-", "--", ":")):
            rows = [row for row in r["variance_scale"] if row["bn_mode"] == mode]
            ax_scale.plot([row["factor"] for row in rows],
                          [100 * row["accuracy"] for row in rows], style, color=color,
                          marker="o", label=f"{r['run']} ({mode})")
        for mode, style in zip(r["batch"]["single_class"], ("-", "--")):
            rows = [row for row in r["batch"]["batch_sizes"] if row["bn_mode"] == mode]
            ax_batch.plot([row["batch_size"] for row in rows],
                          [100 * row["accuracy"] for row in rows], style, color=color,
                          marker="o", label=f"{r['run']} ({mode})")
            ax_batch.plot([r["batch"]["single_class_batch"]],
                          [100 * r["batch"]["single_class"][mode]["single-class"]], "x",
                          color=color, ms=9)
    if results:
        ax_gain.axhline(results[0]["gain_scale"] ** 2, color="gray", lw=0.8,
                        label="linear path (s²)")
    ax_ratio.set(yscale="log", xlabel="BN layer (call order)",
                 ylabel="mean square normalized / stored variance",
                 title="Do the stored variances fit? (1: yes)")
    ax_ratio.axhline(1, color="gray", lw=0.8)
    ax_gain.set(xlabel="BN layer (call order)", ylabel="next BN's input variance ratio",
                title="Variance gain of one BN output scaled")
    ax_scale.set(xlabel="stored variances x factor", ylabel="accuracy (%)",
                 title="Sensitivity to the stored variances")
    ax_batch.set(xscale="log", xlabel="evaluation batch size", ylabel="accuracy (%)",
                 title="Batch dependence (x: single-class batches)")
    for ax in axes.ravel():
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    return fig
