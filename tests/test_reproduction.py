"""The reproduction campaign end to end on tiny synthetic data: four runs trained, every
stage evaluated and reported, a restart skipping what is done; the report's verdict rule."""

import json
import os

import pytest

from awn_jax import reproduction
from awn_jax.errors import UserError
from awn_jax.reproduction import campaign, paper, report, stages

TINY = reproduction.Budget(
    "tiny", epochs=2, test_examples=64, attacks=("fgsm", "pgd"), attack_steps=2,
    sweep_examples=32, eps_values=(0.03,), steps_values=(1,), interpolation_points=1,
    interpolation_bn_stats=("interpolate",), feature_images=16, eval_batch_size=32)
SYNTHETIC = dict(dataset="synthetic", normalization="dataset", image_size=8, crop_padding=0,
                 random_flip=False, synthetic_num_train=128, synthetic_num_test=64,
                 batch_size=32, eval_batch_size=64, log_every_steps=4)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    runs_dir = str(tmp_path_factory.mktemp("runs"))
    return runs_dir, reproduction.run_campaign(TINY, runs_dir, overrides=SYNTHETIC,
                                               command="pytest")


@pytest.mark.slow
def test_campaign_trains_evaluates_and_reports(finished):
    runs_dir, result = finished
    assert set(result["workdirs"]) == {"conv", "adder", "adder-ws", "adder-awn"}
    for workdir in result["workdirs"].values():
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            assert len(f.readlines()) == 2
    rows = report.named_rows(result["table"])
    assert set(report.TABLE1) <= set(rows) and rows["ANN-R-AWN"]["num_examples"] == 64
    assert {"clean", "fgsm", "pgd"} <= set(rows["CNN"])
    assert [len(result["interpolation"][t]) for t in result["workdirs"]] == [1] * 4
    report_dir = os.path.join(campaign.campaign_dir(runs_dir, TINY), "report")
    for name in ("report.md", "report.json", "curves.png", "interpolation.png",
                 "features.png", "eps_sweep.png", "steps_sweep.png"):
        assert os.path.exists(os.path.join(report_dir, name)), name
    markdown = result["report"]
    assert "budget `tiny`: 2 epochs" in markdown and "43.39" in markdown  # paper beside
    with open(os.path.join(report_dir, "report.json")) as f:
        assert len(json.load(f)["claims"]) == len(report.CLAIMS)


@pytest.mark.slow
def test_restart_skips_finished_runs_and_stages(finished, monkeypatch):
    runs_dir, result = finished
    for name in ("table", "sweeps", "interpolation_study", "distributions_study"):
        monkeypatch.setattr(stages, name, lambda *a: pytest.fail("recomputed a stage"))
    monkeypatch.setattr(campaign, "train_and_evaluate",
                        lambda *a: None)  # a finished run is never retrained either way
    again = reproduction.run_campaign(TINY, runs_dir, overrides=SYNTHETIC, command="pytest")
    assert again["table"] == result["table"]


def test_evaluation_stages_need_finished_runs(tmp_path):
    with pytest.raises(UserError, match="not finished at 2 epochs"):
        reproduction.run_campaign(TINY, str(tmp_path), stages=("table",))
    with pytest.raises(UserError, match="unknown stages"):
        reproduction.run_campaign(TINY, str(tmp_path), stages=("tables",))


def test_run_configs_are_the_official_recipe_at_the_budget(tmp_path):
    for layer_type in campaign.CONFIGS:
        config = campaign.run_config(layer_type, reproduction.BUDGETS["cpu"], str(tmp_path))
        assert (config.layer_type, config.num_epochs, config.batch_size) == (layer_type, 10, 256)
        assert (config.dataset, config.data_dir) == ("image_folder", str(tmp_path))
        assert config.normalization == "cifar10" and config.learning_rate == 0.1


def test_verdict_rule():
    a = {"pgd": 0.40, "num_examples": 2000}
    assert report.verdict(a, {"pgd": 0.30, "num_examples": 2000}, "pgd")["verdict"] == "holds"
    assert report.verdict(a, {"pgd": 0.39, "num_examples": 2000}, "pgd")["verdict"] == (
        "cannot tell")
    assert report.verdict(a, {"pgd": 0.50, "num_examples": 2000}, "pgd")["verdict"] == (
        "does not hold")


def test_paper_row_names():
    assert paper.row_name("adder-awn", "running-mean") == "ANN-R-AWN"
    assert paper.row_name("adder-ws", "running") == "ANN-r-WS"
    assert paper.row_name("conv", "tracked") == "CNN"
    assert set(report.TABLE3) <= set(paper.ROWS)
