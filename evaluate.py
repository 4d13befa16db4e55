"""Accuracy of trained runs under white-box attacks and BatchNorm statistics modes.

    python evaluate.py --attack pgd --bn_mode running-mean --workdir workdirs/cifar10_r20_awn
    python evaluate.py --attack all --bn_mode all --workdir A --workdir B --num_examples 1000
    python evaluate.py --study eps-sweep --bn_mode running-mean --workdir A --workdir B
    python evaluate.py --study batch --bn_mode all --workdir A
    python evaluate.py --study strict --bn_mode all --workdir A --num_examples 1000

--study picks what is measured (all of it written into --output_dir, default: the first
workdir); each study is one entry of STUDIES below, with its settings (the flags it reads
besides the common ones; `--study NAME --help` lists them with their defaults), and a flag
of another study is refused rather than ignored:
  table        rows run x BN mode, columns clean and each attack, #Mul, #Add (Table 1),
               then the verdicts on the paper's claims that the rows can judge:
               robustness.json/.md; each finished cell is kept in table-parts/, so the
               same command, restarted after a kill, goes on where it stopped
  eps-sweep    PGD-7 accuracy vs eps, step eps/7 (Fig. 2a): eps_sweep.json/.md/.png
  steps-sweep  PGD accuracy vs steps at eps 8/255, step 2/255 (Fig. 2b): steps_sweep.*
  batch        batch dependence: accuracy vs evaluation batch size, random partitions into
               batches, attackers controlling part of each batch, transfer from tracked:
               batch.json/.md, batch_size.png
  strict       a strict evaluation of the batch modes, per run x BN mode: clean, PGD-7,
               APGD-CE, APGD-DLR, Square, transfer from tracked, EOT over unknown batch
               partners, worst case; harm to clean batch mates against the attacker's
               share of the batch; controls (batch size 1, single-class batches):
               strict.json/.md/.png (docs/ROBUSTNESS.md, "Strict evaluation"); each
               finished part is kept in strict-parts/, so the same command, restarted
               after a kill, goes on where it stopped
--bn_stats reestimate (or reestimate-running-mean) evaluates every run with BatchNorm
statistics re-estimated on --bn_stats_images training images instead of the running averages
of training (awn_jax.bn_statistics; computed once, kept in <workdir>/bn_stats/); the reports
name the statistics used.
A detection workdir (trained from a configs/voc_frcnn_* config) gets its VOC mAP and
per-class AP table instead (detection_eval.json/.md; --epoch, --data_dir, --num_examples
and --output_dir apply). Without --workdir, the --config file's workdir is used;
--pretrained NAME evaluates a shipped model instead (awn_jax.pretrained; its test images
from --data_dir, or TFDS), by default on the test images its manifest's accuracies were
measured on, with the report in awn-reports/NAME/ unless --output_dir says otherwise.
Every study prints where its report went.
"""

import dataclasses
import os
from collections.abc import Callable, Mapping

from absl import flags
from ml_collections import config_flags

from awn_jax import cli, names, pretrained, robustness
from awn_jax.detection import training as detection
from awn_jax.errors import UserError
from awn_jax.nn.batchnorm import EVAL_BN_MODES, check_bn_modes
from awn_jax.reproduction import report
from awn_jax.detection.evaluation import summary_table
from awn_jax.robustness import attacks, strict, studies
from awn_jax.training.runs import load_run

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config whose workdir to evaluate when --workdir is not given.",
    lock_config=True)
_WORKDIRS = flags.DEFINE_multi_string("workdir", None, "Training workdir(s); one row block each.")
_PRETRAINED = flags.DEFINE_multi_string(
    "pretrained", None, "Shipped model(s) to evaluate, e.g. cifar10_r20_awn (see "
    "awn_jax.pretrained.names()).")
_STUDY = flags.DEFINE_string("study", "table",
                             "table | eps-sweep | steps-sweep | batch | strict; "
                             "--study NAME --help lists that study's own settings.")
_BN_MODE = flags.DEFINE_list("bn_mode", ["all"], "tracked | running-mean | running, or a "
                             "comma-separated list of them, or all.")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", None, "Evaluation batch (BN statistics!); default 500, and 128 for the "
    "partitions and threat models of the batch study.", lower_bound=1)
_NUM_EXAMPLES = flags.DEFINE_integer(
    "num_examples", None, "Test examples (default: all; for --pretrained, those its manifest's "
    "accuracies were measured on).", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the attacks' randomness.", lower_bound=0)
_EPOCH = flags.DEFINE_integer("epoch", None, "Checkpoint epoch (default: the latest).",
                              lower_bound=1)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Data location, if it moved since training.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where to write the report (default: "
                                  "the first workdir; awn-reports/NAME for --pretrained).")
_CHUNK = flags.DEFINE_integer("chunk_size", 512, "Studies: examples per compiled call.",
                              lower_bound=1)
_BN_STATS = cli.define_bn_stats_flags()

PRETRAINED_REPORTS = "awn-reports"  # --pretrained without --output_dir: awn-reports/<names>
# Flags every study reads; each study's own are the fields of its settings.
COMMON_FLAGS = ("config", "workdir", "pretrained", "study", "bn_mode", "batch_size",
                "num_examples", "seed", "epoch", "data_dir", "output_dir", "chunk_size",
                "bn_stats", "bn_stats_images", "bn_stats_augment")


# ------------------------------------------------------------------------------ settings

def _attack_name(name: str) -> str:
    return name if name == "all" else attacks.check_attack_name(name)


def _pgd(settings):
    if settings.attack != "pgd":
        raise UserError(f"the sweeps are PGD sweeps; --attack {settings.attack} is not "
                        "supported")


def _setting(default, help_text, lower_bound=None):
    """A settings field: its default, and its flag's help and lower bound."""
    return dataclasses.field(default=default,
                             metadata={"help": help_text, "lower_bound": lower_bound})


_EPS_HELP = "L-inf radius."
_STEP_SIZE_HELP = "Attack step size."


@dataclasses.dataclass(frozen=True)
class TableSettings:
    """Table 1: clean and each attack; eps, steps, step_size None: each attack's paper
    settings."""
    attack: str = _setting("all", "Attack name, or all: the paper's five.")
    eps: float | None = _setting(None, _EPS_HELP + " (none given: 8/255)", 0)
    steps: int | None = _setting(None, "Iterations (none given: each attack's own, as the "
                                 "paper: FGSM 1, BIM and PGD 7, MIM and RFGSM 5).", 0)
    step_size: float | None = _setting(None, _STEP_SIZE_HELP + " (none given: 2/255)", 0)

    @property
    def attack_names(self) -> tuple[str, ...]:
        return names.PAPER_ATTACKS if self.attack == "all" else (self.attack,)


@dataclasses.dataclass(frozen=True)
class EpsSweepSettings:
    """Fig. 2a: PGD-``steps`` at each eps, step eps/7."""
    attack: str = _setting("pgd", "The sweeps are PGD sweeps.")
    eps_values: tuple[float, ...] = _setting(studies.SWEEP_EPS, "The eps values.")
    steps: int = _setting(7, "PGD iterations.", 0)


@dataclasses.dataclass(frozen=True)
class StepsSweepSettings:
    """Fig. 2b: PGD at each step count, at eps and step_size."""
    attack: str = _setting("pgd", "The sweeps are PGD sweeps.")
    steps_values: tuple[int, ...] = _setting(studies.SWEEP_STEPS, "The step counts.")
    eps: float = _setting(attacks.DEFAULT_EPS, _EPS_HELP, 0)
    step_size: float = _setting(attacks.DEFAULT_STEP_SIZE, _STEP_SIZE_HELP, 0)


@dataclasses.dataclass(frozen=True)
class BatchSettings:
    """Batch dependence: batch sizes, partitions, attackers controlling part of a batch."""
    attack: str = _setting("pgd", "The attack of every row, at the paper's settings.")
    batch_sizes: tuple[int, ...] = _setting(studies.BATCH_SIZES,
                                            "The evaluation batch sizes.")
    partitions: int = _setting(5, "Random partitions into batches.", 1)
    attacked_per_batch: tuple[int, ...] | None = _setting(
        None, "Images the attacker controls per batch (none given: 1, 10% and all of "
        "--batch_size).")
    threat_passes: int = _setting(8, "Rotations of the attacked slots per batch (more "
                                  "attacked examples, more time).", 1)


@dataclasses.dataclass(frozen=True)
class StrictSettings(strict.Budgets):
    """The strict study's budgets (AutoAttack's by default) at eps and step_size."""
    eps: float = _setting(attacks.DEFAULT_EPS, _EPS_HELP, 0)
    step_size: float = _setting(attacks.DEFAULT_STEP_SIZE, _STEP_SIZE_HELP, 0)

    @property
    def budgets(self) -> strict.Budgets:
        return strict.Budgets(**{f.name: getattr(self, f.name)
                                 for f in dataclasses.fields(strict.Budgets)})


# ------------------------------------------------------------------------------ studies
# Each: evaluate(run, settings, bn_modes, batch_size, num_examples, output_dir) -> one run's
# result; write(results of every run, settings, output_dir) -> the Markdown it wrote.

def _table(run, settings, bn_modes, batch_size, num_examples, output_dir):
    return robustness.evaluate_run(
        run, settings.attack_names, bn_modes, eps=settings.eps, steps=settings.steps,
        step_size=settings.step_size, batch_size=batch_size, num_examples=num_examples,
        seed=_SEED.value, cache_dir=os.path.join(output_dir, "table-parts"))


def _eps_sweep(run, settings, bn_modes, batch_size, num_examples, output_dir):
    return studies.eps_sweep(run, bn_modes, settings.eps_values, steps=settings.steps,
                             batch_size=batch_size, num_examples=num_examples,
                             seed=_SEED.value, cache_dir=os.path.join(output_dir, "sweep-parts"))


def _steps_sweep(run, settings, bn_modes, batch_size, num_examples, output_dir):
    return studies.steps_sweep(run, bn_modes, settings.steps_values, eps=settings.eps,
                               step_size=settings.step_size, batch_size=batch_size,
                               num_examples=num_examples, seed=_SEED.value,
                               cache_dir=os.path.join(output_dir, "sweep-parts"))


def _batch(run, settings, bn_modes, batch_size, num_examples, output_dir):
    return studies.batch_study(
        run, bn_modes, num_examples=num_examples, batch_sizes=settings.batch_sizes,
        batch_size=batch_size, partitions=settings.partitions,
        attacked=settings.attacked_per_batch, max_passes=settings.threat_passes,
        attack=settings.attack, seed=_SEED.value)


def _strict(run, settings, bn_modes, batch_size, num_examples, output_dir):
    return strict.strict_study(
        run, bn_modes, num_examples=num_examples, batch_size=batch_size, eps=settings.eps,
        step_size=settings.step_size, seed=_SEED.value, budgets=settings.budgets,
        cache_dir=os.path.join(output_dir, "strict-parts"))


def _write_table(rows, settings, output_dir):
    """Table 1, then the verdicts on the paper's claims that its rows can judge."""
    judged = report.table_claims(rows)
    appendix = ("The paper's claims these rows can judge (a verdict is about these models; "
                "rule in awn_jax.reproduction.report):\n\n" + report.format_claims(judged)
                if judged else "")
    return robustness.write_report(rows, settings.attack_names, output_dir, appendix=appendix)


def _flattened(write):
    return lambda results, settings, output_dir: write(
        [r for rows in results for r in rows], settings, output_dir)


@dataclasses.dataclass(frozen=True)
class Study:
    """One study of this command: its settings (a frozen dataclass whose fields are its own
    flags, named as in ``flag_names`` where they differ; ``awn_jax.cli``), a check of them
    before anything loads, its evaluation of one run and its report of all runs."""

    summary: str
    settings: type
    evaluate: Callable
    write: Callable
    check: Callable = lambda settings: None
    batch_size: int = 500   # the default evaluation batch (BN statistics!)
    flag_names: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @property
    def flags(self) -> tuple[str, ...]:
        return tuple(name for name, _, _ in cli.settings_fields(self.settings,
                                                                  self.flag_names))

    def settings_from_flags(self):
        settings = cli.settings_from_flags(self.settings, self.flag_names)
        self.check(settings)
        return settings

    def help(self, name: str) -> str:
        """``evaluate.py --study NAME --help``: this study's settings, then the common flags."""
        return "\n".join([
            f"evaluate.py --study {name}: {self.summary}", "", "Its settings:",
            *cli.settings_help(self.settings, self.flag_names), "",
            f"Default --batch_size: {self.batch_size}. Flags of every study: "
            + ", ".join(f"--{f}" for f in COMMON_FLAGS)
            + "; python evaluate.py --help describes them."])


STUDIES = {
    "table": Study(
        "rows run x BN mode, columns clean and each attack, #Mul, #Add (Table 1)",
        TableSettings, _table,
        _flattened(_write_table),
        check=lambda settings: _attack_name(settings.attack)),
    "eps-sweep": Study(
        "PGD accuracy vs eps, step eps/7 (Fig. 2a)", EpsSweepSettings, _eps_sweep,
        _flattened(lambda rows, settings, out: studies.write_sweep(rows, "eps", out)),
        check=_pgd),
    "steps-sweep": Study(
        "PGD accuracy vs steps (Fig. 2b)", StepsSweepSettings, _steps_sweep,
        _flattened(lambda rows, settings, out: studies.write_sweep(rows, "steps", out)),
        check=_pgd),
    "batch": Study(
        "accuracy vs evaluation batch size, random partitions into batches, attackers "
        "controlling part of each batch, transfer from tracked", BatchSettings, _batch,
        lambda results, settings, out: studies.write_batch_study(results, out),
        check=lambda settings: attacks.check_attack_name(settings.attack), batch_size=128),
    "strict": Study(
        "APGD-CE/-DLR, Square, transfer from tracked, EOT over unknown batch partners, "
        "worst case, harm to batch mates, controls (docs/ROBUSTNESS.md)", StrictSettings,
        _strict, lambda results, settings, out: strict.write_strict(results, out),
        flag_names={"mate_sizes": "attacked_per_batch"}),
}


for _each in STUDIES.values():   # one flag per setting; a study's own default applies
    cli.define_settings_flags(_each.settings, _each.flag_names)
flags.adopt_module_key_flags(cli)  # --help lists the flags defined there


def _study() -> tuple[Study, object]:
    """The chosen study and its settings, refusing a flag that belongs only to other
    studies."""
    if _STUDY.value not in STUDIES:
        raise UserError(f"unknown study {_STUDY.value!r}; expected one of {', '.join(STUDIES)}")
    study = STUDIES[_STUDY.value]
    for name in sorted({f for other in STUDIES.values() for f in other.flags}
                       - set(study.flags)):
        if flags.FLAGS[name].present:
            readers = [s for s, other in STUDIES.items() if name in other.flags]
            raise UserError(f"--{name} is a setting of --study {' / '.join(readers)}, "
                            f"not of --study {_STUDY.value}")
    return study, study.settings_from_flags()


def study_help(argv) -> str | None:
    """The help of the study named in ``argv`` when it asks for --help, else None."""
    if not {"--help", "-h", "-?"} & set(argv):
        return None
    for i, arg in enumerate(argv):
        name = (arg.partition("=")[2] if arg.startswith("--study=") else
                argv[i + 1] if arg == "--study" and i + 1 < len(argv) else None)
        if name in STUDIES:
            return STUDIES[name].help(name)
    return None


def _evaluate_detection(workdirs) -> None:
    """VOC mAP and the per-class AP table of detection workdirs (Table 2)."""
    results = [detection.evaluate_workdir(w, epoch=_EPOCH.value, data_dir=_DATA_DIR.value,
                                          num_examples=_NUM_EXAMPLES.value,
                                          output_dir=_OUTPUT_DIR.value) for w in workdirs]
    print("\n\n".join([r["table"] for r in results] + [summary_table(results)]))


def main(argv):
    del argv
    study, settings = _study()
    bn_modes = check_bn_modes(EVAL_BN_MODES if _BN_MODE.value == ["all"] else _BN_MODE.value)
    num_examples = _NUM_EXAMPLES.value
    if _PRETRAINED.value:
        output_dir = _OUTPUT_DIR.value or os.path.join(PRETRAINED_REPORTS,
                                                       "+".join(_PRETRAINED.value))
        loaded = (pretrained.load(name, data_dir=_DATA_DIR.value) for name in _PRETRAINED.value)
        # The images the manifests' accuracies were measured on, unless told otherwise.
        stated = [pretrained.manifest().get(name, {}).get("test_examples")
                  for name in _PRETRAINED.value]
        num_examples = num_examples or (max(stated) if all(stated) else None)
    else:
        workdirs = _WORKDIRS.value or ([_CONFIG.value.workdir] if _CONFIG.value else None)
        if not workdirs:
            raise UserError("pass --workdir or --pretrained (or --config to use its workdir)")
        if any(detection.is_detection_workdir(w) for w in workdirs):
            return _evaluate_detection(workdirs)
        output_dir = _OUTPUT_DIR.value or workdirs[0]
        loaded = (load_run(w, epoch=_EPOCH.value, data_dir=_DATA_DIR.value) for w in workdirs)
    batch_size = _BATCH_SIZE.value or study.batch_size
    bn_stats = _BN_STATS(batch_size)
    runs = (dataclasses.replace(run, eval_chunk_size=_CHUNK.value).with_bn_stats(bn_stats)
            for run in loaded)
    results = [study.evaluate(run, settings, bn_modes, batch_size, num_examples, output_dir)
               for run in runs]
    print(study.write(results, settings, output_dir))
    print(f"\nreport written to {os.path.abspath(output_dir)}")


if __name__ == "__main__":
    cli.run(main, help_for=study_help)
