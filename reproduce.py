"""Reproduce the paper's ResNet-20 CIFAR-10 experiments at a budget.

    python reproduce.py --budget cpu --data_dir ~/awn-data/cifar10 --runs_dir ~/awn-runs

trains the four runs (CNN, ANN, ANN-WS, ANN-AWN; resumed when interrupted, skipped when
finished), evaluates them (Table 1 and 3, PGD sweeps, interpolation, distributions) and
writes ``<runs_dir>/<budget>-<epochs>ep/report/report.{md,json}`` with its figures, and
the finished runs' weights as shipped models under ``report/pretrained/`` (``--stages
table,export`` ships without the studies). A restarted command skips what is done. See
``awn_jax.reproduction``.
"""

import ast
import dataclasses
import sys

from absl import app, flags, logging

from awn_jax import cli, reproduction
from awn_jax.config import PAPER_RUNS
from awn_jax.errors import UserError
from awn_jax.reproduction import campaign

_BUDGET = flags.DEFINE_enum("budget", "cpu", list(reproduction.BUDGETS),
                            "Budget of the campaign (epochs and evaluation sizes).")
_EPOCHS = flags.DEFINE_integer("epochs", None, "Epochs of every run (default: the budget's).",
                               lower_bound=1)
_RUNS_DIR = flags.DEFINE_string("runs_dir", "~/awn-runs", "Where the campaign's runs go.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", "", "CIFAR-10 image folder (<dir>/{train,test}/<class>/*.jpg); empty: TFDS.")
_STAGES = flags.DEFINE_list("stages", list(reproduction.STAGES),
                            f"Stages to run, of {', '.join(reproduction.STAGES)}.")
_RUNS = flags.DEFINE_list("runs", list(PAPER_RUNS),
                          f"Runs to train and evaluate, in this order, of "
                          f"{', '.join(PAPER_RUNS)} (the report covers all four, "
                          "partial while some train).")
_SET = flags.DEFINE_multi_string(
    "set", [], "KEY=VALUE: a config key of every run changed (e.g. num_train_examples=512 "
    "for a dry run, dataset=synthetic for a test); it changes the runs' configs.")
_TRAIN_SECONDS = flags.DEFINE_float(
    "train_seconds", None, "Stop training at the first epoch end past this many seconds (a "
    "machine lent for a fixed time); a later call goes on.", lower_bound=0)
_ARCHIVE = flags.DEFINE_string(
    "archive", "", "Also write a .tar.gz of what resuming elsewhere needs (configs, metrics, "
    "the latest and the studies' checkpoints, the report).")
_BN_STATS = cli.define_bn_stats_flags()  # of the table and the sweeps
flags.adopt_module_key_flags(cli)  # --help lists the shared flags defined there
_PARALLEL = flags.DEFINE_bool("parallel", False,
                              "Train the four runs at once, one process each (a GPU).")


def _parse_setting(setting: str):
    key, sep, value = setting.partition("=")
    if not sep or not key:
        raise UserError(f"--set takes KEY=VALUE, got {setting!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value  # a string


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    budget = reproduction.BUDGETS[_BUDGET.value]
    if _EPOCHS.value is not None:
        budget = dataclasses.replace(budget, epochs=_EPOCHS.value)
    # Re-estimated statistics get their own report, report+<label>/.
    budget = dataclasses.replace(budget, bn_stats=_BN_STATS(budget.eval_batch_size))
    overrides = dict(_parse_setting(setting) for setting in _SET.value)
    try:
        result = reproduction.run_campaign(
            budget, _RUNS_DIR.value, _DATA_DIR.value, stages=_STAGES.value,
            overrides=overrides, parallel=_PARALLEL.value, train_seconds=_TRAIN_SECONDS.value,
            command=" ".join(["python", *sys.argv]), runs=_RUNS.value)
    finally:
        if _ARCHIVE.value:
            campaign.archive_runs(_RUNS_DIR.value, budget, _ARCHIVE.value)
    if "report" in result:
        print(result["report"])
    for entry in result.get("pretrained", {}).values():
        print(f"exported {entry['file']} (and its manifest entry) to "
              f"{campaign.report_dir(_RUNS_DIR.value, budget)}/pretrained")


if __name__ == "__main__":
    cli.run(main)
