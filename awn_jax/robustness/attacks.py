"""L-inf attacks as pure JAX functions of a ``logits_fn``: white-box gradient attacks and
one score-based attack that never differentiates the model (``square``).

Every attack has the signature::

    attack_fn(logits_fn, images, labels, *, key=None, eps=8/255, step_size=2/255, steps=N)

and returns adversarial images of the shape and dtype of ``images``.

* ``logits_fn(images) -> logits``: images NHWC (any shape with a leading batch axis
  works) in [0, 1]; normalization lives inside the model. ``labels``: integer classes.
* Loss: softmax cross-entropy averaged over the batch (``apgd-dlr``: the DLR loss;
  ``square``: the margin, no gradient); the gradient taken is that of the
  **batch mean**. Every gradient attack here is invariant to a positive rescaling of the whole
  gradient (sign steps, or MIM's per-example normalization), so mean vs. sum (what
  AutoAttack uses) gives the same adversarial images.
* Batch-dependent models: the gradient is that of the batch loss with respect to the
  whole batch input, computed by one ``jax.grad`` through one ``logits_fn`` call on the
  batch -- exactly what PyTorch attack libraries do with autograd. When ``logits_fn``
  depends on the whole batch (BatchNorm with current-batch statistics, the ``running`` and
  ``running-mean`` modes), each example's gradient then contains the cross-terms through
  the batch statistics, and nothing here assumes per-example independence. Evaluate the
  returned batch as a batch (same composition) to score what the attacker optimized.
* Constraint: after every step the iterate is projected onto the L-inf ball of radius
  ``eps`` around the clean images and then clipped to [0, 1] (both element-wise, so the
  result lies in both sets). The one deliberate exception is ``rfgsm-legacy``, which
  reproduces an older library definition that only clips to [0, 1] (see its docstring).
* Randomness only through ``key`` (``fgsm``, ``bim`` and ``mim`` ignore it and accept
  ``None``; ``pgd``, ``rfgsm``, ``rfgsm-legacy``, ``apgd-ce``, ``apgd-dlr`` and ``square``
  require it).
* Compilation: the functions are traceable; wrap the call in ``jax.jit`` with
  ``logits_fn`` closed over (``awn_jax.robustness`` does). ``steps`` must be a Python int
  (it is static: it fixes the loop length and APGD's checkpoint schedule); ``eps`` and
  ``step_size`` may be Python floats or traced scalars, so one compilation can serve an
  eps sweep when they are passed as jit arguments. Iterations run in
  ``jax.lax.fori_loop``, so compile time does not grow with ``steps``; on the CPU the short
  loops (the paper's attacks, APGD up to 20 iterations) are unrolled instead
  (:func:`iterate`).

Library versions referred to below, read from the torchattacks sources
(Harry24k/adversarial-attacks-pytorch): "torchattacks 2.x" is release 2.12.0 (the 2.x
files checked); "torchattacks 3.x" is 3.5.0 plus an early-3.x ``rfgsm.py``/``pgd.py``
(same update rules as 3.5.0, other defaults). The differences that change numbers:

* PGD: 2.12.0 ``PGD(..., random_start=False)`` by default (then PGD is BIM); 3.x
  ``random_start=True``: start at ``clip(x + U(-eps, eps), 0, 1)``.
* RFGSM: 2.12.0 steps by ``eps - alpha`` and only clips to [0, 1] (no projection: with
  ``steps > 1`` it leaves the eps-ball; defaults eps 16/255, alpha 8/255, 1 step); 3.x
  steps by ``alpha`` and projects (defaults 16/255, 8/255, 1 early in 3.x; 8/255, 2/255,
  10 in 3.5.0).
* MI-FGSM: 2.12.0 uses ``alpha = eps / steps`` and divides the gradient by its
  per-example L1 norm; 3.x takes ``alpha`` (default 2/255) and divides by the per-example
  mean absolute value. The two normalizations differ by the constant ``numel`` and give
  identical sign steps.
* Both major versions compute the loss as ``nn.CrossEntropyLoss()`` (batch mean) on one
  forward pass of the whole batch.
"""

from __future__ import annotations

import dataclasses
import numbers
import operator
import zlib
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from awn_jax.errors import UserError

LogitsFn = Callable[[jax.Array], jax.Array]

DEFAULT_EPS = 8 / 255
DEFAULT_STEP_SIZE = 2 / 255


# ----------------------------------------------------------------------------- helpers

def _per_example_losses(logits_fn: LogitsFn, x: jax.Array, labels: jax.Array):
    logits = logits_fn(x)
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels)
    return jnp.mean(losses), (losses, logits)


def _dlr(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Difference of Logits Ratio (Croce & Hein 2020, Eq. 6), per example:
    ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12)`` with ``z_pi1 >= z_pi2 >= ...``
    the sorted logits. Invariant to shifting and positively rescaling the logits, so a
    model cannot hide behind large or tiny logits; needs at least 3 classes."""
    logits = logits.astype(jnp.float32)
    if logits.shape[-1] < 3:
        raise UserError(f"the DLR loss needs at least 3 classes, got {logits.shape[-1]}")
    top = jnp.sort(logits, axis=-1)[..., ::-1]
    return -_margin(logits, labels) / (top[..., 0] - top[..., 2] + 1e-12)


def _per_example_dlr(logits_fn: LogitsFn, x: jax.Array, labels: jax.Array):
    logits = logits_fn(x)
    losses = _dlr(logits, labels)
    return jnp.mean(losses), (losses, logits)


def _loss_grad(logits_fn: LogitsFn, x: jax.Array, labels: jax.Array) -> jax.Array:
    """Gradient of the batch-mean cross-entropy w.r.t. the whole batch input."""
    grad, _ = jax.grad(_per_example_losses, argnums=1, has_aux=True)(logits_fn, x, labels)
    return grad


def _project(x_adv: jax.Array, x: jax.Array, eps) -> jax.Array:
    """Projection onto the L-inf eps-ball around ``x``, then clipping to [0, 1]."""
    return jnp.clip(jnp.clip(x_adv, x - eps, x + eps), 0.0, 1.0)


def _margin(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """logit of the true class minus the largest other logit (< 0: misclassified)."""
    logits = logits.astype(jnp.float32)
    true = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
    others = jnp.where(jax.nn.one_hot(labels, logits.shape[-1], dtype=bool), -jnp.inf, logits)
    return true - jnp.max(others, axis=-1)


def _per_example(v: jax.Array, like: jax.Array) -> jax.Array:
    """Broadcast a (batch,) vector against an array shaped like ``like``."""
    return v.reshape(v.shape + (1,) * (like.ndim - 1))


def _check_steps(steps) -> int:
    try:
        steps = operator.index(steps)   # a tracer raises TracerIntegerConversionError
    except TypeError:
        raise TypeError(f"steps must be a Python int (it is static), got {steps!r}") from None
    if steps < 0:
        raise UserError(f"steps must be >= 0, got {steps}")
    return steps


def _check_inputs(images, labels):
    images = jnp.asarray(images)
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise TypeError(f"images must be floating point in [0, 1], got dtype {images.dtype}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"labels must have shape ({images.shape[0]},), got {labels.shape}")
    return images, labels.astype(jnp.int32)


def _require_key(key, name):
    if key is None:
        raise ValueError(f"{name} is randomized: pass key=jax.random.key(...)")
    return key


# XLA:CPU runs a convolution's backward pass about 5x slower inside a loop than unrolled (a
# CNN's PGD iteration at batch 256: 3.6 s against 0.67 s, APGD's at batch 128: 3.1 s against
# 0.55 s; the adder kernels are custom calls and do not slow down; bench/RESULTS.md), so
# loops of up to this many gradients are unrolled on the CPU: the paper's attacks (at most
# 7), APGD at the CPU budget of the strict study (20), not AutoAttack's 100 nor Square.
UNROLL_MAX_STEPS = 20


def iterate(steps: int, body, init, *, gradients: int | None = None):
    """``jax.lax.fori_loop(0, steps, body, init)``, unrolled on the CPU when the gradients
    it would copy (``gradients``, default ``steps``; a loop nested in another counts both)
    are at most ``UNROLL_MAX_STEPS`` (same operations; compile time grows with them)."""
    unrolled = gradients if gradients is not None else steps
    unroll = jax.default_backend() == "cpu" and unrolled <= UNROLL_MAX_STEPS
    return jax.lax.fori_loop(0, steps, body, init, unroll=bool(unroll and steps))


def _sign_steps(logits_fn, x, labels, x_start, eps, step_size, steps):
    """``steps`` iterations of x <- P(x + step_size * sign(grad)) from ``x_start``."""
    def body(_, x_adv):
        grad = _loss_grad(logits_fn, x_adv, labels)
        return _project(x_adv + step_size * jnp.sign(grad), x, eps)

    return iterate(steps, body, x_start)


# ----------------------------------------------------------------------------- attacks

def fgsm(logits_fn: LogitsFn, images, labels, *, key=None, eps=DEFAULT_EPS,
         step_size=None, steps: int = 1) -> jax.Array:
    """FGSM (Goodfellow, Shlens & Szegedy, "Explaining and Harnessing Adversarial
    Examples", ICLR 2015): ``x' = clip(x + eps * sign(grad_x L(x, y)), 0, 1)``.

    Same rule as torchattacks 2.12.0 and 3.5.0 ``FGSM``. Single-step by definition:
    ``step_size`` and ``steps`` are accepted for a uniform signature and ignored (the step
    is ``eps``); ``key`` is unused.
    """
    del key, step_size, steps
    x, labels = _check_inputs(images, labels)
    grad = _loss_grad(logits_fn, x, labels)
    return _project(x + eps * jnp.sign(grad), x, eps)


def bim(logits_fn: LogitsFn, images, labels, *, key=None, eps=DEFAULT_EPS,
        step_size=DEFAULT_STEP_SIZE, steps: int = 7) -> jax.Array:
    """BIM / I-FGSM (Kurakin, Goodfellow & Bengio, "Adversarial Examples in the Physical
    World", ICLR 2017 workshop): start at the clean image, then ``steps`` times
    ``x <- Clip_{x, eps}(x + step_size * sign(grad))`` with ``Clip`` = projection onto the
    eps-ball and [0, 1].

    Same update as torchattacks 2.12.0 and 3.5.0 ``BIM`` (whose min/max formulation
    equals the projection-then-clip here). Their defaults differ: 2.12.0 alpha 1/255 and
    ``steps`` from Kurakin's ``min(eps*255 + 4, 1.25*eps*255)`` rule, 3.5.0 alpha 2/255 and
    10 steps; ours are the AWN paper's (2/255, 7). ``key`` is unused.
    """
    del key
    x, labels = _check_inputs(images, labels)
    return _sign_steps(logits_fn, x, labels, x, eps, step_size, _check_steps(steps))


def pgd(logits_fn: LogitsFn, images, labels, *, key=None, eps=DEFAULT_EPS,
        step_size=DEFAULT_STEP_SIZE, steps: int = 7, random_start: bool = True) -> jax.Array:
    """PGD (Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks",
    ICLR 2018) with the torchattacks 3.x ``PGD`` definition: start at
    ``clip(x + U(-eps, eps), 0, 1)`` (uniform in the eps-ball, element-wise), then
    ``steps`` signed steps ``x <- P(x + step_size * sign(grad))``, ``P`` = projection onto
    the eps-ball then clipping to [0, 1].

    ``random_start=False`` gives torchattacks 2.12.0's default ``PGD`` (no random start),
    which is exactly ``bim``. ``key`` is required when ``random_start``.
    """
    x, labels = _check_inputs(images, labels)
    steps = _check_steps(steps)
    if random_start:
        noise = jax.random.uniform(_require_key(key, "pgd"), x.shape, x.dtype, -1.0, 1.0)
        x_start = jnp.clip(x + eps * noise, 0.0, 1.0)
    else:
        x_start = x
    return _sign_steps(logits_fn, x, labels, x_start, eps, step_size, steps)


def mim(logits_fn: LogitsFn, images, labels, *, key=None, eps=DEFAULT_EPS,
        step_size=DEFAULT_STEP_SIZE, steps: int = 5, decay: float = 1.0) -> jax.Array:
    """MI-FGSM (Dong et al., "Boosting Adversarial Attacks with Momentum", CVPR 2018) with
    the torchattacks 3.x ``MIFGSM`` definition: from the clean image, ``steps`` times

        g <- decay * g + grad / mean(|grad|)      (mean over each example's elements)
        x <- P(x + step_size * sign(g))

    The paper divides by the L1 norm (torchattacks 2.12.0 too); dividing by L1/numel
    (3.x) differs by a constant factor and gives the same iterates. The gradient is of the
    batch-mean loss; its 1/batch factor cancels in the per-example normalization. An
    example whose gradient is exactly zero contributes zero (instead of NaN). torchattacks
    2.12.0 fixes ``step_size = eps / steps``; pass that to reproduce it. ``key`` is unused.
    """
    del key
    x, labels = _check_inputs(images, labels)
    steps = _check_steps(steps)
    reduce_axes = tuple(range(1, x.ndim))

    def body(_, carry):
        x_adv, momentum = carry
        grad = _loss_grad(logits_fn, x_adv, labels)
        scale = jnp.mean(jnp.abs(grad), axis=reduce_axes, keepdims=True)
        normalized = jnp.where(scale > 0, grad / jnp.where(scale > 0, scale, 1.0), 0.0)
        momentum = decay * momentum + normalized
        return _project(x_adv + step_size * jnp.sign(momentum), x, eps), momentum

    x_adv, _ = iterate(steps, body, (x, jnp.zeros_like(x)))
    return x_adv


def _rademacher_start(key, x, alpha, name):
    signs = jax.random.rademacher(_require_key(key, name), x.shape, x.dtype)
    return jnp.clip(x + alpha * signs, 0.0, 1.0)


def _check_alpha(eps, alpha, name):
    if isinstance(eps, numbers.Real) and isinstance(alpha, numbers.Real) and alpha > eps:
        raise UserError(f"{name}: step_size (alpha) = {alpha} must not exceed eps = {eps}")


def rfgsm(logits_fn: LogitsFn, images, labels, *, key=None, eps=DEFAULT_EPS,
          step_size=DEFAULT_STEP_SIZE, steps: int = 5) -> jax.Array:
    """R+FGSM, projected: the torchattacks 3.x ``RFGSM`` definition (3.5.0 and an early-3.x
    file checked), after Tramer et al., "Ensemble Adversarial Training: Attacks and
    Defenses", ICLR 2018.

    With ``alpha = step_size``: start at ``clip(x + alpha * sign(N(0, I)), 0, 1)`` (drawn
    here as Rademacher signs, the same distribution), then ``steps`` times
    ``x <- P(x + alpha * sign(grad))``, ``P`` = projection onto the eps-ball then [0, 1].
    (Tramer et al.'s single step is ``eps - alpha``; torchattacks 3.x steps by ``alpha``
    and projects -- that is what is followed here. The start is projected too, a no-op for
    ``alpha <= eps``, which is required.) For the older unprojected rule see
    ``rfgsm_legacy``. ``key`` is required.
    """
    x, labels = _check_inputs(images, labels)
    steps = _check_steps(steps)
    _check_alpha(eps, step_size, "rfgsm")
    x_start = _project(_rademacher_start(key, x, step_size, "rfgsm"), x, eps)
    return _sign_steps(logits_fn, x, labels, x_start, eps, step_size, steps)


def rfgsm_legacy(logits_fn: LogitsFn, images, labels, *, key=None, eps=DEFAULT_EPS,
                 step_size=DEFAULT_STEP_SIZE, steps: int = 5) -> jax.Array:
    """R+FGSM, legacy unprojected: the torchattacks 2.x ``RFGSM`` definition (checked:
    2.12.0), for reproducing tables made with it.

    With ``alpha = step_size``: start at ``clip(x + alpha * sign(N(0, I)), 0, 1)``, then
    ``steps`` times ``x <- clip(x + (eps - alpha) * sign(grad), 0, 1)`` -- clipped to
    [0, 1] only, **never projected onto the eps-ball**. With ``steps = 1`` this is exactly
    Tramer et al. (ICLR 2018) R+FGSM and stays within ``eps``; with ``steps > 1`` the
    perturbation can grow to ``alpha + steps * (eps - alpha)`` (32/255 for the paper's
    eps 8/255, alpha 2/255, 5 steps), so it is not an eps-bounded attack. ``key`` is
    required.
    """
    x, labels = _check_inputs(images, labels)
    steps = _check_steps(steps)
    _check_alpha(eps, step_size, "rfgsm-legacy")
    x_start = _rademacher_start(key, x, step_size, "rfgsm-legacy")

    def body(_, x_adv):
        grad = _loss_grad(logits_fn, x_adv, labels)
        return jnp.clip(x_adv + (eps - step_size) * jnp.sign(grad), 0.0, 1.0)

    return iterate(steps, body, x_start)


# ----------------------------------------------------------------------------- APGD

def apgd_checkpoints(n_iter: int) -> list[tuple[int, int]]:
    """APGD's checkpoints for ``n_iter`` iterations: ``(iterations done, window length)``.

    AutoAttack's schedule (fra31/auto-attack ``autopgd_base.py``): the first check after
    ``k = max(int(0.22 n), 1)`` iterations, then each window ``k <- max(k - max(int(0.03
    n), 1), max(int(0.06 n), 1))`` long. For n = 100 the checks fall after 22, 41, 57, 70,
    80, 87, 93, 99 iterations: the paper's ``w_j = ceil(p_j n)`` with ``p_0 = 0``,
    ``p_1 = 0.22``, ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``.
    """
    n_iter = _check_steps(n_iter)
    k = max(int(0.22 * n_iter), 1)
    k_min = max(int(0.06 * n_iter), 1)
    decrement = max(int(0.03 * n_iter), 1)
    checks, done = [], 0
    while done + k <= n_iter:
        done += k
        checks.append((done, k))
        k = max(k - decrement, k_min)
    return checks


_APGD_LOSSES = {"ce": _per_example_losses, "dlr": _per_example_dlr}


def _apgd_run(logits_fn: LogitsFn, images, labels, *, key, eps, steps, loss="ce", rho=0.75,
              momentum=0.75):
    """APGD with ``loss`` ('ce' or 'dlr'); returns ``(best adversarial images, final
    per-example step sizes, best per-example loss)``. See ``apgd_ce``."""
    name = f"apgd-{loss}"
    per_example_losses = _APGD_LOSSES[loss]
    x, labels = _check_inputs(images, labels)
    n_iter = _check_steps(steps)
    if n_iter < 1:
        raise UserError(f"{name} needs steps >= 1")
    batch = x.shape[0]
    reduce_axes = tuple(range(1, x.ndim))

    # Static schedule: is_check[i] says whether the step-size condition is evaluated
    # after iteration i (0-based), window[i] over how many iterations.
    is_check = [False] * n_iter
    window = [1] * n_iter
    for done, k in apgd_checkpoints(n_iter):
        is_check[done - 1], window[done - 1] = True, k
    is_check, window = jnp.asarray(is_check), jnp.asarray(window)

    def evaluate(z):
        (_, (losses, logits)), grad = jax.value_and_grad(
            per_example_losses, argnums=1, has_aux=True)(logits_fn, z, labels)
        return losses, _margin(logits, labels), grad

    # Start: x + eps * t / max|t|, t ~ U(-1, 1)^d (largest coordinate exactly eps), in [0, 1].
    t = jax.random.uniform(_require_key(key, name), x.shape, x.dtype, -1.0, 1.0)
    t_max = jnp.max(jnp.abs(t), axis=reduce_axes, keepdims=True)
    x_adv = jnp.clip(x + eps * t / (t_max + 1e-12), 0.0, 1.0)
    losses, margin, grad = evaluate(x_adv)

    # The returned point: the lowest margin among the clean image, the start and every
    # iterate (negative margin = misclassified, so a misclassified point wins whenever
    # one was visited).
    clean_margin = _margin(logits_fn(x), labels)
    take = margin < clean_margin
    x_ret = jnp.where(_per_example(take, x), x_adv, x)
    margin_ret = jnp.minimum(margin, clean_margin)

    history = jnp.zeros((n_iter + 1, batch), jnp.float32).at[0].set(losses)
    state = dict(
        x_adv=x_adv, x_old=x_adv, grad=grad,
        step=jnp.full((batch,), 2.0, jnp.float32) * eps,
        x_best=x_adv, grad_best=grad, loss_best=losses,
        history=history,
        reduced_last=jnp.ones((batch,), bool), loss_best_last=losses,
        x_ret=x_ret, margin_ret=margin_ret)
    iteration = jnp.arange(n_iter)

    def body(i, s):
        x_cur = s["x_adv"]
        step = _per_example(s["step"], x_cur).astype(x_cur.dtype)
        a = jnp.where(i > 0, momentum, 1.0).astype(x_cur.dtype)
        z = _project(x_cur + step * jnp.sign(s["grad"]), x, eps)
        x_new = _project(x_cur + a * (z - x_cur) + (1 - a) * (x_cur - s["x_old"]), x, eps)
        losses, margin, grad = evaluate(x_new)

        better = margin < s["margin_ret"]
        x_ret = jnp.where(_per_example(better, x), x_new, s["x_ret"])
        margin_ret = jnp.where(better, margin, s["margin_ret"])

        history = s["history"].at[i + 1].set(losses)
        improved = losses > s["loss_best"]
        x_best = jnp.where(_per_example(improved, x), x_new, s["x_best"])
        grad_best = jnp.where(_per_example(improved, x), grad, s["grad_best"])
        loss_best = jnp.where(improved, losses, s["loss_best"])

        # Checkpoint (only where is_check[i]): condition 1, the loss increased in at most
        # rho * k of the last k steps; condition 2, the step size was not reduced at the
        # previous checkpoint and the best loss has not improved since. Either one:
        # halve the step size and restart from the best point (with its gradient).
        k = window[i]
        increases = history[1:] > history[:-1]          # increases[j]: f(x_{j+1}) > f(x_j)
        in_window = (iteration > i - k) & (iteration <= i)
        count = jnp.sum(increases & in_window[:, None], axis=0)
        oscillating = count <= k * rho
        stalled = (~s["reduced_last"]) & (s["loss_best_last"] >= loss_best)
        check = is_check[i]
        reduce = check & (oscillating | stalled)
        return dict(
            x_adv=jnp.where(_per_example(reduce, x), x_best, x_new),
            x_old=x_cur,
            grad=jnp.where(_per_example(reduce, x), grad_best, grad),
            step=jnp.where(reduce, s["step"] / 2, s["step"]),
            x_best=x_best, grad_best=grad_best, loss_best=loss_best, history=history,
            reduced_last=jnp.where(check, reduce, s["reduced_last"]),
            loss_best_last=jnp.where(check, loss_best, s["loss_best_last"]),
            x_ret=x_ret, margin_ret=margin_ret)

    state = iterate(n_iter, body, state)
    return state["x_ret"], state["step"], state["loss_best"]


def apgd_ce(logits_fn: LogitsFn, images, labels, *, key=None, eps=DEFAULT_EPS,
            step_size=None, steps: int = 100) -> jax.Array:
    """APGD-CE (Croce & Hein, "Reliable evaluation of adversarial robustness with an
    ensemble of diverse parameter-free attacks", ICML 2020), following AutoAttack's
    ``APGDAttack`` (fra31/auto-attack, ``autopgd_base.py``; L-inf, loss 'ce', rho 0.75,
    one restart as in its 'standard' version). No step size to tune: ``step_size`` is
    ignored. ``steps`` = N_iter (AutoAttack default 100).

    * Start ``x_0 = clip(x + eps * t / max|t|, 0, 1)``, ``t ~ U(-1, 1)`` per element.
    * Per-example step size ``eta = 2 eps``; with ``a = 1`` at the first step and 0.75
      after: ``z = P(x_k + eta sign(grad f(x_k)))``,
      ``x_{k+1} = P(x_k + a (z - x_k) + (1 - a)(x_k - x_{k-1}))``.
    * At the checkpoints of ``apgd_checkpoints``, per example: if the loss increased in at
      most 0.75 of the window's steps, or the step size was not halved at the last
      checkpoint and the best loss did not improve since, halve ``eta`` and continue from
      the best-loss point (and its gradient).

    Differences from the reference code, all deliberate: at the first checkpoint the
    window's first comparison is against the starting point's loss (the paper's
    definition; the reference compares with a not-yet-filled zero entry there); the whole
    batch is attacked, not only the initially
    correct examples (static shapes, and a batch-dependent model must see the whole
    batch); the result is, per example, the lowest-margin point (true logit minus largest
    other logit) among the clean image, the start and all iterates -- a misclassified one
    whenever any was visited, otherwise the closest to the decision boundary. With a
    batch-dependent ``logits_fn`` the margins are those measured on the iterate's batch.
    ``key`` is required.
    """
    del step_size
    x_ret, _, _ = _apgd_run(logits_fn, images, labels, key=key, eps=eps, steps=steps)
    return x_ret


def apgd_dlr(logits_fn: LogitsFn, images, labels, *, key=None, eps=DEFAULT_EPS,
             step_size=None, steps: int = 100) -> jax.Array:
    """APGD-DLR (Croce & Hein, ICML 2020): ``apgd_ce``'s algorithm, start, schedule and
    returned point, maximizing the untargeted Difference of Logits Ratio loss ``_dlr``
    instead of the cross-entropy (AutoAttack's ``APGDAttack(loss='dlr')``). The DLR loss
    is unchanged when the logits are shifted or rescaled, so it is not misled by the
    scale of a model's logits (which BatchNorm with batch statistics changes with the
    batch). The targeted variant (APGD-T) is not implemented. Needs >= 3 classes;
    ``step_size`` is ignored; ``key`` is required.
    """
    del step_size
    x_ret, _, _ = _apgd_run(logits_fn, images, labels, key=key, eps=eps, steps=steps,
                            loss="dlr")
    return x_ret


# ----------------------------------------------------------------------------- Square

def square_sides(queries: int, height: int, width: int, p_init: float = 0.8) -> list[int]:
    """Side of the square that each of the ``queries - 1`` iterations after the first query
    changes: ``max(round(sqrt(p * height * width)), 1)``, at most ``min(height, width)``,
    with Andriushchenko et al.'s schedule of the changed fraction ``p``: ``p_init`` halved
    after iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 of 10,000, the
    schedule rescaled to the actual number of iterations (as AutoAttack does)."""
    n_iter = _check_steps(queries) - 1
    halvings = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
    sides = []
    for i in range(n_iter):
        progress = int(i / n_iter * 10000)
        p = p_init / 2 ** sum(progress > h for h in halvings)
        sides.append(min(max(round((p * height * width) ** 0.5), 1), height, width))
    return sides


SQUARE_CORNERS = "0..n-s-1"
"""Where Square's windows may start along a side of ``n`` pixels for a window of ``s``: as
the authors' code (max-andr/square-attack), AutoAttack and torchattacks draw it, never at
``n - s`` (the last fitting position; 0 when ``s = n``). Drawing 0..n-s, as this project did
before 2026-12-06, made Square a few points stronger than theirs at the same budget."""


def square_corners(key, batch: int, size: int, side) -> jax.Array:
    """``(batch, 1)`` window corners along a side of ``size`` (:data:`SQUARE_CORNERS`)."""
    return jax.random.randint(key, (batch, 1), 0, jnp.maximum(size - side, 1))


def square(logits_fn: LogitsFn, images, labels, *, key=None, eps=DEFAULT_EPS,
           step_size=None, steps: int = 5000, p_init: float = 0.8) -> jax.Array:
    """Square Attack, L-inf, untargeted (Andriushchenko et al., "Square Attack: a
    query-efficient black-box adversarial attack via random search", ECCV 2020). Score
    based: it reads ``logits_fn``'s outputs and never differentiates it, so a model whose
    gradients mislead (obfuscated gradients) does not mislead it.

    ``steps`` is the query budget: forward passes of the batch, the first one included.
    Images NHWC.

    * Start at vertical stripes: each column of each channel at ``x +- eps`` (random
      sign), clipped to [0, 1]; one query gives each example's margin (true logit minus
      the largest other).
    * Each further query: every example not yet misclassified proposes to set a random
      ``s x s`` window (side from ``square_sides``; corner uniform as the reference code
      draws it, :data:`SQUARE_CORNERS`; one random sign per channel) to ``x +- eps``,
      clipped to [0, 1]; the proposal is kept where its margin is lower than the
      example's best.

    ``p_init`` 0.8 is AutoAttack's setting for Square (fra31/auto-attack). Batch-dependent
    models: one query scores all proposals of the batch together, and an example's
    acceptance is judged in that batch; an example that proposed nothing gets its margin
    re-measured (its batch mates moved), and it proposes again if it became correct.
    Examples that proposed keep their margin from the query that accepted their change.
    ``step_size`` is ignored; ``key`` is required.
    """
    del step_size
    x, labels = _check_inputs(images, labels)
    if x.ndim != 4:
        raise ValueError(f"square needs NHWC images, got shape {x.shape}")
    batch, height, width, channels = x.shape
    if _check_steps(steps) < 1:
        raise UserError("square needs a budget (steps) of at least 1 query")
    sides = jnp.asarray(square_sides(steps, height, width, p_init), jnp.int32)
    key_start, key_loop = jax.random.split(_require_key(key, "square"))
    stripes = jax.random.rademacher(key_start, (batch, 1, width, channels), x.dtype)
    x_adv = jnp.clip(x + eps * stripes, 0.0, 1.0)
    margin = _margin(logits_fn(x_adv), labels)
    rows, cols = jnp.arange(height), jnp.arange(width)

    def body(i, carry):
        x_adv, margin = carry
        key_row, key_col, key_sign = jax.random.split(jax.random.fold_in(key_loop, i), 3)
        side = sides[i]
        top = square_corners(key_row, batch, height, side)
        left = square_corners(key_col, batch, width, side)
        in_rows = (rows >= top) & (rows < top + side)                  # (batch, height)
        in_cols = (cols >= left) & (cols < left + side)                # (batch, width)
        active = margin > 0
        window = (in_rows[:, :, None, None] & in_cols[:, None, :, None]
                  & _per_example(active, x))
        signs = jax.random.rademacher(key_sign, (batch, 1, 1, channels), x.dtype)
        proposal = jnp.where(window, jnp.clip(x + eps * signs, 0.0, 1.0), x_adv)
        new_margin = _margin(logits_fn(proposal), labels)
        accept = active & (new_margin < margin)
        x_adv = jnp.where(_per_example(accept, x), proposal, x_adv)
        return x_adv, jnp.where(accept | ~active, new_margin, margin)

    if sides.shape[0]:
        x_adv, _ = jax.lax.fori_loop(0, sides.shape[0], body, (x_adv, margin))
    return x_adv


# ----------------------------------------------------------------------------- registry

ATTACKS: dict[str, Callable[..., jax.Array]] = {
    "fgsm": fgsm,
    "bim": bim,
    "pgd": pgd,
    "mim": mim,
    "rfgsm": rfgsm,
    "rfgsm-legacy": rfgsm_legacy,
    "apgd-ce": apgd_ce,
    "apgd-dlr": apgd_dlr,
    "square": square,
}

# For square, "steps" is the query budget.
_DEFAULT_STEPS = {"fgsm": 1, "bim": 7, "pgd": 7, "mim": 5, "rfgsm": 5, "rfgsm-legacy": 5,
                  "apgd-ce": 100, "apgd-dlr": 100, "square": 5000}
_NO_STEP_SIZE = ("fgsm", "apgd-ce", "apgd-dlr", "square")


def check_attack_name(name: str) -> str:
    """Return ``name`` if it is a known attack, else raise UserError listing them."""
    if name not in ATTACKS:
        raise UserError(f"unknown attack {name!r}; known attacks: {', '.join(ATTACKS)}")
    return name


def default_settings(name: str) -> dict:
    """The AWN paper's settings (Sec. 5.1): eps 8/255, step 2/255; FGSM 1 step, BIM and PGD
    7, MIM and RFGSM 5. APGD-CE and APGD-DLR: AutoAttack's 100 iterations; Square:
    AutoAttack's 5,000 queries. These four take no step size (``step_size`` None: unused,
    as for FGSM whose step is eps)."""
    check_attack_name(name)
    step_size = None if name in _NO_STEP_SIZE else DEFAULT_STEP_SIZE
    return {"eps": DEFAULT_EPS, "step_size": step_size, "steps": _DEFAULT_STEPS[name]}


def attack(name: str, logits_fn: LogitsFn, images, labels, *, key, eps=None,
           step_size=None, steps=None) -> jax.Array:
    """Run attack ``name`` with ``default_settings(name)`` for every setting left None."""
    settings = default_settings(name)
    for setting, value in (("eps", eps), ("step_size", step_size), ("steps", steps)):
        if value is not None:
            settings[setting] = value
    return ATTACKS[name](logits_fn, images, labels, key=key, **settings)


@dataclasses.dataclass(frozen=True)
class Attack:
    """Attack ``name`` with ``steps`` steps, called as ``awn_jax.evaluation.Evaluator``
    calls attacks: ``Attack(...)(logits_fn, images, labels, key, eps, step_size)``, eps
    and step size traced, so one compilation serves every eps. Hashable by value."""

    name: str
    steps: int

    def __call__(self, logits_fn, images, labels, key, eps, step_size):
        return attack(self.name, logits_fn, images, labels, key=key, eps=eps,
                      step_size=step_size, steps=self.steps)


def configured(name: str, *, eps=None, step_size=None, steps=None) -> tuple[Attack, tuple]:
    """``(Attack, (eps, step_size))`` for the evaluator, with ``default_settings(name)``
    for every setting left None."""
    settings = default_settings(name)
    for setting, value in (("eps", eps), ("step_size", step_size), ("steps", steps)):
        if value is not None:
            settings[setting] = value
    return (Attack(name, _check_steps(settings["steps"])),
            (settings["eps"], settings["step_size"]))


def root_key(seed: int) -> jax.Array:
    """A study's root key, from which :func:`named_key` folds each evaluation's. Where one
    key is meant to be shared (every point of a PGD sweep starts from the same random
    points, so a curve's steps are the sweep's, not the draw's), it is this one."""
    return jax.random.key(seed)


def named_key(seed: int, name: str, ids: Mapping[str, int] | None = None) -> jax.Array:
    """The random key of the evaluation ``name`` in a study: ``fold_in(root_key(seed),
    ids[name])`` with ``ids`` the study's frozen table (names it lacks: their CRC-32). Keyed
    by name, so adding, dropping or reordering a study's evaluations leaves the others'
    numbers as they were; a table only grows, its numbers never change (cached results
    depend on them)."""
    ids = ids or {}
    number = ids[name] if name in ids else zlib.crc32(name.encode()) & 0x7FFFFFFF
    return jax.random.fold_in(root_key(seed), number)
