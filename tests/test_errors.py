"""Bad input stops with one clear line before anything is written; a bug keeps its traceback.

The config's values are checked before a workdir exists (``awn_jax.training.config_checks``), the
command-line tools print a ``UserError`` as one line and nothing else, and their console
carries no absl INFO logging (Orbax logs every checkpoint save and restore at INFO).
"""

import math
import os
import re
import subprocess
import sys

import ml_collections
import pytest
from absl import flags
from PIL import Image

from awn_jax import cli
from awn_jax.training import config_checks
from awn_jax.data import get_dataset, image_folder
from awn_jax.config import PAPER_RUNS
from awn_jax.errors import MissingDataError, NonFiniteLossError, UserError
from awn_jax.reproduction import campaign
from awn_jax.training import checkpointing
from awn_jax.training.loop import train_and_evaluate
from configs import default
from test_configs import CONFIG_FILES, DETECTION_FILES, load

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAN = float("nan")
ABSL_LOG_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d", re.MULTILINE)

# What each numeric key of configs/default.py accepts, written out here (not read from the
# code under test): NaN never; a negative value only for eta (<= 0 turns its scaling off);
# zero where it means "all", "off" or "keep every checkpoint", or is a plain count or seed.
NEGATIVE_IS_VALID = {"eta"}
ZERO_IS_VALID = {"seed", "crop_padding", "num_train_examples", "num_test_examples", "eta",
                 "num_devices", "warmup_epochs", "momentum", "weight_decay",
                 "awn_lr_multiplier", "max_checkpoints_to_keep"}
DEFAULT = default.get_config()
NUMERIC_KEYS = sorted(k for k, v in DEFAULT.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool))


def _with(config, **values):
    """An unlocked copy of ``config`` with ``values`` of any type (NaN in an int key too)."""
    return ml_collections.ConfigDict({**config.to_dict(), **values})


def _is_valid(key, value) -> bool:
    if math.isnan(value):
        return False
    if value < 0:
        return key in NEGATIVE_IS_VALID
    return value != 0 or key in ZERO_IS_VALID


def test_every_numeric_key_of_the_default_config_has_a_range():
    assert set(NUMERIC_KEYS) == set(config_checks.NUMBERS)
    assert NEGATIVE_IS_VALID | ZERO_IS_VALID <= set(NUMERIC_KEYS)


@pytest.mark.parametrize("value", [0, -3, NAN], ids=["zero", "negative", "nan"])
@pytest.mark.parametrize("key", NUMERIC_KEYS)
def test_numeric_key_at_zero_negative_and_nan(key, value, tmp_path):
    config = _with(DEFAULT, **{key: value})
    if _is_valid(key, value):
        config_checks.check_config(config)
        return
    workdir = tmp_path / "run"
    with pytest.raises(UserError) as error:
        train_and_evaluate(config, str(workdir))
    message = str(error.value)
    assert message.startswith(f"invalid config value: {key} must be ")
    assert f"got {value!r}" in message and "\n" not in message
    assert not workdir.exists()


def test_values_of_the_wrong_kind_and_unknown_names_are_reported_together():
    config = _with(DEFAULT, batch_size=2.5, nesterov=1, layer_type="adder-xyz",
                   lr_schedule="cosine", data_dir=None, momentum=1.0)
    with pytest.raises(UserError) as error:
        config_checks.check_config(config)
    message = str(error.value)
    assert message.startswith("invalid config values: ") and "\n" not in message
    for part in ("batch_size must be an integer >= 1, got 2.5",
                 "nesterov must be True or False, got 1",
                 "unknown layer_type 'adder-xyz' (expected one of conv, adder, adder-ws, "
                 "adder-awn)",
                 "unknown lr_schedule 'cosine'", "data_dir must be a string, got None",
                 "momentum must be a finite number >= 0 and < 1, got 1.0"):
        assert part in message


def test_skipped_keys_are_left_to_their_own_code():
    config = _with(DEFAULT, dataset="voc")
    with pytest.raises(UserError, match="unknown dataset 'voc'"):
        config_checks.check_config(config)
    config_checks.check_config(config, skip=("dataset",))


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_every_config_file_passes(path):
    """Detection configs have keys of their own (checked by its code) and other datasets."""
    config_checks.check_config(load(path), skip=("dataset",) if path in DETECTION_FILES else ())


@pytest.mark.parametrize("budget", sorted(campaign.BUDGETS))
def test_the_campaign_configs_pass(budget):
    for layer_type in PAPER_RUNS:
        config_checks.check_config(
            campaign.run_config(layer_type, campaign.BUDGETS[budget], "/data/cifar10"))


def test_an_unreadable_image_in_a_folder_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv(image_folder.CACHE_ENV, str(tmp_path / "cache"))
    for split in ("train", "test"):
        (tmp_path / split / "cat").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / split / "cat" / "good.png")
    broken = tmp_path / "train" / "cat" / "broken.png"
    broken.write_bytes(b"not a PNG")
    config = _with(DEFAULT, dataset="image_folder", data_dir=str(tmp_path), image_size=8)
    with pytest.raises(UserError, match=f"cannot read {broken} .*replace or remove it"):
        get_dataset(config)


def test_error_types_are_user_errors_and_the_builtin_a_caller_expects():
    assert issubclass(checkpointing.CheckpointError, UserError)
    assert issubclass(MissingDataError, FileNotFoundError)
    assert issubclass(NonFiniteLossError, FloatingPointError)
    assert all(issubclass(e, ValueError) for e in (UserError, MissingDataError,
                                                   NonFiniteLossError))


# ---------------------------------------------------------------------------- the CLIs

def _run(*args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("overrides, message", [
    (["--config.batch_size=-3"], "batch_size must be an integer >= 1, got -3"),
    (["--config.batch_size=0"], "batch_size must be an integer >= 1, got 0"),
    (["--config.learning_rate=nan", "--config.weight_decay=-1"],
     "learning_rate must be a finite number > 0, got nan; weight_decay must be a finite "
     "number >= 0, got -1.0"),
    (["--config.num_epoch=1"], 'error: unknown config key num_epoch (did you mean '
                               '"num_epochs" instead of "num_epoch"?)'),
    (["--config=configs/no_such_config.py"], "error: cannot load --config "
                                             "configs/no_such_config.py: [Errno 2]"),
])
def test_train_cli_prints_one_line_and_creates_no_workdir(overrides, message, tmp_path):
    workdir = tmp_path / "run"
    result = _run("train.py", "--config", "configs/smoke.py", *overrides,
                  "--workdir", str(workdir))
    assert result.returncode == 1
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "\\" not in result.stderr and result.stdout == ""
    assert not workdir.exists()


@pytest.mark.parametrize("args, message", [
    (["evaluate.py", "--batch_size", "0"], "error: flag --batch_size=0: 0 is not a positive "
                                           "integer"),
    (["analyze.py", "--num_points", "-1"], "error: flag --num_points=-1: -1 is not a "
                                           "non-negative integer"),
])
def test_numeric_flags_out_of_range_are_one_clear_error(args, message):
    result = _run(*args)
    assert result.returncode == 1
    assert result.stderr.startswith(message) and "Traceback" not in result.stderr


def test_dashed_flags_of_earlier_versions_work_with_one_notice_each():
    result = _run("evaluate.py", "--batch-size", "0", "--batch-size=0")
    assert result.returncode == 1
    notice = "note: --batch-size is now spelled --batch_size; the dashed spelling will go\n"
    assert result.stderr.startswith(notice + "error: flag --batch_size=0: 0 is not a positive")
    values = flags.FlagValues()
    flags.DEFINE_bool("bn_stats_augment", False, "", flag_values=values)
    flags.DEFINE_integer("num_examples", None, "", flag_values=values)
    argv = ["x", "--nobn-stats-augment", "--num-examples=5", "--config.data_dir=d",
            "--unknown-flag", "--", "--num-examples"]
    assert cli._underscored(argv, values) == [
        "x", "--nobn_stats_augment", "--num_examples=5", "--config.data_dir=d",
        "--unknown-flag", "--", "--num-examples"]


_CLI_SCRIPT = """
import sys
from absl import logging
from awn_jax import cli
from awn_jax.errors import UserError

def main(argv):
    logging.info("Closing _NonBlockingMetadataStore")  # what Orbax logs
    if sys.argv[1] == "user":
        raise UserError("bad input")
    raise ValueError("a bug")

cli.run(main)
"""


def test_cli_prints_a_user_error_in_one_line_and_a_bug_with_its_traceback():
    user = _run("-c", _CLI_SCRIPT, "user")
    assert (user.returncode, user.stderr) == (1, "error: bad input\n")
    bug = _run("-c", _CLI_SCRIPT, "bug")
    assert bug.returncode == 1
    assert "Traceback" in bug.stderr and bug.stderr.strip().endswith("ValueError: a bug")
    verbose = _run("-c", _CLI_SCRIPT, "user", "--verbosity=0")
    assert "Closing _NonBlockingMetadataStore" in verbose.stderr


def test_evaluate_cli_prints_its_table_without_logging(tmp_path):
    workdir = str(tmp_path / "run")
    config = _with(default.get_config(), dataset="synthetic", normalization="dataset",
                   synthetic_num_train=64, synthetic_num_test=32, image_size=8,
                   crop_padding=1, batch_size=32, num_epochs=1, eval_batch_size=32,
                   num_devices=1, log_every_steps=1, layer_type="adder-awn")
    train_and_evaluate(config, workdir)
    result = _run("evaluate.py", "--workdir", workdir, "--attack", "fgsm", "--bn_mode",
                  "tracked", "--output_dir", str(tmp_path), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[0].startswith("| run | model | BN mode | clean | fgsm |")
    # header, rule, one row; then where the report went
    assert result.stdout.splitlines()[3:] == ["", f"report written to {tmp_path}"]
    assert not ABSL_LOG_LINE.search(result.stderr), result.stderr[-3000:]


def test_offline_tfds_fails_within_seconds_and_names_the_image_folder(tmp_path, monkeypatch):
    """The network blocked (every connection refused): preparing TFDS cifar10 stops before
    TFDS's minutes of retries, writes nothing into its data_dir, and says how to go on."""
    import socket
    import time

    from awn_jax.data import tfds_source

    def refuse(*args, **kwargs):
        raise OSError("network blocked by the test")

    monkeypatch.setattr(socket, "create_connection", refuse)
    config = default.get_config()
    config.update(dataset="cifar10", data_dir=str(tmp_path / "tfds"))
    start = time.monotonic()
    with pytest.raises(MissingDataError, match="cannot be reached.*dataset=image_folder"):
        get_dataset(config)
    assert time.monotonic() - start < 30
    assert not (tmp_path / "tfds").exists() or not any((tmp_path / "tfds").rglob("*"))
    assert tfds_source.DATASETS["cifar10"].download_host == "www.cs.toronto.edu"


def test_an_image_folder_given_as_tfds_data_dir_is_refused(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    config = default.get_config()
    config.update(dataset="cifar10", data_dir=str(tmp_path))
    with pytest.raises(MissingDataError, match="is an image folder.*dataset=image_folder"):
        get_dataset(config)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no cifar10/, downloads/
