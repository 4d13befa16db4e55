"""Weight and feature distributions and BN running statistics across saved epochs.

* Weights (Fig. 1c-d): the kernels of the layers inside the residual stages, as stored and
  as computed with (after WS/AWN), with maximum-likelihood Laplace and Gaussian fits.
* Features before BN (Fig. 3): the outputs of every layer inside the stages on the same
  test images at each epoch, read while the forward is traced
  (:func:`awn_jax.nn.layers.record_calls`; every such layer feeds a BatchNorm); mean/std per
  layer and histograms of the chosen layers.
* BN running statistics: the cross-channel spread of the running variances and how far
  the running means move between saved epochs, relative to their size and in units of
  the running standard deviation (the shift a test image sees after normalization).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from awn_jax.errors import UserError
from awn_jax.model import bn_drift, named_leaves, with_bn_mode
from awn_jax.nn import Conv2d
from awn_jax.nn.layers import record_calls
from awn_jax.reports import new_figure


# ---------------------------------------------------------------------------------------
# Fits
# ---------------------------------------------------------------------------------------


def fit_laplace(values) -> dict:
    """Maximum likelihood: location the median, scale the mean absolute deviation from it;
    ``loglik`` is the mean log-likelihood per value (comparable with the Gaussian's)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    loc = float(np.median(v))
    scale = float(np.mean(np.abs(v - loc)))
    return {"loc": loc, "scale": scale, "variance": 2 * scale ** 2,
            "loglik": -math.log(2 * scale) - 1.0}


def fit_gaussian(values) -> dict:
    """Maximum likelihood: sample mean and (biased) standard deviation."""
    v = np.asarray(values, dtype=np.float64).ravel()
    std = float(v.std())
    return {"mean": float(v.mean()), "std": std, "variance": std ** 2,
            "loglik": -0.5 * math.log(2 * math.pi * std ** 2) - 0.5}


def laplace_pdf(x, loc, scale):
    return np.exp(-np.abs(np.asarray(x) - loc) / scale) / (2 * scale)


def gaussian_pdf(x, mean, std):
    return np.exp(-0.5 * ((np.asarray(x) - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))


def _histogram(values, bins, value_range=None) -> dict:
    density, edges = np.histogram(values, bins=bins, range=value_range, density=True)
    return {"edges": edges.tolist(), "density": density.tolist()}


# ---------------------------------------------------------------------------------------
# Per checkpoint
# ---------------------------------------------------------------------------------------


def block_layers(model) -> list[tuple[str, Conv2d]]:
    """``(name, layer)`` of the layers inside the residual stages, in model order."""
    return [(".".join(map(str, path)), module) for path, module in nnx.iter_graph(model)
            if isinstance(module, Conv2d) and path and path[0] == "stages"]


def default_layers(names) -> list[str]:
    """The first and last non-shortcut layers (ResNet-20: the paper's 2nd and 19th)."""
    main = [n for n in names if "shortcut" not in n]
    return sorted({main[0], main[-1]}, key=main.index)


def weight_summary(run, bins: int = 100) -> dict:
    """Per-layer statistics of the stored and effective kernels, and fits and a histogram
    of all effective kernels pooled."""
    model = nnx.merge(run.graphdef, run.params, run.batch_stats)
    layers, pooled = [], []
    for name, layer in block_layers(model):
        raw = np.asarray(layer.kernel[...], np.float64)
        effective = np.asarray(layer.effective_kernel(), np.float64)
        pooled.append(effective.ravel())
        layers.append({"layer": name, "layer_type": layer.layer_type,
                       "raw_mean": float(raw.mean()), "raw_std": float(raw.std()),
                       "mean": float(effective.mean()), "std": float(effective.std()),
                       "laplace": fit_laplace(effective), "gaussian": fit_gaussian(effective)})
    pooled = np.concatenate(pooled)
    return {"layers": layers, "pooled_laplace": fit_laplace(pooled),
            "pooled_gaussian": fit_gaussian(pooled), "pooled_histogram": _histogram(pooled, bins)}


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _pre_bn_features(graphdef, names, keep, params, batch_stats, images):
    """Statistics of every named layer's output, and the whole output of those in keep."""
    model = nnx.merge(graphdef, params, batch_stats, copy=True)
    wanted = {id(layer): name for name, layer in block_layers(model) if name in names}
    outputs = {}

    def record(layer, x, y):
        if id(layer) in wanted:
            outputs[wanted[id(layer)]] = y

    with record_calls(record):
        model(images)
    stats = {}
    for name in names:
        x = outputs[name].astype(jnp.float32)
        axes = tuple(range(x.ndim - 1))
        stats[name] = {"mean": jnp.mean(x), "std": jnp.std(x),
                       "channel_mean": jnp.mean(x, axes), "channel_std": jnp.std(x, axes)}
    return stats, {name: outputs[name] for name in keep}


def feature_summary(run, images, layers, *, bn_mode="tracked", max_values=200_000,
                    seed=0) -> tuple[list[dict], dict]:
    """Per-layer table of the features before BN, and up to ``max_values`` random values
    of each chosen layer's features (for histograms)."""
    names = tuple(name for name, _ in block_layers(
        nnx.merge(run.graphdef, run.params, run.batch_stats)))
    unknown = sorted(set(layers) - set(names))
    if unknown:
        raise UserError(f"unknown layers {unknown}; the layers are {list(names)}")
    graphdef = with_bn_mode(run.graphdef, run.params, run.batch_stats, bn_mode)
    stats, kept = jax.device_get(_pre_bn_features(graphdef, names, tuple(layers), run.params,
                                                  run.batch_stats, images))
    table = [{"layer": name, "mean": float(s["mean"]), "std": float(s["std"]),
              "channel_std_mean": float(np.mean(s["channel_std"])),
              "channel_mean_spread": float(np.std(s["channel_mean"]))}
             for name, s in ((n, stats[n]) for n in names)]
    rng = np.random.default_rng(seed)
    samples = {}
    for name, x in kept.items():
        flat = np.ravel(x)
        samples[name] = flat if flat.size <= max_values else rng.choice(flat, max_values,
                                                                       replace=False)
    return table, samples


def _bn_layers(batch_stats) -> dict[str, dict[str, np.ndarray]]:
    """``{layer: {"mean": ..., "var": ...}}`` in model order (the pytree sorts by name)."""
    layers = {}
    for name, value in named_leaves(jax.device_get(batch_stats)).items():
        layer, stat = name.rsplit(".", 1)
        layers.setdefault(layer, {})[stat] = np.asarray(value, np.float64)
    first, last = [n for n in layers if n.startswith("stem")], [
        n for n in layers if n.startswith("classifier")]
    order = first + [n for n in layers if n not in first + last] + last
    return {n: layers[n] for n in order}


def bn_summary(batch_stats) -> list[dict]:
    """Cross-channel spread of each BN layer's running variance (and its size)."""
    rows = []
    for layer, s in _bn_layers(batch_stats).items():
        var = s["var"]
        rows.append({"layer": layer, "var_mean": float(var.mean()), "var_std": float(var.std()),
                     "var_cv": float(var.std() / var.mean()),
                     "log10_var_std": float(np.std(np.log10(np.maximum(var, 1e-30)))),
                     "mean_abs_mean": float(np.mean(np.abs(s["mean"])))})
    return rows


def bn_mean_shift(previous, current) -> dict:
    """How far the running means moved between two checkpoints: per layer the relative
    change ``||m1 - m0|| / ||m1||`` and the mean of ``|m1 - m0| / sqrt(v1)`` over channels;
    pooled, the same (the relative ones as in the training log's ``bn_mean_drift``)."""
    before, after = _bn_layers(previous), _bn_layers(current)
    layers, shifts = [], []
    for layer, s in after.items():
        delta = s["mean"] - before[layer]["mean"]
        shift = np.abs(delta) / np.sqrt(s["var"])
        shifts.append(shift)
        layers.append({"layer": layer,
                       "relative": float(np.linalg.norm(delta) / max(np.linalg.norm(s["mean"]),
                                                                     1e-12)),
                       "shift_in_std": float(shift.mean())})
    return {**bn_drift(previous, current),
            "shift_in_std": float(np.concatenate(shifts).mean()), "layers": layers}


# ---------------------------------------------------------------------------------------
# Across epochs and runs
# ---------------------------------------------------------------------------------------


def analyze_run(runs, *, layers=None, num_images=256, bn_mode="tracked", bins=60,
                max_values=200_000, seed=0) -> dict:
    """All distribution statistics of one workdir over ``runs`` (its checkpoints, in
    epoch order; a sequence or an iterator, so only one need be in memory)."""
    epochs, weights, features, bn, shifts, samples = [], [], [], [], [], {}
    previous, label, images, workdir = None, None, None, None
    for run in runs:
        if images is None:
            label, workdir = run.paper_name, run.workdir
            images = next(run.dataset.test_batches(num_images, num_examples=num_images))["image"]
            layers = layers or default_layers(
                [n for n, _ in block_layers(nnx.merge(run.graphdef, run.params,
                                                      run.batch_stats))])
        epochs.append(run.epoch)
        weights.append({"epoch": run.epoch, **weight_summary(run, bins)})
        table, kept = feature_summary(run, images, layers, bn_mode=bn_mode,
                                      max_values=max_values, seed=seed)
        features.append({"epoch": run.epoch, "layers": table})
        for name, values in kept.items():
            samples.setdefault(name, []).append(values)
        bn.append({"epoch": run.epoch, "layers": bn_summary(run.batch_stats)})
        if previous is not None:
            shifts.append({"from_epoch": previous[0], "to_epoch": run.epoch,
                           **bn_mean_shift(previous[1], run.batch_stats)})
        previous = (run.epoch, run.batch_stats)
    if not epochs:
        raise UserError("no checkpoints to analyze")
    histograms = {}
    for name, per_epoch in samples.items():
        low = min(float(v.min()) for v in per_epoch)
        high = max(float(v.max()) for v in per_epoch)
        histograms[name] = [{"epoch": e, **_histogram(v, bins, (low, high))}
                            for e, v in zip(epochs, per_epoch)]
    return {"model": label, "workdir": workdir, "epochs": epochs, "feature_layers": layers,
            "num_images": int(len(images)), "bn_mode": bn_mode, "weights": weights,
            "features": features, "feature_histograms": histograms, "bn_running_var": bn,
            "bn_mean_shift": shifts}


# ---------------------------------------------------------------------------------------
# Figures (from the JSON results alone)
# ---------------------------------------------------------------------------------------


def plot_weights(results):
    """Pooled effective kernels of the last epoch with their Laplace and Gaussian fits."""
    fig, axes = new_figure(1, len(results), figsize=(4.5 * len(results), 3.6), squeeze=False)
    for ax, r in zip(axes[0], results):
        w = r["weights"][-1]
        edges, density = np.asarray(w["pooled_histogram"]["edges"]), w["pooled_histogram"][
            "density"]
        ax.stairs(density, edges, fill=True, alpha=0.4, label="weights")
        x = np.linspace(edges[0], edges[-1], 400)
        lap, gau = w["pooled_laplace"], w["pooled_gaussian"]
        ax.plot(x, laplace_pdf(x, lap["loc"], lap["scale"]), "r",
                label=f"Laplace mu={lap['loc']:.3g} var={lap['variance']:.3g}")
        ax.plot(x, gaussian_pdf(x, gau["mean"], gau["std"]), "k--",
                label=f"Gauss mu={gau['mean']:.3g} var={gau['variance']:.3g}")
        ax.set(title=f"{r['model']} block-layer weights, epoch {w['epoch']}", xlabel="weight")
        ax.legend(fontsize=7)
    return fig


def plot_features(results):
    """Features before BN of the chosen layers, one histogram per epoch (Fig. 3)."""
    cols = max(len(r["feature_layers"]) for r in results)
    fig, axes = new_figure(len(results), cols, figsize=(4.5 * cols, 3.2 * len(results)),
                             squeeze=False)
    for row, r in zip(axes, results):
        for ax, layer in zip(row, r["feature_layers"]):
            for h in r["feature_histograms"][layer]:
                ax.stairs(h["density"], h["edges"], label=f"epoch {h['epoch']}")
            ax.set(title=f"{r['model']} {layer}", xlabel="feature before BN")
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_bn(results):
    """Cross-channel spread of running variances, running-mean shifts, feature std."""
    fig, axes = new_figure(1, 3, figsize=(15, 4))
    for r in results:
        last = r["bn_running_var"][-1]
        line, = axes[0].plot([row["var_cv"] for row in last["layers"]], "o-", ms=3,
                             label=f"{r['model']} (epoch {last['epoch']})")
        if r["bn_mean_shift"]:
            axes[1].plot([s["to_epoch"] for s in r["bn_mean_shift"]],
                         [s["shift_in_std"] for s in r["bn_mean_shift"]], "o-",
                         color=line.get_color(), label=r["model"])
        for features, style in ((r["features"][0], ":"), (r["features"][-1], "-")):
            axes[2].plot([row["std"] for row in features["layers"]], style, marker="o", ms=3,
                         color=line.get_color(), label=f"{r['model']} epoch {features['epoch']}")
    axes[0].set(xlabel="BN layer (model order)", ylabel="std / mean of running var",
                title="Cross-channel spread of BN running variances")
    axes[1].set(xlabel="epoch", ylabel="mean |m_e - m_prev| / sqrt(v_e)",
                title="BN running-mean shift since the previous checkpoint")
    axes[2].set(xlabel="layer in the stages (model order)", ylabel="std", yscale="log",
                title="Std of features before BN")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig
