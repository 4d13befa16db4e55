"""The notebooks: each .ipynb is its .py twin (jupytext, outputs stripped), and the
quickstart and reproduce_paper run top to bottom in their small mode and compute what they
say they do.

Each notebook runs in a subprocess, as a user's kernel would: with JAX's default single
CPU device (not the 8 fake devices of conftest.py, only its compilation cache and
optimization level), the non-interactive Agg backend and a temporary workdir. It leaves
its numbers in a ``summary`` dict, which is checked here.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"

# Runs the notebook's code as a script and saves its `summary`.
_RUNNER = """
import json, runpy, sys
namespace = runpy.run_path(sys.argv[1], run_name="__main__")
with open(sys.argv[2], "w") as f:
    json.dump(namespace["summary"], f)
"""


def _run_small_mode(name, env_prefix, tmp):
    """Run notebooks/<name>.py in its small mode, workdir under ``tmp``; its ``summary``."""
    env = {**os.environ, f"{env_prefix}_MODE": "small",
           f"{env_prefix}_WORKDIR": str(tmp / "workdirs"), "MPLBACKEND": "Agg",
           "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", _RUNNER, str(NOTEBOOKS / f"{name}.py"), str(tmp / "summary.json")],
        cwd=NOTEBOOKS, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, f"{name} failed:\n{result.stderr[-6000:]}"
    return json.loads((tmp / "summary.json").read_text())


def test_every_ipynb_is_paired_with_its_py_and_stripped():
    import jupytext  # in the `test` extra

    notebooks = sorted(NOTEBOOKS.glob("*.ipynb"))
    assert notebooks, f"no notebooks in {NOTEBOOKS}"
    for ipynb in notebooks:
        script = ipynb.with_suffix(".py")
        assert script.exists(), f"{ipynb.name} has no jupytext twin {script.name}"
        from_ipynb, from_script = jupytext.read(ipynb), jupytext.read(script)
        assert "py:percent" in from_ipynb.metadata["jupytext"]["formats"], ipynb.name
        cells = [(c.cell_type, c.source) for c in from_ipynb.cells]
        assert cells == [(c.cell_type, c.source) for c in from_script.cells], (
            f"{ipynb.name} and {script.name} differ: run `jupytext --sync {script}`")
        for cell in from_ipynb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, (
                    f"{ipynb.name} holds outputs: strip them (jupytext --to ipynb {script})")


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """The quickstart's `summary`, from one run in small mode."""
    return _run_small_mode("quickstart", "AWN_QUICKSTART", tmp_path_factory.mktemp("quickstart"))


@pytest.mark.slow
def test_quickstart_counts_only_stem_and_classifier_as_multiplications(quickstart):
    conv, adder = quickstart["counts"]["conv"], quickstart["counts"]["adder"]
    stem, classifier = 3 * 3 * 3 * 16 * 32 * 32, 64 * 10
    assert adder["mul"] == stem + classifier
    # every other multiply-accumulate of the CNN becomes two additions
    assert adder["add"] == adder["mul"] + 2 * (conv["mul"] - adder["mul"])
    assert conv["mul"] == conv["add"] and conv["mul"] == pytest.approx(40.81e6, rel=1e-3)


@pytest.mark.slow
def test_quickstart_one_weight_gradients_follow_addernet_and_true_l1_rules(quickstart):
    grads = quickstart["one_weight_grads"]
    x, w = np.asarray(grads["x"]), grads["w"]
    away = np.abs(x - w) > 1e-6  # the l1 derivative is undefined at x == w
    official, true, conv = (grads[k] for k in ("adder (official)", "adder (true l1)", "conv"))
    np.testing.assert_allclose(official["dx"], np.clip(w - x, -1, 1), atol=1e-6)  # HardTanh
    np.testing.assert_allclose(official["dw"], x - w, atol=1e-6)  # full precision
    np.testing.assert_allclose(np.asarray(true["dx"])[away], np.sign(w - x)[away])
    np.testing.assert_allclose(np.asarray(true["dw"])[away], np.sign(x - w)[away])
    np.testing.assert_allclose(conv["dx"], np.full_like(x, w), atol=1e-6)
    np.testing.assert_allclose(conv["dw"], x, atol=1e-6)


@pytest.mark.slow
def test_quickstart_layer_weight_gradient_has_the_adaptive_norm(quickstart):
    norms = quickstart["layer_grad_norms"]
    expected = quickstart["layer_grad_norm_expected"]
    assert expected == pytest.approx(0.2 * np.sqrt(3 * 3 * 16 * 16))
    assert norms["adder, official (eta=0.2)"] == pytest.approx(expected, rel=1e-4)
    # unscaled, the full-precision gradient is far larger than the scaled one
    assert norms["adder, official (eta=None)"] > 10 * expected


@pytest.mark.slow
def test_quickstart_training_learns(quickstart):
    history = quickstart["train"]["adder-awn"]
    assert [m["epoch"] for m in history] == [1, 2, 3, 4, 5]
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
    assert history[-1]["test_accuracy"] > 0.6  # 10 classes: chance is 0.1


@pytest.mark.slow
def test_quickstart_bn_modes_change_batch_dependence(quickstart):
    dependence = quickstart["bn_batch_dependence"]
    assert dependence["tracked"] < 1e-5  # running statistics: per-image logits
    assert dependence["running-mean"] > 1e-3 and dependence["running"] > 1e-3


@pytest.mark.slow
def test_quickstart_pgd_sweep(quickstart):
    eps, accuracy = quickstart["pgd"]["eps"], quickstart["pgd"]["accuracy"]
    assert eps[0] == 0 and eps[-1] == pytest.approx(8 / 255)
    assert set(accuracy) == {"tracked", "running-mean", "running"}
    for mode, values in accuracy.items():
        assert len(values) == len(eps)
        assert values[0] > 0.6, mode  # clean accuracy of a model that learned
        assert values[-1] <= values[0], mode  # maximizing the loss does not raise accuracy
    assert accuracy["tracked"][-1] < accuracy["tracked"][0]  # and this one hurts


# ---------------------------------------------------------------------------------------
# reproduce_paper: the whole paper pipeline in its small mode (synthetic 8x8 data).


@pytest.fixture(scope="module")
def reproduce(tmp_path_factory):
    """reproduce_paper's `summary`, from one run in small mode."""
    tmp = tmp_path_factory.mktemp("reproduce")
    summary = _run_small_mode("reproduce_paper", "AWN_REPRODUCE", tmp)
    summary["_workdir"] = str(tmp / "workdirs")
    return summary


LAYER_TYPES = ("conv", "adder", "adder-ws", "adder-awn")
BN_MODES = ("tracked", "running-mean", "running")


@pytest.mark.slow
def test_reproduce_trains_the_four_runs(reproduce):
    assert reproduce["mode"] == "small"
    assert set(reproduce["train"]) == set(LAYER_TYPES)
    for layer_type, history in reproduce["train"].items():
        assert [m["epoch"] for m in history] == [1, 2], layer_type
        assert all(np.isfinite(m["train_loss"]) for m in history), layer_type
    # the CNN learns the synthetic classes within 2 epochs (10 classes: chance is 0.1, and
    # 0.18 is 3 standard errors above it on the 128 test images; with the official
    # classifier init, U(+-1/8), it learns more slowly than with Kaiming's: 0.20 here)
    assert reproduce["train"]["conv"][-1]["test_accuracy"] > 0.18


@pytest.mark.slow
def test_reproduce_table1_grid(reproduce):
    rows = [{**r, "layer_type": t} for t, rs in reproduce["table"].items() for r in rs]
    assert sorted((r["layer_type"], r["bn_mode"]) for r in rows) == sorted(
        (t, m) for t in LAYER_TYPES for m in BN_MODES)
    for r in rows:
        assert r["num_examples"] == 128 and "fgsm" not in r  # the small budget's PGD alone
        assert 0.0 <= r["pgd"] <= 1.0 and 0.0 <= r["clean"] <= 1.0
        if r["bn_mode"] == "tracked":  # per-image logits: maximizing the loss cannot help
            assert r["pgd"] <= r["clean"], r
    conv_tracked = next(r for r in rows if r["layer_type"] == "conv" and r["bn_mode"] == "tracked")
    assert conv_tracked["pgd"] < conv_tracked["clean"]  # and on a model that learned, it hurts
    # #Mul/#Add of the 8x8 runs: adder layers replace all but the stem's and classifier's
    # multiplications by two additions each
    cost = {r["layer_type"]: (r["mul"], r["add"]) for r in rows}
    assert cost["adder"] == cost["adder-ws"] == cost["adder-awn"]
    assert cost["adder"][0] == 3 * 3 * 3 * 16 * 8 * 8 + 64 * 10
    assert cost["adder"][1] == cost["adder"][0] + 2 * (cost["conv"][0] - cost["adder"][0])
    # the claims are judged on the paper's row names, Table 3's among them
    claimed = {(c["a"], c["b"]) for c in reproduce["claims"]}
    assert ("ANN-R-AWN", "ANN-R-WS") in claimed and ("ANN-R-AWN", "ANN-r-AWN") in claimed
    assert all(c["verdict"] in ("holds", "does not hold", "cannot tell")
               for c in reproduce["claims"])
    written = json.loads((pathlib.Path(reproduce["report_dir"]) / "report.json").read_text())
    assert written["table"] == reproduce["table"]


@pytest.mark.slow
def test_reproduce_sweeps(reproduce):
    for layer_type, sweeps in reproduce["sweeps"].items():
        eps_rows, steps_rows = sweeps["eps"], sweeps["steps"]
        assert [r["eps"] for r in eps_rows] == pytest.approx([0.01, 0.05, 0.1])
        assert all(r["step_size"] == pytest.approx(r["eps"] / 7) for r in eps_rows)
        assert [r["steps"] for r in steps_rows] == [1, 2]
        for r in eps_rows + steps_rows:
            assert r["run"] == layer_type and r["bn_mode"] == "running-mean"
            assert 0.0 <= r["accuracy"] <= 1.0
        # the sweeps' clean accuracy is the Table-1 row's: same model, images, batch, mode
        table = {r["bn_mode"]: r for r in reproduce["table"][layer_type]}
        assert eps_rows[0]["clean"] == pytest.approx(table["running-mean"]["clean"])


@pytest.mark.slow
def test_reproduce_interpolation_ends_are_the_checkpoints(reproduce):
    assert set(reproduce["interpolation"]) == set(LAYER_TYPES)
    for layer_type, results in reproduce["interpolation"].items():
        (r,) = results
        assert (r["epoch_a"], r["epoch_b"]) == (1, 2) and r["bn_stats"] == "interpolate"
        assert r["alphas"] == pytest.approx([0, 0.25, 0.5, 0.75, 1])
        # The ends score the checkpoints under tracked BN, as the per-epoch test does (on
        # its first 128 images, all of the small mode's test set).
        history = reproduce["train"][layer_type]
        assert r["test_accuracy_pct"][0] == pytest.approx(100 * history[0]["test_accuracy"])
        assert r["test_accuracy_pct"][-1] == pytest.approx(100 * history[1]["test_accuracy"])
        assert r["accuracy_var_interior"] == pytest.approx(np.var(r["test_accuracy_pct"][1:-1]))


@pytest.mark.slow
def test_reproduce_feature_distributions(reproduce):
    dists = reproduce["distributions"]
    assert set(dists) == set(LAYER_TYPES)
    for d in dists.values():
        assert d["epochs"] == [1, 2]
        # the paper's 2nd and 19th layers: the first and the last layer in the stages
        assert d["feature_layers"] == ["stages.0.0.conv1", "stages.2.2.conv2"]
        for features in d["features"]:
            assert all(np.isfinite(s["mean"]) and s["std"] > 0 for s in features["layers"])


@pytest.mark.slow
def test_reproduce_writes_its_figures(reproduce):
    names = sorted(pathlib.Path(p).name for p in reproduce["figures"])
    assert names == sorted(["eps_sweep.png", "steps_sweep.png", "interpolation.png",
                            "curves.png", "features.png", "weights.png"])
    for path in reproduce["figures"]:
        data = pathlib.Path(path).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, path
