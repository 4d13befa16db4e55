"""Per-epoch records (awn_jax.stability.epoch_records): AWN's movement read off the
parameters, accuracies that are the evaluator's, one cached record per saved epoch."""

import dataclasses
import os
import shutil

import numpy as np
import pytest

from awn_jax import bn_statistics
from awn_jax.bn_statistics import BNStats
from awn_jax.nn.batchnorm import EVAL_BN_MODES
from awn_jax.model import named_leaves
from awn_jax.stability import epoch_records
from awn_jax.training.runs import load_run
from workdirs import random_workdir

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
