"""The training loop end to end on synthetic data: metrics, checkpoints, resume, data
parallelism, and the failures that must stop a run without losing anything."""

import os
import shutil
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from awn_jax import data
from awn_jax.distributed import make_mesh
from awn_jax.ops import adder_vjp
from awn_jax.training import checkpointing
from awn_jax.training.runs import load_run
from awn_jax.training.loop import Trainer, train_and_evaluate
from awn_jax.training import loop as train_module
from awn_jax.training.metrics import read_metrics
from configs import smoke

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPARED = ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "learning_rate",
            "bn_mean_drift", "bn_var_drift")


def _config(**overrides):
    config = smoke.get_config()
    config.update(dict(synthetic_num_train=96, synthetic_num_test=48, batch_size=32,
                       eval_batch_size=48, image_size=8, crop_padding=1, num_epochs=2,
                       num_devices=1, log_every_steps=2))
    config.update(overrides)
    return config


def _compared(metrics):
    return [{k: m[k] for k in COMPARED} for m in metrics]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    train_and_evaluate(_config(), workdir)
    return workdir


def test_smoke_run_writes_metrics_checkpoints_and_config(uninterrupted):
    metrics = read_metrics(uninterrupted)
    assert [m["epoch"] for m in metrics] == [1, 2]
    for m in metrics:
        assert all(np.isfinite(m[k]) for k in COMPARED + ("images_per_second",))
        assert 0.0 <= m["test_accuracy"] <= 1.0
    assert sorted(os.listdir(os.path.join(uninterrupted, "checkpoints"))) == ["1", "2"]
    saved = checkpointing.load_config_dict(uninterrupted)
    assert saved["layer_type"] == "adder-awn" and saved["num_epochs"] == 2
    info = checkpointing.load_dataset_info(uninterrupted)
    assert (info["num_classes"], info["num_train"], info["image_shape"]) == (10, 96, [8, 8, 3])
    assert os.listdir(os.path.join(uninterrupted, "tensorboard"))


class _Killed(Exception):
    pass


def test_resume_after_a_kill_repeats_the_uninterrupted_run(uninterrupted, tmp_path,
                                                           monkeypatch):
    workdir = str(tmp_path)
    original = data.Dataset.train_batches

    def killed_in_second_epoch(self, epoch, *args, **kwargs):
        for step, batch in enumerate(original(self, epoch, *args, **kwargs)):
            if epoch == 1 and step == 2:
                raise _Killed
            yield batch

    monkeypatch.setattr(data.Dataset, "train_batches", killed_in_second_epoch)
    with pytest.raises(_Killed):
        train_and_evaluate(_config(), workdir)
    assert [m["epoch"] for m in read_metrics(workdir)] == [1]
    monkeypatch.setattr(data.Dataset, "train_batches", original)
    train_and_evaluate(_config(), workdir)
    assert _compared(read_metrics(workdir)) == _compared(read_metrics(uninterrupted))


def test_eight_devices_give_the_loss_of_one(monkeypatch):
    assert len(jax.devices()) == 8, "tests/conftest.py asks for 8 CPU devices"
    config = _config(batch_size=32)
    dataset = data.get_dataset(config)
    batch = next(dataset.train_batches(0, config.batch_size))
    splits = []  # how the adder layers split the batch, seen while tracing
    batch_axes = adder_vjp.batch_axes

    def recorded_batch_axes(batch_size):
        splits.append(batch_axes(batch_size))
        return splits[-1]

    monkeypatch.setattr(adder_vjp, "batch_axes", recorded_batch_axes)
    results = []
    for devices in (1, 8):
        trainer = Trainer(config, dataset, make_mesh(devices))
        state, metrics = trainer.train_step(trainer.initial_state,
                                             trainer.parallel.global_batch(batch))
        results.append((jax.device_get(metrics), jax.device_get(state.params)))
        # One device: whole; eight: every adder layer's kernels run per batch shard.
        assert splits and set(splits) == ({()} if devices == 1 else {("data",)})
        splits.clear()
    (m1, p1), (m8, p8) = results
    chex.assert_trees_all_close(m1, m8, rtol=1e-5)
    chex.assert_trees_all_close(p1, p8, rtol=1e-4, atol=1e-5)


def test_eight_device_run_matches_one_device_run(tmp_path):
    """The whole loop on 8 devices: the adder kernels run per batch shard in training, and
    in evaluation test batches of 20 run whole on every device while the last one, of 8,
    is split; the epoch's metrics are the single device's."""
    metrics = {devices: train_and_evaluate(_config(num_epochs=1, num_devices=devices,
                                                   eval_batch_size=20),
                                           str(tmp_path / f"devices_{devices}"))
               for devices in (1, 8)}
    # Three steps of float32 sums in another order: with the official init of the
    # classifier (U(+-1/8), then a BatchNorm that divides by its small std) the losses
    # drift apart by 5e-4 relative (2.3e-3 with JAX 0.7); one step agrees to 1e-5 (the
    # test above).
    for key in ("train_loss", "test_loss", "bn_mean_drift"):
        np.testing.assert_allclose(metrics[8][key], metrics[1][key], rtol=5e-3)
    # An argmax may flip on a near tie after a different summation order: one of 48 images.
    assert abs(metrics[8]["test_accuracy"] - metrics[1]["test_accuracy"]) <= 1 / 48 + 1e-9


def test_batch_not_divisible_by_devices_is_a_clear_error():
    config = _config(batch_size=36, num_devices=8)
    with pytest.raises(ValueError, match="not divisible by the 8 devices"):
        Trainer(config, data.get_dataset(config), make_mesh(8))


def test_corrupt_checkpoint_stops_the_run_and_is_kept(uninterrupted, tmp_path):
    workdir = str(tmp_path / "corrupt")
    os.makedirs(workdir)
    os.system(f"cp -r {uninterrupted}/checkpoints {uninterrupted}/config.json {workdir}/")
    damaged = []
    for root, _, files in os.walk(os.path.join(workdir, "checkpoints", "2")):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "wb") as f:
                f.write(b"not a checkpoint")
            damaged.append(path)
    with pytest.raises(checkpointing.CheckpointError, match="epoch 2.*left untouched"):
        train_and_evaluate(_config(num_epochs=3), workdir)
    for path in damaged:
        with open(path, "rb") as f:
            assert f.read() == b"not a checkpoint"


def _snapshot(directory):
    """Every file under ``directory`` and its bytes."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                out[os.path.relpath(os.path.join(root, name), directory)] = f.read()
    return out


def _largest(paths):
    return max(paths, key=os.path.getsize)


# One file of each kind in the checkpoint of epoch 2, cut to half its size: the array data
# (the ocdbt data files under d/), the tree metadata and the step's own metadata.
CHECKPOINT_FILES = {
    "array data": lambda step: _largest([os.path.join(root, f) for root, _, files in
                                         os.walk(step) for f in files
                                         if os.path.basename(root) == "d"]),
    "tree metadata": lambda step: os.path.join(step, "default", "_METADATA"),
    "step metadata": lambda step: os.path.join(step, "_CHECKPOINT_METADATA"),
}


@pytest.mark.parametrize("kind", sorted(CHECKPOINT_FILES))
def test_a_truncated_checkpoint_file_is_one_error_and_changes_nothing(kind, uninterrupted,
                                                                      tmp_path):
    """Resuming with a longer run (which would rewrite config.json) and evaluating both stop
    with one CheckpointError naming the epoch, and every file of the workdir is as it was."""
    workdir = str(tmp_path / "truncated")
    shutil.copytree(uninterrupted, workdir)
    path = CHECKPOINT_FILES[kind](os.path.join(workdir, "checkpoints", "2"))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    before = _snapshot(workdir)
    with pytest.raises(checkpointing.CheckpointError, match="epoch 2"):
        train_and_evaluate(_config(num_epochs=3), workdir)
    assert _snapshot(workdir) == before
    with pytest.raises(checkpointing.CheckpointError, match="epoch 2"):
        load_run(workdir)
    assert _snapshot(workdir) == before


def test_a_run_says_what_it_does_and_where_things_are(uninterrupted, capsys, monkeypatch):
    """A finished run writes its curves; rerunning it says so in one line without loading
    data or compiling; a different config is still refused."""
    assert os.path.exists(os.path.join(uninterrupted, "curves.png"))
    monkeypatch.setattr(data, "get_dataset", lambda config: pytest.fail("loaded the data"))
    metrics = train_and_evaluate(_config(), uninterrupted)
    assert metrics == read_metrics(uninterrupted)[-1]
    out = capsys.readouterr().out
    assert "has finished its 2 epochs" in out and "test accuracy" in out
    with pytest.raises(checkpointing.CheckpointError, match="layer_type"):
        train_and_evaluate(_config(layer_type="adder"), uninterrupted)


def test_start_banner_and_end_summary(tmp_path, capsys):
    train_and_evaluate(_config(num_epochs=1), str(tmp_path / "run"))
    out = capsys.readouterr().out
    assert "training resnet20" in out and "steps of" in out and str(tmp_path / "run") in out
    assert "1 epochs; test accuracy" in out and "curves.png" in out


def test_a_workdir_saved_before_the_architecture_keys_still_resumes(uninterrupted, tmp_path):
    """Runs saved before ``shortcut`` and ``head`` existed had the projection shortcut and
    the conv + BN head: the same config, not another one."""
    import json

    workdir = str(tmp_path / "old")
    shutil.copytree(uninterrupted, workdir)
    path = os.path.join(workdir, "config.json")
    with open(path) as f:
        saved = json.load(f)
    with open(path, "w") as f:
        json.dump({k: v for k, v in saved.items() if k not in ("shortcut", "head")}, f)
    checkpointing.check_config(_config(), workdir)
    with pytest.raises(checkpointing.CheckpointError, match="head"):
        checkpointing.check_config(_config(head="linear"), workdir)


def test_a_missing_workdir_is_named_as_such(tmp_path):
    with pytest.raises(checkpointing.CheckpointError, match="no such workdir"):
        load_run(str(tmp_path / "nowhere"))


def test_workdir_of_another_config_is_refused(uninterrupted):
    before = read_metrics(uninterrupted)
    with pytest.raises(checkpointing.CheckpointError, match="layer_type"):
        train_and_evaluate(_config(layer_type="adder"), uninterrupted)
    assert read_metrics(uninterrupted) == before


def test_nan_loss_stops_at_its_step_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    """The loss of step 5 (the 2nd of epoch 2) turns NaN inside the jitted step.
    (NaN inputs would not do: ReLU on XLA:CPU maps NaN to 0.)"""
    workdir = str(tmp_path)
    real_step = train_module.train_step

    def step_with_nan_at_5(graphdef, tx, state, batch):
        new_state, metrics = real_step(graphdef, tx, state, batch)
        metrics["loss"] = jnp.where(state.step == 4, jnp.nan, metrics["loss"])
        return new_state, metrics

    monkeypatch.setattr(train_module, "train_step", step_with_nan_at_5)
    with pytest.raises(FloatingPointError, match=r"step 5 \(epoch 2\)"):
        train_and_evaluate(_config(), workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1"]
    assert [m["epoch"] for m in read_metrics(workdir)] == [1]


@pytest.mark.parametrize("override, message", [
    ("--config.bogus=1", "unknown config key bogus"),
    ("--config.batch_size=abc", "config.batch_size"),
    ("--config.layer_type=foo", "unknown layer_type 'foo'"),
    ("--config.dataset=mnist", "unknown dataset 'mnist'"),
])
def test_cli_reports_bad_input_in_one_line(override, message, tmp_path):
    result = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/smoke.py", override,
         "--workdir", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert os.listdir(tmp_path) == []
