"""Diagnostics of the BatchNorm statistics (awn_jax.stability.bn_diagnostics): the variance
gain through a linear path is its closed form, the variance ratio is a direct computation,
the variance factor 1 and the batch study reproduce plain evaluations, and analyze.py runs
them."""

import os
import subprocess
import sys

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax import lax

from awn_jax.model import split_model
from awn_jax.nn import BatchNorm, Conv2d
from awn_jax.stability import bn_diagnostics
from awn_jax.training.runs import Run
from workdirs import random_workdir

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Path(nnx.Module):
    """conv -> BN -> ReLU -> layer -> BN: between the two BNs a ReLU (positively
    homogeneous) and a multiplying convolution (linear), or an adder layer (neither)."""

    def __init__(self, rngs, layer_type="conv"):
        self.conv1 = Conv2d(3, 4, 3, layer_type="conv", rngs=rngs)
        self.bn1 = BatchNorm(4)
        self.conv2 = Conv2d(4, 5, 3, layer_type=layer_type, rngs=rngs)
        self.bn2 = BatchNorm(5)

    def __call__(self, x):
        y = nnx.relu(self.bn1(self.conv1(x)))
        return jnp.mean(self.bn2(self.conv2(y)), axis=(1, 2))


def _run(layer_type="conv", shift=True):
    graphdef, params, batch_stats = split_model(Path(nnx.Rngs(0), layer_type))
    rng = np.random.default_rng(0)
    batch_stats["bn1"]["mean"][...] = rng.normal(0, 0.3, 4).astype(np.float32)
    batch_stats["bn1"]["var"][...] = rng.uniform(0.05, 0.2, 4).astype(np.float32)
    params["bn1"]["bias"][...] = rng.normal(0, 1, 4).astype(np.float32) * shift
    config = ml_collections.ConfigDict({"layer_type": "conv"})
    return Run("toy", config, None, 0, graphdef, params, batch_stats)


def _images(n=40):
    return np.random.default_rng(1).random((n, 6, 6, 3), dtype=np.float32)


@pytest.mark.parametrize("mode", ["tracked", "running-mean", "running"])
def test_gain_through_a_homogeneous_path_is_the_square_of_the_scale(mode):
    """BN without a shift: relu(s y) = s relu(y) for s > 0 and the convolution is linear,
    so the next BN's input is scaled by s exactly, its variance by s**2, whatever the BN
    mode upstream."""
    (row,) = bn_diagnostics.variance_gains(_run(shift=False), _images(), bn_mode=mode,
                                           scale=1.1, batch_size=20)
    assert (row["layer"], row["next"]) == ("bn1", "bn2")
    assert row["gain"] == pytest.approx(1.21, rel=1e-5)
    assert row["min"] == pytest.approx(1.21, rel=1e-5)
    assert row["max"] == pytest.approx(1.21, rel=1e-5)
    assert row["elasticity"] == pytest.approx(1.0, abs=1e-4)


def test_the_scaling_keeps_the_shift_and_an_adder_layer_is_not_homogeneous():
    """With a shift, relu(b + s d) is not s relu(b + d): the gain moves off s**2 even on a
    multiplying path; an adder layer moves it too."""
    for run in (_run(), _run("adder", shift=False)):
        (row,) = bn_diagnostics.variance_gains(run, _images(), scale=1.1, batch_size=20)
        assert abs(row["gain"] - 1.21) > 1e-3


def test_variance_ratio_is_the_mean_square_over_the_stored_variance():
    run = _run()
    images = _images()
    kernel = np.asarray(nnx.merge(run.graphdef, run.params, run.batch_stats).conv1
                        .effective_kernel(), np.float64)
    x = np.asarray(lax.conv_general_dilated(
        images.astype(np.float64), kernel, (1, 1), [(1, 1)] * 2,
        dimension_numbers=("NHWC", "HWIO", "NHWC")), np.float64)
    stored_mean = np.asarray(run.batch_stats["bn1"]["mean"][...], np.float64)
    stored_var = np.asarray(run.batch_stats["bn1"]["var"][...], np.float64)
    tracked = bn_diagnostics.variance_ratios(run, images, bn_mode="tracked", batch_size=20)
    expected = np.mean((x - stored_mean) ** 2, axis=(0, 1, 2)) / stored_var
    assert tracked[0]["layer"] == "bn1"
    assert tracked[0]["mean"] == pytest.approx(expected.mean(), rel=1e-4)
    assert tracked[0]["max"] == pytest.approx(expected.max(), rel=1e-4)
    # running-mean: deviations from each batch's own mean.
    batches = x.reshape(2, 20, *x.shape[1:])
    centered = batches - batches.mean(axis=(1, 2, 3), keepdims=True)
    expected = np.mean(np.mean(centered ** 2, axis=(1, 2, 3)), axis=0) / stored_var
    (first, _) = bn_diagnostics.variance_ratios(run, images, bn_mode="running-mean",
                                                batch_size=20)
    assert first["mean"] == pytest.approx(expected.mean(), rel=1e-4)


def test_variance_factor_one_and_batch_study_are_plain_evaluations():
    run = _run()
    images = _images(60)
    labels = np.arange(60) % 3
    rows = bn_diagnostics.variance_scale_accuracy(run, images, labels, bn_modes=("running-mean",),
                                                  factors=(0.5, 1.0), batch_size=20)
    plain = run.evaluator.accuracy(images, labels, batch_size=20, bn_mode="running-mean")
    assert [r["factor"] for r in rows] == [0.5, 1.0] and rows[1]["accuracy"] == plain
    batch = bn_diagnostics.batch_accuracy(run, images, labels, batch_sizes=(20, 60),
                                          single_class_batch=10)
    assert [r["batch_size"] for r in batch["batch_sizes"]] == [20, 60]
    assert batch["batch_sizes"][0]["accuracy"] == plain
    assert batch["num_single_class"] == 60
    order = np.argsort(labels, kind="stable")
    assert batch["single_class"]["running-mean"]["single-class"] == run.evaluator.accuracy(
        images[order], labels[order], batch_size=10, bn_mode="running-mean")


def test_augmentation_trigger_pads_crops_and_flips_the_test_images():
    run = _run()
    run.config.update({"crop_padding": 2, "random_flip": True})
    images, labels = _images(40), np.arange(40) % 3
    trigger = bn_diagnostics.augmentation_trigger(run, images, labels, bn_modes=("tracked",),
                                                  batch_size=20)
    rng = np.random.default_rng(0)
    offsets = rng.integers(0, 5, size=(40, 2))
    flips = rng.random(40) < 0.5
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
    augmented = np.stack([padded[i, o[0]:o[0] + 6, o[1]:o[1] + 6][:, ::-1 if f else 1]
                          for i, (o, f) in enumerate(zip(offsets, flips))])
    assert trigger["accuracy"]["tracked"]["augmented"] == run.evaluator.accuracy(
        augmented, labels, batch_size=20, bn_mode="tracked")
    ratios = [bn_diagnostics.variance_ratios(run, x, bn_mode="tracked", batch_size=20)[0]
              for x in (augmented, images)]
    assert trigger["first_bn_widening"] == pytest.approx(ratios[0]["mean"] / ratios[1]["mean"])
    run.config.crop_padding = 0
    assert bn_diagnostics.augmentation_trigger(run, images, labels) is None


def test_analyze_cli_diagnoses_a_workdir(tmp_path):
    """A random ResNet-20 workdir on synthetic images, diagnosed through analyze.py."""
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    random_workdir(workdir, layer_type="adder-ws", image_size=8, crop_padding=0,
                   synthetic_num_train=64, synthetic_num_test=100, batch_size=32)
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "analyze.py", "--study", "bn-diagnostics", "--workdir", workdir,
         "--batch_size", "50", "--num_examples", "100", "--bn_stats", "reestimate",
         "--bn_stats_images", "64", "--single_class_batch", "5",
         "--output_dir", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for suffix in ("json", "md", "png"):
        assert (out / f"bn_diagnostics+reestimate-64.{suffix}").exists()
    assert "re-estimated on 64 un-augmented training images" in result.stdout
    assert "| stem_bn |" in result.stdout
    assert "augmented images" not in result.stdout  # crop_padding 0: no trigger to show
