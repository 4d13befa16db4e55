"""The training state: the model's pytrees and the optimizer's, one Orbax checkpoint each
epoch; and the BatchNorm drift the loop reports."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from awn_jax.training import optimizer
from awn_jax.model import build_model, named_leaves, split_model


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


def bn_drift(previous, current) -> dict:
    """Change of all BN running means and variances over the epoch, relative to their
    current size (1.0 when they started from zero)."""
    def relative(name):
        prev = [np.ravel(v) for k, v in named_leaves(jax.device_get(previous)).items()
                if k.rsplit(".", 1)[-1] == name]
        cur = [np.ravel(v) for k, v in named_leaves(jax.device_get(current)).items()
               if k.rsplit(".", 1)[-1] == name]
        if not prev:
            return 0.0
        prev, cur = np.concatenate(prev), np.concatenate(cur)
        return float(np.linalg.norm(cur - prev) / max(np.linalg.norm(cur), 1e-12))
    return {"bn_mean_drift": relative("mean"), "bn_var_drift": relative("var")}
