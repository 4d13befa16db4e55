"""The configs every run starts from, as library functions: the defaults (the official
AdderNet CIFAR-10 recipe, ResNet-20 ANN-AWN; every key with its meaning) and the paper's four
CIFAR-10 ResNet-20 runs. The files in ``configs/`` (``configs/default.py``,
``configs/cifar10_r20_*.py``) return these, and the reproduction campaign builds its runs
from them without the repository's ``configs/`` on ``sys.path``.

Every key has one meaning. Quantities that follow from others (steps per epoch, the
schedule, the nu/upsilon learning rate) are computed by the trainer, so overrides such
as ``--config.num_epochs=1 --config.batch_size=64`` stay consistent.
"""

import ml_collections

# The paper's training length (the official recipe; Sec. 5): the default, and the scale of
# the stability studies' epochs at shorter budgets.
PAPER_EPOCHS = 400


def default_config() -> ml_collections.ConfigDict:
    """The defaults: every key the trainer reads, with its meaning."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.workdir = "workdirs/cifar10_r20_awn"  # used when --workdir is not given

    # Data: cifar10 | cifar100 | imagenet2012 (TFDS), image_folder, synthetic.
    config.dataset = "cifar10"
    config.data_dir = ""                # TFDS data_dir, or the root of an image folder
    config.image_size = 32              # training/eval crop size
    config.crop_padding = 4             # random crop from the zero-padded image (CIFAR)
    config.random_flip = True
    config.num_train_examples = 0       # >0: train on a fixed random subset (CPU runs)
    config.num_test_examples = 0        # >0: the per-epoch test uses this many examples
    # Input mean/std: "dataset" (the source's own; measured on an image folder) or a TFDS
    # name whose official constants to use (CIFAR-10's from the AdderNet main.py).
    config.normalization = "cifar10"
    config.synthetic_num_train = 512    # sizes of the synthetic source (smoke runs)
    config.synthetic_num_test = 256
    config.synthetic_num_classes = 10

    # Model: resnet20 | resnet32 | resnet56 | resnet18 | resnet50;
    # layer_type: conv | adder | adder-ws | adder-awn.
    config.model = "resnet20"
    config.layer_type = "adder-awn"
    config.shortcut = "projection"      # projection (official AdderNet) | option-a (zero pad)
    config.head = "conv-bn"             # conv-bn (official AdderNet) | linear (with bias)
    config.eta = 0.2                    # adaptive gradient scaling of adder layers (<=0: off)
    config.weight_norm_eps = 1e-5       # eps of WS/AWN
    config.compute_dtype = "float32"    # float32 | bfloat16 (parameters stay float32)

    # Optimization (official recipe).
    config.batch_size = 256             # global batch, split over devices
    config.num_devices = 0              # devices of the data-parallel mesh (0: all)
    config.num_epochs = PAPER_EPOCHS
    config.learning_rate = 0.1
    config.lr_schedule = "cosine-epoch"  # cosine-epoch (official) | cosine-step | constant
    config.warmup_epochs = 0.0
    config.momentum = 0.9
    config.nesterov = False
    config.weight_decay = 5e-4
    config.awn_lr_multiplier = 1e-5     # lr of AWN's nu/upsilon = learning_rate * this

    # Evaluation and bookkeeping.
    config.eval_batch_size = 500
    config.eval_bn_mode = "tracked"     # BN statistics mode of the per-epoch test
    config.max_checkpoints_to_keep = 0  # 0 keeps every epoch (the stability studies need them)
    config.log_every_steps = 50
    return config


# The paper's four CIFAR-10 ResNet-20 runs: layer type -> the name of its config file (and of
# its workdir and shipped weights).
PAPER_RUNS = {"conv": "cifar10_r20_cnn", "adder": "cifar10_r20_ann",
              "adder-ws": "cifar10_r20_ws", "adder-awn": "cifar10_r20_awn"}


def paper_config(layer_type: str) -> ml_collections.ConfigDict:
    """The official recipe with ``layer_type`` layers: ``configs/<PAPER_RUNS[layer_type]>.py``."""
    config = default_config()
    config.layer_type = layer_type
    config.workdir = f"workdirs/{PAPER_RUNS[layer_type]}"
    return config
