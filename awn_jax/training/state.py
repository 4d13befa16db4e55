"""The training state: the model's pytrees and the optimizer's, saved as one Orbax
checkpoint each epoch."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from awn_jax.training import optimizer
from awn_jax.model import build_model, split_model


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State
    batch_stats: nnx.State
    opt_state: optax.OptState


def create_train_state(config, info, steps_per_epoch: int):
    """Fresh model, optimizer and state: ``(graphdef, tx, state)``."""
    graphdef, params, batch_stats = split_model(build_model(config, info))
    tx = optimizer.make_optimizer(config, steps_per_epoch)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                       opt_state=tx.init(params))
    return graphdef, tx, state
