"""Detection training end to end on tiny synthetic runs: one step per layer type, 8 devices
against one, resume after a kill, backbone from a classification workdir, mAP from a
workdir."""

import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from awn_jax.detection import data, training
from awn_jax.distributed import make_mesh
from awn_jax.ops import adder_vjp
from awn_jax.training import checkpointing
from awn_jax.training.metrics import read_metrics
from awn_jax.training.state import create_train_state
from configs import smoke, voc_frcnn_smoke

COMPARED = ("train_loss", "train_rpn_objectness", "train_roi_classification", "test_map",
            "learning_rate", "bn_mean_drift")


def tiny_config(**overrides):
    config = voc_frcnn_smoke.get_config()
    config.update(dict(synthetic_num_train=8, synthetic_num_test=4, batch_size=4,
                       eval_batch_size=4, num_epochs=2, eval_every_epochs=1, num_devices=1,
                       fpn_channels=16, box_head_dim=32, rpn_batch_size_per_image=32,
                       rpn_pre_nms_topk_train=50, rpn_post_nms_topk_train=20,
                       rpn_pre_nms_topk_test=50, rpn_post_nms_topk_test=20,
                       roi_batch_size_per_image=16, test_candidates_per_class=10,
                       test_detections_per_image=10, warmup_steps=2, log_every_steps=1))
    config.update(overrides)
    return config


def one_step(config, devices=1):
    dataset = data.get_dataset(config)
    trainer = training.DetectionTrainer(config, dataset, make_mesh(devices))
    before = jax.device_get(trainer.initial_state)
    batch = next(dataset.train_batches(0, config.batch_size))
    state, metrics = trainer.train_step(trainer.initial_state, trainer.parallel.global_batch(batch))
    return before, jax.device_get(state), jax.device_get(metrics)


# Each compiles a ResNet-18 Faster R-CNN step: 30-40 s without the compilation cache.
@pytest.mark.parametrize("layer_type", [
    "conv", pytest.param("adder", marks=pytest.mark.slow),
    pytest.param("adder-ws", marks=pytest.mark.slow), "adder-awn"])
def test_one_train_step_per_layer_type(layer_type):
    before, after, metrics = one_step(tiny_config(layer_type=layer_type))
    assert int(after.step) == 1
    assert set(metrics) == {"loss"} | set(training.LOSS_NAMES)
    assert all(np.isfinite(v) for v in metrics.values())
    np.testing.assert_allclose(metrics["loss"], sum(metrics[k] for k in training.LOSS_NAMES),
                               rtol=1e-5)
    neck_kernel = lambda s: s.params["neck"]["output"][0]["conv"]["kernel"][...]  # noqa: E731
    assert not np.allclose(neck_kernel(before), neck_kernel(after))
    stem_mean = lambda s: s.batch_stats["backbone"]["stem_bn"]["mean"][...]  # noqa: E731
    assert not np.allclose(stem_mean(before), stem_mean(after))  # BatchNorm is trained


def test_eight_devices_give_the_loss_of_one(monkeypatch):
    assert len(jax.devices()) == 8, "tests/conftest.py asks for 8 CPU devices"
    splits = []  # how the adder layers split the batch, seen while tracing
    batch_axes = adder_vjp.batch_axes

    def recorded(batch_size):
        splits.append(batch_axes(batch_size))
        return splits[-1]

    monkeypatch.setattr(adder_vjp, "batch_axes", recorded)
    config = tiny_config(layer_type="adder", batch_size=8, eval_batch_size=8,
                         synthetic_num_train=16)
    results = {}
    for devices in (1, 8):
        results[devices] = one_step(config, devices)[1:]
        assert splits and set(splits) == ({()} if devices == 1 else {("data",)})
        splits.clear()
    (state1, metrics1), (state8, metrics8) = results[1], results[8]
    chex.assert_trees_all_close(metrics1, metrics8, rtol=1e-5)
    chex.assert_trees_all_close(state1.params, state8.params, rtol=1e-4, atol=1e-5)


class _Killed(Exception):
    pass


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    training.train_and_evaluate(tiny_config(), workdir)
    return workdir


def compared(metrics):
    return [{k: m[k] for k in COMPARED} for m in metrics]


def test_run_writes_metrics_checkpoints_and_the_ap_table(uninterrupted):
    metrics = read_metrics(uninterrupted)
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert all(0.0 <= m["test_map"] <= 1.0 for m in metrics)
    assert sorted(os.listdir(os.path.join(uninterrupted, "checkpoints"))) == ["1", "2"]
    saved = checkpointing.load_config_dict(uninterrupted)
    assert saved["task"] == "detection" and saved["layer_type"] == "adder-awn"
    with open(os.path.join(uninterrupted, "detection_eval.md")) as f:
        table = f.read()
    assert "after epoch 2" in table and "| square0 |" in table and "**mAP**" in table


def test_resume_after_a_kill_repeats_the_uninterrupted_run(uninterrupted, tmp_path,
                                                           monkeypatch):
    workdir = str(tmp_path)
    original = data.DetectionDataset.train_batches

    def killed_in_second_epoch(self, epoch, *args, **kwargs):
        for step, batch in enumerate(original(self, epoch, *args, **kwargs)):
            if epoch == 1 and step == 1:
                raise _Killed
            yield batch

    monkeypatch.setattr(data.DetectionDataset, "train_batches", killed_in_second_epoch)
    with pytest.raises(_Killed):
        training.train_and_evaluate(tiny_config(), workdir)
    assert [m["epoch"] for m in read_metrics(workdir)] == [1]
    monkeypatch.setattr(data.DetectionDataset, "train_batches", original)
    training.train_and_evaluate(tiny_config(), workdir)
    assert compared(read_metrics(workdir)) == compared(read_metrics(uninterrupted))


def test_evaluate_workdir_reports_the_runs_map(uninterrupted, tmp_path):
    result = training.evaluate_workdir(uninterrupted, output_dir=str(tmp_path))
    assert result["map"] == pytest.approx(read_metrics(uninterrupted)[-1]["test_map"])
    assert "**mAP**" in result["table"]
    assert os.path.exists(tmp_path / "detection_eval.json")
    with pytest.raises(checkpointing.CheckpointError, match="no checkpoint of epoch 7"):
        training.evaluate_workdir(uninterrupted, epoch=7)


def classification_workdir(path, layer_type):
    """A classification run's workdir holding one checkpoint of a fresh ResNet-18."""
    config = smoke.get_config()
    config.update(dict(model="resnet18", layer_type=layer_type, image_size=32))
    from awn_jax import data as classification_data  # pylint: disable=import-outside-toplevel
    info = classification_data.get_dataset(config).info
    _, _, state = create_train_state(config, info, steps_per_epoch=1)
    os.makedirs(path)
    checkpointing.check_or_save_config(config, str(path))
    checkpointing.save_dataset_info(info, str(path))
    manager = checkpointing.make_manager(str(path))
    checkpointing.save(manager, 1, state)
    manager.wait_until_finished()
    manager.close()
    return state


def test_backbone_starts_from_a_classification_workdir(tmp_path):
    workdir = tmp_path / "classification"
    # Another seed than the detector's, so a fresh backbone would differ.
    saved = classification_workdir(workdir, "adder-awn")
    saved_kernel = saved.params["stages"][2][1]["conv2"]["kernel"][...]
    config = tiny_config(backbone_workdir=str(workdir), seed=5)
    _, _, state = training.create_detection_state(config, data.get_dataset(config).info, 10)
    np.testing.assert_array_equal(
        state.params["backbone"]["stages"][2][1]["conv2"]["kernel"][...], saved_kernel)
    np.testing.assert_array_equal(state.params["backbone"]["stem_conv"]["kernel"][...],
                                  saved.params["stem_conv"]["kernel"][...])
    _, _, fresh = training.create_detection_state(tiny_config(seed=5),
                                                  data.get_dataset(config).info, 10)
    assert not np.allclose(fresh.params["backbone"]["stem_conv"]["kernel"][...],
                           saved.params["stem_conv"]["kernel"][...])
    with pytest.raises(ValueError, match="layer_type='adder-awn'"):
        training.create_detection_state(tiny_config(backbone_workdir=str(workdir),
                                                    layer_type="adder"),
                                        data.get_dataset(config).info, 10)


def test_bad_settings_are_clear_errors():
    config = tiny_config(num_devices=8, batch_size=4)
    with pytest.raises(ValueError, match="batch_size 4 is not divisible by the 8 devices"):
        training.DetectionTrainer(config, data.get_dataset(config), make_mesh(8))
    with pytest.raises(ValueError, match="warmup_steps"):
        training.optimizer_config(tiny_config(warmup_steps=-1), 10)
    assert training.optimizer_config(tiny_config(warmup_steps=5), 10).warmup_epochs == 0.5
    assert jnp.isfinite(training.optimizer_config(tiny_config(), 3).learning_rate)


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("override, message", [
    ("--config.dataset=coco", "unknown detection dataset 'coco'"),
    ("--config.layer_type=foo", "unknown layer_type 'foo'"),
    ("--config.image_size=100", "image_size 100 must be a multiple of 64"),
    ("--config.bogus=1", "unknown config key bogus"),
])
def test_train_cli_reports_bad_detection_input_in_one_line(override, message, tmp_path):
    result = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/voc_frcnn_smoke.py", override,
         "--workdir", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr
    assert os.listdir(tmp_path) == []


def test_evaluate_cli_prints_the_map_table_of_a_detection_workdir(uninterrupted, tmp_path):
    result = subprocess.run(
        [sys.executable, "evaluate.py", "--workdir", uninterrupted, "--output_dir",
         str(tmp_path)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    expected = 100 * read_metrics(uninterrupted)[-1]["test_map"]
    assert "| **mAP** | " in result.stdout and f"**{expected:.1f}**" in result.stdout
    assert f"| ANN-AWN-FPN | adder-awn | {uninterrupted} | 2 | {expected:.1f} |" in result.stdout
    assert os.path.exists(tmp_path / "detection_eval.md")
