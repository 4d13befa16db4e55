"""The official AdderNet optimizer as an optax chain, with AWN's learning-rate multiplier.

PyTorch's ``SGD(lr, momentum, weight_decay)`` adds ``wd * param`` to the gradient, keeps a
momentum buffer of that sum and steps by ``lr * buffer``. For adder layers the gradient it
sees is already the adaptively scaled one (the scaling lives in the op's backward), so
momentum and weight decay act on the scaled gradient, as in the official code. AWN's nu
and upsilon get ``learning_rate * awn_lr_multiplier`` (the paper: 1e-5); everything else
about their update is the same.
"""

from __future__ import annotations

import jax
import optax
from flax import nnx

from awn_jax.errors import UserError
from awn_jax.nn import AWNParam

LR_SCHEDULES = ("cosine-epoch", "cosine-step", "constant")


def _decay(config, base: float, steps: int, steps_per_epoch: int) -> optax.Schedule:
    """The decay after the warmup, over its ``steps`` steps, counted from the warmup's end."""
    if config.lr_schedule == "constant":
        return optax.constant_schedule(base)
    if config.lr_schedule == "cosine-epoch":
        # Floored to the epoch: lr/2 * (1 + cos(pi * epoch / epochs)), constant within one.
        cosine = optax.cosine_decay_schedule(base, steps / steps_per_epoch)
        return lambda step: cosine(step // steps_per_epoch)
    return optax.cosine_decay_schedule(base, steps)


def learning_rate_schedule(config, steps_per_epoch: int) -> optax.Schedule:
    """Learning rate per step: optional linear warmup, then the configured decay.

    ``cosine-epoch`` is the official one: ``lr/2 * (1 + cos(pi * epoch / num_epochs))``,
    constant within an epoch. A warmup of ``warmup_epochs`` (rounded to whole steps) rises
    linearly to ``learning_rate``, reached at its last step, ``lr * (step + 1) / warmup``;
    the decay then starts from ``learning_rate`` and spans the remaining steps
    (``optax.join_schedules``), so the rate is continuous where the warmup ends.
    """
    if config.lr_schedule not in LR_SCHEDULES:
        raise UserError(f"unknown lr_schedule {config.lr_schedule!r}; "
                        f"expected one of {LR_SCHEDULES}")
    base, total = config.learning_rate, config.num_epochs * steps_per_epoch
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    if warmup >= total and config.lr_schedule != "constant":
        raise UserError(f"warmup_epochs={config.warmup_epochs} leaves none of the "
                        f"{config.num_epochs} epochs to the {config.lr_schedule} decay")
    decay = _decay(config, base, total - warmup, steps_per_epoch)
    if warmup == 0:
        return decay
    ramp = optax.linear_schedule(base / warmup, base, transition_steps=warmup - 1)
    return optax.join_schedules([ramp, decay], boundaries=[warmup])


def awn_mask(params: nnx.State):
    """True at AWN's nu/upsilon, False elsewhere (a prefix tree of ``params``)."""
    return jax.tree.map(lambda v: isinstance(v, AWNParam), params,
                        is_leaf=lambda v: isinstance(v, nnx.Variable))


def make_optimizer(config, steps_per_epoch: int) -> optax.GradientTransformation:
    """SGD with momentum and coupled weight decay on every parameter (PyTorch's SGD)."""
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.trace(decay=config.momentum, nesterov=config.nesterov),
        optax.scale_by_learning_rate(learning_rate_schedule(config, steps_per_epoch)),
        optax.masked(optax.scale(config.awn_lr_multiplier), awn_mask),
    )
