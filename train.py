"""Train an adder (or convolutional) ResNet: ``python train.py --config configs/cifar10_r20_awn.py``,
or a detector (configs with ``task = "detection"``, e.g. configs/voc_frcnn_r18_awn.py).

Any config key can be overridden, e.g. ``--config.num_epochs=1 --config.batch_size=64``;
an unknown key is an error. ``--workdir`` defaults to the config's ``workdir``; a run
resumes from the latest checkpoint there.
"""

from absl import app, flags
from ml_collections import config_flags

from awn_jax import cli
from awn_jax.detection import training as detection
from awn_jax.distributed import maybe_initialize_distributed
from awn_jax.training.loop import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/default.py", "Training configuration file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Call jax.distributed.initialize() (one process per host; "
    "cluster environments such as SLURM are detected by JAX).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    maybe_initialize_distributed(_MULTIHOST.value)
    config = _CONFIG.value
    train = detection.train_and_evaluate if config.get("task") == "detection" else train_and_evaluate
    train(config, _WORKDIR.value or config.workdir)


if __name__ == "__main__":
    cli.run(main)
