"""``train_and_evaluate(config, workdir)``: the data-parallel training loop.

One ``jax.jit`` train step over a 1-D device mesh (axis ``data``): the global batch is
sharded, parameters are replicated, and XLA inserts the reductions, so BatchNorm
statistics and the adder layers' adaptive gradient norm are global over the batch as on
one device. Steps are traced with the mesh set (``jax.set_mesh``), so the adder kernels,
custom calls XLA cannot split, run per batch shard (``ops.adder.adder_vjp``). A checkpoint is written after every epoch and a run restarts from the latest
one in ``workdir``; data order and augmentation depend only on (seed, epoch), so a resumed
run repeats an uninterrupted one.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from awn_jax import checkpointing, data, optim
from awn_jax.metrics_io import MetricsWriter
from awn_jax.nn.batchnorm import check_bn_mode
from awn_jax.state import (TrainState, apply_model, build_model, cross_entropy, named_leaves,
                           split_model, with_bn_mode)


def make_mesh(num_devices: int = 0) -> Mesh:
    """A 1-D mesh named ``data`` over the first ``num_devices`` devices (0: all)."""
    devices = jax.devices()
    if num_devices:
        if num_devices > len(devices):
            raise ValueError(f"num_devices={num_devices} but only {len(devices)} devices exist")
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), ("data",))


def create_train_state(config, info, steps_per_epoch: int):
    """Fresh model, optimizer and state: ``(graphdef, tx, state)``."""
    graphdef, params, batch_stats = split_model(build_model(config, info))
    tx = optim.make_optimizer(config, steps_per_epoch)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                       opt_state=tx.init(params))
    return graphdef, tx, state


def train_step(graphdef, tx, state: TrainState, batch):
    """One SGD step on a global batch (BatchNorm in ``train`` mode)."""

    def loss_fn(params, batch_stats):
        logits, batch_stats = apply_model(graphdef, params, batch_stats, batch["image"])
        return cross_entropy(logits, batch["label"]), (logits, batch_stats)

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = jax.tree.map(lambda p, u: p + u, state.params, updates)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state)
    return new_state, {"loss": loss, "accuracy": accuracy}


def eval_step(graphdef, state: TrainState, batch):
    """Summed loss and number correct on a batch (the graphdef fixes the BN mode)."""
    logits, _ = apply_model(graphdef, state.params, state.batch_stats, batch["image"])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    return {"loss_sum": jnp.sum(losses),
            "correct": jnp.sum(jnp.argmax(logits, -1) == batch["label"])}


class Trainer:
    """Holds the compiled steps and shardings of one run."""

    def __init__(self, config, dataset, mesh: Mesh):
        self.config, self.dataset, self.mesh = config, dataset, mesh
        self.replicated = NamedSharding(mesh, PartitionSpec())
        self.sharded = NamedSharding(mesh, PartitionSpec("data"))
        num_devices = mesh.devices.size
        if config.batch_size % num_devices:
            raise ValueError(f"batch_size {config.batch_size} is not divisible by the "
                             f"{num_devices} devices; choose a multiple of {num_devices}")
        self.steps_per_epoch = dataset.steps_per_epoch(config.batch_size)
        self.graphdef, tx, state = create_train_state(config, dataset.info, self.steps_per_epoch)
        self.initial_state = jax.device_put(state, self.replicated)
        self.schedule = optim.learning_rate_schedule(config, self.steps_per_epoch)
        self.eval_graphdef = with_bn_mode(self.graphdef, state.params, state.batch_stats,
                                          check_bn_mode(config.eval_bn_mode))
        self.train_step = self._under_mesh(jax.jit(
            functools.partial(train_step, self.graphdef, tx),
            in_shardings=(self.replicated, self.sharded),
            out_shardings=(self.replicated, self.replicated), donate_argnums=0))
        self.eval_step = self._under_mesh(
            jax.jit(functools.partial(eval_step, self.eval_graphdef)))

    def _under_mesh(self, step):
        """``step`` traced and run with the mesh set (``jax.set_mesh``): the adder layers'
        kernels then run on each device's shard of the batch (``adder.adder_vjp``)."""
        @functools.wraps(step)
        def run(*args):
            with jax.set_mesh(self.mesh):
                return step(*args)
        return run

    def global_batch(self, local_batch, sharding):
        return {k: jax.make_array_from_process_local_data(sharding, v)
                for k, v in local_batch.items()}

    def train_epoch(self, state, epoch: int, progress: tqdm.tqdm):
        """Run one epoch; returns the state and the epoch's mean loss and accuracy."""
        losses, accuracies, pending = [], [], []
        batches = self.dataset.train_batches(epoch, self.config.batch_size,
                                             process_index=jax.process_index(),
                                             process_count=jax.process_count())
        for i, local_batch in enumerate(batches):
            state, metrics = self.train_step(state, self.global_batch(local_batch, self.sharded))
            pending.append(metrics)
            if (i + 1) % self.config.log_every_steps == 0 or i + 1 == self.steps_per_epoch:
                fetched = jax.device_get(pending)
                last_step = epoch * self.steps_per_epoch + i + 1  # counted from 1
                _raise_on_nonfinite(fetched, epoch, first_step=last_step - len(fetched) + 1)
                losses += [m["loss"] for m in fetched]
                accuracies += [m["accuracy"] for m in fetched]
                progress.update(len(fetched))
                progress.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.3f}")
                pending = []
        return state, float(np.mean(losses)), float(np.mean(accuracies))

    def evaluate(self, state) -> dict:
        """Test loss and accuracy with BatchNorm in ``config.eval_bn_mode``."""
        totals, count = {"loss_sum": 0.0, "correct": 0}, 0
        num_devices = self.mesh.devices.size
        for local_batch in self.dataset.test_batches(
                self.config.eval_batch_size, num_examples=self.config.num_test_examples,
                process_index=jax.process_index(), process_count=jax.process_count()):
            size = len(local_batch["label"]) * jax.process_count()
            # A batch that does not split evenly runs whole on every device: same numbers.
            sharding = self.sharded if size % num_devices == 0 else self.replicated
            if sharding is self.replicated and jax.process_count() > 1:
                raise ValueError(f"test batch of {size} does not split over {num_devices} "
                                 "devices; choose eval_batch_size dividing the test set")
            sums = jax.device_get(self.eval_step(state, self.global_batch(local_batch, sharding)))
            totals = {k: totals[k] + float(sums[k]) for k in totals}
            count += size
        return {"test_loss": totals["loss_sum"] / count, "test_accuracy": totals["correct"] / count}


def _raise_on_nonfinite(metrics, epoch, first_step):
    for offset, m in enumerate(metrics):
        if not math.isfinite(float(m["loss"])):
            raise FloatingPointError(
                f"loss is {float(m['loss'])} at step {first_step + offset} (epoch {epoch + 1}); "
                "training stopped, the last good checkpoint is kept")


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


def train_and_evaluate(config, workdir: str) -> dict:
    """Train ``config`` into ``workdir`` (resuming from its latest checkpoint); returns the
    last epoch's metrics."""
    dataset = data.get_dataset(config)
    trainer = Trainer(config, dataset, make_mesh(config.num_devices))  # validates config
    os.makedirs(workdir, exist_ok=True)
    checkpointing.check_or_save_config(config, workdir)
    checkpointing.save_dataset_info(dataset.info, workdir)
    manager = checkpointing.make_manager(workdir, config.max_checkpoints_to_keep)
    state, start_epoch = checkpointing.restore_latest(manager, trainer.initial_state)
    writer = MetricsWriter(workdir, start_epoch)
    total_steps = config.num_epochs * trainer.steps_per_epoch
    progress = tqdm.tqdm(total=total_steps, initial=start_epoch * trainer.steps_per_epoch,
                         unit="step", disable=jax.process_index() != 0, dynamic_ncols=True)
    if start_epoch:
        progress.write(f"resumed from epoch {start_epoch} of {config.num_epochs} in {workdir}")
    metrics = {}
    previous_stats = jax.device_get(state.batch_stats)
    try:
        for epoch in range(start_epoch, config.num_epochs):
            start = time.perf_counter()
            state, train_loss, train_accuracy = trainer.train_epoch(state, epoch, progress)
            seconds = time.perf_counter() - start
            current_stats = jax.device_get(state.batch_stats)
            metrics = {
                "epoch": epoch + 1, "step": (epoch + 1) * trainer.steps_per_epoch,
                "train_loss": train_loss, "train_accuracy": train_accuracy,
                **trainer.evaluate(state),
                "learning_rate": float(trainer.schedule((epoch + 1) * trainer.steps_per_epoch - 1)),
                "images_per_second": trainer.steps_per_epoch * config.batch_size / seconds,
                "epoch_seconds": seconds,
                **bn_drift(previous_stats, current_stats),
            }
            previous_stats = current_stats
            writer.write(metrics)
            checkpointing.save(manager, epoch + 1, state)
            progress.write(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                       for k, v in metrics.items()}))
    finally:
        progress.close()
        manager.wait_until_finished()
        manager.close()
        writer.close()
    return metrics


def maybe_initialize_distributed(force: bool = False) -> None:
    """Join a multi-host run when asked to, or when JAX's coordinator is configured."""
    if force or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize()
