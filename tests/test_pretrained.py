"""Shipped models: every one loads offline and gives its manifest's logits; on real
CIFAR-10 test images (when ../shared/data is here) its manifest's clean accuracy; and
export -> load round-trips a run exactly."""

import json
import os
import pathlib
import shutil
import subprocess

import numpy as np
import pytest

from awn_jax import pretrained
from awn_jax.errors import UserError
from awn_jax.training.loop import train_and_evaluate
from awn_jax.training.runs import load_run
from configs import smoke

CIFAR_JPEG_TAR = pathlib.Path(__file__).resolve().parents[2] / "shared/data/cifar10-jpeg.tar"
SHIPPED = pretrained.names()


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_loads_offline_and_gives_its_logits(name):
    run = pretrained.load(name)
    expected = pretrained.manifest()[name]["check_logits"]
    for mode in pretrained.CHECK_BN_MODES:
        logits = np.asarray(run.logits_fn(mode)(pretrained.check_images()))
        np.testing.assert_allclose(logits, expected[mode], rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def cifar_folder(tmp_path_factory):
    if not CIFAR_JPEG_TAR.exists() or shutil.which("tar") is None:
        pytest.skip(f"{CIFAR_JPEG_TAR} (and tar) needed")
    folder = tmp_path_factory.mktemp("cifar10")
    subprocess.run(["tar", "-xf", str(CIFAR_JPEG_TAR), "-C", str(folder)], check=True)
    return str(folder)


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_scores_its_manifest_accuracy_on_real_images(name, cifar_folder):
    entry = pretrained.manifest()[name]
    run = pretrained.load(name, data_dir=cifar_folder)
    images, labels = run.test_set(entry["test_examples"])
    for mode, accuracy in entry["clean_accuracy"].items():
        obtained = run.evaluator.accuracy(images, labels, batch_size=500, bn_mode=mode)
        assert abs(obtained - accuracy) <= 2 / len(labels), (mode, obtained, accuracy)


def test_export_then_load_round_trips(tmp_path):
    config = smoke.get_config()
    config.update(num_epochs=1, synthetic_num_train=64, synthetic_num_test=32, batch_size=32,
                  eval_batch_size=32)
    train_and_evaluate(config, str(tmp_path / "run"))
    run = load_run(str(tmp_path / "run"))
    directory = str(tmp_path / "weights")
    entry = pretrained.export(run, "smoke_awn", directory, budget="1 epoch, synthetic")
    assert entry["sha256"] and entry["budget"] == "1 epoch, synthetic"
    loaded = pretrained.load("smoke_awn", directory=directory)
    images = pretrained.check_images()[:, :16, :16]
    for mode in pretrained.CHECK_BN_MODES:
        np.testing.assert_array_equal(np.asarray(loaded.logits_fn(mode)(images)),
                                      np.asarray(run.logits_fn(mode)(images)))
    with open(os.path.join(directory, "smoke_awn.npz"), "ab") as f:
        f.write(b"damage")
    with pytest.raises(UserError, match="sha256"):
        pretrained.load("smoke_awn", directory=directory)
    with pytest.raises(UserError, match="no shipped model 'nope'"):
        pretrained.load("nope", directory=directory)
    with open(os.path.join(directory, "manifest.json")) as f:
        assert set(json.load(f)) == {"smoke_awn"}
