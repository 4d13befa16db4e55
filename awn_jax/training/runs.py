"""A finished (or running) training run, loaded back from its workdir for evaluation and
analysis: its config, dataset, and the model of any saved epoch."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections

from awn_jax import checkpointing, data
from awn_jax.state import apply_model, with_bn_mode
from awn_jax.train import create_train_state


@dataclasses.dataclass
class Run:
    workdir: str
    config: ml_collections.ConfigDict
    dataset: Any
    epoch: int
    graphdef: Any
    params: Any
    batch_stats: Any

    @property
    def name(self) -> str:
        return f"{self.config.model}-{self.config.layer_type}"

    def logits_fn(self, bn_mode: str):
        """``images -> logits`` with every BatchNorm in ``bn_mode`` (a pure function of the
        images; under ``running-mean``/``running`` it depends on the whole batch)."""
        graphdef = with_bn_mode(self.graphdef, self.params, self.batch_stats, bn_mode)
        return lambda images: apply_model(graphdef, self.params, self.batch_stats, images)[0]


def saved_epochs(workdir: str) -> list[int]:
    manager = checkpointing.make_manager(workdir)
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()


def load_run(workdir: str, epoch: int | None = None, data_dir: str | None = None) -> Run:
    """The model saved after ``epoch`` (the latest when None). ``data_dir`` points to the
    data when it has moved since training."""
    config = ml_collections.ConfigDict(checkpointing.load_config_dict(workdir))
    if data_dir:
        config.data_dir = data_dir
    saved_info = checkpointing.load_dataset_info(workdir)
    if saved_info is None:  # runs from before dataset_info.json: recompute from the data
        dataset = data.get_dataset(config)
    else:
        info = data.DatasetInfo(**{k: tuple(v) if isinstance(v, list) else v
                                   for k, v in saved_info.items()})
        dataset = data.dataset_for_run(config, info)
    graphdef, _, template = create_train_state(config, dataset.info,
                                               dataset.steps_per_epoch(config.batch_size))
    manager = checkpointing.make_manager(workdir)
    try:
        epochs = sorted(manager.all_steps())
        if not epochs:
            raise checkpointing.CheckpointError(f"{workdir} holds no checkpoint yet")
        epoch = epochs[-1] if epoch is None else epoch
        if epoch not in epochs:
            raise checkpointing.CheckpointError(
                f"{workdir} has no checkpoint of epoch {epoch}; saved epochs: {epochs}")
        state = checkpointing.restore(manager, epoch, template)
    finally:
        manager.close()
    state = jax.device_get(state)
    return Run(workdir, config, dataset, epoch, graphdef, state.params, state.batch_stats)
