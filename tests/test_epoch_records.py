"""Per-epoch records (awn_jax.stability.epoch_records): AWN's movement read off the
parameters, accuracies that are the evaluator's, one cached record per saved epoch."""

import dataclasses
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from awn_jax import bn_statistics
from awn_jax.bn_statistics import BNStats
from awn_jax.nn.batchnorm import EVAL_BN_MODES
from awn_jax.model import named_leaves
from awn_jax.stability import epoch_records
from awn_jax.training.runs import load_run
from workdirs import random_workdir

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = epoch_records.RecordSettings(test_examples=40, batch_size=20,
                                        bn_stats=BNStats("reestimate", 32, batch_size=16))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A random ResNet-20 ANN-AWN on 8x8 synthetic images, saved as epochs 1 and 2, with
    nu and upsilon of epoch 2 moved by known amounts."""
    def move(epoch, state):
        if epoch == 2:
            conv = state.params["stages"][0][0]["conv1"]
            conv["nu"][...] = conv["nu"][...].at[3].set(1.25)
            conv["upsilon"][...] = conv["upsilon"][...].at[0].set(-0.5)
        return state

    return random_workdir(str(tmp_path_factory.mktemp("records_workdir")), epochs=(1, 2),
                          edit=move, layer_type="adder-awn", image_size=8, crop_padding=0,
                          synthetic_num_train=64, synthetic_num_test=40, batch_size=32)


def test_awn_movement_is_read_off_the_parameters(workdir):
    first, second = (epoch_records.awn_movement(load_run(workdir, e).params) for e in (1, 2))
    assert first["nu_max"] == 0 and first["upsilon_max"] == 0
    assert second["nu_max"] == pytest.approx(0.25) and second["upsilon_max"] == 0.5
    layer = next(r for r in second["layers"] if r["layer"] == "stages.0.0.conv1")
    assert layer["nu_mean"] == pytest.approx(0.25 / 16)
    assert len(second["layers"]) == sum(name.endswith(".nu") for name in
                                        named_leaves(load_run(workdir).params))
    assert epoch_records.awn_movement({"conv": {"kernel": np.ones(3)}}) is None


def test_records_are_the_evaluators_accuracies_and_cached(workdir, monkeypatch, tmp_path):
    result = epoch_records.collect(workdir, SETTINGS)
    assert [r["epoch"] for r in result["records"]] == [1, 2]
    run = load_run(workdir, 2)
    images, labels = run.test_set(40)
    record = result["records"][1]
    for mode in EVAL_BN_MODES:
        assert record["trained"][mode] == run.evaluator.accuracy(images, labels, batch_size=20,
                                                                 bn_mode=mode)
    reestimated = run.with_bn_stats(SETTINGS.bn_stats)
    assert record["reestimated"]["running-mean"] == reestimated.evaluator.accuracy(
        images, labels, batch_size=20, bn_mode="running-mean")
    assert sorted(os.listdir(os.path.join(workdir, "records"))) == ["epoch-1.json",
                                                                     "epoch-2.json"]
    monkeypatch.setattr(epoch_records, "record_epoch",
                        lambda *a, **k: pytest.fail("recomputed a cached record"))
    monkeypatch.setattr(bn_statistics, "reestimate",
                        lambda *a, **k: pytest.fail("recomputed cached statistics"))
    assert epoch_records.collect(workdir, SETTINGS)["records"] == result["records"]
    fresh = tmp_path / "fresh"  # a fresh machine: epoch 1's checkpoint gone, its record kept
    shutil.copytree(workdir, fresh)
    shutil.rmtree(fresh / "checkpoints" / "1")
    assert epoch_records.collect(str(fresh), SETTINGS)["records"] == result["records"]
    other = dataclasses.replace(SETTINGS, test_examples=20)  # another record set: epoch 2 only
    monkeypatch.setattr(epoch_records, "record_epoch",
                        lambda run, *a, **k: {"epoch": run.epoch, "awn": None})
    assert epoch_records.collect(str(fresh), other)["records"] == [{"epoch": 2, "awn": None}]
    markdown = epoch_records.format_markdown([result])
    assert "| 2 | " in markdown and "max abs(nu-1)" in markdown
    # One accuracy panel per run and AWN's, two to a row: 1 run 1x2, 2 runs 3 of 2x2.
    assert [len(epoch_records.plot([result] * n).axes) for n in (1, 2, 3)] == [2, 3, 4]


def _record(epoch, tracked, running_mean, re_tracked=0.5, re_running_mean=0.5):
    return {"epoch": epoch,
            "trained": {"tracked": tracked, "running-mean": running_mean},
            "reestimated": {"tracked": re_tracked, "running-mean": re_running_mean}}


def test_defense_gaps_compare_the_runs_on_their_common_epochs_by_quarter():
    # "-R" minus tracked: run A -10 points at epoch 1, +2 and -4 at epochs 7 and 8 (epoch 6
    # only A has: left out); run B -1 point everywhere, re-estimated +0.5 at epoch 8.
    a = {"model": "A", "records": [_record(1, 0.5, 0.4), _record(6, 0.5, 0.0),
                                   _record(7, 0.6, 0.62), _record(8, 0.7, 0.66)]}
    b = {"model": "B", "records": [_record(e, 0.5, 0.49) for e in (1, 2, 7)]
         + [_record(8, 0.5, 0.49, 0.5, 0.505)]}
    rows = epoch_records.defense_gaps([a, b])
    assert [(r["epochs"], r["recorded"]) for r in rows] == [([1, 2], [1]), ([7, 8], [7, 8])]
    assert rows[0]["runs"]["A"]["trained"] == pytest.approx(
        {"mean": -10.0, "min": -10.0, "max": -10.0, "below": 1})
    assert rows[1]["runs"]["A"]["trained"] == pytest.approx(
        {"mean": -1.0, "min": -4.0, "max": 2.0, "below": 1})
    assert rows[1]["runs"]["B"]["trained"]["below"] == 2
    assert rows[1]["runs"]["B"]["reestimated"] == pytest.approx(
        {"mean": 0.25, "min": 0.0, "max": 0.5, "below": 0})
    table = "\n".join(epoch_records.format_defense_gaps(rows))
    assert "| 7-8 (2) | -1.00 (-4.00 to +2.00), 1 below | -1.00 (-1.00 to -1.00), 2 below |" \
        in table
    assert epoch_records.defense_gaps([a, {"model": "C", "records": []}]) == []


def test_cli_writes_records_table_and_figure_of_two_runs(workdir, tmp_path):
    runs = [str(tmp_path / name) for name in ("a", "b")]
    for run in runs:
        shutil.copytree(workdir, run)
    out = str(tmp_path / "out")
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(jax.device_count())}
    result = subprocess.run(
        [sys.executable, "analyze.py", "--study", "epoch-records", "--workdir", runs[0],
         "--workdir", runs[1], "--output_dir", out, "--num_examples", "40", "--batch_size",
         "20", "--bn_stats", "reestimate", "--bn_stats_images", "32"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    stem = os.path.join(out, "stability_epoch_records")
    assert all(os.path.exists(stem + suffix) for suffix in (".json", ".md", ".png"))
    with open(stem + ".md") as f:
        markdown = f.read()
    # The copies are the same run, so their "-R" gaps are equal, cell for cell.
    row = next(line for line in markdown.splitlines() if line.startswith("| 2-2 (1) |"))
    cells = row.strip("|").split("|")[1:]
    assert len(cells) == 4 and cells[0] == cells[1] and cells[2] == cells[3]


def test_cumulative_learning_rate_of_the_official_cosine():
    # sum over e < E of lr/2 (1 + cos(pi e / E)) is lr (E + 1) / 2: the cosines sum to 1
    config = {"learning_rate": 0.1, "lr_schedule": "cosine-epoch", "num_epochs": 100,
              "warmup_epochs": 0.0}
    clock = epoch_records.cumulative_learning_rate(config)
    assert clock.shape == (100,) and clock[0] == pytest.approx(0.1)
    assert clock[-1] == pytest.approx(0.1 * 101 / 2, rel=1e-6)
    assert epoch_records.cumulative_learning_rate(config, 400)[-1] == pytest.approx(
        0.1 * 401 / 2, rel=1e-6)


def test_awn_extrapolation_recovers_a_power_law():
    config = {"learning_rate": 0.1, "lr_schedule": "cosine-epoch", "num_epochs": 100,
              "warmup_epochs": 0.0}
    clock = epoch_records.cumulative_learning_rate(config)
    powers = {"nu_max": (0.2, 0.8), "upsilon_max": (0.1, 0.5), "nu_mean": (0.03, 0.7),
              "upsilon_mean": (0.02, 1.0)}
    records = [{"epoch": e, "awn": {k: a * clock[e - 1] ** p for k, (a, p) in powers.items()}}
               for e in range(1, 61)]
    records[0]["awn"]["nu_max"] = 5.0  # before first_epoch: not fitted
    out = epoch_records.extrapolate_awn_movement(records, config, first_epoch=10)
    assert out["fit_epochs"] == [10, 60]
    target = 0.1 * 401 / 2
    assert out["cumulative_learning_rate"]["target"] == pytest.approx(target, rel=1e-6)
    for k, (a, p) in powers.items():
        assert out["measures"][k]["exponent"] == pytest.approx(p, rel=1e-6)
        assert out["measures"][k]["extrapolated"] == pytest.approx(a * target ** p, rel=1e-6)
    assert "plain extrapolation" in "\n".join(epoch_records.format_extrapolation(out))
    assert epoch_records.extrapolate_awn_movement(records[:11], config) is None
    assert epoch_records.extrapolate_awn_movement(
        [{"epoch": e, "awn": None} for e in range(10, 20)], config) is None
