"""Stability studies on a tiny run trained here: interpolation ends equal the checkpoints,
distribution fits recover known parameters, BN re-estimation and feature capture give the
directly computed statistics, and the CLI writes every study or fails in one line."""

import json
import os
import shutil
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from awn_jax import bn_statistics, reports
from awn_jax.evaluation import Evaluator
from awn_jax.nn import set_bn_mode
from awn_jax.stability import curves, distributions, interpolation, theory
from awn_jax.stability import variance_theory as vt
from awn_jax.training.loop import train_and_evaluate
from awn_jax.training.metrics import read_metrics
from awn_jax.training.runs import load_run
from configs import smoke

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config():
    """The training tests' tiny run (the same computations, so its compilations are shared
    through the persistent cache)."""
    config = smoke.get_config()
    config.update(dict(synthetic_num_train=96, synthetic_num_test=48, batch_size=32,
                       eval_batch_size=48, image_size=8, crop_padding=1, num_epochs=2,
                       num_devices=1, log_every_steps=2))
    return config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("stability_run"))
    train_and_evaluate(_config(), path)
    return path


@pytest.fixture(scope="module")
def runs(workdir):
    return load_run(workdir, 1), load_run(workdir, 2)


def test_lerp_is_exact_at_the_ends(runs):
    a, b = runs
    chex.assert_trees_all_equal(interpolation.lerp(a.params, b.params, 0.0), a.params)
    chex.assert_trees_all_equal(interpolation.lerp(a.params, b.params, 1.0), b.params)


def test_interpolation_ends_reproduce_the_checkpoints(workdir, runs):
    metrics = read_metrics(workdir)
    r = interpolation.interpolate_run(*runs, num_points=1, bn_stats="interpolate", batch_size=48)
    assert r["alphas"] == [0.0, 0.5, 1.0]
    for index, m in ((0, metrics[0]), (-1, metrics[1])):
        assert r["test_accuracy_pct"][index] == 100 * m["test_accuracy"]
        assert r["test_loss"][index] == pytest.approx(m["test_loss"], rel=1e-6)
    assert r["test_loss"][1] not in (r["test_loss"][0], r["test_loss"][2])
    assert r["accuracy_var_all"] == pytest.approx(np.var(r["test_accuracy_pct"]))


def test_path_summary_separates_trend_from_roughness():
    alphas = np.linspace(0, 1, 5)
    straight = interpolation.summarize(alphas, 20 + 10 * alphas, np.ones(5))
    assert straight["accuracy_var_interior"] > 0 and straight["accuracy_detrended_msd"] == 0
    dip = interpolation.summarize(alphas, [30, 30, 10, 30, 30], np.ones(5))
    assert dip["accuracy_detrended_msd"] == pytest.approx(400 / 3)
    assert dip["accuracy_var_interior"] == pytest.approx(np.var([30, 10, 30]))


def test_reestimated_path_ends_use_the_reestimated_statistics(runs):
    """bn_stats="reestimate": the end of the path is run_b with its statistics re-estimated
    by awn_jax.bn_statistics on the fixed training images (tested there in float64)."""
    r = interpolation.interpolate_run(*runs, num_points=0, bn_stats="reestimate",
                                      batch_size=48, reestimate_batches=2)
    run = runs[1]
    images = [b["image"] for b in run.dataset.statistics_batches(64, 32)]
    stats = bn_statistics.reestimate(run.graphdef, run.params, run.batch_stats,
                                     lambda: iter(images))
    expected = Evaluator(run.graphdef, run.params, stats).loss_and_accuracy(
        run.dataset.test_batches(48), bn_mode="tracked")
    assert r["reestimate_batches"] == 2
    assert r["test_accuracy_pct"][-1] == 100 * expected["test_accuracy"]
    assert r["test_loss"][-1] == pytest.approx(expected["test_loss"], rel=1e-6)


@pytest.mark.parametrize("loc, scale", [(0.3, 2.0), (-5.0, 0.1)])
def test_laplace_fit_recovers_parameters(loc, scale):
    x = np.random.default_rng(0).laplace(loc, scale, 200_000)
    fit = distributions.fit_laplace(x)
    assert fit["loc"] == pytest.approx(loc, abs=0.02 * scale)
    assert fit["scale"] == pytest.approx(scale, rel=0.01)
    assert fit["loglik"] == pytest.approx(
        np.mean(np.log(distributions.laplace_pdf(x, fit["loc"], fit["scale"]))), rel=1e-9)
    assert fit["loglik"] > distributions.fit_gaussian(x)["loglik"]


@pytest.mark.parametrize("mean, std", [(-0.5, 0.7), (88.0, 30.0)])
def test_gaussian_fit_recovers_parameters(mean, std):
    x = np.random.default_rng(1).normal(mean, std, 200_000)
    fit = distributions.fit_gaussian(x)
    assert fit["mean"] == pytest.approx(mean, abs=0.02 * std)
    assert fit["std"] == pytest.approx(std, rel=0.01)
    assert fit["loglik"] == pytest.approx(
        np.mean(np.log(distributions.gaussian_pdf(x, fit["mean"], fit["std"]))), rel=1e-9)
    assert fit["loglik"] > distributions.fit_laplace(x)["loglik"]


def test_distributions_over_epochs(workdir, runs):
    r = distributions.analyze_run(iter(runs), num_images=16, bins=10)
    assert r["epochs"] == [1, 2] and r["feature_layers"] == ["stages.0.0.conv1",
                                                             "stages.2.2.conv2"]
    # Captured features of the first block layer = that layer applied by hand (BN tracked).
    model = nnx.merge(runs[1].graphdef, runs[1].params, runs[1].batch_stats)
    set_bn_mode(model, "tracked")
    images = next(runs[1].dataset.test_batches(16, num_examples=16))["image"]
    x = (jnp.asarray(images) - jnp.asarray(model.mean)) / jnp.asarray(model.std)
    y = np.asarray(model.stages[0][0].conv1(nnx.relu(model.stem_bn(model.stem_conv(x)))))
    first = r["features"][-1]["layers"][0]
    assert first["layer"] == "stages.0.0.conv1"
    assert first["mean"] == pytest.approx(y.mean(), rel=1e-5)
    assert first["std"] == pytest.approx(y.std(), rel=1e-4)
    # Pooled running-mean drift as the training log computed it.
    assert r["bn_mean_shift"][0]["bn_mean_drift"] == pytest.approx(
        read_metrics(workdir)[1]["bn_mean_drift"], rel=1e-6)
    # AWN computes with standardized kernels (nu ~ 1, upsilon ~ 0 after a few steps).
    for layer in r["weights"][-1]["layers"]:
        assert layer["std"] == pytest.approx(1.0, abs=0.02) and layer["raw_std"] != layer["std"]
    for h in r["feature_histograms"]["stages.2.2.conv2"]:
        assert sum(np.diff(h["edges"]) * h["density"]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown layers"):
        distributions.analyze_run(iter(runs), layers=["stages.9.conv1"], num_images=4)


def test_curves_read_the_metrics(workdir):
    (r,) = curves.collect([workdir])
    metrics = read_metrics(workdir)
    assert r["model"] == "ANN-AWN" and r["epoch"] == [1, 2]
    assert r["test_loss"] == [m["test_loss"] for m in metrics]
    step = metrics[1]["test_loss"] - metrics[0]["test_loss"]
    assert r["test_loss_jumps"] == pytest.approx(
        {"mean_abs_change": abs(step), "largest_rise": max(step, 0.0),
         "largest_fall": max(-step, 0.0)})


def test_variance_theory_study_is_small_and_consistent(tmp_path):
    r = theory.run(samples=2000, grid=vt.bound_grid(sigma=(0.62,), b=(1.0,), mu=(0.0, "tau0"),
                                                   n=(27,)),
                   perturbation_grid=[(0.62, 1.0, 0.0, 0.1, 27)], layer=False, sweep_points=9)
    assert all(abs(c["z_mean"]) < 4.5 and abs(c["z_var"]) < 4.5
               for c in r["rectified_gaussian"])                      # Eq. 4-5 exact
    assert os.path.exists(reports.save_figure(theory.plot(r), str(tmp_path), "theory"))
    sweep = r["bound_sweeps"][0]
    low, high = sweep["failure_band"]
    for tau, ratio in zip(sweep["tau_mu"], sweep["mean_ratio_exact"]):
        assert (ratio > 1.0) == (low < tau < high)                    # Eq. 7 fails in the band


def _analyze(*args):
    """``analyze.py`` in a subprocess with this process's device count (the compilation
    cache comes through conftest's environment), so it reuses what the tests above compiled."""
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(jax.device_count())}
    return subprocess.run([sys.executable, "analyze.py", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_cli_writes_the_run_studies(workdir, tmp_path):
    """Two runs side by side, with the shapes the tests above compiled (the variance-theory
    study needs no run: its function is tested above)."""
    twin = str(tmp_path / "twin")
    shutil.copytree(workdir, twin)
    out = str(tmp_path / "out")
    result = _analyze("--study", "curves,interpolation,distributions", "--workdir", workdir,
                      "--workdir", twin, "--output_dir", out, "--num_points", "1",
                      "--reestimate_batches", "1", "--batch_size", "48",
                      "--feature_images", "16", "--bins", "10")
    assert result.returncode == 0, result.stderr[-3000:]
    assert set(os.listdir(out)) == {
        "stability_curves.json", "stability_curves.png", "stability_interpolation.json",
        "stability_interpolation.png", "stability_distributions.json",
        "stability_distributions_weights.png", "stability_distributions_features.png",
        "stability_distributions_bn.png"}
    with open(os.path.join(out, "stability_interpolation.json")) as f:
        rows = json.load(f)
    assert [(r["bn_stats"], r["epoch_a"], r["epoch_b"], len(r["alphas"])) for r in rows] == [
        ("interpolate", 1, 2, 3), ("reestimate", 1, 2, 3)] * 2
    with open(os.path.join(out, "stability_distributions.json")) as f:
        labels = [r["model"] for r in json.load(f)]
    assert labels == ["ANN-AWN (stability_run0)", "ANN-AWN (twin)"]


@pytest.mark.parametrize("args, message", [
    (["--study", "bogus", "--workdir", "."], "unknown study bogus"),
    (["--study", "curves", "--workdir", "/no/such/workdir"], "no such workdir: /no/such/workdir"),
    (["--study", "interpolation", "--workdir", "."], "holds no config.json"),
])
def test_cli_reports_bad_input_in_one_line(args, message):
    result = _analyze(*args)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
