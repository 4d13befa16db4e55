"""The attacks of the strict study, after AutoAttack (Croce & Hein, ICML 2020; fra31/auto-attack):
APGD with the cross-entropy or the DLR loss, parameter-free white-box attacks, and Square
(Andriushchenko et al., ECCV 2020), which reads only the model's scores. Signature and
conventions: :mod:`awn_jax.robustness.attacks`, whose registry names them ``apgd-ce``,
``apgd-dlr`` and ``square``."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from awn_jax.errors import UserError
from awn_jax.robustness import attack_core as core
from awn_jax.robustness.attack_core import DEFAULT_EPS, LogitsFn


# ----------------------------------------------------------------------------- APGD

def apgd_checkpoints(n_iter: int) -> list[tuple[int, int]]:
    """APGD's checkpoints for ``n_iter`` iterations: ``(iterations done, window length)``.

    AutoAttack's schedule (fra31/auto-attack ``autopgd_base.py``): the first check after
    ``k = max(int(0.22 n), 1)`` iterations, then each window ``k <- max(k - max(int(0.03
    n), 1), max(int(0.06 n), 1))`` long. For n = 100 the checks fall after 22, 41, 57, 70,
    80, 87, 93, 99 iterations: the paper's ``w_j = ceil(p_j n)`` with ``p_0 = 0``,
    ``p_1 = 0.22``, ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``.
    """
    n_iter = core.check_steps(n_iter)
    k = max(int(0.22 * n_iter), 1)
    k_min = max(int(0.06 * n_iter), 1)
    decrement = max(int(0.03 * n_iter), 1)
    checks, done = [], 0
    while done + k <= n_iter:
        done += k
        checks.append((done, k))
        k = max(k - decrement, k_min)
    return checks


_APGD_LOSSES = {"ce": core.per_example_losses, "dlr": core.per_example_dlr}


def _apgd_run(logits_fn: LogitsFn, images, labels, *, key, eps, steps, loss="ce", rho=0.75,
              momentum=0.75):
    """APGD with ``loss`` ('ce' or 'dlr'); returns ``(best adversarial images, final
    per-example step sizes, best per-example loss)``. See ``apgd_ce``."""
    name = f"apgd-{loss}"
    per_example_losses = _APGD_LOSSES[loss]
    x, labels = core.check_inputs(images, labels)
    n_iter = core.check_steps(steps)
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
        return losses, core.margin(logits, labels), grad

    # Start: x + eps * t / max|t|, t ~ U(-1, 1)^d (largest coordinate exactly eps), in [0, 1].
    t = jax.random.uniform(core.require_key(key, name), x.shape, x.dtype, -1.0, 1.0)
    t_max = jnp.max(jnp.abs(t), axis=reduce_axes, keepdims=True)
    x_adv = jnp.clip(x + eps * t / (t_max + 1e-12), 0.0, 1.0)
    losses, margin, grad = evaluate(x_adv)

    # The returned point: the lowest margin among the clean image, the start and every
    # iterate (negative margin = misclassified, so a misclassified point wins whenever
    # one was visited).
    clean_margin = core.margin(logits_fn(x), labels)
    take = margin < clean_margin
    x_ret = jnp.where(core.per_example(take, x), x_adv, x)
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
        step = core.per_example(s["step"], x_cur).astype(x_cur.dtype)
        a = jnp.where(i > 0, momentum, 1.0).astype(x_cur.dtype)
        z = core.project(x_cur + step * jnp.sign(s["grad"]), x, eps)
        x_new = core.project(x_cur + a * (z - x_cur) + (1 - a) * (x_cur - s["x_old"]), x, eps)
        losses, margin, grad = evaluate(x_new)

        better = margin < s["margin_ret"]
        x_ret = jnp.where(core.per_example(better, x), x_new, s["x_ret"])
        margin_ret = jnp.where(better, margin, s["margin_ret"])

        history = s["history"].at[i + 1].set(losses)
        improved = losses > s["loss_best"]
        x_best = jnp.where(core.per_example(improved, x), x_new, s["x_best"])
        grad_best = jnp.where(core.per_example(improved, x), grad, s["grad_best"])
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
            x_adv=jnp.where(core.per_example(reduce, x), x_best, x_new),
            x_old=x_cur,
            grad=jnp.where(core.per_example(reduce, x), grad_best, grad),
            step=jnp.where(reduce, s["step"] / 2, s["step"]),
            x_best=x_best, grad_best=grad_best, loss_best=loss_best, history=history,
            reduced_last=jnp.where(check, reduce, s["reduced_last"]),
            loss_best_last=jnp.where(check, loss_best, s["loss_best_last"]),
            x_ret=x_ret, margin_ret=margin_ret)

    state = core.iterate(n_iter, body, state)
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
    returned point, maximizing the untargeted Difference of Logits Ratio loss ``attack_core.dlr``
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
    n_iter = core.check_steps(queries) - 1
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
    x, labels = core.check_inputs(images, labels)
    if x.ndim != 4:
        raise ValueError(f"square needs NHWC images, got shape {x.shape}")
    batch, height, width, channels = x.shape
    if core.check_steps(steps) < 1:
        raise UserError("square needs a budget (steps) of at least 1 query")
    sides = jnp.asarray(square_sides(steps, height, width, p_init), jnp.int32)
    key_start, key_loop = jax.random.split(core.require_key(key, "square"))
    stripes = jax.random.rademacher(key_start, (batch, 1, width, channels), x.dtype)
    x_adv = jnp.clip(x + eps * stripes, 0.0, 1.0)
    margin = core.margin(logits_fn(x_adv), labels)
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
                  & core.per_example(active, x))
        signs = jax.random.rademacher(key_sign, (batch, 1, 1, channels), x.dtype)
        proposal = jnp.where(window, jnp.clip(x + eps * signs, 0.0, 1.0), x_adv)
        new_margin = core.margin(logits_fn(proposal), labels)
        accept = active & (new_margin < margin)
        x_adv = jnp.where(core.per_example(accept, x), proposal, x_adv)
        return x_adv, jnp.where(accept | ~active, new_margin, margin)

    if sides.shape[0]:
        x_adv, _ = jax.lax.fori_loop(0, sides.shape[0], body, (x_adv, margin))
    return x_adv
