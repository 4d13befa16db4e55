"""The variance analysis of Sec. 3 on a trained adder network: per adder layer, the measured
kernel, input and output statistics against Eq. 7-8 (:mod:`.variance_theory`).

The paper's setting: the input of an adder layer is ``x = max(0, y)``, ``y ~ N(0, sigma^2)``,
the kernel is Laplace(mu, b), and over the ``n = k*k*cin`` terms of an output
``E[y'] >= -n (b + tau_sigma + |tau_mu|)`` (Eq. 7) and ``Var[y'] >= n [(b + tau_sigma)^2 -
2 |tau_mu| (b + tau_sigma)]`` (Eq. 8), expectations over inputs and weights. Here, per
layer of a trained model on real images:

* the kernel: Laplace fit (``mu`` the median, ``b`` the mean absolute deviation), mean and
  variance of the effective kernel;
* the input: its mean and variance, and ``sigma``, the scale of the rectified Gaussian with
  the measured variance (``Var[x] = sigma^2 (1/2 - 1/(2 pi))``, Eq. 5), with that Gaussian's
  mean ``sigma / sqrt(2 pi)`` (Eq. 4) beside the measured mean;
* the output before BN: mean, and variance over inputs and kernels (all channels pooled,
  as the paper's expectation) and over inputs only (per channel, averaged);
* Eq. 7-8 from the measured ``sigma``, ``mu``, ``b``, ``n``, and the exact moments under the
  paper's assumptions (:func:`.variance_theory.adder_exact_moments`);
* the BatchNorm after the layer: its running mean, its running variance averaged over the
  channels (what it divides by: the variance over inputs) and pooled with the spread of the
  channels' means (comparable with the variance over inputs and kernels).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from awn_jax.model import named_leaves, with_bn_mode
from awn_jax.nn.layers import record_calls
from awn_jax.stability import variance_theory as theory
from awn_jax.stability.distributions import block_layers, fit_laplace

_RECTIFIED_VARIANCE = 0.5 - 1.0 / (2.0 * math.pi)  # Var[max(0, y)] / sigma^2, Eq. 5


@functools.partial(jax.jit, static_argnums=0)
def _moments(graphdef, params, batch_stats, images):
    """Per adder layer: the input's mean and mean square, the output's per-channel mean and
    mean square, over the batch."""
    model = nnx.merge(graphdef, params, batch_stats, copy=True)
    names = {id(layer): name for name, layer in block_layers(model)}
    out = {}

    def record(layer, x, y):
        if id(layer) in names and layer.layer_type != "conv":
            x, y = x.astype(jnp.float32), y.astype(jnp.float32)
            axes = tuple(range(y.ndim - 1))
            out[names[id(layer)]] = {"x": jnp.mean(x), "x2": jnp.mean(jnp.square(x)),
                                     "y": jnp.mean(y, axis=axes),
                                     "y2": jnp.mean(jnp.square(y), axis=axes)}

    with record_calls(record):
        model(images)
    return out


def analyze(run, images, *, bn_mode: str = "tracked", batch_size: int = 500) -> dict:
    """The table of the module docstring for every adder layer of ``run`` on ``images``."""
    graphdef = with_bn_mode(run.graphdef, run.params, run.batch_stats, bn_mode)
    batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
    per_batch = [jax.device_get(_moments(graphdef, run.params, run.batch_stats, b))
                 for b in batches]
    weights = np.asarray([len(b) for b in batches], np.float64)
    moments = jax.tree.map(lambda *xs: np.average(np.stack(xs), axis=0, weights=weights),
                           *per_batch)
    model = nnx.merge(run.graphdef, run.params, run.batch_stats)
    stats = named_leaves(run.batch_stats)
    rows = []
    for name, layer in block_layers(model):
        if name not in moments:
            continue
        m = moments[name]
        kernel = np.asarray(layer.effective_kernel(), np.float64)
        laplace = fit_laplace(kernel)
        n = int(np.prod(kernel.shape[:3]))
        x_var = float(m["x2"] - m["x"] ** 2)
        sigma = math.sqrt(max(x_var, 0.0) / _RECTIFIED_VARIANCE)
        mu, b = laplace["loc"], laplace["scale"]
        exact_mean, exact_var = theory.adder_exact_moments(sigma, b, mu, n)
        y_mean = float(np.mean(m["y"]))
        bn = name.rsplit(".", 1)[0] + "." + {"conv1": "bn1", "conv2": "bn2", "conv3": "bn3",
                                             "conv": "bn"}[name.rsplit(".", 1)[1]]
        bn_mean, bn_var = (np.asarray(stats[f"{bn}.{k}"], np.float64) for k in ("mean", "var"))
        rows.append({
            "layer": name, "n": n,
            "kernel_mean": float(kernel.mean()), "kernel_var": float(kernel.var()),
            "laplace_mu": mu, "laplace_b": b, "laplace_var": laplace["variance"],
            "x_mean": float(m["x"]), "x_var": x_var, "sigma": sigma,
            "rectified_mean": sigma / theory.SQRT_2PI,
            "y_mean": y_mean,
            "y_var_pooled": float(np.mean(m["y2"]) - y_mean ** 2),
            "y_var_per_channel": float(np.mean(m["y2"] - np.square(m["y"]))),
            "eq7_mean_bound": theory.adder_mean_bound(sigma, b, mu, n),
            "eq8_var_bound": theory.adder_var_bound(sigma, b, mu, n),
            "exact_mean": exact_mean, "exact_var": exact_var,
            "bn_mean": float(bn_mean.mean()),
            "bn_var_pooled": float(bn_var.mean() + bn_mean.var()),
            "bn_var_per_channel": float(bn_var.mean()),
        })
    return {"run": run.label, "model": run.paper_name, "epoch": run.epoch,
            "bn_mode": bn_mode, "num_examples": len(images), "layers": rows}


def format_markdown(results) -> str:
    lines = []
    for r in results:
        lines += [f"### {r['model']} (`{r['run']}`, epoch {r['epoch']}; {r['num_examples']} "
                  f"test images, BN `{r['bn_mode']}`)", "",
                  "| layer | n | kernel var (Laplace b) | x mean (rect. Gaussian) | sigma "
                  "| E[y'] | Eq. 7 bound | exact | Var[y'] x,W (x only) | Eq. 8 bound | exact "
                  "| BN mean | BN var pooled (per channel) |", "|" + "---|" * 13]
        for row in r["layers"]:
            lines.append(
                f"| {row['layer']} | {row['n']} | {row['kernel_var']:.3g} ({row['laplace_b']:.3g}) "
                f"| {row['x_mean']:.3g} ({row['rectified_mean']:.3g}) | {row['sigma']:.3g} "
                f"| {row['y_mean']:.4g} | {row['eq7_mean_bound']:.4g} | {row['exact_mean']:.4g} "
                f"| {row['y_var_pooled']:.4g} ({row['y_var_per_channel']:.4g}) "
                f"| {row['eq8_var_bound']:.4g} | {row['exact_var']:.4g} "
                f"| {row['bn_mean']:.4g} | {row['bn_var_pooled']:.4g} "
                f"({row['bn_var_per_channel']:.4g}) |")
        lines.append("")
    return "\n".join(lines)
