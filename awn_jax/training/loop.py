"""``train_and_evaluate(config, workdir)``: the data-parallel training loop.

One ``jax.jit`` train step over a 1-D device mesh (axis ``data``): the global batch is
sharded, parameters are replicated, and XLA inserts the reductions, so BatchNorm
statistics and the adder layers' adaptive gradient norm are global over the batch as on
one device. Steps are traced with the mesh set (``jax.set_mesh``), so the adder kernels,
custom calls XLA cannot split, run per batch shard. The per-epoch test goes through
``awn_jax.evaluation.Evaluator`` like every other evaluation. A checkpoint is written after
every epoch and a run restarts from the latest one in ``workdir``; data order and
augmentation depend only on (seed, epoch), so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from jax.sharding import Mesh

from awn_jax import data
from awn_jax.distributed import make_mesh
from awn_jax.evaluation import Evaluator
from awn_jax.nn.batchnorm import check_bn_modes
from awn_jax.model import apply_model, bn_drift, cross_entropy
from awn_jax.training import checkpointing, optimizer
from awn_jax.training.config_checks import check_config
from awn_jax.training.data_parallel import DataParallel, run_epoch_steps
from awn_jax.reports import save_figure
from awn_jax.training.metrics import MetricsWriter, plot_curves, read_metrics, summary
from awn_jax.training.state import TrainState, create_train_state


def train_step(graphdef, tx, state: TrainState, batch):
    """One SGD step on a global batch (BatchNorm in ``train`` mode)."""

    def loss_fn(params, batch_stats):
        logits, batch_stats = apply_model(graphdef, params, batch_stats, batch["image"])
        return cross_entropy(logits, batch["label"]), (logits, batch_stats)

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state)
    return new_state, {"loss": loss, "accuracy": accuracy}


class Trainer:
    """The compiled steps and shardings of one classification run (an :class:`EpochTrainer`)."""

    def __init__(self, config, dataset, mesh: Mesh):
        self.config, self.dataset = config, dataset
        check_bn_modes([config.eval_bn_mode])
        self.parallel = DataParallel(mesh, batch_size=config.batch_size)
        self.steps_per_epoch = dataset.steps_per_epoch(config.batch_size)
        self.graphdef, tx, state = create_train_state(config, dataset.info, self.steps_per_epoch)
        self.initial_state = jax.device_put(state, self.parallel.replicated)
        self.schedule = optimizer.learning_rate_schedule(config, self.steps_per_epoch)
        self.evaluator = Evaluator(self.graphdef, state.params, state.batch_stats, mesh=mesh)
        self.train_step = self.parallel.jit_train_step(
            functools.partial(train_step, self.graphdef, tx))

    def train_epoch(self, state, epoch: int, progress: tqdm.tqdm):
        """Run one epoch; returns the state and the epoch's mean loss and accuracy."""
        state, metrics = run_epoch_steps(self.train_step, state, self.dataset, self.parallel,
                                         epoch=epoch, config=self.config, progress=progress)
        return state, {"train_loss": float(np.mean([m["loss"] for m in metrics])),
                       "train_accuracy": float(np.mean([m["accuracy"] for m in metrics]))}

    def evaluate(self, state) -> dict:
        """Test loss and accuracy with BatchNorm in ``config.eval_bn_mode`` (a second
        progress bar counts the test batches, so the display moves while it runs)."""
        total = min(self.config.num_test_examples or self.dataset.info.num_test,
                    self.dataset.info.num_test)
        batches = tqdm.tqdm(self.dataset.test_batches(
            self.config.eval_batch_size, num_examples=self.config.num_test_examples,
            process_index=jax.process_index(), process_count=jax.process_count()),
            total=math.ceil(total / self.config.eval_batch_size), desc="test", unit="batch",
            leave=False, position=1, disable=jax.process_index() != 0, dynamic_ncols=True)
        result = self.evaluator.loss_and_accuracy(batches, bn_mode=self.config.eval_bn_mode,
                                                  params=state.params,
                                                  batch_stats=state.batch_stats)
        return {"test_loss": result["test_loss"], "test_accuracy": result["test_accuracy"]}


def train_and_evaluate(config, workdir: str, deadline: float | None = None) -> dict:
    """Train ``config`` into ``workdir`` (resuming from its latest checkpoint); returns the
    last epoch's metrics. ``deadline`` (a ``time.time()``): stop after the first epoch
    that ends past it, checkpoint written, so a machine lent for a fixed time loses none."""
    check_config(config)
    finished = _finished(config, workdir)
    if finished is not None:
        return finished
    dataset = data.get_dataset(config)
    trainer = Trainer(config, dataset, make_mesh(config.num_devices))  # checks the rest
    info = dataset.info
    _say(f"training {config.model} ({config.layer_type}) on {info.name}: {info.num_train} "
         f"training images, {trainer.steps_per_epoch} steps of {config.batch_size} per epoch, "
         f"{config.num_epochs} epochs, on {trainer.parallel.mesh.devices.size} "
         f"{jax.devices()[0].platform.upper()} device(s); workdir {os.path.abspath(workdir)}")
    return run_epochs(config, workdir, dataset.info, trainer,
                      lambda state, epoch: trainer.evaluate(state), deadline)


def _say(line: str) -> None:
    if jax.process_index() == 0:
        print(line, flush=True)


def _finished(config, workdir: str) -> dict | None:
    """The last metrics of a workdir that already holds ``config.num_epochs`` epochs of this
    config (said in one line, nothing loaded or compiled), else None."""
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        return None
    checkpointing.check_config(config, workdir)
    saved = checkpointing.saved_epochs(workdir)
    metrics = read_metrics(workdir)
    if not saved or saved[-1] < config.num_epochs or len(metrics) < config.num_epochs:
        return None
    _say(f"{os.path.abspath(workdir)} has finished its {config.num_epochs} epochs: "
         f"{summary(metrics[:config.num_epochs])}; nothing to do (a larger "
         "--config.num_epochs goes on)")
    return metrics[config.num_epochs - 1]


class EpochTrainer(Protocol):
    """What :func:`run_epochs` drives (the classification :class:`Trainer` and the
    detection one): a replicated initial state, the steps of an epoch, the learning rate at
    a step, and one epoch of training returning the state and the epoch's train metrics."""

    initial_state: TrainState
    steps_per_epoch: int

    def schedule(self, step: int) -> float: ...

    def train_epoch(self, state: TrainState, epoch: int,
                    progress: tqdm.tqdm) -> tuple[TrainState, dict]: ...


def run_epochs(config, workdir: str, dataset_info, trainer: EpochTrainer, evaluate_epoch,
               deadline: float | None = None) -> dict:
    """The epoch loop of every trainer: save the config and dataset info, resume from the
    latest checkpoint, and per epoch train, evaluate, write a line of ``metrics.jsonl`` and
    a checkpoint. ``evaluate_epoch(state, epoch)`` returns the epoch's test metrics (may be
    empty). Returns the last epoch's metrics."""
    os.makedirs(workdir, exist_ok=True)
    # Nothing in the workdir changes before its checkpoint is restored: a damaged one stops
    # the run with the config and files as they were.
    checkpointing.check_config(config, workdir)
    manager = checkpointing.make_manager(workdir, config.max_checkpoints_to_keep)
    try:
        state, start_epoch = checkpointing.restore_latest(manager, trainer.initial_state)
    except checkpointing.CheckpointError:
        manager.close()
        raise
    checkpointing.check_or_save_config(config, workdir)
    checkpointing.save_dataset_info(dataset_info, workdir)
    writer = MetricsWriter(workdir, start_epoch)
    steps_per_epoch = trainer.steps_per_epoch
    progress = tqdm.tqdm(total=config.num_epochs * steps_per_epoch,
                         initial=start_epoch * steps_per_epoch, unit="step",
                         disable=jax.process_index() != 0, dynamic_ncols=True)
    if start_epoch:
        progress.write(f"resumed from epoch {start_epoch} of {config.num_epochs} in {workdir}")
    metrics = {}
    previous_stats = jax.device_get(state.batch_stats)
    try:
        for epoch in range(start_epoch, config.num_epochs):
            start = time.perf_counter()
            state, train_metrics = trainer.train_epoch(state, epoch, progress)
            seconds = time.perf_counter() - start
            current_stats = jax.device_get(state.batch_stats)
            metrics = {
                "epoch": epoch + 1, "step": (epoch + 1) * steps_per_epoch, **train_metrics,
                **evaluate_epoch(state, epoch),
                "learning_rate": float(trainer.schedule((epoch + 1) * steps_per_epoch - 1)),
                "images_per_second": steps_per_epoch * config.batch_size / seconds,
                "epoch_seconds": seconds,
                **bn_drift(previous_stats, current_stats),
            }
            previous_stats = current_stats
            writer.write(metrics)
            checkpointing.save(manager, epoch + 1, state)
            progress.write(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                       for k, v in metrics.items()}))
            if deadline is not None and time.time() > deadline and epoch + 1 < config.num_epochs:
                progress.write(f"deadline reached: stopped after epoch {epoch + 1}; the same "
                               "command resumes here")
                break
    finally:
        progress.close()
        manager.wait_until_finished()
        manager.close()
        writer.close()
        _end_of_run(workdir)
    return metrics


def _end_of_run(workdir: str) -> None:
    """The run's curves as ``curves.png`` and a summary line saying where things are."""
    metrics = read_metrics(workdir)
    if jax.process_index() != 0 or not metrics:
        return
    save_figure(plot_curves(metrics), workdir, "curves")
    _say(f"{summary(metrics)}. In {os.path.abspath(workdir)}: checkpoints/ (one per epoch), "
         "metrics.jsonl, curves.png, tensorboard/ (`tensorboard --logdir` it, "
         "pip install -e '.[tensorboard]')")
