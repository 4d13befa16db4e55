"""The reproduction campaign end to end on tiny synthetic data: four runs trained, every
stage evaluated and reported, a restart skipping what is done; the report's verdict rule."""

import dataclasses
import json
import pathlib
import os
import subprocess
import sys
import tarfile

import pytest

from awn_jax import names, reproduction
from awn_jax.bn_statistics import BNStats
from awn_jax.config import PAPER_RUNS
from awn_jax.errors import UserError
from awn_jax.reproduction import campaign, paper, report
from awn_jax.training.runs import load_run

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# The dry budget (the GPU path's check) on tiny synthetic data, through the CLI.
SYNTHETIC = dict(dataset="synthetic", normalization="dataset", image_size=8,
                 crop_padding=0, random_flip=False, synthetic_num_train=128,
                 synthetic_num_test=100, batch_size=32, eval_batch_size=100,
                 log_every_steps=4)
DRY = reproduction.BUDGETS["dry"]


def _reproduce(runs_dir, *flags):
    command = [sys.executable, "reproduce.py", "--budget", "dry", "--runs_dir", runs_dir,
               *(f"--set={k}={v}" for k, v in SYNTHETIC.items()), *flags]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=1500)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    runs_dir = str(tmp_path_factory.mktemp("runs"))
    archive = str(tmp_path_factory.mktemp("archive") / "runs.tar.gz")
    return runs_dir, _reproduce(runs_dir, f"--archive={archive}"), archive


@pytest.mark.slow
def test_campaign_trains_evaluates_and_reports(finished):
    runs_dir, result, _ = finished
    root = pathlib.Path(campaign.campaign_dir(runs_dir, DRY))
    for layer_type in PAPER_RUNS:
        metrics = (root / layer_type / "metrics.jsonl").read_text().splitlines()
        assert len(metrics) == DRY.epochs, layer_type
    report_dir = root / "report"
    for name in ("report.md", "report.json", "curves.png", "interpolation.png",
                 "features.png", "eps_sweep.png", "steps_sweep.png"):
        assert (report_dir / name).exists(), name
    saved = json.loads((report_dir / "report.json").read_text())
    rows = report.named_rows(saved["table"])
    assert set(report.TABLE1) <= set(rows) and rows["ANN-R-AWN"]["num_examples"] == 100
    assert {"clean", "fgsm", "pgd"} <= set(rows["CNN"])
    assert len(saved["claims"]) == len(report.CLAIMS)
    assert [len(saved["interpolation"][t]) for t in PAPER_RUNS] == [1] * 4
    assert "budget `dry`: 2 epochs" in result.stdout and "43.39" in result.stdout
    shipped = json.loads((report_dir / "pretrained" / "manifest.json").read_text())
    assert set(shipped) == {f"{name}_2ep" for name in PAPER_RUNS.values()}


@pytest.mark.slow
def test_restart_skips_finished_runs_and_stages(finished):
    runs_dir, _, _ = finished
    stages_dir = pathlib.Path(campaign.campaign_dir(runs_dir, DRY)) / "report" / "stages"
    before = {p.name: p.stat().st_mtime_ns for p in stages_dir.iterdir()}
    again = _reproduce(runs_dir, "--stages=train,table,sweeps,interpolation,distributions")
    assert again.stdout.count("has finished its 2 epochs") == 4  # nothing retrained
    assert {p.name: p.stat().st_mtime_ns for p in stages_dir.iterdir()} == before


@pytest.mark.slow
def test_reestimated_statistics_get_their_own_table_and_report(finished):
    runs_dir, _, _ = finished
    root = pathlib.Path(campaign.campaign_dir(runs_dir, DRY))
    trained_report = (root / "report" / "report.md").read_text()
    budget = dataclasses.replace(DRY, bn_stats=BNStats("reestimate", num_images=64,
                                                       batch_size=DRY.eval_batch_size))
    result = reproduction.run_campaign(budget, runs_dir, stages=("table", "report", "export"))
    directory = root / "report+reestimate-64"
    assert "re-estimated on 64 un-augmented training images" in (
        directory / "report.md").read_text()
    assert not (directory / "pretrained").exists()  # shipped weights keep trained statistics
    for layer_type in PAPER_RUNS:
        assert (root / "report" / "stages" / f"table+reestimate-64-{layer_type}.json").exists()
        assert {row["bn_stats"] for row in result["table"][layer_type]} == {"reestimate-64"}
    assert (root / "report" / "report.md").read_text() == trained_report


@pytest.mark.slow
def test_archive_holds_what_resuming_needs(finished, tmp_path):
    runs_dir, _, archive = finished
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
        tar.extractall(tmp_path)
    run = "dry-2ep/adder-awn"
    assert {f"{run}/config.json", f"{run}/metrics.jsonl", f"{run}/checkpoints/2",
            "dry-2ep/report", f"{run}/table-parts", f"{run}/sweep-parts",
            f"{run}/interpolation-parts"} <= names
    assert f"{run}/checkpoints/1" not in names  # its studies are done: the latest is enough
    assert load_run(str(tmp_path / run)).epoch == 2


def test_a_bad_setting_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "reproduce.py", "--budget", "dry", "--runs_dir",
                             str(tmp_path), "--set", "num_epoch=3", "--stages", "train"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "unknown config keys ['num_epoch']" in result.stderr
    assert "Traceback" not in result.stderr


def test_evaluation_stages_wait_for_finished_runs(tmp_path):
    assert reproduction.run_campaign(DRY, str(tmp_path), stages=("table",))["table"] == {}
    with pytest.raises(UserError, match="no run has finished its 2 epochs"):
        reproduction.run_campaign(DRY, str(tmp_path), stages=("report",))
    with pytest.raises(UserError, match="no run has finished its 2 epochs"):
        reproduction.run_campaign(DRY, str(tmp_path), stages=("export",))
    with pytest.raises(UserError, match="unknown stages"):
        reproduction.run_campaign(DRY, str(tmp_path), stages=("tables",))
    with pytest.raises(UserError, match=r"unknown runs \['awn'\]"):
        reproduction.run_campaign(DRY, str(tmp_path), stages=("table",), runs=("awn",))


@pytest.mark.slow
def test_runs_trains_only_those_and_the_report_is_partial(tmp_path):
    result = reproduction.run_campaign(DRY, str(tmp_path), stages=("train",),
                                       overrides=SYNTHETIC, runs=("adder-awn",))
    assert list(result["workdirs"]) == ["adder-awn"]
    assert sorted(os.listdir(tmp_path / "dry-2ep")) == ["adder-awn"]
    checkpoints = lambda names: sorted(n for n in names if "/checkpoints/" in n)  # noqa: E731
    archived = campaign.archive_runs(str(tmp_path), DRY, str(tmp_path / "before.tar.gz"))
    assert checkpoints(archived) == ["dry-2ep/adder-awn/checkpoints/1",
                                     "dry-2ep/adder-awn/checkpoints/2"]  # studies to come
    exported = reproduction.run_campaign(DRY, str(tmp_path), stages=("export",))
    assert set(exported) == {"workdirs", "table", "pretrained"}  # the table only, no studies
    assert exported["pretrained"]["adder-awn"]["file"] == "cifar10_r20_awn_2ep.npz"
    result = reproduction.run_campaign(DRY, str(tmp_path), stages=("report", "export"))
    archived = campaign.archive_runs(str(tmp_path), DRY, str(tmp_path / "after.tar.gz"))
    assert checkpoints(archived) == ["dry-2ep/adder-awn/checkpoints/2"]
    records = tmp_path / "dry-2ep/adder-awn/records"  # per-epoch records begun: epoch 1 kept
    records.mkdir()
    archived = campaign.archive_runs(str(tmp_path), DRY, str(tmp_path / "records.tar.gz"))
    assert checkpoints(archived) == ["dry-2ep/adder-awn/checkpoints/1",
                                     "dry-2ep/adder-awn/checkpoints/2"]
    (records / "epoch-1.json").write_text("{}")
    archived = campaign.archive_runs(str(tmp_path), DRY, str(tmp_path / "recorded.tar.gz"))
    assert checkpoints(archived) == ["dry-2ep/adder-awn/checkpoints/2"]
    markdown = result["report"]
    assert "**Partial report**: still training CNN (0 of 2 epochs), ANN (0 of 2 epochs)" in (
        markdown)
    assert "| ANN-R-AWN | running-mean |" in markdown and "| CNN-R |" not in markdown
    found = json.loads((tmp_path / "dry-2ep/report/report.json").read_text())["claims"]
    for claim in found:  # judged only where both rows are AWN's ("-R beats -r for AWN")
        both_awn = claim["a"].endswith("AWN") and claim["b"].endswith("AWN")
        assert (claim["verdict"] != report.WAITING) == both_awn, claim
    assert list(result["pretrained"]) == ["adder-awn"]


def test_run_configs_are_the_official_recipe_at_the_budget(tmp_path):
    for layer_type in PAPER_RUNS:
        config = campaign.run_config(layer_type, reproduction.BUDGETS["cpu"], str(tmp_path))
        assert (config.layer_type, config.num_epochs, config.batch_size) == (layer_type, 10, 256)
        assert (config.dataset, config.data_dir) == ("image_folder", str(tmp_path))
        assert config.normalization == "cifar10" and config.learning_rate == 0.1


def test_shipped_names_carry_the_epochs_unless_the_shipped_budget():
    assert campaign.shipped_name("adder-awn", campaign.SHIPPED_EPOCHS) == "cifar10_r20_awn"
    assert campaign.shipped_name("conv", 10) == "cifar10_r20_cnn_10ep"


def test_verdict_rule():
    a = {"pgd": 0.40, "num_examples": 2000}
    assert report.verdict(a, {"pgd": 0.30, "num_examples": 2000}, "pgd")["verdict"] == "holds"
    assert report.verdict(a, {"pgd": 0.39, "num_examples": 2000}, "pgd")["verdict"] == (
        "cannot tell")
    assert report.verdict(a, {"pgd": 0.50, "num_examples": 2000}, "pgd")["verdict"] == (
        "does not hold")


def test_paper_row_names():
    assert names.row_name("adder-awn", "running-mean") == "ANN-R-AWN"
    assert names.row_name("adder-ws", "running") == "ANN-r-WS"
    assert names.row_name("conv", "tracked") == "CNN"
    assert set(report.TABLE3) <= set(paper.ROWS)


def test_interpolation_pairs_scale_the_papers_from_100_epochs():
    from awn_jax.reproduction import stages

    assert stages.epoch_pairs(10, "adder") == [(1, 2), (9, 10)]
    assert stages.epoch_pairs(400, "adder") == [(1, 2), (160, 164), (290, 294), (399, 400)]
    assert stages.epoch_pairs(400, "adder-awn") == [(1, 2), (125, 135), (283, 294),
                                                     (399, 400)]
    # 100 epochs: 160/4 = 40, 164/4 = 41; 290/4 = 72.5 -> 72, 294/4 = 73.5 -> 74.
    assert stages.epoch_pairs(100, "adder") == [(1, 2), (40, 41), (72, 74), (99, 100)]
    assert stages.epoch_pairs(100, "adder-ws") == stages.epoch_pairs(100, "adder-awn")
    assert {e for pair in stages.epoch_pairs(100) for e in pair} >= {31, 34, 40, 41, 71}


def _table_row(workdir, layer_type, bn_mode, pgd, n=2000):
    return {"workdir": workdir, "model": f"resnet20-{layer_type}", "layer_type": layer_type,
            "bn_mode": bn_mode, "bn_stats": "trained", "num_examples": n, "clean": 0.8,
            "pgd": pgd}


def test_table_claims_judge_only_the_claims_whose_rows_are_unambiguous():
    ann = [_table_row("pretrained:a", "adder", "tracked", 0.0),
           _table_row("pretrained:a", "adder", "running-mean", 0.1045)]
    cnn = [_table_row("pretrained:c", "conv", "running-mean", 0.143)]
    judged = {c["claim"]: c for c in report.table_claims(ann + cnn)}
    assert set(judged) == {report.CLAIMS[0][0], report.CLAIMS[1][0]}   # R vs ANN, vs CNN-R
    assert judged[report.CLAIMS[0][0]]["verdict"] == "holds"
    assert judged[report.CLAIMS[1][0]]["verdict"] == "does not hold"   # 10.45 vs 14.30
    # A second CNN (say a ResNet-32) makes "CNN-R" ambiguous: that claim is left out.
    second = [_table_row("pretrained:c32", "conv", "running-mean", 0.0)]
    assert [c["claim"] for c in report.table_claims(ann + cnn + second)] == [report.CLAIMS[0][0]]
    assert report.table_claims(cnn) == []
