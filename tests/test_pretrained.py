"""Shipped models: every one loads offline and gives its manifest's logits; on real
CIFAR-10 test images (when ../shared/data is here) its manifest's clean accuracy; and
export -> load round-trips a run exactly."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from awn_jax import paths, pretrained
from awn_jax.errors import UserError
from awn_jax.training.loop import train_and_evaluate
from awn_jax.training.runs import load_run
from configs import smoke

CIFAR_JPEG_TAR = pathlib.Path(__file__).resolve().parents[2] / "shared/data/cifar10-jpeg.tar"
SHIPPED = pretrained.names()


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_loads_offline_and_gives_its_logits(name):
    """Up to float32 summation order (XLA's optimization level differs between the tests and
    the export): the 400-epoch official AdderNet sums hundreds of terms of size ~1e2 per
    adder output, which moves its logits by up to about 1e-3 of their size on these noise images
    (3e-4 seen under running-mean with JAX 0.10, 1.1e-3 with JAX 0.7's XLA); the 100-epoch
    ANN-AWN under running-mean (the batch statistics of 16 noise images) by 2.0e-3 of their
    size with JAX 0.7.1 (one logit of 160: 0.4254 against 0.4292, the largest 1.86)."""
    run = pretrained.load(name)
    expected = pretrained.manifest()[name]["check_logits"]
    for mode in pretrained.CHECK_BN_MODES:
        logits = np.asarray(run.logits_fn(mode)(pretrained.check_images()))
        scale = float(np.max(np.abs(expected[mode])))
        np.testing.assert_allclose(logits, expected[mode], rtol=1e-4,
                                   atol=max(1e-4, 3e-3 * scale))


@pytest.fixture(scope="module")
def cifar_folder(tmp_path_factory):
    """The JPEG copy extracted to a temporary folder, its decoded arrays cached beside it
    (a cache keyed by a temporary path would only fill the shared one)."""
    if not CIFAR_JPEG_TAR.exists() or shutil.which("tar") is None:
        pytest.skip(f"{CIFAR_JPEG_TAR} (and tar) needed")
    folder = tmp_path_factory.mktemp("cifar10")
    subprocess.run(["tar", "-xf", str(CIFAR_JPEG_TAR), "-C", str(folder)], check=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(paths.CACHE_ENV, str(folder / "cache"))
        yield str(folder)


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
    package = str(tmp_path / "package")  # a folder with a model already, as the package's
    pretrained.export(run, "older", package, budget="kept")
    assert pretrained.copy_models(directory, package) == ["smoke_awn"]
    assert pretrained.names(package) == ["older", "smoke_awn"]
    np.testing.assert_array_equal(
        np.asarray(pretrained.load("smoke_awn", directory=package).logits_fn("tracked")(images)),
        np.asarray(run.logits_fn("tracked")(images)))
    with open(os.path.join(directory, "smoke_awn.npz"), "ab") as f:
        f.write(b"damage")
    with pytest.raises(UserError, match="sha256"):
        pretrained.load("smoke_awn", directory=directory)
    with pytest.raises(UserError, match="sha256"):
        pretrained.copy_models(directory, package)
    with pytest.raises(UserError, match="no manifest.json"):
        pretrained.copy_models(str(tmp_path / "nothing"), package)
    with pytest.raises(UserError, match="no shipped model 'nope'"):
        pretrained.load("nope", directory=directory)
    with open(os.path.join(directory, "manifest.json")) as f:
        assert set(json.load(f)) == {"smoke_awn"}


# ------------------------------------------------- the imported models of other repositories

EXACT_SAMPLES = CIFAR_JPEG_TAR.parent / "exact-cifar10-samples"
# ../shared/data/pretrained-reference/README.md, measured there with independent PyTorch
# forwards: correct of the 20 exact images (tracked); accuracy % on every 10th JPEG test
# image of each class, batches of 500 mixed across classes: tracked, running-mean, running.
STATED = {"cifar10_r20_ann_official": (20, (80.9, 75.3, 78.8)),
          "cifar10_r20_cnn_ref": (20, (79.5, 71.2, 76.9)),
          "cifar10_r32_cnn_ref": (19, (80.8, 68.4, 78.7))}


@pytest.mark.parametrize("name", sorted(STATED))
def test_imported_model_classifies_the_exact_images_as_stated(name):
    if not EXACT_SAMPLES.is_dir():
        pytest.skip(f"{EXACT_SAMPLES} is not here (../shared/data)")
    from PIL import Image

    files = sorted(EXACT_SAMPLES.glob("cifar10_*.png"))
    images = np.stack([np.asarray(Image.open(f).convert("RGB"), np.float32) / 255
                       for f in files])
    labels = np.asarray([int(f.stem.rsplit("_", 1)[1]) for f in files])
    run = pretrained.load(name)
    predicted = np.argmax(np.asarray(run.logits_fn("tracked")(images)), axis=-1)
    assert (len(files), int(np.sum(predicted == labels))) == (20, STATED[name][0])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(STATED))
def test_imported_model_scores_the_stated_jpeg_accuracy(name, cifar_folder):
    """Within one standard error under tracked (the same 1,000 images, batch-independent);
    within two under the batch modes, whose batches' mixing the README does not give."""
    from PIL import Image

    classes = sorted(os.listdir(os.path.join(cifar_folder, "test")))
    files = [(os.path.join(cifar_folder, "test", c, f), label)
             for label, c in enumerate(classes)
             for f in sorted(os.listdir(os.path.join(cifar_folder, "test", c)))[::10]]
    order = np.random.default_rng(0).permutation(len(files))
    images = np.stack([np.asarray(Image.open(files[i][0]).convert("RGB"), np.float32) / 255
                       for i in order])
    labels = np.asarray([files[i][1] for i in order])
    run = pretrained.load(name)
    for mode, stated, sigmas in zip(("tracked", "running-mean", "running"), STATED[name][1],
                                    (1, 2, 2)):
        obtained = 100 * run.evaluator.accuracy(images, labels, batch_size=500, bn_mode=mode)
        se = 100 * np.sqrt(stated / 100 * (1 - stated / 100) / len(labels))
        assert abs(obtained - stated) <= sigmas * se, (mode, obtained, stated, se)


def test_pretrained_reports_land_where_the_cli_says(cifar_folder, tmp_path):
    """Without --output_dir a shipped model's report goes to awn-reports/NAME under the
    current directory, and the CLI prints that path."""
    repo = pathlib.Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, str(repo / "evaluate.py"), "--pretrained", "cifar10_r20_cnn_10ep",
         "--data_dir", cifar_folder, "--attack", "fgsm", "--bn_mode", "tracked",
         "--num_examples", "20", "--batch_size", "20"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(repo)})
    assert result.returncode == 0, result.stderr[-2000:]
    report = tmp_path / "awn-reports" / "cifar10_r20_cnn_10ep"
    assert (report / "robustness.json").exists() and (report / "robustness.md").exists()
    assert f"report written to {report}" in result.stdout
    assert json.loads((report / "robustness.json").read_text())[0]["num_examples"] == 20
