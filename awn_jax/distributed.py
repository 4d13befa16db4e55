"""The device mesh every data-parallel computation runs over (training and evaluation), and
joining a multi-host run."""

from __future__ import annotations

import functools
import os

import jax
import numpy as np
from jax.sharding import Mesh

from awn_jax.errors import UserError


def make_mesh(num_devices: int = 0) -> Mesh:
    """A 1-D mesh named ``data`` over the first ``num_devices`` devices (0: all)."""
    devices = jax.devices()
    if num_devices:
        if num_devices > len(devices):
            raise UserError(f"num_devices={num_devices} but only {len(devices)} devices exist")
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), ("data",))


def under_mesh(fn, mesh: Mesh):
    """``fn`` traced and run with ``mesh`` set (``jax.set_mesh``): the adder layers' kernels,
    custom calls XLA cannot split, then run on each device's shard of the batch
    (``ops.adder_vjp.per_batch_shard``). Every jitted step over a sharded batch goes
    through this."""
    @functools.wraps(fn)
    def run(*args):
        with jax.set_mesh(mesh):
            return fn(*args)
    return run


def maybe_initialize_distributed(force: bool = False) -> None:
    """Join a multi-host run when asked to, or when JAX's coordinator is configured."""
    if force or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize()
