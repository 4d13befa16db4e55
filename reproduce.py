"""Reproduce the paper's ResNet-20 CIFAR-10 experiments at a budget.

    python reproduce.py --budget cpu --data-dir ~/awn-data/cifar10 --runs-dir ~/awn-runs

trains the four runs (CNN, ANN, ANN-WS, ANN-AWN; resumed when interrupted, skipped when
finished), then evaluates them and writes the report (see ``awn_jax.reproduce``).
"""

import dataclasses

from absl import app, flags, logging

from awn_jax import cli, reproduce

_BUDGET = flags.DEFINE_enum("budget", "cpu", list(reproduce.BUDGETS), "Budget of the campaign.")
_EPOCHS = flags.DEFINE_integer("epochs", None, "Epochs of every run (default: the budget's).")
_RUNS_DIR = flags.DEFINE_string("runs_dir", "~/awn-runs", "Where the campaign's runs go.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", "", "CIFAR-10 image folder (<dir>/{train,test}/<class>/*.jpg); empty: TFDS.")
_STAGES = flags.DEFINE_list("stages", ["train"], "Stages to run, in order: train.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    budget = reproduce.BUDGETS[_BUDGET.value]
    if _EPOCHS.value is not None:
        budget = dataclasses.replace(budget, epochs=_EPOCHS.value)
    if "train" in _STAGES.value:
        reproduce.train_runs(budget, _RUNS_DIR.value, _DATA_DIR.value)


if __name__ == "__main__":
    cli.run(main)
