"""Monte Carlo check of the variance analysis of the paper (Sec. 3, Eq. 4-9; Sec. 4, Eq. 13-15).

Setting of the paper (Eq. 3): one adder layer after BN and ReLU,
``x = max(0, y)`` with ``y ~ N(0, sigma^2)`` i.i.d., weights ``W ~ Laplace(mu, b)``
i.i.d. (variance ``2 b^2``, assumed ``2 b^2 >> sigma^2``), and the adder output over the
``n = d*d*cin`` terms of one output channel, ``y' = -sum_j |x_j - W_j|``. Expectations
are over both ``x`` and ``W``, as in the paper.

Closed forms, as transcribed from the paper (the extracted text loses fraction bars,
square roots and subscripts; each form below was re-derived):

* Eq. 4: ``E[x] = sigma * phi(0) / (1 - Phi(0)) * 1/2 = sigma / sqrt(2 pi)`` (exact).
* Eq. 5: ``Var[x] = [sigma^2 (1 - (phi(0)/(1 - Phi(0)))^2) + 4 sigma^2/(2 pi)] * 1/2
  - sigma^2/(2 pi) = sigma^2 (1/2 - 1/(2 pi))`` (exact).
* After Eq. 5: ``x - W ~approx L(tau_mu, b + tau_sigma)`` with
  ``tau_mu = sigma/sqrt(2 pi) - mu`` and ``b + tau_sigma = sqrt(b^2 + (pi - 1) sigma^2 / (4 pi))``.
  Mean and variance of ``x - W`` are matched exactly (``Var = 2 (b + tau_sigma)^2``);
  only the Laplace shape is an approximation.
* Eq. 6: ``y' >= -sum [|x - W - tau_mu| + |tau_mu|]`` (triangle inequality, holds
  pointwise), with ``|x - W - tau_mu| ~approx Exp(1/(b + tau_sigma))``, hence
  ``E|x - W - tau_mu| ~= b + tau_sigma`` (the extracted text writes ``E[|x_l - W_l|]``
  here; it must mean the centred ``|x_l - W_l - tau_mu|``).
* Eq. 7: ``E[y'] >= -n (b + tau_sigma + |tau_mu|)``.
* Eq. 8: ``Var[y'] >= n [(b + tau_sigma)^2 - 2 |tau_mu| (b + tau_sigma)]``.
* Eq. 13-14 (perturbation ``delta ~ N(0, sigma_delta^2)`` on ``x``):
  CNN ``Var[sum -delta_i W_i] = n sigma_delta^2 (Var[W] + E[W]^2)`` (exact);
  ANN with all signs aligned ``Var[sum |delta_i|] = n sigma_delta^2 (1 - 2/pi)``.
* Eq. 15: after BN the disturbance variance is divided by ``Var[y~']``.

Eq. 7 and Eq. 8 are not exact bounds: their step ``E|x - W - tau_mu| = b + tau_sigma``
is the Laplace approximation. Since ``Var[x - W]`` and ``E[x - W]`` are exact, Eq. 8
holds if and only if ``E|x - W| <= b + tau_sigma + |tau_mu|``, i.e. exactly when Eq. 7
holds. The exact ``E|x - W|`` is a one-dimensional integral (:func:`adder_exact_moments`)
used here as a second reference next to the Monte Carlo.

What the checks show (``python -m awn_jax.stability.variance_theory``): Eq. 4-5 are exact. Eq. 7-8
hold except in a narrow band of ``tau_mu`` around 0 (:func:`bound_failure_band`), where
the Laplace step underestimates ``E|x - W - tau_mu|`` by about ``Var[x] / (4 b)``: the
band's half-width is ``~(pi-1) sigma^2 / (8 pi b)`` and the relative violation in it
``~(pi-1) sigma^2 / (8 pi b^2)`` (0.07% at the paper's Fig. 1 statistics) for ``b >> sigma``.
Eq. 9 is BN with these bounds in place of the moments; it adds nothing to check.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import integrate, optimize
from scipy.special import ndtr

SQRT_2PI = math.sqrt(2.0 * math.pi)


# ---------------------------------------------------------------------------------------
# Closed forms
# ---------------------------------------------------------------------------------------

def rectified_gaussian_moments(sigma: float) -> tuple[float, float]:
    """``(E[x], Var[x])`` of ``x = max(0, y)``, ``y ~ N(0, sigma^2)``: Eq. 4 and Eq. 5."""
    return sigma / SQRT_2PI, sigma ** 2 / 2.0 * (1.0 - 1.0 / math.pi)


def taus(sigma: float, b: float, mu: float) -> tuple[float, float]:
    """``(tau_mu, b + tau_sigma)`` of the Laplace approximation of ``x - W`` (text after Eq. 5)."""
    tau_mu = sigma / SQRT_2PI - mu
    b_tau = math.sqrt(b ** 2 + (math.pi - 1.0) * sigma ** 2 / (4.0 * math.pi))
    return tau_mu, b_tau


def adder_mean_bound(sigma: float, b: float, mu: float, n: int) -> float:
    """Eq. 7: ``E[y'] >= -n (b + tau_sigma + |tau_mu|)``."""
    tau_mu, b_tau = taus(sigma, b, mu)
    return -n * (b_tau + abs(tau_mu))


def adder_var_bound(sigma: float, b: float, mu: float, n: int) -> float:
    """Eq. 8: ``Var[y'] >= n [(b + tau_sigma)^2 - 2 |tau_mu| (b + tau_sigma)]``."""
    tau_mu, b_tau = taus(sigma, b, mu)
    return n * (b_tau ** 2 - 2.0 * abs(tau_mu) * b_tau)


def abs_diff_moments(w, sigma: float):
    """Exact ``(E|x - w|, Var|x - w|)`` for a fixed weight ``w`` (array) and rectified ``x``.

    ``E|x - w| = |w| + sigma phi(0)`` for ``w <= 0`` and
    ``2 w Phi(w/sigma) - w - sigma phi(0) + 2 sigma phi(w/sigma)`` for ``w > 0``;
    ``E(x - w)^2 = sigma^2/2 - 2 w sigma/sqrt(2 pi) + w^2``.
    Summed over the taps of one output channel they give that channel's statistics
    over inputs (the taps see independent inputs).
    """
    w = np.asarray(w, dtype=np.float64)
    s = w / sigma
    phi0 = 1.0 / SQRT_2PI
    phi = np.exp(-0.5 * s ** 2) / SQRT_2PI
    positive = 2.0 * w * ndtr(s) - w - sigma * phi0 + 2.0 * sigma * phi
    mean = np.where(w > 0, positive, np.abs(w) + sigma * phi0)
    second = sigma ** 2 / 2.0 - 2.0 * w * sigma / SQRT_2PI + w ** 2
    return mean, second - mean ** 2


def adder_exact_moments(sigma: float, b: float, mu: float, n: int) -> tuple[float, float]:
    """Exact ``(E[y'], Var[y'])`` for Laplace weights (reference for Eq. 7, 8).

    ``E|x - W| = int E|x - w| f_L(w) dw`` by quadrature; ``E(x - W)^2 =
    Var[x] + 2 b^2 + tau_mu^2`` is exact, so ``Var[y'] = n [E(x - W)^2 - (E|x - W|)^2]``.
    """
    def integrand(w):
        return float(abs_diff_moments(w, sigma)[0]) * math.exp(-abs(w - mu) / b) / (2.0 * b)

    cuts = sorted({0.0, float(mu)})
    pieces = [(-np.inf, cuts[0])] + list(zip(cuts[:-1], cuts[1:])) + [(cuts[-1], np.inf)]
    mean_abs = sum(integrate.quad(integrand, lo, hi, epsabs=1e-12, epsrel=1e-12, limit=200)[0]
                   for lo, hi in pieces)
    _, var_x = rectified_gaussian_moments(sigma)
    tau_mu, _ = taus(sigma, b, mu)
    second = var_x + 2.0 * b ** 2 + tau_mu ** 2
    return -n * mean_abs, n * (second - mean_abs ** 2)


def bound_failure_band(sigma: float, b: float) -> tuple[float, float]:
    """The interval of ``tau_mu`` on which Eq. 7 (and so Eq. 8) fails, from exact moments.

    ``f(t) = E|x - W| - (b + tau_sigma + |t|)`` at ``mu = sigma/sqrt(2 pi) - t`` is convex
    minus ``|t|`` on each side of 0, positive at ``t = 0`` when the Laplace step
    underestimates ``E|x - W - tau_mu|``; its roots bound the band. ``(0, 0)`` if none.
    """
    _, b_tau = taus(sigma, b, 0.0)

    def f(t):
        return -adder_exact_moments(sigma, b, sigma / SQRT_2PI - t, 1)[0] - b_tau - abs(t)

    if f(0.0) <= 0:
        return 0.0, 0.0
    far = 10.0 * (b_tau + sigma)
    return (optimize.brentq(f, -far, 0.0, xtol=1e-10), optimize.brentq(f, 0.0, far, xtol=1e-10))


# ---------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------

def mean_var_se(samples) -> dict:
    """Sample mean and (unbiased) variance with their standard errors.

    ``se(var) = sqrt((m4 - var^2) / m)``, ``m4`` the fourth central moment.
    """
    v = np.asarray(samples, dtype=np.float64).ravel()
    m = v.size
    centred = v - v.mean()
    var = centred.var(ddof=1)
    m4 = np.mean(centred ** 4)
    return {"mean": float(v.mean()), "se_mean": float(math.sqrt(var / m)),
            "var": float(var), "se_var": float(math.sqrt(max(m4 - var ** 2, 0.0) / m)), "m": m}


def _rectified(rng, sigma, shape):
    return np.maximum(0.0, rng.normal(0.0, sigma, shape))


def _chunks(total: int, n: int, max_elements: int = 1 << 21):
    step = max(1, max_elements // n)
    for start in range(0, total, step):
        yield min(step, total - start)


def sample_adder_outputs(rng, sigma: float, b: float, mu: float, n: int, m: int) -> np.ndarray:
    """``m`` draws of ``y' = -sum_{j<n} |x_j - W_j|`` with fresh ``x`` and ``W`` (Eq. 3, 6)."""
    out = [-np.abs(_rectified(rng, sigma, (k, n)) - rng.laplace(mu, b, (k, n))).sum(1)
           for k in _chunks(m, n)]
    return np.concatenate(out)


def _z(sample: dict, key: str, exact: float) -> float:
    se = sample["se_" + key]
    return float((sample[key] - exact) / se) if se > 0 else 0.0


# ---------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------

def check_rectified_gaussian(sigma: float, m: int = 200_000, seed: int = 0) -> dict:
    """Eq. 4-5: closed form vs Monte Carlo of ``max(0, N(0, sigma^2))``."""
    mean, var = rectified_gaussian_moments(sigma)
    s = mean_var_se(_rectified(np.random.default_rng(seed), sigma, m))
    return {"sigma": sigma, "mean_closed": mean, "var_closed": var, "mc": s,
            "z_mean": _z(s, "mean", mean), "z_var": _z(s, "var", var)}


def check_adder_bounds(sigma: float, b: float, mu: float, n: int, m: int = 20_000,
                       seed: int = 0) -> dict:
    """Eq. 6-8: Monte Carlo and exact ``E[y']``, ``Var[y']`` against the paper's bounds.

    ``mean_ratio = E[y'] / bound`` (bound holds iff ``<= 1``, both negative);
    ``var_ratio = Var[y'] / bound`` (bound holds iff ``>= 1`` when the bound is positive;
    a bound ``<= 0`` holds trivially). ``holds`` is decided on the exact values.
    """
    tau_mu, b_tau = taus(sigma, b, mu)
    mean_bound, var_bound = adder_mean_bound(sigma, b, mu, n), adder_var_bound(sigma, b, mu, n)
    mean_exact, var_exact = adder_exact_moments(sigma, b, mu, n)
    s = mean_var_se(sample_adder_outputs(np.random.default_rng(seed), sigma, b, mu, n, m))
    var_ratio = (lambda v: v / var_bound) if var_bound > 0 else (lambda v: None)
    return {
        "sigma": sigma, "b": b, "mu": mu, "n": n,
        "assumption_2b2_over_sigma2": 2 * b * b / sigma ** 2,
        "tau_mu": tau_mu, "b_plus_tau_sigma": b_tau, "mc": s,
        "mean_bound": mean_bound, "mean_exact": mean_exact,
        "z_mean_mc_vs_exact": _z(s, "mean", mean_exact),
        "mean_ratio_mc": s["mean"] / mean_bound, "mean_ratio_se": s["se_mean"] / abs(mean_bound),
        "mean_ratio_exact": mean_exact / mean_bound,
        "mean_bound_holds": bool(mean_exact >= mean_bound),
        "var_bound": var_bound, "var_exact": var_exact,
        "z_var_mc_vs_exact": _z(s, "var", var_exact),
        "var_bound_trivial": bool(var_bound <= 0),
        "var_ratio_mc": var_ratio(s["var"]), "var_ratio_se": var_ratio(s["se_var"]),
        "var_ratio_exact": var_ratio(var_exact),
        "var_bound_holds": bool(var_exact >= var_bound),
    }


def check_perturbation(sigma: float, b: float, mu: float, sigma_delta: float, n: int,
                       m: int = 20_000, seed: int = 0) -> dict:
    """Eq. 13-15: how an input perturbation propagates through ``x*W`` vs ``|x - W|``.

    * ``cnn``: ``sum -delta_i W_i``; Eq. 14 ``n sigma_delta^2 (Var W + E[W]^2)``, exact.
    * ``ann_aligned``: ``sum |x-W| - |x-delta-W|`` with each ``delta_i`` given the sign
      that makes its term ``+|delta_i|`` (the attacker's best case of Eq. 13); Eq. 14
      ``Var ~= n sigma_delta^2 (1 - 2/pi)``, mean ``n sigma_delta sqrt(2/pi)``.
    * ``ann_random``: the same with independent ``delta ~ N(0, sigma_delta^2)``: the
      terms are ``~ sign(x-W) delta``, variance ~``n sigma_delta^2``, mean slightly
      negative (``E|a - delta| >= |a|``) but near 0 (not in the paper; the signs cancel,
      as Eq. 13's discussion says).
    * Eq. 15: each disturbance variance divided by the clean ``Var[y']`` of its layer
      (CNN: ``n (E[x^2] E[W^2] - E[x]^2 E[W]^2)``; ANN: exact, :func:`adder_exact_moments`).
    """
    rng = np.random.default_rng(seed)
    cnn, aligned, random_, y_cnn, y_ann = [], [], [], [], []
    for k in _chunks(m, n):
        x = _rectified(rng, sigma, (k, n))
        w = rng.laplace(mu, b, (k, n))
        g = rng.normal(0.0, sigma_delta, (k, n))
        d = x - w
        cnn.append((-g * w).sum(1))
        y_cnn.append((x * w).sum(1))
        y_ann.append(-np.abs(d).sum(1))
        aligned.append((np.abs(d) - np.abs(d - np.sign(d) * np.abs(g))).sum(1))
        random_.append((np.abs(d) - np.abs(d - g)).sum(1))
    stats = {name: mean_var_se(np.concatenate(v)) for name, v in
             [("cnn", cnn), ("ann_aligned", aligned), ("ann_random", random_),
              ("y_cnn", y_cnn), ("y_ann", y_ann)]}
    ex, vx = rectified_gaussian_moments(sigma)
    var_w, mean_w = 2 * b * b, mu
    closed = {
        "cnn_var": n * sigma_delta ** 2 * (var_w + mean_w ** 2),
        "ann_aligned_var": n * sigma_delta ** 2 * (1 - 2 / math.pi),
        "ann_aligned_mean": n * sigma_delta * math.sqrt(2 / math.pi),
        "ann_random_var": n * sigma_delta ** 2,
        "y_cnn_var": n * ((vx + ex ** 2) * (var_w + mean_w ** 2) - (ex * mean_w) ** 2),
        "y_ann_var": adder_exact_moments(sigma, b, mu, n)[1],
    }
    closed["eq15_cnn"] = closed["cnn_var"] / closed["y_cnn_var"]
    closed["eq15_ann"] = closed["ann_aligned_var"] / closed["y_ann_var"]
    return {
        "sigma": sigma, "b": b, "mu": mu, "sigma_delta": sigma_delta, "n": n, "mc": stats,
        "closed": closed,
        "z_cnn_var": _z(stats["cnn"], "var", closed["cnn_var"]),
        "z_ann_aligned_var": _z(stats["ann_aligned"], "var", closed["ann_aligned_var"]),
        "z_ann_aligned_mean": _z(stats["ann_aligned"], "mean", closed["ann_aligned_mean"]),
        "eq15_cnn_mc": stats["cnn"]["var"] / stats["y_cnn"]["var"],
        "eq15_ann_mc": stats["ann_aligned"]["var"] / stats["y_ann"]["var"],
    }


def check_adder_layer(sigma: float = 0.62, b: float = 1.0, mu: float = 0.0, cin: int = 16,
                      cout: int = 32, d: int = 3, batch: int = 64, out_hw: int = 8,
                      seed: int = 0) -> dict:
    """The same statistics on a real ``adder_conv2d`` layer.

    Stride ``d``, no padding: every output pixel sees its own patch of i.i.d. rectified
    inputs (``n = d*d*cin``), so each output channel gives ``batch * out_hw^2`` i.i.d.
    draws of ``-sum_j |x_j - w_j|`` for that channel's fixed weights. Per channel they
    are compared with direct numpy sampling (fresh inputs, same weights; two-sample
    z-scores) and with the exact :func:`abs_diff_moments`; pooled over channels (random
    Laplace weights) with Eq. 7-8 and the exact moments. With few channels the pooled
    variance is dominated by the spread of the sampled channels' means, so it is also
    given exactly for the sampled weights (``pooled_var_exact_given_w``).
    """
    import jax.numpy as jnp

    from awn_jax.ops import adder_conv2d

    rng = np.random.default_rng(seed)
    n, hw = d * d * cin, out_hw * d
    x = _rectified(rng, sigma, (batch, hw, hw, cin)).astype(np.float32)
    kernel = rng.laplace(mu, b, (d, d, cin, cout)).astype(np.float32)
    y = np.asarray(adder_conv2d(jnp.asarray(x), jnp.asarray(kernel), stride=d, padding=0),
                   dtype=np.float64).reshape(-1, cout)

    # Same patches in numpy: the op computes exactly -sum |patch - w|.
    patches = x.reshape(batch, out_hw, d, out_hw, d, cin).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(-1, n).astype(np.float64)
    w = kernel.reshape(n, cout).astype(np.float64)       # (kh, kw, cin) flattened like patches
    same = np.stack([-np.abs(patches - w[:, c]).sum(1) for c in range(cout)], 1)
    max_rel_diff = float(np.max(np.abs(y - same)) / np.max(np.abs(same)))

    m = y.shape[0]
    per_channel = []
    for c in range(cout):
        conv = mean_var_se(y[:, c])
        direct = mean_var_se(-np.abs(_rectified(rng, sigma, (m, n)) - w[:, c]).sum(1))
        e, v = abs_diff_moments(w[:, c], sigma)
        exact_mean, exact_var = -float(e.sum()), float(v.sum())

        def two_sample(key):
            se = math.hypot(conv["se_" + key], direct["se_" + key])
            return (conv[key] - direct[key]) / se

        per_channel.append({
            "conv": conv, "direct": direct, "exact_mean": exact_mean, "exact_var": exact_var,
            "z_mean_conv_vs_direct": two_sample("mean"), "z_var_conv_vs_direct": two_sample("var"),
            "z_mean_conv_vs_exact": _z(conv, "mean", exact_mean),
            "z_var_conv_vs_exact": _z(conv, "var", exact_var)})

    def max_abs(suffix):
        return max(max(abs(p["z_mean_" + suffix]), abs(p["z_var_" + suffix])) for p in per_channel)

    exact_means = np.array([p["exact_mean"] for p in per_channel])
    exact_vars = np.array([p["exact_var"] for p in per_channel])
    mean_exact, var_exact = adder_exact_moments(sigma, b, mu, n)
    return {
        "sigma": sigma, "b": b, "mu": mu, "n": n, "cout": cout, "draws_per_channel": m,
        "max_rel_diff_same_patches": max_rel_diff, "per_channel": per_channel,
        "max_abs_z_conv_vs_direct": max_abs("conv_vs_direct"),
        "max_abs_z_conv_vs_exact": max_abs("conv_vs_exact"),
        "pooled_mean": float(y.mean()),
        "pooled_mean_se": float(y.mean(0).std(ddof=1) / math.sqrt(cout)),
        "pooled_var": float(y.var(ddof=1)),
        "pooled_var_exact_given_w": float(exact_vars.mean() + exact_means.var()),
        "mean_exact": mean_exact, "var_exact": var_exact,
        "mean_bound": adder_mean_bound(sigma, b, mu, n),
        "var_bound": adder_var_bound(sigma, b, mu, n),
    }


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------

# Fig. 1 of the paper (ResNet-18 ANN, ImageNet): features after BN with variance 0.38,
# weights with mean 0.32 and variance 88.47 = 2 b^2.
PAPER_SIGMA, PAPER_B, PAPER_MU = math.sqrt(0.38), math.sqrt(88.47 / 2), 0.32
DEFAULT_BOUND_GRID = dict(sigma=(0.62, 1.0), b=(0.3, 1.0, 6.65), mu=(0.0, "tau0", 0.32, -1.0),
                          n=(27, 576))


def bound_grid(sigma=DEFAULT_BOUND_GRID["sigma"], b=DEFAULT_BOUND_GRID["b"],
               mu=DEFAULT_BOUND_GRID["mu"], n=DEFAULT_BOUND_GRID["n"]):
    """``(sigma, b, mu, n)`` tuples; ``mu="tau0"`` is ``mu = sigma/sqrt(2 pi)`` (``tau_mu = 0``)."""
    return [(s, bb, s / SQRT_2PI if mm == "tau0" else float(mm), nn)
            for s in sigma for bb in b for mm in mu for nn in n]


def run_all(seed: int = 0, samples: int = 20_000, grid=None, perturbation_grid=None,
            layer: bool = True) -> dict:
    """All checks as a JSON-serializable dict."""
    grid = bound_grid() if grid is None else grid
    perturbation_grid = perturbation_grid or [
        (PAPER_SIGMA, bb, mm, sd, 144) for bb in (1.0, PAPER_B) for mm in (0.0, PAPER_MU)
        for sd in (8 / 255, 0.3)]
    out = {
        "rectified_gaussian": [check_rectified_gaussian(s, 10 * samples, seed + i)
                               for i, s in enumerate((0.1, 0.62, 1.0, 3.0))],
        "adder_bounds": [check_adder_bounds(*g, m=samples, seed=seed) for g in grid],
        "failure_bands": [{"sigma": s, "b": bb, "tau_mu_band": bound_failure_band(s, bb),
                           "b_plus_tau_sigma": taus(s, bb, 0.0)[1]}
                          for s, bb in sorted({(g[0], g[1]) for g in grid})],
        "perturbation": [check_perturbation(*p, m=samples, seed=seed) for p in perturbation_grid],
    }
    if layer:
        out["adder_conv2d_layer"] = check_adder_layer(seed=seed)
    return out


def _g(v, digits=4):
    return "-" if v is None else f"{v:.{digits}g}"


def _pm(stats, key, digits=4):
    return f"{_g(stats[key], digits)} ± {_g(stats['se_' + key], 2)}"


def _table(header, rows):
    cells = [header, ["---"] * len(header)] + rows
    return ["| " + " | ".join(str(c) for c in row) + " |" for row in cells]


def format_markdown(results: dict) -> str:
    """Short Markdown tables of :func:`run_all`'s results."""
    lines = ["Eq. 4-5, x = max(0, N(0, sigma^2)):", ""]
    lines += _table(
        ["sigma", "E[x] closed", "E[x] MC", "z", "Var[x] closed", "Var[x] MC", "z"],
        [[f"{r['sigma']:g}", _g(r["mean_closed"], 6), _pm(r["mc"], "mean", 6),
          f"{r['z_mean']:+.2f}", _g(r["var_closed"], 6), _pm(r["mc"], "var", 6),
          f"{r['z_var']:+.2f}"]
         for r in results.get("rectified_gaussian", [])])

    rows = []
    for r in results.get("adder_bounds", []):
        if r["var_bound_trivial"]:
            var_mc, var_ex = "bound <= 0", "-"
        else:
            var_mc = f"{r['var_ratio_mc']:.4f} ± {r['var_ratio_se']:.4f}"
            var_ex = f"{r['var_ratio_exact']:.4f}"
        rows.append([f"{r['sigma']:g}", f"{r['b']:g}", f"{r['mu']:.3g}", r["n"],
                     f"{r['assumption_2b2_over_sigma2']:.3g}", f"{r['tau_mu']:+.3f}",
                     f"{r['mean_ratio_mc']:.4f} ± {r['mean_ratio_se']:.4f}",
                     f"{r['mean_ratio_exact']:.4f}", f"{r['z_mean_mc_vs_exact']:+.2f}",
                     var_mc, var_ex, f"{r['z_var_mc_vs_exact']:+.2f}",
                     "yes" if r["mean_bound_holds"] and r["var_bound_holds"] else "NO"])
    lines += ["", "Eq. 7-8, y' = -sum |x - W|, W ~ L(mu, b): ratio sampled / bound "
              "(Eq. 7 holds iff E ratio <= 1, Eq. 8 iff Var ratio >= 1; holds: exact values):", ""]
    lines += _table(["sigma", "b", "mu", "n", "2b²/σ²", "tau_mu", "E ratio MC", "E ratio exact",
                     "z(MC-exact)", "Var ratio MC", "Var ratio exact", "z(MC-exact)", "holds"],
                    rows)

    bands = results.get("failure_bands", [])
    if bands:
        lines += ["", "Where Eq. 7-8 fail (exact): tau_mu inside this band, hold outside it:", ""]
        lines += _table(
            ["sigma", "b", "b + tau_sigma", "failing tau_mu band", "half-width / (b + tau_sigma)"],
            [[f"{r['sigma']:g}", f"{r['b']:g}", f"{r['b_plus_tau_sigma']:.4g}",
              "[{:+.4g}, {:+.4g}]".format(*r["tau_mu_band"]),
              f"{(r['tau_mu_band'][1] - r['tau_mu_band'][0]) / 2 / r['b_plus_tau_sigma']:.3g}"]
             for r in bands])

    lines += ["", "Eq. 13-15, perturbation delta ~ N(0, sigma_delta²) on x (variances of the "
              "disturbance; Eq. 15 = disturbance variance / Var[y']):", ""]
    lines += _table(
        ["sigma", "b", "mu", "σ_δ", "n", "CNN closed", "CNN MC", "ANN aligned closed",
         "ANN aligned MC", "ANN random MC", "Eq.15 CNN closed / MC", "Eq.15 ANN closed / MC"],
        [[f"{r['sigma']:.3g}", f"{r['b']:.3g}", f"{r['mu']:g}", f"{r['sigma_delta']:.3g}", r["n"],
          _g(r["closed"]["cnn_var"]), _pm(r["mc"]["cnn"], "var"),
          _g(r["closed"]["ann_aligned_var"]), _pm(r["mc"]["ann_aligned"], "var"),
          _g(r["mc"]["ann_random"]["var"]),
          f"{_g(r['closed']['eq15_cnn'], 3)} / {_g(r['eq15_cnn_mc'], 3)}",
          f"{_g(r['closed']['eq15_ann'], 3)} / {_g(r['eq15_ann_mc'], 3)}"]
         for r in results.get("perturbation", [])])

    layer = results.get("adder_conv2d_layer")
    if layer:
        lines += ["", (
            "adder_conv2d layer (sigma={sigma:.3g}, b={b:g}, mu={mu:g}, n={n}, {cout} channels "
            "x {draws_per_channel} draws): same-patch max rel diff "
            "{max_rel_diff_same_patches:.1e}; per-channel max |z| conv vs direct sampling "
            "{max_abs_z_conv_vs_direct:.2f}, conv vs exact {max_abs_z_conv_vs_exact:.2f}; "
            "pooled E[y'] {pooled_mean:.1f} ± {pooled_mean_se:.1f} (exact {mean_exact:.1f}, "
            "Eq. 7 bound {mean_bound:.1f}); pooled Var[y'] {pooled_var:.1f} (exact for "
            "these weights {pooled_var_exact_given_w:.1f}, over random weights "
            "{var_exact:.1f}, Eq. 8 bound {var_bound:.1f}).").format(**layer)]
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_markdown(run_all()))


# ---------------------------------------------------------------------------------------
# How an adder term passes on a change of its input's spread (docs/REPRODUCTION.md,
# "Why -R collapses": the kernel-scale hypothesis)
# ---------------------------------------------------------------------------------------

def folded_variance(c: float) -> float:
    """``Var|z - c|`` for ``z ~ N(0, 1)``: ``1 + c^2 - (E|z - c|)^2`` with
    ``E|z - c| = c (2 Phi(c) - 1) + 2 phi(c)``."""
    mean = c * (2.0 * ndtr(c) - 1.0) + 2.0 * math.exp(-0.5 * c * c) / SQRT_2PI
    return 1.0 + c * c - mean * mean


def folded_elasticity(c: float, step: float = 1e-5) -> float:
    """``d ln Var|a z - w| / d ln a^2`` at ``a = 1`` for ``c = w / sd``: how the variance of
    one adder term follows its input's spread scaled by ``a`` (1: as a linear term). Since
    ``Var|a z - w| = a^2 h(w / a)`` with ``h`` :func:`folded_variance`, it is
    ``1 - (c/2) d ln h / d ln c``: below 1 for every ``c != 0`` (the term damps a change)."""
    if c == 0.0:
        return 1.0
    dh = (math.log(folded_variance(c * (1 + step))) - math.log(folded_variance(c * (1 - step))))
    return 1.0 - 0.5 * dh / (2.0 * step)


def adder_elasticity_mc(kernels, *, rho: float, shift: float, scale: float = 0.9,
                        samples: int = 20_000, seed: int = 0) -> float:
    """Monte Carlo elasticity of ``y' = -sum_j |x_j - w_j|`` (one output per column of
    ``kernels``, shape ``(n, filters)``) when ``x = max(0, shift + a z)`` has its spread
    ``a`` scaled by ``scale``; the ``z_j`` of one output share a component (correlation
    ``rho``), as the taps of a patch do. Mean over the filters of ``ln(Var ratio) / ln
    scale^2``."""
    kernels = np.asarray(kernels, np.float64)
    rng = np.random.default_rng(seed)
    n = kernels.shape[0]
    z = rho * rng.normal(size=(samples, 1)) + math.sqrt(1 - rho ** 2) * rng.normal(
        size=(samples, n))

    def variance(a):
        x = np.maximum(shift + a * z, 0.0)
        return np.abs(x[:, :, None] - kernels[None]).sum(1).var(0)

    return float(np.mean(np.log(variance(scale) / variance(1.0)) / math.log(scale ** 2)))
