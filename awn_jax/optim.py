"""The official AdderNet optimizer as an optax chain, with AWN's learning-rate multiplier.

PyTorch's ``SGD(lr, momentum, weight_decay)`` adds ``wd * param`` to the gradient, keeps a
momentum buffer of that sum and steps by ``lr * buffer``. For adder layers the gradient it
sees is already the adaptively scaled one (the scaling lives in the op's backward), so
momentum and weight decay act on the scaled gradient, as in the official code. AWN's nu
and upsilon get ``learning_rate * awn_lr_multiplier`` (the paper: 1e-5); everything else
about their update is the same.
"""

from __future__ import annotations

import math

import jax
import optax
from flax import nnx

from awn_jax.nn import AWNParam

LR_SCHEDULES = ("cosine-epoch", "cosine-step", "constant")


def learning_rate_schedule(config, steps_per_epoch: int) -> optax.Schedule:
    """Learning rate per step: optional linear warmup, then the configured decay.

    ``cosine-epoch`` is the official one: ``lr/2 * (1 + cos(pi * epoch / num_epochs))``,
    constant within an epoch.
    """
    if config.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr_schedule {config.lr_schedule!r}; "
                         f"expected one of {LR_SCHEDULES}")
    base, total = config.learning_rate, config.num_epochs * steps_per_epoch
    warmup = int(round(config.warmup_epochs * steps_per_epoch))

    def decay(step):
        if config.lr_schedule == "constant":
            return base
        if config.lr_schedule == "cosine-epoch":
            progress = (step // steps_per_epoch) / config.num_epochs
        else:
            progress = step / total
        return 0.5 * base * (1.0 + jax.numpy.cos(math.pi * progress))

    def schedule(step):
        if warmup == 0:
            return decay(step)
        return jax.numpy.where(step < warmup, base * (step + 1) / warmup, decay(step))

    return schedule


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
