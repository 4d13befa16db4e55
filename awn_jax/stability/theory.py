"""The variance analysis of Sec. 3 as a study: :mod:`awn_jax.stability.variance_theory`'s checks
(Eq. 4-5 exact moments, Eq. 6-8 bounds, Eq. 13-15 perturbations, a real adder layer) and a
figure of how tight Eq. 7 and Eq. 8 are as the weight mean moves, per weight scale b.

Eq. 9 is BN applied with the bounds of Eq. 7-8 in place of the moments and adds nothing
to check numerically; Eq. 14 is covered by the perturbation checks.
"""

from __future__ import annotations

import numpy as np

from awn_jax.stability import variance_theory as vt
from awn_jax.reports import new_figure


def run(seed: int = 0, samples: int = 20_000, sweep_points: int = 41, grid=None,
        perturbation_grid=None, layer: bool = True) -> dict:
    """``variance_theory.run_all`` plus exact Eq. 7/8 ratios swept over tau_mu."""
    results = vt.run_all(seed=seed, samples=samples, grid=grid,
                         perturbation_grid=perturbation_grid, layer=layer)
    sweeps = []
    for sigma, b in sorted({(g["sigma"], g["b"]) for g in results["adder_bounds"]}):
        _, b_tau = vt.taus(sigma, b, 0.0)
        tau = np.linspace(-3.0, 3.0, sweep_points) * b_tau
        mean_ratio, var_ratio = [], []
        for t in tau:
            mu = sigma / vt.SQRT_2PI - t
            mean_exact, var_exact = vt.adder_exact_moments(sigma, b, mu, 1)
            mean_ratio.append(mean_exact / vt.adder_mean_bound(sigma, b, mu, 1))
            var_bound = vt.adder_var_bound(sigma, b, mu, 1)
            var_ratio.append(var_exact / var_bound if var_bound > 0 else None)
        sweeps.append({"sigma": sigma, "b": b, "b_plus_tau_sigma": b_tau,
                       "tau_mu": tau.tolist(), "mean_ratio_exact": mean_ratio,
                       "var_ratio_exact": var_ratio,
                       "failure_band": list(vt.bound_failure_band(sigma, b))})
    return {**results, "bound_sweeps": sweeps, "markdown": vt.format_markdown(results)}


def plot(results):
    """E[y'] / Eq. 7 bound (holds below 1) and Var[y'] / Eq. 8 bound (holds above 1)
    against tau_mu / (b + tau_sigma): exact curves, Monte Carlo points, failure bands."""
    fig, (ax_mean, ax_var) = new_figure(1, 2, figsize=(12, 4))
    for sweep in results["bound_sweeps"]:
        scale = sweep["b_plus_tau_sigma"]
        x = np.asarray(sweep["tau_mu"]) / scale
        label = f"sigma={sweep['sigma']:.3g}, b={sweep['b']:.3g}"
        line, = ax_mean.plot(x, sweep["mean_ratio_exact"], label=label)
        var = [np.nan if v is None else v for v in sweep["var_ratio_exact"]]
        ax_var.plot(x, var, color=line.get_color(), label=label)
        points = [r for r in results["adder_bounds"]
                  if (r["sigma"], r["b"]) == (sweep["sigma"], sweep["b"])]
        ax_mean.errorbar([r["tau_mu"] / scale for r in points],
                         [r["mean_ratio_mc"] for r in points],
                         [r["mean_ratio_se"] for r in points], fmt="o", ms=3,
                         color=line.get_color())
        points = [r for r in points if not r["var_bound_trivial"]]
        ax_var.errorbar([r["tau_mu"] / scale for r in points],
                        [r["var_ratio_mc"] for r in points],
                        [r["var_ratio_se"] for r in points], fmt="o", ms=3,
                        color=line.get_color())
        low, high = sweep["failure_band"]
        if high > low:
            for ax in (ax_mean, ax_var):
                ax.axvspan(low / scale, high / scale, color=line.get_color(), alpha=0.15)
    ax_mean.axhline(1.0, color="k", lw=0.8)
    ax_var.axhline(1.0, color="k", lw=0.8)
    ax_mean.set(xlabel="tau_mu / (b + tau_sigma)", ylabel="E[y'] / Eq. 7 bound",
                title="Eq. 7 holds below 1 (lines exact, points Monte Carlo)")
    ax_var.set(xlabel="tau_mu / (b + tau_sigma)", ylabel="Var[y'] / Eq. 8 bound", yscale="log",
               title="Eq. 8 holds above 1 (bound <= 0 where missing)")
    for ax in (ax_mean, ax_var):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig
