"""What every attack shares: the per-example losses (cross-entropy, DLR, margin), the
projection onto the eps-ball, the checks of an attack's inputs, and the loop, unrolled on
the CPU when it is short (:func:`iterate`). The conventions all attacks follow are in
:mod:`awn_jax.robustness.attacks`."""

from __future__ import annotations

import operator
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from awn_jax.errors import UserError

LogitsFn = Callable[[jax.Array], jax.Array]

DEFAULT_EPS = 8 / 255
DEFAULT_STEP_SIZE = 2 / 255


def per_example_losses(logits_fn: LogitsFn, x: jax.Array, labels: jax.Array):
    logits = logits_fn(x)
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels)
    return jnp.mean(losses), (losses, logits)


def dlr(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Difference of Logits Ratio (Croce & Hein 2020, Eq. 6), per example:
    ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12)`` with ``z_pi1 >= z_pi2 >= ...``
    the sorted logits. Invariant to shifting and positively rescaling the logits, so a
    model cannot hide behind large or tiny logits; needs at least 3 classes."""
    logits = logits.astype(jnp.float32)
    if logits.shape[-1] < 3:
        raise UserError(f"the DLR loss needs at least 3 classes, got {logits.shape[-1]}")
    top = jnp.sort(logits, axis=-1)[..., ::-1]
    return -margin(logits, labels) / (top[..., 0] - top[..., 2] + 1e-12)


def per_example_dlr(logits_fn: LogitsFn, x: jax.Array, labels: jax.Array):
    logits = logits_fn(x)
    losses = dlr(logits, labels)
    return jnp.mean(losses), (losses, logits)


def loss_grad(logits_fn: LogitsFn, x: jax.Array, labels: jax.Array) -> jax.Array:
    """Gradient of the batch-mean cross-entropy w.r.t. the whole batch input."""
    grad, _ = jax.grad(per_example_losses, argnums=1, has_aux=True)(logits_fn, x, labels)
    return grad


def project(x_adv: jax.Array, x: jax.Array, eps) -> jax.Array:
    """Projection onto the L-inf eps-ball around ``x``, then clipping to [0, 1]."""
    return jnp.clip(jnp.clip(x_adv, x - eps, x + eps), 0.0, 1.0)


def margin(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """logit of the true class minus the largest other logit (< 0: misclassified)."""
    logits = logits.astype(jnp.float32)
    true = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
    others = jnp.where(jax.nn.one_hot(labels, logits.shape[-1], dtype=bool), -jnp.inf, logits)
    return true - jnp.max(others, axis=-1)


def per_example(v: jax.Array, like: jax.Array) -> jax.Array:
    """Broadcast a (batch,) vector against an array shaped like ``like``."""
    return v.reshape(v.shape + (1,) * (like.ndim - 1))


def check_steps(steps) -> int:
    try:
        steps = operator.index(steps)   # a tracer raises TracerIntegerConversionError
    except TypeError:
        raise TypeError(f"steps must be a Python int (it is static), got {steps!r}") from None
    if steps < 0:
        raise UserError(f"steps must be >= 0, got {steps}")
    return steps


def check_inputs(images, labels):
    images = jnp.asarray(images)
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise TypeError(f"images must be floating point in [0, 1], got dtype {images.dtype}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"labels must have shape ({images.shape[0]},), got {labels.shape}")
    return images, labels.astype(jnp.int32)


def require_key(key, name):
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
