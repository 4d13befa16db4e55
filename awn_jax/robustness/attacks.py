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
  (:func:`attack_core.iterate`). APGD and Square live in
:mod:`awn_jax.robustness.autoattack`, what all attacks share in
:mod:`awn_jax.robustness.attack_core`.

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
import zlib
from typing import Callable, Mapping

import jax
import jax.numpy as jnp

from awn_jax.errors import UserError
from awn_jax.robustness import attack_core as core
from awn_jax.robustness.attack_core import DEFAULT_EPS, DEFAULT_STEP_SIZE, LogitsFn
from awn_jax.robustness.autoattack import apgd_ce, apgd_dlr, square

# ----------------------------------------------------------------------------- the paper's

def _sign_steps(logits_fn, x, labels, x_start, eps, step_size, steps):
    """``steps`` iterations of x <- P(x + step_size * sign(grad)) from ``x_start``."""
    def body(_, x_adv):
        grad = core.loss_grad(logits_fn, x_adv, labels)
        return core.project(x_adv + step_size * jnp.sign(grad), x, eps)

    return core.iterate(steps, body, x_start)


def fgsm(logits_fn: LogitsFn, images, labels, *, key=None, eps=DEFAULT_EPS,
         step_size=None, steps: int = 1) -> jax.Array:
    """FGSM (Goodfellow, Shlens & Szegedy, "Explaining and Harnessing Adversarial
    Examples", ICLR 2015): ``x' = clip(x + eps * sign(grad_x L(x, y)), 0, 1)``.

    Same rule as torchattacks 2.12.0 and 3.5.0 ``FGSM``. Single-step by definition:
    ``step_size`` and ``steps`` are accepted for a uniform signature and ignored (the step
    is ``eps``); ``key`` is unused.
    """
    del key, step_size, steps
    x, labels = core.check_inputs(images, labels)
    grad = core.loss_grad(logits_fn, x, labels)
    return core.project(x + eps * jnp.sign(grad), x, eps)


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
    x, labels = core.check_inputs(images, labels)
    return _sign_steps(logits_fn, x, labels, x, eps, step_size, core.check_steps(steps))


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
    x, labels = core.check_inputs(images, labels)
    steps = core.check_steps(steps)
    if random_start:
        noise = jax.random.uniform(core.require_key(key, "pgd"), x.shape, x.dtype, -1.0, 1.0)
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
    x, labels = core.check_inputs(images, labels)
    steps = core.check_steps(steps)
    reduce_axes = tuple(range(1, x.ndim))

    def body(_, carry):
        x_adv, momentum = carry
        grad = core.loss_grad(logits_fn, x_adv, labels)
        scale = jnp.mean(jnp.abs(grad), axis=reduce_axes, keepdims=True)
        normalized = jnp.where(scale > 0, grad / jnp.where(scale > 0, scale, 1.0), 0.0)
        momentum = decay * momentum + normalized
        return core.project(x_adv + step_size * jnp.sign(momentum), x, eps), momentum

    x_adv, _ = core.iterate(steps, body, (x, jnp.zeros_like(x)))
    return x_adv


def _rademacher_start(key, x, alpha, name):
    signs = jax.random.rademacher(core.require_key(key, name), x.shape, x.dtype)
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
    x, labels = core.check_inputs(images, labels)
    steps = core.check_steps(steps)
    _check_alpha(eps, step_size, "rfgsm")
    x_start = core.project(_rademacher_start(key, x, step_size, "rfgsm"), x, eps)
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
    x, labels = core.check_inputs(images, labels)
    steps = core.check_steps(steps)
    _check_alpha(eps, step_size, "rfgsm-legacy")
    x_start = _rademacher_start(key, x, step_size, "rfgsm-legacy")

    def body(_, x_adv):
        grad = core.loss_grad(logits_fn, x_adv, labels)
        return jnp.clip(x_adv + (eps - step_size) * jnp.sign(grad), 0.0, 1.0)

    return core.iterate(steps, body, x_start)


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


def _settings(name: str, eps, step_size, steps) -> dict:
    """``default_settings(name)`` with the settings given (not None) in their place."""
    given = {"eps": eps, "step_size": step_size, "steps": steps}
    return {**default_settings(name), **{k: v for k, v in given.items() if v is not None}}


def attack(name: str, logits_fn: LogitsFn, images, labels, *, key, eps=None,
           step_size=None, steps=None) -> jax.Array:
    """Run attack ``name`` with ``default_settings(name)`` for every setting left None."""
    settings = _settings(name, eps, step_size, steps)
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
    settings = _settings(name, eps, step_size, steps)
    return (Attack(name, core.check_steps(settings["steps"])),
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
