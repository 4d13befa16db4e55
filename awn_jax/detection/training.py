"""``train_and_evaluate(config, workdir)`` for detection configs (``task = "detection"``).

The classification trainer's machinery, reused: the ``data`` device mesh (the global batch
sharded, parameters replicated, steps traced under ``jax.set_mesh`` so the adder kernels
run per batch shard), its train state, SGD chain and learning-rate schedule, Orbax
checkpoints with the config check, ``metrics.jsonl`` + TensorBoard, progress and the same
stops on bad input and non-finite losses. What differs: the loss is Faster R-CNN's,
sampling keys come from ``(seed, step)`` so a resumed run draws what the uninterrupted
one did, the warmup is counted in iterations, and the evaluation is VOC mAP (every
``eval_every_epochs`` and after the last epoch; the per-class table goes to
``detection_eval.md``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from flax import nnx
from jax.sharding import Mesh

from awn_jax import data as classification_data
from awn_jax.detection import data, evaluation
from awn_jax.detection.detector import build_detector
from awn_jax.distributed import make_mesh
from awn_jax.errors import UserError
from awn_jax.model import split_model, with_bn_mode
from awn_jax.nn.batchnorm import check_bn_modes
from awn_jax.training import checkpointing, optimizer
from awn_jax.training.config_checks import check_config
from awn_jax.training.data_parallel import DataParallel, run_epoch_steps
from awn_jax.training.loop import run_epochs
from awn_jax.training.state import TrainState, create_train_state

LOSS_NAMES = ("rpn_objectness", "rpn_box", "roi_classification", "roi_box")


def optimizer_config(config, steps_per_epoch: int):
    """The keys ``training.optimizer`` reads, the warmup converted from iterations to epochs."""
    keys = ("learning_rate", "lr_schedule", "num_epochs", "momentum", "nesterov",
            "weight_decay", "awn_lr_multiplier")
    if config.warmup_steps < 0:
        raise UserError(f"warmup_steps must be >= 0, got {config.warmup_steps}")
    return ml_collections.ConfigDict(
        {**{k: config[k] for k in keys}, "warmup_epochs": config.warmup_steps / steps_per_epoch})


def load_backbone(workdir: str, config):
    """The ResNet of a classification run's latest checkpoint, to start the backbone from.

    Read without its dataset: the saved config and dataset info suffice to rebuild the
    model and restore the checkpoint.
    """
    saved = ml_collections.ConfigDict(checkpointing.load_config_dict(workdir))
    for key in ("model", "layer_type"):
        if saved[key] != config[key]:
            raise UserError(f"backbone_workdir {workdir} trained {key}={saved[key]!r}, but "
                            f"this detector has {key}={config[key]!r}")
    info_fields = checkpointing.load_dataset_info(workdir)
    if info_fields is None:
        raise checkpointing.CheckpointError(f"{workdir} holds no dataset_info.json")
    info = classification_data.DatasetInfo(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in info_fields.items()})
    graphdef, _, template = create_train_state(saved, info, steps_per_epoch=1)
    manager = checkpointing.make_manager(workdir)
    try:
        state, epoch = checkpointing.restore_latest(manager, template)
    finally:
        manager.close()
    if epoch == 0:
        raise checkpointing.CheckpointError(f"backbone_workdir {workdir} holds no checkpoint")
    return nnx.merge(graphdef, state.params, state.batch_stats)


def create_detection_state(config, info, steps_per_epoch: int):
    """Fresh detector (backbone from ``config.backbone_workdir`` if set), optimizer and
    state: ``(graphdef, tx, state)``."""
    resnet = load_backbone(config.backbone_workdir, config) if config.backbone_workdir else None
    graphdef, params, batch_stats = split_model(build_detector(config, info, resnet))
    tx = optimizer.make_optimizer(optimizer_config(config, steps_per_epoch), steps_per_epoch)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                       opt_state=tx.init(params))
    return graphdef, tx, state


def train_step(graphdef, tx, seed: int, state: TrainState, batch):
    """One SGD step on a global batch (BatchNorm in ``train`` mode)."""
    key = jax.random.fold_in(jax.random.key(seed), state.step)

    def loss_fn(params, batch_stats):
        model = nnx.merge(graphdef, params, batch_stats, copy=True)
        total, parts = model.losses(batch, key)
        return total, (parts, nnx.state(model, nnx.BatchStat))

    (loss, (parts, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state)
    return new_state, {"loss": loss, **parts}


def detect_step(graphdef, params, batch_stats, batch):
    model = nnx.merge(graphdef, params, batch_stats)
    return model.detect(batch["image"], batch["image_hw"])


class DetectionTrainer:
    """The compiled steps and shardings of one detection run (a ``loop.EpochTrainer``)."""

    def __init__(self, config, dataset, mesh: Mesh):
        self.config, self.dataset = config, dataset
        self.parallel = DataParallel(mesh, batch_size=config.batch_size,
                                     eval_batch_size=config.eval_batch_size)
        if config.eval_every_epochs < 0:
            raise UserError(f"eval_every_epochs must be >= 0, got {config.eval_every_epochs}")
        check_bn_modes([config.eval_bn_mode])
        self.steps_per_epoch = dataset.steps_per_epoch(config.batch_size)
        self.graphdef, tx, state = create_detection_state(config, dataset.info,
                                                          self.steps_per_epoch)
        self.initial_state = jax.device_put(state, self.parallel.replicated)
        self.schedule = optimizer.learning_rate_schedule(
            optimizer_config(config, self.steps_per_epoch), self.steps_per_epoch)
        eval_graphdef = with_bn_mode(self.graphdef, state.params, state.batch_stats,
                                     config.eval_bn_mode)
        self.train_step = self.parallel.jit_train_step(
            functools.partial(train_step, self.graphdef, tx, config.seed))
        replicated, sharded = self.parallel.replicated, self.parallel.sharded
        self.detect_step = self.parallel.jit(functools.partial(detect_step, eval_graphdef),
                                             (replicated, replicated, sharded), replicated)

    def train_epoch(self, state, epoch: int, progress: tqdm.tqdm):
        """One epoch; returns the state and the epoch's mean of each loss."""
        state, metrics = run_epoch_steps(self.train_step, state, self.dataset, self.parallel,
                                         epoch=epoch, config=self.config, progress=progress)
        return state, {f"train_{k}": float(np.mean([float(m[k]) for m in metrics]))
                       for k in ("loss",) + LOSS_NAMES}

    def evaluate(self, state) -> dict:
        """VOC AP of the detector (BatchNorm in ``eval_bn_mode``) on the test split."""
        return evaluation.evaluate(
            lambda batch: self.detect_step(state.params, state.batch_stats, batch),
            self.dataset, self.config.eval_batch_size, metric=self.config.ap_metric,
            num_examples=self.config.num_test_examples, to_device=self.parallel.global_batch)


def _due_for_evaluation(config, epoch: int) -> bool:
    last = epoch + 1 == config.num_epochs
    every = config.eval_every_epochs
    return last or (every > 0 and (epoch + 1) % every == 0)


def train_and_evaluate(config, workdir: str, deadline: float | None = None) -> dict:
    """Train the detection ``config`` into ``workdir`` (resuming from its latest
    checkpoint); returns the last epoch's metrics. ``deadline``: as for classification."""
    check_config(config, skip=("dataset",))  # the detection datasets: data.get_dataset
    dataset = data.get_dataset(config)
    trainer = DetectionTrainer(config, dataset, make_mesh(config.num_devices))

    def evaluate_epoch(state, epoch):
        if not _due_for_evaluation(config, epoch):
            return {}
        result = trainer.evaluate(state)
        evaluation.write_report(result, workdir, epoch + 1)
        return {"test_map": result["map"]}

    return run_epochs(config, workdir, dataset.info, trainer, evaluate_epoch, deadline)


def is_detection_workdir(workdir: str) -> bool:
    return checkpointing.load_config_dict(workdir).get("task") == "detection"


def evaluate_workdir(workdir: str, *, epoch: int | None = None, data_dir: str | None = None,
                     num_examples: int | None = None, metric: str | None = None,
                     output_dir: str | None = None) -> dict:
    """VOC mAP of a detection run's checkpoint (the latest by default) on its test split;
    writes ``detection_eval.{json,md}`` into ``output_dir`` (default: the workdir)."""
    config = ml_collections.ConfigDict(checkpointing.load_config_dict(workdir))
    if config.get("task") != "detection":
        raise checkpointing.CheckpointError(f"{workdir} is not a detection run (its config has no "
                         "task = 'detection')")
    config.backbone_workdir = ""  # the checkpoint holds the trained backbone
    if data_dir:
        config.data_dir = data_dir
    if num_examples is not None:
        config.num_test_examples = num_examples
    if metric:
        config.ap_metric = metric
    dataset = data.get_dataset(config)
    trainer = DetectionTrainer(config, dataset, make_mesh(config.num_devices))
    state, epoch = checkpointing.restore_epoch(workdir, epoch, trainer.initial_state)
    result = trainer.evaluate(state)
    result["table"] = evaluation.write_report(result, output_dir or workdir, epoch)
    return dict(result, workdir=workdir, layer_type=config.layer_type, epoch=epoch)
