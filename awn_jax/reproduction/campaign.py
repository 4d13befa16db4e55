"""The reproduction campaign of Tables 1 and 3 and Figs. 2-3: four ResNet-20s on CIFAR-10
at one budget, trained, evaluated and reported.

A budget fixes what every run shares (epochs, data, seed) and how much of each study is
evaluated; the four runs (CNN, ANN, ANN-WS, ANN-AWN) differ only in ``layer_type``. Runs
train into ``<runs_dir>/<budget>-<epochs>ep/<layer_type>``, resume from their latest
checkpoint and are skipped once finished. Each evaluation stage of each finished run
writes its results to ``report/stages/<stage>-<layer_type>.json`` with the run's epochs,
and is skipped when that file matches; so a killed campaign restarted with the same
command loses at most the epoch or the stage in progress, and a run can be evaluated
while the others still train. The report covers all four, partial while some still train.
The export writes each finished run's weights as a shipped model (``awn_jax.pretrained``)
with its Table 1 clean accuracies: it needs the table stage only.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os
import tarfile
import time

import ml_collections
from absl import logging

from awn_jax import names, reports
from awn_jax.bn_statistics import BNStats
from awn_jax.config import PAPER_RUNS, paper_config
from awn_jax.errors import UserError
from awn_jax.robustness.studies import SWEEP_EPS, SWEEP_STEPS
from awn_jax.training.loop import train_and_evaluate
from awn_jax.training.metrics import read_metrics

# The four runs of the campaign are config.PAPER_RUNS, trained in its order: the CNN first,
# because a CNN short of the accuracy expected at the budget means a problem to find before
# the others run.
STAGES = ("train", "table", "sweeps", "interpolation", "distributions", "report", "export")


@dataclasses.dataclass(frozen=True)
class Budget:
    """What one campaign costs and how much of each study it evaluates.

    Attributes:
      name: ``cpu``, ``gpu``, or a name of one's own (tests, the notebook's small mode).
      epochs: training epochs of every run (the cosine schedule spans exactly these).
      test_examples: the fixed test subset of Table 1/3 (0: all 10,000).
      attacks: Table 1's attacks; ``attack_steps`` overrides their steps (None: paper's).
      sweep_examples, eps_values, steps_values: the PGD sweeps of Fig. 2a/2b.
      interpolation_points, interpolation_bn_stats: Fig. 2c between epochs 1-2 and the
        last two (``interpolate``: BN statistics interpolated; ``reestimate``: recomputed
        on training batches).
      feature_images: test images of the Fig. 3 feature distributions.
      eval_batch_size: evaluation batch (the batch the "-R"/"-r" statistics come from).
      bn_stats: the BN statistics of the table and the sweeps (the trained running
        averages, or re-estimated ones: :mod:`awn_jax.bn_statistics`); a campaign with
        re-estimated statistics writes its report to ``report+<label>/``.
    """

    name: str
    epochs: int
    test_examples: int = 0
    attacks: tuple[str, ...] = names.PAPER_ATTACKS
    attack_steps: int | None = None
    sweep_examples: int = 0
    eps_values: tuple[float, ...] = SWEEP_EPS
    steps_values: tuple[int, ...] = SWEEP_STEPS
    interpolation_points: int = 9
    interpolation_bn_stats: tuple[str, ...] = ("interpolate", "reestimate")
    feature_images: int = 256
    eval_batch_size: int = 500
    bn_stats: BNStats = BNStats()

    def describe(self) -> str:
        """One line for every table: what the numbers were obtained at."""
        tests = self.test_examples or "all"
        return (f"budget `{self.name}`: {self.epochs} epochs per run; Table 1/3 on {tests} "
                f"test images, evaluation batches of {self.eval_batch_size}; "
                f"{self.bn_stats.describe()}")


BUDGETS = {
    # 2 CPU cores: ~5 hours for 10 epochs of the four runs, ~3 hours of evaluation.
    "cpu": Budget("cpu", epochs=10, test_examples=2000, sweep_examples=500,
                  eps_values=(0.01, 0.03, 0.06, 0.1), steps_values=(1, 7, 20, 50)),
    # One H200: the paper's 400 epochs when they fit, else at least 100.
    "gpu": Budget("gpu", epochs=100, test_examples=0, sweep_examples=2000),
    # The GPU path checked on a CPU in minutes (--set num_train_examples=512): no results.
    "dry": Budget("dry", epochs=2, test_examples=100, attacks=("fgsm", "pgd"),
                  attack_steps=1, sweep_examples=100,
                  eps_values=(0.03,), steps_values=(1,), interpolation_points=1,
                  interpolation_bn_stats=("interpolate",), feature_images=16,
                  eval_batch_size=100),
}


def run_config(layer_type: str, budget: Budget, data_dir: str = "") -> ml_collections.ConfigDict:
    """The official recipe of ``layer_type``'s config file, at ``budget``'s epochs.

    ``data_dir``: a CIFAR-10 image folder (``<dir>/{train,test}/<class>/*.jpg``); empty
    reads TFDS ``cifar10``. Either way the images are normalized with the official
    CIFAR-10 constants (``normalization = "cifar10"``).
    """
    config = paper_config(layer_type)
    config.num_epochs = budget.epochs
    config.normalization = "cifar10"
    if data_dir:
        config.dataset = "image_folder"
        config.data_dir = os.path.abspath(os.path.expanduser(data_dir))
    return config


def campaign_dir(runs_dir: str, budget: Budget) -> str:
    return os.path.join(os.path.expanduser(runs_dir), f"{budget.name}-{budget.epochs}ep")


def workdirs(runs_dir: str, budget: Budget, layer_types=tuple(PAPER_RUNS)) -> dict[str, str]:
    return {t: os.path.join(campaign_dir(runs_dir, budget), t) for t in layer_types}


def _train_one(layer_type, budget, workdir, data_dir, overrides, deadline):
    config = run_config(layer_type, budget, data_dir)
    unknown = sorted(set(overrides or {}) - set(config))
    if unknown:
        raise UserError(f"unknown config keys {unknown}; the keys are those of "
                        "configs/default.py")
    config.update(overrides or {})
    config.workdir = workdir
    train_and_evaluate(config, workdir, deadline=deadline)
    return layer_type


def train_runs(budget: Budget, runs_dir: str, data_dir: str = "",
               layer_types=tuple(PAPER_RUNS), overrides: dict | None = None,
               parallel: bool = False, deadline: float | None = None) -> dict[str, str]:
    """Train (or resume, or skip when finished) each run; returns layer_type -> workdir.

    ``overrides``: config keys changed in every run (tests shrink the data with them).
    ``parallel``: one process per run, all at once (on a GPU each takes a share of its
    memory: ``XLA_PYTHON_CLIENT_MEM_FRACTION`` is set for the children). ``deadline``:
    a ``time.time()`` after which every run stops at its next epoch end.
    """
    dirs = workdirs(runs_dir, budget, layer_types)
    if not parallel:
        for layer_type, workdir in dirs.items():
            _train_one(layer_type, budget, workdir, data_dir, overrides, deadline)
        return dirs
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / len(dirs):.2f}")
    context = multiprocessing.get_context("spawn")  # fresh JAX in every child
    with concurrent.futures.ProcessPoolExecutor(len(dirs), mp_context=context) as pool:
        futures = [pool.submit(_train_one, t, budget, w, data_dir, overrides, deadline)
                   for t, w in dirs.items()]
        for future in concurrent.futures.as_completed(futures):
            logging.warning("finished training %s", future.result())
    return dirs


# The stages whose results depend on the BN statistics evaluated with (Budget.bn_stats).
STATISTICS_STAGES = ("table", "sweeps")


def stage_name(stage: str, layer_type: str, bn_stats: BNStats = BNStats()) -> str:
    """The name one run's cached stage result has under ``report/stages``."""
    if stage in STATISTICS_STAGES and bn_stats.reestimated:
        return f"{stage}+{bn_stats.label()}-{layer_type}"
    return f"{stage}-{layer_type}"


def report_dir(runs_dir: str, budget: Budget) -> str:
    """``report/``, or ``report+<label>/`` for re-estimated BN statistics."""
    name = "report" + (f"+{budget.bn_stats.label()}" if budget.bn_stats.reestimated else "")
    return os.path.join(campaign_dir(runs_dir, budget), name)


def cached_stage(stages_dir: str, stage: str, epochs: dict, compute):
    """``compute()``'s result, or the one saved for the same runs by an earlier call."""
    return reports.cached(stages_dir, stage, {"epochs": epochs}, compute)


def run_campaign(budget: Budget, runs_dir: str, data_dir: str = "", stages=STAGES,
                 overrides: dict | None = None, parallel: bool = False,
                 train_seconds: float | None = None, command: str = "",
                 runs=tuple(PAPER_RUNS)) -> dict:
    """The whole campaign, or the ``stages`` of it asked for; returns what it computed
    (``workdirs``, and per stage its results; ``report`` is the Markdown).
    ``train_seconds``: training stops at the first epoch end past this many seconds, and
    the evaluation stages wait for a later call. ``runs``: the runs trained and evaluated
    (in this order), of ``PAPER_RUNS``; the report covers all four, partial while some train."""
    # The stage functions (module ``stages``, not the parameter) need matplotlib.
    from awn_jax.reproduction import report, stages as stage_functions

    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise UserError(f"unknown stages {unknown}; expected some of {STAGES}")
    unknown = sorted(set(runs) - set(PAPER_RUNS))
    if unknown or not runs:
        raise UserError(f"unknown runs {unknown or list(runs)}; expected some of "
                        f"{list(PAPER_RUNS)}")
    dirs = workdirs(runs_dir, budget, tuple(runs))
    out = {"workdirs": dirs}
    if "train" in stages:
        deadline = None if train_seconds is None else time.time() + train_seconds
        train_runs(budget, runs_dir, data_dir, layer_types=tuple(runs), overrides=overrides,
                   parallel=parallel, deadline=deadline)
        if any(len(read_metrics(w)) < budget.epochs for w in dirs.values()):
            logging.warning("training time is up; run the same command again to go on")
            return out
    evaluations = {"table": stage_functions.table, "sweeps": stage_functions.sweeps,
                   "interpolation": stage_functions.interpolation_study,
                   "distributions": stage_functions.distributions_study}
    needed = {"report": set(evaluations), "export": {"table"}}  # what they are written from
    wanted = [s for s in evaluations
              if s in stages or any(s in needed[k] for k in needed if k in stages)]
    if not wanted:
        return out
    if "report" in stages:
        dirs = workdirs(runs_dir, budget)  # the report covers all four, finished or not
    epochs = {t: len(read_metrics(w)) for t, w in dirs.items()}
    done = {t for t, e in epochs.items() if e >= budget.epochs}
    if not done and ("report" in stages or "export" in stages):
        raise UserError(f"no run has finished its {budget.epochs} epochs yet ({epochs}); "
                        "run the train stage first")
    # Every stage's results are kept in report/stages, whatever the report they go into.
    stages_dir = os.path.join(campaign_dir(runs_dir, budget), "report", "stages")
    for stage in wanted:
        out[stage] = {}
        for layer_type, workdir in dirs.items():
            if layer_type not in done:  # evaluated once it has finished training
                logging.warning("campaign %s: %s of %s waits for its training (%d of %d "
                                "epochs)", budget.name, stage, layer_type, epochs[layer_type],
                                budget.epochs)
                continue
            logging.warning("campaign %s: %s of %s", budget.name, stage, layer_type)
            out[stage][layer_type] = cached_stage(
                stages_dir, stage_name(stage, layer_type, budget.bn_stats),
                {layer_type: epochs[layer_type]},
                lambda fn=evaluations[stage], w=workdir: fn(w, budget))
    if "report" in stages:  # partial while some runs train: they are named as such
        directory = report_dir(runs_dir, budget)
        out["report"] = report.write(directory, budget, epochs, dirs,
                                     {s: out[s] for s in evaluations}, command)
    if "export" in stages and budget.bn_stats.reestimated:
        logging.warning("campaign %s: no export with re-estimated statistics (shipped "
                        "models keep their trained ones)", budget.name)
    elif "export" in stages:
        out["pretrained"] = export_weights(
            os.path.join(report_dir(runs_dir, budget), "pretrained"), budget,
            {t: dirs[t] for t in dirs if t in done}, out["table"], command)
    return out


# The number of epochs of the models shipped under their config's name (cifar10_r20_awn);
# those of other budgets carry their epochs in the name (cifar10_r20_awn_10ep).
SHIPPED_EPOCHS = 100


def shipped_name(layer_type: str, epochs: int) -> str:
    """The name a run of ``layer_type`` trained for ``epochs`` ships under."""
    name = PAPER_RUNS[layer_type]
    return name if epochs == SHIPPED_EPOCHS else f"{name}_{epochs}ep"


def export_weights(directory: str, budget: Budget, dirs: dict, table: dict,
                   command: str) -> dict:
    """Each run's final weights as a shipped model (``awn_jax.pretrained``) named by
    :func:`shipped_name`, its manifest entry carrying the budget and the clean accuracy per
    BN mode of Table 1."""
    from awn_jax import pretrained
    from awn_jax.training.runs import load_run

    entries = {}
    for layer_type, workdir in dirs.items():
        rows = table[layer_type]
        entries[layer_type] = pretrained.export(
            load_run(workdir), shipped_name(layer_type, budget.epochs), directory,
            budget=budget.describe(), command=command,
            clean_accuracy={row["bn_mode"]: row["clean"] for row in rows},
            test_examples=rows[0]["num_examples"],
            test_images="the first N of the fixed test order (awn_jax.data: seed 2021)")
    return entries


def archive_runs(runs_dir: str, budget: Budget, path: str) -> list[str]:
    """A ``.tar.gz`` of what a fresh machine needs to resume the campaign and run its
    studies: every run's config, dataset info, metrics, per-epoch records
    (``analyze.py --study epoch-records``) and the kept parts of the evaluation stages
    (a stage cut short resumes), the checkpoint of its latest
    epoch and, until the studies that read them are done (cached in the report), those of
    the epochs they read, and once a run's per-epoch records have begun (its ``records/``
    exists), every checkpoint not yet recorded (a fresh machine computes those records
    instead of losing them); and the report so far. Returns the members."""
    from awn_jax.reproduction import stages
    from awn_jax.stability import epoch_records
    from awn_jax.training.checkpointing import saved_epochs

    root = campaign_dir(runs_dir, budget)
    wanted = {e for pair in stages.epoch_pairs(budget.epochs) for e in pair}
    wanted |= set(stages.feature_epochs(budget.epochs))
    members = []
    for layer_type, workdir in workdirs(runs_dir, budget).items():
        if not os.path.isdir(workdir):
            continue
        epochs = saved_epochs(workdir)
        studied = all(os.path.exists(os.path.join(root, "report", "stages",
                                                  stage_name(stage, layer_type) + ".json"))
                      for stage in ("interpolation", "distributions"))
        keep = (set() if studied else wanted & set(epochs)) | set(epochs[-1:])
        if os.path.isdir(epoch_records.records_dir(workdir)):
            keep |= {e for e in epochs if not epoch_records.is_recorded(workdir, e)}
        members += [os.path.join(workdir, name) for name in
                    ("config.json", "dataset_info.json", "metrics.jsonl", "records",
                     stages.TABLE_PARTS, stages.SWEEP_PARTS, stages.PATH_PARTS)
                    if os.path.exists(os.path.join(workdir, name))]
        members += [os.path.join(workdir, "checkpoints", str(e)) for e in sorted(keep)]
    members += sorted(os.path.join(root, name) for name in os.listdir(root)
                      if name.startswith("report") and os.path.isdir(os.path.join(root, name)))
    with tarfile.open(path, "w:gz") as tar:
        for member in members:
            tar.add(member, arcname=os.path.relpath(member, os.path.expanduser(runs_dir)))
    return [os.path.relpath(m, os.path.expanduser(runs_dir)) for m in members]
