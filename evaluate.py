"""Accuracy of trained runs under white-box attacks and BatchNorm statistics modes.

    python evaluate.py --attack pgd --bn-mode running-mean --workdir workdirs/cifar10_r20_awn
    python evaluate.py --attack all --bn-mode all --workdir A --workdir B --num-examples 1000

Prints a Table-1-style table (rows: run x BN mode; columns: clean and each attack, #Mul,
#Add) and writes it as robustness.json and robustness.md into --output-dir (default: the
first workdir). Without --workdir, the --config file's workdir is used.
"""

from absl import flags
from ml_collections import config_flags

from awn_jax import cli, robustness
from awn_jax.runs import load_run

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config whose workdir to evaluate when --workdir is not given.",
    lock_config=True)
_WORKDIRS = flags.DEFINE_multi_string("workdir", None, "Training workdir(s); one row block each.")
_ATTACK = flags.DEFINE_string("attack", "all", "Attack name or 'all' (the paper's five).")
_BN_MODE = flags.DEFINE_string("bn-mode", "all", "tracked | running-mean | running | all.")
_EPS = flags.DEFINE_float("eps", None, "L-inf radius (default 8/255).")
_STEPS = flags.DEFINE_integer("steps", None, "Iterations (default: per attack, as the paper).")
_STEP_SIZE = flags.DEFINE_float("step-size", None, "Step size (default 2/255).")
_BATCH_SIZE = flags.DEFINE_integer("batch-size", 500, "Evaluation batch (BN statistics!).")
_NUM_EXAMPLES = flags.DEFINE_integer("num-examples", None, "Test examples (default: all).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the attacks' randomness.")
_EPOCH = flags.DEFINE_integer("epoch", None, "Checkpoint epoch (default: the latest).")
_DATA_DIR = flags.DEFINE_string("data-dir", None, "Data location, if it moved since training.")
_OUTPUT_DIR = flags.DEFINE_string("output-dir", None, "Where to write the report.")

PAPER_ATTACKS = ("fgsm", "bim", "pgd", "mim", "rfgsm")


def main(argv):
    del argv
    workdirs = _WORKDIRS.value or ([_CONFIG.value.workdir] if _CONFIG.value else None)
    if not workdirs:
        raise ValueError("pass --workdir (or --config to use its workdir)")
    attack_names = PAPER_ATTACKS if _ATTACK.value == "all" else (_ATTACK.value,)
    bn_modes = robustness.EVAL_BN_MODES if _BN_MODE.value == "all" else (_BN_MODE.value,)
    rows = []
    for workdir in workdirs:
        run = load_run(workdir, epoch=_EPOCH.value, data_dir=_DATA_DIR.value)
        rows += robustness.evaluate_run(
            run, attack_names, bn_modes, eps=_EPS.value, steps=_STEPS.value,
            step_size=_STEP_SIZE.value, batch_size=_BATCH_SIZE.value,
            num_examples=_NUM_EXAMPLES.value, seed=_SEED.value)
    print(robustness.write_report(rows, attack_names, _OUTPUT_DIR.value or workdirs[0]))


if __name__ == "__main__":
    cli.run(main)
