"""What every trainer (classification, detection) shares to run its steps: placements on the
1-D ``data`` mesh, the check that each batch divides over the devices, jitted steps traced
under the mesh, and the step loop that fetches metrics every few steps and stops at the
first non-finite loss."""

from __future__ import annotations

import math

import jax
import tqdm
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from awn_jax.distributed import under_mesh
from awn_jax.errors import NonFiniteLossError, UserError


class DataParallel:
    """Parameters replicated, batches sharded along ``data``; ``batch_sizes`` (name ->
    size, e.g. ``batch_size=256``) must each be a multiple of the number of devices."""

    def __init__(self, mesh: Mesh, **batch_sizes: int):
        self.mesh = mesh
        self.replicated = NamedSharding(mesh, PartitionSpec())
        self.sharded = NamedSharding(mesh, PartitionSpec("data"))
        num_devices = mesh.devices.size
        for name, size in batch_sizes.items():
            if size % num_devices:
                raise UserError(f"{name} {size} is not divisible by the {num_devices} "
                                f"devices; choose a multiple of {num_devices}")

    def jit(self, fn, in_shardings, out_shardings, **kwargs):
        """``jax.jit(fn)`` traced and run under the mesh (``distributed.under_mesh``)."""
        return under_mesh(jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                                  **kwargs), self.mesh)

    def jit_train_step(self, fn):
        """``fn(state, batch) -> (state, metrics)`` jitted: the state replicated and donated,
        the batch sharded."""
        return self.jit(fn, (self.replicated, self.sharded),
                        (self.replicated, self.replicated), donate_argnums=0)

    def global_batch(self, local_batch: dict) -> dict:
        """This process's part of a batch as global arrays sharded along ``data``."""
        return {k: jax.make_array_from_process_local_data(self.sharded, v)
                for k, v in local_batch.items()}


def run_epoch_steps(step, state, dataset, parallel: DataParallel, *, epoch: int, config,
                progress: tqdm.tqdm):
    """``state`` after ``step`` over epoch ``epoch``'s training batches (of
    ``config.batch_size``; this process's part of each), and every step's metrics on the
    host. Metrics are fetched every ``config.log_every_steps`` steps and at the epoch's end
    (fetching each step would wait for the device every step); a non-finite loss among them
    stops the run with a ``NonFiniteLossError`` naming its step (counted from 1)."""
    steps_per_epoch = dataset.steps_per_epoch(config.batch_size)
    local_batches = dataset.train_batches(epoch, config.batch_size,
                                          process_index=jax.process_index(),
                                          process_count=jax.process_count())
    fetched_all, pending = [], []
    for i, local_batch in enumerate(local_batches):
        state, metrics = step(state, parallel.global_batch(local_batch))
        pending.append(metrics)
        if (i + 1) % config.log_every_steps == 0 or i + 1 == steps_per_epoch:
            fetched = jax.device_get(pending)
            first_step = epoch * steps_per_epoch + i + 2 - len(fetched)
            for offset, m in enumerate(fetched):
                if not math.isfinite(loss := float(m["loss"])):
                    raise NonFiniteLossError(
                        f"loss is {loss} at step {first_step + offset} (epoch {epoch + 1}); "
                        "training stopped, the last good checkpoint is kept")
            fetched_all += fetched
            progress.update(len(fetched))
            progress.set_postfix(epoch=epoch + 1, loss=f"{float(fetched[-1]['loss']):.3f}")
            pending = []
    return state, fetched_all
