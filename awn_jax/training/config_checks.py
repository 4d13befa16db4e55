"""The values of a training config checked before anything is read or written.

``check_config(config)`` checks every key of ``configs/default.py`` that the config has:
each number's type and range, each boolean, each named choice against the names the code
that reads it accepts. All problems are reported in one ``UserError`` line, so
``--config.batch_size=-3`` stops before a workdir exists instead of training with negative
step counts. Keys of other configs (detection's own) are left to the code that reads them;
checks that need more than one value or the data and devices (a warmup that leaves no
decay, a batch larger than the dataset or not split over the devices) stay where those are
known, and run before the workdir is created too.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterable

from awn_jax import data, model
from awn_jax.errors import UserError
from awn_jax.nn import ARCHITECTURES, HEADS, LAYER_TYPES, SHORTCUTS
from awn_jax.nn.batchnorm import EVAL_BN_MODES
from awn_jax.training.optimizer import LR_SCHEDULES


@dataclasses.dataclass(frozen=True)
class Number:
    """An int (``integer``) or a finite real in ``[minimum, below)``; ``positive`` excludes 0."""

    integer: bool
    minimum: float | None = None
    positive: bool = False
    below: float | None = None

    def accepts(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return False
        if (self.integer and not isinstance(value, numbers.Integral)) or not math.isfinite(value):
            return False
        if (self.positive and value <= 0) or (self.minimum is not None and value < self.minimum):
            return False
        return self.below is None or value < self.below

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        bounds = []
        if self.positive:
            bounds.append("> 0")
        elif self.minimum is not None:
            bounds.append(f">= {self.minimum:g}")
        if self.below is not None:
            bounds.append(f"< {self.below:g}")
        return " ".join([kind, " and ".join(bounds)]).strip()


INTEGER_AT_LEAST_0 = Number(integer=True, minimum=0)
INTEGER_AT_LEAST_1 = Number(integer=True, minimum=1)
POSITIVE = Number(integer=False, positive=True)
AT_LEAST_0 = Number(integer=False, minimum=0)

# Every numeric key of configs/default.py and its range.
NUMBERS = {
    "seed": INTEGER_AT_LEAST_0,                  # numpy's generators take no negative seed
    "image_size": INTEGER_AT_LEAST_1,
    "crop_padding": INTEGER_AT_LEAST_0,
    "num_train_examples": INTEGER_AT_LEAST_0,    # 0: all
    "num_test_examples": INTEGER_AT_LEAST_0,     # 0: all
    "synthetic_num_train": INTEGER_AT_LEAST_1,
    "synthetic_num_test": INTEGER_AT_LEAST_1,
    "synthetic_num_classes": INTEGER_AT_LEAST_1,
    "eta": Number(integer=False),                # <= 0 turns the scaling off
    "weight_norm_eps": POSITIVE,
    "batch_size": INTEGER_AT_LEAST_1,
    "num_devices": INTEGER_AT_LEAST_0,           # 0: all
    "num_epochs": INTEGER_AT_LEAST_1,
    "learning_rate": POSITIVE,
    "warmup_epochs": AT_LEAST_0,
    "momentum": Number(integer=False, minimum=0, below=1),
    "weight_decay": AT_LEAST_0,
    "awn_lr_multiplier": AT_LEAST_0,
    "eval_batch_size": INTEGER_AT_LEAST_1,
    "max_checkpoints_to_keep": INTEGER_AT_LEAST_0,  # 0: keep all
    "log_every_steps": INTEGER_AT_LEAST_1,
}
BOOLEANS = ("random_flip", "nesterov")
# Every string key with a fixed set of values, and those values.
CHOICES = {
    "dataset": data.DATASET_NAMES,
    "normalization": data.NORMALIZATIONS,
    "model": tuple(ARCHITECTURES),
    "layer_type": LAYER_TYPES,
    "shortcut": SHORTCUTS,
    "head": HEADS,
    "compute_dtype": tuple(model.COMPUTE_DTYPES),
    "lr_schedule": LR_SCHEDULES,
    "eval_bn_mode": EVAL_BN_MODES,
}
PATHS = ("workdir", "data_dir")  # free strings


def config_problems(config, *, skip: Iterable[str] = ()) -> list[str]:
    """One message per invalid value among the keys above that ``config`` has, less
    ``skip`` (keys whose values the caller's own code checks)."""
    skip = set(skip)

    def present(key):
        return key in config and key not in skip

    problems = []
    for key, number in NUMBERS.items():
        if present(key) and not number.accepts(config[key]):
            problems.append(f"{key} must be {number.describe()}, got {config[key]!r}")
    for key in BOOLEANS:
        if present(key) and not isinstance(config[key], bool):
            problems.append(f"{key} must be True or False, got {config[key]!r}")
    for key, choices in CHOICES.items():
        if present(key) and config[key] not in choices:
            problems.append(f"unknown {key} {config[key]!r} (expected one of "
                            f"{', '.join(choices)})")
    for key in PATHS:
        if present(key) and not isinstance(config[key], str):
            problems.append(f"{key} must be a string, got {config[key]!r}")
    return problems


def check_config(config, *, skip: Iterable[str] = ()) -> None:
    """Raise one ``UserError`` line naming every invalid value (see :func:`config_problems`)."""
    problems = config_problems(config, skip=skip)
    if problems:
        label = "invalid config value" if len(problems) == 1 else "invalid config values"
        raise UserError(f"{label}: " + "; ".join(problems))
