"""Accuracy of trained runs under white-box attacks and BatchNorm statistics modes.

    python evaluate.py --attack pgd --bn_mode running-mean --workdir workdirs/cifar10_r20_awn
    python evaluate.py --attack all --bn_mode all --workdir A --workdir B --num_examples 1000
    python evaluate.py --study eps-sweep --bn_mode running-mean --workdir A --workdir B
    python evaluate.py --study batch --bn_mode all --workdir A
    python evaluate.py --study strict --bn_mode all --workdir A --num_examples 1000

--study picks what is measured (all of it written into --output_dir, default: the first
workdir); each study is one entry of STUDIES below, with the flags it reads besides the
common ones, and a flag of another study is refused rather than ignored:
  table        rows run x BN mode, columns clean and each attack, #Mul, #Add (Table 1):
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
from collections.abc import Callable

from absl import flags
from ml_collections import config_flags

from awn_jax import cli, names, pretrained, robustness
from awn_jax.detection import training as detection
from awn_jax.errors import UserError
from awn_jax.nn.batchnorm import EVAL_BN_MODES, check_bn_modes
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
                             "table | eps-sweep | steps-sweep | batch | strict.")
_ATTACK = flags.DEFINE_string(
    "attack", None, "Attack name; 'all' (the paper's five) for the table, the default there. "
    "The sweeps are PGD; the batch study uses this one attack (default pgd) at the "
    "paper's settings (--eps/--steps/--step_size are for the table and the sweeps).")
_BN_MODE = flags.DEFINE_list("bn_mode", ["all"], "tracked | running-mean | running, or a "
                             "comma-separated list of them, or all.")
_EPS = flags.DEFINE_float("eps", None, "L-inf radius (default 8/255).", lower_bound=0)
_STEPS = flags.DEFINE_integer("steps", None, "Iterations (default: per attack, as the paper).",
                              lower_bound=0)
_STEP_SIZE = flags.DEFINE_float("step_size", None, "Step size (default 2/255).", lower_bound=0)
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
_EPS_VALUES = flags.DEFINE_list("eps_values", [f"{e:g}" for e in studies.SWEEP_EPS],
                                "eps-sweep: the eps values.")
_STEPS_VALUES = flags.DEFINE_list("steps_values", [str(s) for s in studies.SWEEP_STEPS],
                                  "steps-sweep: the step counts.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", [str(b) for b in studies.BATCH_SIZES],
                                 "batch study: the evaluation batch sizes.")
_PARTITIONS = flags.DEFINE_integer("partitions", 5, "batch study: random partitions.",
                                   lower_bound=1)
_ATTACKED = flags.DEFINE_list("attacked_per_batch", None,
                              "batch study: images the attacker controls per batch "
                              "(default: 1, 10% and all of --batch_size); strict study: "
                              "the harm curve's k (default: 1, 5%, 10%, 25%).")
_PASSES = flags.DEFINE_integer("threat_passes", 8, "batch study: rotations of the attacked "
                               "slots per batch (more attacked examples, more time).",
                               lower_bound=1)
_CHUNK = flags.DEFINE_integer("chunk_size", 512, "Studies: examples per compiled call.",
                              lower_bound=1)
_APGD_STEPS = flags.DEFINE_integer("apgd_steps", 100, "strict: APGD-CE/-DLR iterations.")
_SQUARE_QUERIES = flags.DEFINE_integer("square_queries", 5000,
                                       "strict: Square's query budget per image.")
_TRANSFER = flags.DEFINE_string("transfer_attack", "pgd",
                                "strict: attack crafted under tracked, scored in the batch.")
_EOT_ATTACKED = flags.DEFINE_integer("eot_attacked", None, "strict: images per batch "
                                     "crafted by EOT over random partners (default 10%).")
_EOT_DRAWS = flags.DEFINE_integer("eot_draws", 4, "strict: partner batches per EOT step.")
_EOT_STEPS = flags.DEFINE_integer("eot_steps", 10, "strict: EOT's PGD steps.")
_MATE_STEPS = flags.DEFINE_integer("mate_steps", 20, "strict: steps of the batch-mate "
                                   "attack (step eps/4).")
_MATE_UNBOUNDED = flags.DEFINE_bool("mate_unbounded", False, "strict: the batch-mate "
                                    "attacker's images are free in [0, 1], not in the ball.")
_BN_STATS = cli.define_bn_stats_flags()
flags.adopt_module_key_flags(cli)  # --help lists the shared flags defined there
_CONTROL_BATCH = flags.DEFINE_integer("control_batch_size", 50, "strict: size of the "
                                      "single-class (and matching mixed) control batches.")

PRETRAINED_REPORTS = "awn-reports"  # --pretrained without --output-dir: awn-reports/<names>
# Flags every study reads; each study names its own besides (Study.flags).
COMMON_FLAGS = ("config", "workdir", "pretrained", "study", "bn_mode", "batch_size",
                "num_examples", "seed", "epoch", "data_dir", "output_dir", "chunk_size",
                "bn_stats", "bn_stats_images", "bn_stats_augment")


def _numbers(flag, kind):
    try:
        return tuple(kind(v) for v in flag.value)
    except ValueError:
        raise UserError(f"--{flag.name} must be a comma-separated list of "
                        f"{kind.__name__}s, got {','.join(flag.value)}") from None


def _attack(default: str) -> str:
    attack = _ATTACK.value or default
    return attack if attack == "all" else attacks.check_attack_name(attack)


def _pgd_only():
    if _attack("pgd") != "pgd":
        raise UserError(f"the sweeps are PGD sweeps; --attack {_ATTACK.value} is not supported")


# ------------------------------------------------------------------------------ studies
# Each: evaluate(run, bn_modes, batch_size, num_examples, output_dir) -> one run's result;
# write(results of every run, output_dir) -> the Markdown it wrote.

def _table_names():
    attack = _attack("all")
    return names.PAPER_ATTACKS if attack == "all" else (attack,)


def _table(run, bn_modes, batch_size, num_examples, output_dir):
    return robustness.evaluate_run(
        run, _table_names(), bn_modes, eps=_EPS.value, steps=_STEPS.value,
        step_size=_STEP_SIZE.value, batch_size=batch_size, num_examples=num_examples,
        seed=_SEED.value, cache_dir=os.path.join(output_dir, "table-parts"))


def _eps_sweep(run, bn_modes, batch_size, num_examples, output_dir):
    return studies.eps_sweep(run, bn_modes, _numbers(_EPS_VALUES, float),
                             steps=_STEPS.value or 7, batch_size=batch_size,
                             num_examples=num_examples, seed=_SEED.value)


def _steps_sweep(run, bn_modes, batch_size, num_examples, output_dir):
    return studies.steps_sweep(run, bn_modes, _numbers(_STEPS_VALUES, int),
                               eps=_EPS.value or attacks.DEFAULT_EPS,
                               step_size=_STEP_SIZE.value or attacks.DEFAULT_STEP_SIZE,
                               batch_size=batch_size, num_examples=num_examples,
                               seed=_SEED.value)


def _batch(run, bn_modes, batch_size, num_examples, output_dir):
    return studies.batch_study(
        run, bn_modes, num_examples=num_examples, batch_sizes=_numbers(_BATCH_SIZES, int),
        batch_size=batch_size, partitions=_PARTITIONS.value,
        attacked=_numbers(_ATTACKED, int) if _ATTACKED.value else None,
        max_passes=_PASSES.value, attack=_attack("pgd"), seed=_SEED.value)


def _strict(run, bn_modes, batch_size, num_examples, output_dir):
    budgets = strict.Budgets(
        apgd_steps=_APGD_STEPS.value, square_queries=_SQUARE_QUERIES.value,
        transfer_attack=_TRANSFER.value, eot_attacked=_EOT_ATTACKED.value,
        eot_draws=_EOT_DRAWS.value, eot_steps=_EOT_STEPS.value,
        mate_steps=_MATE_STEPS.value, mate_unbounded=_MATE_UNBOUNDED.value,
        mate_sizes=_numbers(_ATTACKED, int) if _ATTACKED.value else None,
        control_batch_size=_CONTROL_BATCH.value)
    return strict.strict_study(
        run, bn_modes, num_examples=num_examples, batch_size=batch_size,
        eps=_EPS.value or attacks.DEFAULT_EPS,
        step_size=_STEP_SIZE.value or attacks.DEFAULT_STEP_SIZE, seed=_SEED.value,
        budgets=budgets, cache_dir=os.path.join(output_dir, "strict-parts"))


def _flattened(write):
    return lambda results, output_dir: write([r for rows in results for r in rows], output_dir)


@dataclasses.dataclass(frozen=True)
class Study:
    """One study of this command: the flags it reads besides ``COMMON_FLAGS``, a check of
    them before anything loads, its evaluation of one run and its report of all runs."""

    flags: tuple[str, ...]
    evaluate: Callable
    write: Callable
    check: Callable = lambda: None
    batch_size: int = 500   # the default evaluation batch (BN statistics!)


STUDIES = {
    "table": Study(("attack", "eps", "steps", "step_size"), _table,
                   _flattened(lambda rows, out: robustness.write_report(
                       rows, _table_names(), out)), check=_table_names),
    "eps-sweep": Study(("attack", "eps_values", "steps"), _eps_sweep,
                       _flattened(lambda rows, out: studies.write_sweep(rows, "eps", out)),
                       check=_pgd_only),
    "steps-sweep": Study(("attack", "steps_values", "eps", "step_size"), _steps_sweep,
                         _flattened(lambda rows, out: studies.write_sweep(rows, "steps", out)),
                         check=_pgd_only),
    "batch": Study(("attack", "batch_sizes", "partitions", "attacked_per_batch",
                    "threat_passes"), _batch, studies.write_batch_study,
                   check=lambda: _attack("pgd"), batch_size=128),
    "strict": Study(("eps", "step_size", "apgd_steps", "square_queries", "transfer_attack",
                     "eot_attacked", "eot_draws", "eot_steps", "mate_steps", "mate_unbounded",
                     "attacked_per_batch", "control_batch_size"), _strict, strict.write_strict),
}


def _study() -> Study:
    """The chosen study, refusing a flag that belongs only to other studies."""
    if _STUDY.value not in STUDIES:
        raise UserError(f"unknown study {_STUDY.value!r}; expected one of {', '.join(STUDIES)}")
    study = STUDIES[_STUDY.value]
    for name in sorted({f for other in STUDIES.values() for f in other.flags}
                       - set(study.flags)):
        if flags.FLAGS[name].present:
            readers = [s for s, other in STUDIES.items() if name in other.flags]
            raise UserError(f"--{name} is a setting of --study {' / '.join(readers)}, "
                            f"not of --study {_STUDY.value}")
    study.check()
    return study


def _evaluate_detection(workdirs) -> None:
    """VOC mAP and the per-class AP table of detection workdirs (Table 2)."""
    results = [detection.evaluate_workdir(w, epoch=_EPOCH.value, data_dir=_DATA_DIR.value,
                                          num_examples=_NUM_EXAMPLES.value,
                                          output_dir=_OUTPUT_DIR.value) for w in workdirs]
    print("\n\n".join([r["table"] for r in results] + [summary_table(results)]))


def main(argv):
    del argv
    study = _study()
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
    results = [study.evaluate(run, bn_modes, batch_size, num_examples, output_dir)
               for run in runs]
    print(study.write(results, output_dir))
    print(f"\nreport written to {os.path.abspath(output_dir)}")


if __name__ == "__main__":
    cli.run(main)
