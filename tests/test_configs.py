"""Config files: each loads the way the CLIs load it, differs where it should, and stays locked."""

import pathlib

import pytest
from absl import flags
from ml_collections import config_flags

from awn_jax.data import get_dataset

CONFIG_DIR = pathlib.Path(__file__).parents[1] / "configs"
CONFIG_FILES = sorted(p for p in CONFIG_DIR.glob("*.py") if "def get_config(" in p.read_text())
# Detection configs (task = "detection") have their own base, voc_frcnn_default.py.
DETECTION_FILES = [p for p in CONFIG_FILES if p.stem.startswith("voc_frcnn")]
CLASSIFICATION_FILES = [p for p in CONFIG_FILES if p not in DETECTION_FILES]

# What each variant changes relative to default.py (besides workdir).
EXPECTED = {
    "cifar10_r20_cnn": dict(layer_type="conv"),
    "cifar10_r20_ann": dict(layer_type="adder"),
    "cifar10_r20_ws": dict(layer_type="adder-ws"),
    "cifar10_r20_awn": dict(),
    "cifar10_r32_cnn": dict(model="resnet32", layer_type="conv"),
    "cifar10_r32_ann": dict(model="resnet32", layer_type="adder"),
    "cifar10_r32_awn": dict(model="resnet32"),
    "cifar100_r20_cnn": dict(dataset="cifar100", normalization="cifar100", layer_type="conv"),
    "cifar100_r20_ann": dict(dataset="cifar100", normalization="cifar100", layer_type="adder"),
    "cifar100_r20_awn": dict(dataset="cifar100", normalization="cifar100"),
}
DETECTION_LAYER_TYPES = {"cnn": "conv", "ann": "adder", "ws": "adder-ws", "awn": "adder-awn"}
# The paper's Sec. 5.3 recipe.
DETECTION = dict(task="detection", dataset="voc", model="resnet18", learning_rate=0.008,
                 warmup_steps=500, momentum=0.9, weight_decay=1e-4, lr_schedule="cosine-epoch",
                 num_epochs=12, batch_size=4, ap_metric="11-point")
IMAGENET = dict(dataset="imagenet2012", normalization="imagenet2012", image_size=224, model="resnet18", num_epochs=90,
                weight_decay=1e-4, batch_size=256, learning_rate=0.1)


def load(path, *overrides):
    """Parses `--config=path --config.k=v ...` exactly as train.py's flags do, locked."""
    argv = ["prog", f"--config={path}", *overrides]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", str(CONFIG_DIR / "default.py"),
                                    flag_values=flag_values, lock_config=True, sys_argv=argv)
    flag_values(argv)
    return flag_values.config


def test_every_variant_is_covered():
    stems = {p.stem for p in CLASSIFICATION_FILES} - {"default", "smoke"}
    assert stems == set(EXPECTED) | {f"imagenet_r18_{k}" for k in ("cnn", "ann", "ws", "awn")}
    assert {p.stem for p in DETECTION_FILES} == {"voc_frcnn_default", "voc_frcnn_smoke"} | {
        f"voc_frcnn_r18_{k}" for k in DETECTION_LAYER_TYPES}


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_config_loads_locked_with_default_keys(path):
    base = "voc_frcnn_default.py" if path in DETECTION_FILES else "default.py"
    config, reference = load(path), load(CONFIG_DIR / base)
    assert config.is_locked
    assert set(config.keys()) == set(reference.keys())
    assert ("task" in config) == (path in DETECTION_FILES)  # train.py dispatches on it
    if path.stem not in ("default", "voc_frcnn_default"):
        assert config.workdir == f"workdirs/{path.stem}"


@pytest.mark.parametrize("stem", sorted(EXPECTED))
def test_cifar_variants_change_only_what_they_should(stem):
    config, reference = load(CONFIG_DIR / f"{stem}.py"), load(CONFIG_DIR / "default.py")
    changed = {k for k in config.keys() if config[k] != reference[k]} - {"workdir"}
    assert changed == set(EXPECTED[stem])
    assert all(config[k] == v for k, v in EXPECTED[stem].items())
    recipe = dict(batch_size=256, momentum=0.9, weight_decay=5e-4, learning_rate=0.1,
                  num_epochs=400, lr_schedule="cosine-epoch", crop_padding=4, image_size=32)
    assert {k: config[k] for k in recipe} == recipe


@pytest.mark.parametrize("kind, layer_type", [("cnn", "conv"), ("ann", "adder"),
                                              ("ws", "adder-ws"), ("awn", "adder-awn")])
def test_imagenet_variants(kind, layer_type):
    config = load(CONFIG_DIR / f"imagenet_r18_{kind}.py")
    assert {k: config[k] for k in IMAGENET} == IMAGENET
    assert config.layer_type == layer_type
    assert 50_000 % config.eval_batch_size == 0


@pytest.mark.parametrize("kind", sorted(DETECTION_LAYER_TYPES))
def test_detection_variants_follow_the_paper_and_differ_only_in_layer_type(kind):
    config = load(CONFIG_DIR / f"voc_frcnn_r18_{kind}.py")
    reference = load(CONFIG_DIR / "voc_frcnn_default.py")
    assert {k: config[k] for k in DETECTION} == DETECTION
    assert config.layer_type == DETECTION_LAYER_TYPES[kind]
    changed = {k for k in config.keys() if config[k] != reference[k]} - {"workdir"}
    assert changed <= {"layer_type"}
    assert 4952 % config.eval_batch_size == 0


def test_all_variants_are_distinct():
    seen = {}
    for path in CONFIG_FILES:
        if path.stem not in ("default", "voc_frcnn_default"):
            fields = tuple(sorted((k, str(v)) for k, v in load(path).items() if k != "workdir"))
            assert fields not in seen, f"{path.stem} equals {seen.get(fields)}"
            seen[fields] = path.stem


def test_overrides_apply():
    config = load(CONFIG_DIR / "cifar10_r20_cnn.py", "--config.num_epochs=1",
                  "--config.learning_rate=0.05", "--config.dataset=synthetic")
    assert (config.num_epochs, config.learning_rate, config.dataset) == (1, 0.05, "synthetic")
    assert config.layer_type == "conv"


def test_unknown_or_mistyped_override_fails_loudly():
    with pytest.raises(AttributeError, match="num_epoch"):
        load(CONFIG_DIR / "default.py", "--config.num_epoch=1")
    with pytest.raises(flags.IllegalFlagValueError):
        load(CONFIG_DIR / "default.py", "--config.num_epochs=ten")
    config = load(CONFIG_DIR / "default.py")
    with pytest.raises(AttributeError):
        config.new_key = 1


def test_detection_smoke_config_is_small():
    config = load(CONFIG_DIR / "voc_frcnn_smoke.py")
    assert config.task == "detection" and config.dataset == "synthetic"
    assert config.layer_type == "adder-awn" and config.image_size <= 64
    assert config.synthetic_num_train // config.batch_size * config.num_epochs <= 512
    assert config.synthetic_num_test % config.eval_batch_size == 0


def test_smoke_config_is_small():
    config = load(CONFIG_DIR / "smoke.py")
    dataset = get_dataset(config)
    assert config.dataset == "synthetic" and config.layer_type == "adder-awn"
    assert dataset.steps_per_epoch(config.batch_size) * config.batch_size <= 256
    assert config.num_epochs <= 2 and config.image_size <= 16
    assert dataset.info.num_test % config.eval_batch_size == 0
