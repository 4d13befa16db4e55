"""Robustness evaluation: the table from a training workdir, the batch dependence of the BN
modes, the studies (sweeps, batch size, partitions, threat models) and evaluate.py's errors.

Two models keep it fast: a randomly initialized ResNet-20 CNN saved as a real workdir (the
load/evaluate/report path, and per-example independence on the real architecture), and a
tiny network ending like the ResNets in a classifier + BatchNorm, trained in-process on 4x4
synthetic images, for the studies.
"""

import json
import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from awn_jax import data, robustness
from awn_jax.evaluation import Evaluator
from awn_jax.model import apply_model, split_model
from awn_jax.nn import BatchNorm, Conv2d
from awn_jax.names import PAPER_ATTACKS
from awn_jax.reproduction import report as reproduction_report
from awn_jax.robustness import attacks, strict, studies
from awn_jax.training.runs import Run, load_run
from configs import smoke
from workdirs import random_workdir

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------ ResNet-20 from a workdir

@pytest.fixture(scope="module")
def resnet_workdir(tmp_path_factory):
    """A workdir as training leaves it (config, dataset info, a checkpoint of epoch 1),
    holding a randomly initialized ResNet-20 CNN on 8x8 synthetic images."""
    return random_workdir(str(tmp_path_factory.mktemp("resnet_workdir")), layer_type="conv",
                          image_size=8, crop_padding=1, synthetic_num_train=64,
                          synthetic_num_test=48, batch_size=32)


def test_evaluate_run_and_report_from_a_workdir(resnet_workdir, tmp_path):
    run = load_run(resnet_workdir)
    rows = robustness.evaluate_run(run, ["fgsm"], ["running-mean"], batch_size=32,
                                   show_progress=False)
    assert len(rows) == 1
    row = rows[0]
    assert (row["model"], row["bn_mode"], row["epoch"], row["num_examples"]) == (
        "resnet20-conv", "running-mean", 1, 48)   # one full batch and one of 16
    assert 0.0 <= row["fgsm"] <= 1.0 and 0.0 <= row["clean"] <= 1.0
    assert row["mul"] == row["add"] > 0
    table = robustness.write_report(rows, ["fgsm"], str(tmp_path))
    with open(tmp_path / "robustness.json") as f:
        assert json.load(f) == rows
    assert (tmp_path / "robustness.md").read_text() == table + "\n"
    assert table.splitlines()[0] == "| run | model | BN mode | clean | fgsm | #Mul | #Add |"
    label = "/".join(resnet_workdir.rstrip("/").split("/")[-2:])
    p = row["clean"]
    se = (p * (1 - p) / 48) ** 0.5
    assert f"| {label} | resnet20-conv | running-mean | {100 * p:.2f} ± {100 * se:.2f} | " in table


def test_table_cells_carry_binomial_standard_errors_and_name_their_run():
    row = {"workdir": "pretrained:cifar10_r20_ann", "model": "resnet20-adder",
           "bn_stats": "reestimate-10000", "bn_mode": "running", "num_examples": 2000,
           "clean": 0.761, "pgd": 0.0, "mul": 443008, "add": 81183360}
    line = robustness.format_table([row], ["pgd"]).splitlines()[2]
    # sqrt(0.761 * 0.239 / 2000) = 0.00954; an accuracy of 0 has no spread
    assert line == ("| cifar10_r20_ann | resnet20-adder | reestimate-10000 | running | "
                    "76.10 ± 0.95 | 0.00 ± 0.00 | 0.44M | 81.18M |")
    assert robustness.table.run_label("/runs/cpu-10ep/adder-awn/") == "cpu-10ep/adder-awn"


def test_a_columns_random_key_depends_on_its_attack_only(resnet_workdir, monkeypatch):
    """A table of PGD alone attacks with the keys PGD's column has in the paper's table."""
    keys = []

    def recorded(self, images, labels, *, attack=None, key=None, **kwargs):
        keys.append((attack, np.asarray(jax.random.key_data(key)).tolist()))
        return np.zeros(len(labels), np.int64)

    monkeypatch.setattr(Evaluator, "predictions", recorded)
    run = load_run(resnet_workdir)
    pgd = attacks.configured("pgd")[0]
    tables = {}
    for names in (["pgd"], list(PAPER_ATTACKS)):
        keys.clear()
        robustness.evaluate_run(run, names, ["running-mean"], batch_size=32,
                                show_progress=False)
        tables[len(names)] = [key for attack, key in keys if attack == pgd]
    assert len(tables[1]) == 2 and tables[1] == tables[len(PAPER_ATTACKS)]


def test_a_killed_table_goes_on_where_it_stopped(resnet_workdir, tmp_path, monkeypatch):
    run = load_run(resnet_workdir)
    settings = dict(batch_size=32, show_progress=False, cache_dir=str(tmp_path))
    rows = robustness.evaluate_run(run, ["fgsm", "pgd"], ["running-mean"], **settings)
    assert sorted(os.listdir(tmp_path)) == [
        f"{run.label}-running-mean-{name}.json" for name in ("clean", "fgsm", "pgd")]
    evaluated, predictions = [], Evaluator.predictions

    def counted(self, *args, attack=None, **kwargs):
        evaluated.append(None if attack is None else attack.name)
        return predictions(self, *args, attack=attack, **kwargs)

    monkeypatch.setattr(Evaluator, "predictions", counted)
    assert robustness.evaluate_run(run, ["fgsm", "pgd"], ["running-mean"], **settings) == rows
    assert evaluated == []
    os.remove(tmp_path / f"{run.label}-running-mean-pgd.json")     # killed during PGD
    assert robustness.evaluate_run(run, ["fgsm", "pgd"], ["running-mean"], **settings) == rows
    assert evaluated == ["pgd", "pgd"]                              # full batch, then the rest
    robustness.evaluate_run(run, ["fgsm"], ["running-mean"], eps=0.01, **settings)
    assert evaluated[2:] == ["fgsm", "fgsm"]                        # other settings: computed


def test_tracked_logits_are_per_example_and_batch_modes_are_not(resnet_workdir):
    run = load_run(resnet_workdir)
    rng = np.random.default_rng(0)
    batch = rng.uniform(size=(8, 8, 8, 3)).astype(np.float32)
    other = batch.copy()
    other[1:] = rng.uniform(size=(7, 8, 8, 3))        # same first image, new batch mates
    for mode, independent in (("tracked", True), ("running-mean", False), ("running", False)):
        logits_fn = jax.jit(run.logits_fn(mode))
        first, second = logits_fn(batch)[0], logits_fn(other)[0]
        change = float(jnp.max(jnp.abs(first - second)))
        if independent:
            assert change < 1e-5, mode
        else:
            assert change > 1e-2, mode


# --------------------------------------------------------------- tiny trained network

class TinyNet(nnx.Module):
    """3x3 layer + BatchNorm + ReLU, then a classifier over the whole 4x4 map (a 4x4
    layer without padding) + BatchNorm: like the ResNets' head, whose last BatchNorm makes
    batch size 1 degenerate in batch modes. Convolutions: they compile in seconds."""

    def __init__(self, num_classes, rngs):
        self.layer = Conv2d(3, 16, 3, rngs=rngs)
        self.bn = BatchNorm(16)
        self.classifier = Conv2d(16, num_classes, 4, padding=0, rngs=rngs)
        self.classifier_bn = BatchNorm(num_classes)

    def __call__(self, images):
        x = jax.nn.relu(self.bn(self.layer((images - 0.5) / 0.25)))
        return self.classifier_bn(self.classifier(x)).reshape(images.shape[0], -1)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    config = ml_collections.ConfigDict(smoke.get_config().to_dict())
    config.update(dict(image_size=4, crop_padding=0, random_flip=False,  # flips mix classes
                       synthetic_num_train=512, synthetic_num_test=64, synthetic_num_classes=4,
                       model="tiny", layer_type="conv"))
    dataset = data.get_dataset(config)
    graphdef, params, batch_stats = split_model(TinyNet(4, nnx.Rngs(0)))
    tx = optax.sgd(0.1, momentum=0.9)

    @jax.jit
    def step(params, batch_stats, opt_state, images, labels):
        def loss_fn(params):
            logits, stats = apply_model(graphdef, params, batch_stats, images)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), stats
        (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state

    opt_state = tx.init(params)
    for epoch in range(4):
        for batch in dataset.train_batches(epoch, 64):
            params, batch_stats, opt_state = step(params, batch_stats, opt_state,
                                                  batch["image"], batch["label"])
    workdir = str(tmp_path_factory.mktemp("runs") / "tiny")   # run label: "tiny"
    return Run(workdir, config, dataset, 8, graphdef, params, batch_stats)


@pytest.fixture(scope="module")
def run(tiny_run):
    """The tiny run evaluated in chunks of 32 examples, so batches of 8 run 4 at a time."""
    return dataclasses.replace(tiny_run, eval_chunk_size=32)


def test_tiny_network_learned(run, tiny_run):
    images, labels = tiny_run.test_set()
    assert studies.accuracy(run, images, labels, batch_size=32, bn_mode="tracked") > 0.9


def test_grouped_batches_match_separate_calls(run, tiny_run):
    """vmap over groups: each group of 8 has its own statistics, as if called alone."""
    images, labels = tiny_run.test_set(32)
    predictions = studies.predictions(run, images, labels, batch_size=8, bn_mode="running-mean")
    logits_fn = jax.jit(tiny_run.logits_fn("running-mean"))
    separate = [np.argmax(logits_fn(images[i:i + 8]), -1) for i in range(0, 32, 8)]
    np.testing.assert_array_equal(predictions, np.stack(separate))


def test_batch_size_one_is_degenerate_in_batch_modes_only(run, tiny_run):
    images, labels = tiny_run.test_set(32)
    rows = studies.batch_size_rows(run, images, labels, ["tracked", "running-mean"],
                                   batch_sizes=(1, 32), attack="fgsm")
    tracked = [row["clean"] for row in rows if row["bn_mode"] == "tracked"]
    assert tracked == [tracked[0]] * 2 and tracked[0] > 0.8
    single = studies.predictions(run, images, labels, batch_size=1, bn_mode="running-mean")
    assert len(np.unique(single)) == 1      # the classifier's BN removes the image's logits
    by_size = {row["batch_size"]: row for row in rows if row["bn_mode"] == "running-mean"}
    assert by_size[32]["clean"] > by_size[1]["clean"] + 0.3


def test_partial_attack_under_tracked_equals_the_joint_attack(run, tiny_run):
    """Per-example model: BIM on the first 2 images of each batch of 8 finds what BIM on
    the whole batch finds for them (sign steps ignore the loss's averaging)."""
    images, labels = tiny_run.test_set(32)
    common = dict(batch_size=8, attack="bim", eps=0.2, step_size=0.04, steps=5)
    joint = studies.predictions(run, images, labels, bn_mode="tracked", **common)
    partial = studies.predictions(run, images, labels, bn_mode="tracked", attacked=2, **common)
    np.testing.assert_array_equal(partial, joint[:, :2])
    assert np.mean(joint == labels.reshape(4, 8)) < 0.5  # the attack does something
    clean = studies.predictions(run, images, labels, batch_size=8, bn_mode="running-mean")
    unmoved = studies.predictions(run, images, labels, bn_mode="running-mean", attacked=2,
                                  **{**common, "eps": 0.0})
    np.testing.assert_array_equal(unmoved, clean[:, :2])


def test_sweeps_write_tables_and_plots(run, tmp_path):
    eps_rows = studies.eps_sweep(run, ["tracked", "running-mean"], (0.0, 0.3),
                                 batch_size=32)
    for mode in ("tracked", "running-mean"):
        by_eps = {row["eps"]: row for row in eps_rows if row["bn_mode"] == mode}
        assert by_eps[0.0]["accuracy"] == by_eps[0.0]["clean"]    # eps 0: nothing moves
        assert by_eps[0.3]["accuracy"] < by_eps[0.0]["clean"] - 0.3
        assert by_eps[0.3]["step_size"] == pytest.approx(0.3 / 7)
    steps_rows = studies.steps_sweep(run, ["tracked"], (1, 3), eps=0.3, step_size=0.1,
                                     batch_size=32)
    assert [row["steps"] for row in steps_rows] == [1, 3]
    table = studies.write_sweep(eps_rows, "eps", str(tmp_path))
    studies.write_sweep(steps_rows, "steps", str(tmp_path))
    assert table.splitlines()[0] == "| run | BN mode | clean | eps=0 | eps=0.3 |"
    assert len(table.splitlines()) == 4
    for stem in ("eps_sweep", "steps_sweep"):
        with open(tmp_path / f"{stem}.json") as f:
            assert len(json.load(f)) == {"eps_sweep": 4, "steps_sweep": 2}[stem]
        assert (tmp_path / f"{stem}.png").read_bytes()[:4] == b"\x89PNG"


def test_sweep_points_are_kept_and_reused(run, tmp_path, monkeypatch):
    """With a cache_dir each sweep point is saved; a later sweep reads back the points it
    shares (the clean one and eps 0.3 here) and computes only the new one."""
    cache = str(tmp_path / "parts")
    first = studies.eps_sweep(run, ["running-mean"], (0.3,), batch_size=32, cache_dir=cache)
    assert first == studies.eps_sweep(run, ["running-mean"], (0.3,), batch_size=32)
    assert len(os.listdir(cache)) == 2                          # clean and eps 0.3
    computed = []
    real = studies.accuracy
    monkeypatch.setattr(studies, "accuracy",
                        lambda *a, **k: computed.append(k.get("eps")) or real(*a, **k))
    second = studies.eps_sweep(run, ["running-mean"], (0.1, 0.3), batch_size=32,
                               cache_dir=cache)
    assert computed == [0.1] and second[1] == first[0]
    other_seed = studies.eps_sweep(run, ["running-mean"], (0.3,), batch_size=32, seed=1,
                                   cache_dir=cache)
    assert computed == [0.1, None, 0.3] and len(other_seed) == 1  # another key: recomputed


def test_batch_study_partitions_and_threat_models(run, tmp_path):
    study = studies.batch_study(run, ["tracked", "running-mean"], num_examples=64,
                                batch_sizes=(8,), batch_size=8, partitions=3,
                                attacked=(1, 8), max_passes=2, attack="fgsm")
    assert study["num_examples"] == 64
    shuffle = {row["bn_mode"]: row for row in study["shuffle"]}
    assert shuffle["tracked"]["clean"]["agreement"] == 1.0
    assert shuffle["tracked"]["clean"]["std"] == 0.0
    assert shuffle["running-mean"]["clean"]["agreement"] < 1.0
    threat = [(row["bn_mode"], row["attacker"], row["num_attacked"]) for row in study["threat"]]
    assert threat == [
        ("tracked", "1 per batch", 16), ("tracked", "whole batch", 64),
        ("running-mean", "1 per batch", 16), ("running-mean", "whole batch", 64),
        ("running-mean", "whole batch, crafted under tracked", 64)]
    tables = studies.write_batch_study([study], str(tmp_path))
    assert tables.count("| tiny | running-mean |") == 5
    with open(tmp_path / "batch.json") as f:
        assert json.load(f) == [study]
    assert (tmp_path / "batch_size.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluation_rejects_bad_settings(run, tiny_run):
    images, labels = tiny_run.test_set(12)
    with pytest.raises(ValueError, match="do not fill batches of 8"):
        studies.predictions(run, images, labels, batch_size=8, bn_mode="tracked")
    with pytest.raises(ValueError, match="unknown evaluation BN mode 'train'"):
        studies.predictions(run, images, labels, batch_size=4, bn_mode="train")
    with pytest.raises(ValueError, match=r"attacked must be in \[1, 4\]"):
        studies.predictions(run, images, labels, batch_size=4, bn_mode="tracked", attacked=5)


# ---------------------------------------------------------------------------- the CLI

@pytest.mark.parametrize("args, message", [
    (["--attack", "pgdd"], "error: unknown attack 'pgdd'; known attacks: fgsm"),
    (["--bn_mode", "train"], "error: unknown evaluation BN mode 'train'"),
    (["--study", "noise"], "error: unknown study 'noise'"),
    (["--workdir", "/nonexistent/run"], "error: no such workdir: /nonexistent/run"),
    (["--study", "strict", "--attack", "fgsm"], "error: --attack is a setting of --study "
                                               "table / eps-sweep / steps-sweep / batch, not "
                                               "of --study strict"),
    (["--apgd_steps", "5"], "error: --apgd_steps is a setting of --study strict, not of "
                            "--study table"),
    (["--study", "eps-sweep", "--attack", "fgsm"], "error: the sweeps are PGD sweeps"),
])
def test_cli_reports_bad_input_in_one_line(args, message):
    result = subprocess.run([sys.executable, "evaluate.py", *args], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("study, own, foreign", [
    ("strict", ["--apgd_steps: APGD-CE/-DLR iterations. (default: 100)",
                "--eps: L-inf radius. (default: 0.03137)", "--attacked_per_batch"],
     ["--attack:", "--eps_values", "--partitions"]),
    ("eps-sweep", ["--eps_values: The eps values. (default: 0.01,0.02,",
                   "(default: 7)"], ["--apgd_steps", "--batch_sizes"]),
    ("batch", ["--partitions: Random partitions into batches. (default: 5)",
               "Default --batch_size: 128"], ["--apgd_steps", "--eps:"]),
])
def test_cli_study_help_lists_that_study_settings_only(study, own, foreign):
    result = subprocess.run([sys.executable, "evaluate.py", f"--study={study}", "--help"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(f"evaluate.py --study {study}: ")
    for text in own:
        assert text in result.stdout
    for text in foreign:
        assert text not in result.stdout


def test_study_settings_defaults_are_the_library_defaults():
    import evaluate   # the only tests importing a CLI module (its flags are global)
    assert evaluate.StrictSettings().budgets == strict.Budgets()
    assert evaluate.EpsSweepSettings().eps_values == studies.SWEEP_EPS
    assert evaluate.StepsSweepSettings().steps_values == studies.SWEEP_STEPS
    assert evaluate.BatchSettings().batch_sizes == studies.BATCH_SIZES
    assert evaluate.TableSettings().attack_names == PAPER_ATTACKS
    assert set(evaluate.STUDIES["strict"].flags) >= {"attacked_per_batch", "apgd_steps"}
    assert not set(evaluate.COMMON_FLAGS) & {f for s in evaluate.STUDIES.values()
                                            for f in s.flags}


def test_cli_evaluates_with_reestimated_statistics_and_names_them(resnet_workdir, tmp_path):
    result = subprocess.run(
        [sys.executable, "evaluate.py", "--workdir", resnet_workdir, "--attack", "fgsm",
         "--bn_mode", "running-mean", "--bn_stats", "reestimate", "--bn_stats_images", "32",
         "--batch_size", "16", "--num_examples", "32", "--output_dir", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| model | BN stats | BN mode |" in result.stdout
    assert "| resnet20-conv | reestimate-32 | running-mean |" in result.stdout
    assert json.loads((tmp_path / "robustness.json").read_text())[0]["bn_stats"] == \
        "reestimate-32"
    assert any(f.startswith("resnet_workdir") or "epoch1-reestimate-32" in f
               for f in os.listdir(os.path.join(resnet_workdir, "bn_stats")))


def test_table_report_appends_the_claims_it_can_judge(tmp_path):
    import evaluate   # the command's writer of --study table (see above)
    rows = [{"workdir": "pretrained:a", "model": "resnet20-adder", "layer_type": "adder",
             "bn_mode": mode, "bn_stats": "trained", "num_examples": 2000, "clean": 0.8,
             "pgd": pgd, "mul": 1, "add": 2}
            for mode, pgd in (("tracked", 0.0), ("running-mean", 0.1045))]
    settings = evaluate.TableSettings(attack="pgd")
    markdown = evaluate.STUDIES["table"].write([rows], settings, str(tmp_path))
    assert (tmp_path / "robustness.md").read_text() == markdown + "\n"
    assert markdown.splitlines()[5].startswith("The paper's claims these rows can judge")
    claim = reproduction_report.CLAIMS[0][0]
    assert f"| {claim} | ANN-R 10.45 vs ANN 0.00 | +10.45 ± 0.68 | **holds** |" in markdown
