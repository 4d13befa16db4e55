"""A finished (or running) training run, loaded back from its workdir for evaluation and
analysis: its config, dataset, and the model of any saved epoch."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from awn_jax import bn_statistics, data, names
from awn_jax.errors import UserError
from awn_jax.evaluation import Evaluator
from awn_jax.model import apply_model, named_leaves, with_bn_mode
from awn_jax.training import checkpointing
from awn_jax.training.state import create_train_state


@dataclasses.dataclass
class Run:
    workdir: str
    config: ml_collections.ConfigDict
    dataset: Any
    epoch: int
    graphdef: Any
    params: Any
    batch_stats: Any
    eval_chunk_size: int = 512  # examples per evaluation call (see ``Evaluator``)
    bn_stats: bn_statistics.BNStats = bn_statistics.BNStats()  # what batch_stats holds

    @property
    def label(self) -> str:
        """The run's one name in reports, progress bars and cache files: the workdir's last
        component (two runs of one architecture differ in it), with the BN statistics when
        they are not the trained ones (``cifar10_r20_awn+reestimate-10000``)."""
        label = os.path.basename(os.path.normpath(self.workdir))
        return f"{label}+{self.bn_stats.label()}" if self.bn_stats.reestimated else label

    @property
    def paper_name(self) -> str:
        """The paper's name of the model: CNN, ANN, ANN-WS, ANN-AWN."""
        return names.paper_name(self.config.layer_type)

    @property
    def architecture(self) -> str:
        return f"{self.config.model}-{self.config.layer_type}"

    def with_bn_stats(self, settings: bn_statistics.BNStats) -> Run:
        """The same model with the BN statistics ``settings`` asks for (re-estimated ones are
        computed once and kept beside the trained ones, which this run keeps)."""
        if settings == self.bn_stats or not (settings.reestimated or self.bn_stats.reestimated):
            return self
        if self.bn_stats.reestimated:
            raise UserError("re-estimate from the trained statistics: load the run again")
        return dataclasses.replace(
            self, batch_stats=bn_statistics.statistics_for_run(self, settings),
            bn_stats=settings)

    @functools.cached_property
    def weights_sha256(self) -> str:
        """sha256 of the parameters and BN statistics (names, dtypes, shapes, bytes): what
        a cached result of this run is keyed by, since a workdir's or shipped model's name
        and epoch can be reused by different weights (a rerun, a re-export)."""
        digest = hashlib.sha256()
        for prefix, tree in (("params/", self.params), ("batch_stats/", self.batch_stats)):
            for name, leaf in sorted(named_leaves(jax.device_get(tree)).items()):
                value = np.ascontiguousarray(leaf)
                digest.update(f"{prefix}{name}:{value.dtype}:{value.shape};".encode())
                digest.update(value.tobytes())
        return digest.hexdigest()

    @functools.cached_property
    def evaluator(self) -> Evaluator:
        """The run's evaluator over all local devices; kept, so its compiled programs
        serve every later evaluation of the run."""
        return Evaluator(self.graphdef, self.params, self.batch_stats,
                         chunk_size=self.eval_chunk_size)

    def test_set(self, num_examples: int | None = None, multiple_of: int = 1):
        """``(images, labels)``: the first ``num_examples`` (all when None) of the fixed test
        order as numpy arrays, cut to a multiple of ``multiple_of``."""
        if self.dataset is None:
            raise UserError(f"{self.workdir} has no test data: pass its data directory "
                            "(--data_dir to evaluate.py and analyze.py, --data_dir to "
                            "reproduce.py, data_dir= in Python)")
        total = min(num_examples or self.dataset.info.num_test, self.dataset.info.num_test)
        total -= total % multiple_of
        if total == 0:
            raise UserError(f"need at least {multiple_of} test examples for batches of "
                            f"{multiple_of}")
        batches = list(self.dataset.test_batches(min(total, 1000), num_examples=total))
        return (np.concatenate([b["image"] for b in batches]),
                np.concatenate([b["label"] for b in batches]))

    def logits_fn(self, bn_mode: str):
        """``images -> logits`` with every BatchNorm in ``bn_mode`` (a pure function of the
        images; under ``running-mean``/``running`` it depends on the whole batch)."""
        graphdef = with_bn_mode(self.graphdef, self.params, self.batch_stats, bn_mode)
        return lambda images: apply_model(graphdef, self.params, self.batch_stats, images)[0]


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
    state, epoch = checkpointing.restore_epoch(workdir, epoch, template)
    state = jax.device_get(state)
    return Run(workdir, config, dataset, epoch, graphdef, state.params, state.batch_stats)
