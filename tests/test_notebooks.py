"""The notebooks: each .ipynb is its .py twin (jupytext, outputs stripped), and the
quickstart runs top to bottom in its small mode and computes what it says it does.

The quickstart runs in a subprocess, as a user's kernel would: with JAX's default single
CPU device (not the 8 fake devices of conftest.py), the non-interactive Agg backend and
a temporary workdir. It leaves its numbers in a ``summary`` dict, which is checked here.
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
    tmp = tmp_path_factory.mktemp("quickstart")
    env = {**os.environ, "AWN_QUICKSTART_MODE": "small",
           "AWN_QUICKSTART_WORKDIR": str(tmp / "workdirs"), "MPLBACKEND": "Agg",
           "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", _RUNNER, str(NOTEBOOKS / "quickstart.py"), str(tmp / "summary.json")],
        cwd=NOTEBOOKS, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, f"quickstart failed:\n{result.stderr[-6000:]}"
    return json.loads((tmp / "summary.json").read_text())


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
