"""The reproduction campaign of Tables 1 and 3: four ResNet-20s on CIFAR-10, one budget.

A budget fixes what every run of the campaign shares (epochs, data, seed); the four runs
(CNN, ANN, ANN-WS, ANN-AWN) differ only in ``layer_type``. Each run trains into
``<runs_dir>/<budget>-<epochs>ep/<layer_type>``, resumes from its latest checkpoint and is
skipped once finished, so a killed campaign restarted with the same command loses at most
the epoch in progress.
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections

from awn_jax.training import train_and_evaluate
from configs import cifar10_r20_ann, cifar10_r20_awn, cifar10_r20_cnn, cifar10_r20_ws

# The four rows of the campaign, in training order; the CNN first, because a CNN short of
# the accuracy expected at the budget means a problem to find before the others run.
CONFIGS = {"conv": cifar10_r20_cnn, "adder": cifar10_r20_ann, "adder-ws": cifar10_r20_ws,
           "adder-awn": cifar10_r20_awn}


@dataclasses.dataclass(frozen=True)
class Budget:
    """What one campaign costs and on what it is evaluated.

    Attributes:
      name: ``cpu`` or ``gpu``.
      epochs: training epochs of every run (the cosine schedule spans exactly these).
      test_examples: size of the fixed test subset of the attack tables (0: all 10,000).
    """

    name: str
    epochs: int
    test_examples: int


BUDGETS = {
    # 2 CPU cores: ~5 hours for 10 epochs of the four runs; tables on 2,000 test images.
    "cpu": Budget("cpu", epochs=10, test_examples=2000),
    # One H200: the paper's 400 epochs when they fit, else at least 100.
    "gpu": Budget("gpu", epochs=100, test_examples=0),
}


def run_config(layer_type: str, budget: Budget, data_dir: str = "") -> ml_collections.ConfigDict:
    """The official recipe of ``layer_type``'s config file, at ``budget``'s epochs.

    ``data_dir``: a CIFAR-10 image folder (``<dir>/{train,test}/<class>/*.jpg``); empty
    reads TFDS ``cifar10``. Either way the images are normalized with the official
    CIFAR-10 constants (``normalization = "cifar10"``).
    """
    config = CONFIGS[layer_type].get_config()
    config.num_epochs = budget.epochs
    config.normalization = "cifar10"
    if data_dir:
        config.dataset = "image_folder"
        config.data_dir = os.path.abspath(os.path.expanduser(data_dir))
    return config


def campaign_dir(runs_dir: str, budget: Budget) -> str:
    return os.path.join(os.path.expanduser(runs_dir), f"{budget.name}-{budget.epochs}ep")


def train_runs(budget: Budget, runs_dir: str, data_dir: str = "",
               layer_types=tuple(CONFIGS), overrides: dict | None = None) -> dict[str, str]:
    """Train (or resume, or skip when finished) each run; returns layer_type -> workdir.

    ``overrides``: config keys changed in every run (tests shrink the data with them).
    """
    workdirs = {}
    for layer_type in layer_types:
        config = run_config(layer_type, budget, data_dir)
        config.update(overrides or {})
        workdirs[layer_type] = os.path.join(campaign_dir(runs_dir, budget), layer_type)
        config.workdir = workdirs[layer_type]
        train_and_evaluate(config, workdirs[layer_type])
    return workdirs
