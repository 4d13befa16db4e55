"""The strict evaluation of the batch modes: the batch-mate attack (harm to clean batch
mates; none under tracked), EOT over unknown batch partners, the worst-case column and the
study's report, on the tiny trained network of test_robustness.py."""

import dataclasses
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from awn_jax import reports
from awn_jax.evaluation import Evaluator, Scoring
from awn_jax.robustness import attack_core, autoattack, strict
from awn_jax.robustness.batch_attacks import BatchMate, EOTPartners
from test_robustness import REPO_ROOT, TinyNet, resnet_workdir, tiny_run  # noqa: F401

BATCH = 16


@pytest.fixture(scope="module")
def run(tiny_run):  # noqa: F811
    return dataclasses.replace(tiny_run, eval_chunk_size=64)


@pytest.fixture(scope="module")
def data(tiny_run):  # noqa: F811
    return tiny_run.test_set(64)


def mates_logits(run, images, labels, mode, attack=None, k=8, eps=0.3):
    return run.evaluator.mates_logits(
        images, labels, batch_size=BATCH, bn_mode=mode, attacked=k,
        attack=attack, attack_args=() if attack is None else (eps, eps / 4),
        key=jax.random.key(1))


def mates_accuracy(logits, labels, k=8):
    return float(np.mean(np.argmax(logits, -1) == labels.reshape(-1, BATCH)[:, k:]))


@pytest.mark.parametrize("eps", [0.3, 1.0])   # 1.0: the unbounded attacker
def test_batch_mate_attack_harms_clean_mates_under_running_mean_only(run, data, eps):
    images, labels = data
    attack = BatchMate(steps=10)
    clean = mates_logits(run, images, labels, "tracked")
    attacked = mates_logits(run, images, labels, "tracked", attack, eps=eps)
    assert clean.shape == (4, BATCH - 8, 4)
    np.testing.assert_array_equal(attacked, clean)       # per-example: exactly no effect
    clean = mates_accuracy(mates_logits(run, images, labels, "running-mean"), labels)
    harmed = mates_accuracy(mates_logits(run, images, labels, "running-mean", attack,
                                         eps=eps), labels)
    assert harmed < clean - 0.2, (clean, harmed)


def test_batch_mate_attack_stays_in_the_ball_and_the_box(tiny_run, data):  # noqa: F811
    images, labels = data
    batch, k = images[:BATCH], 4
    model = tiny_run.logits_fn("running-mean")

    def logits_fn(x):
        return model(jnp.concatenate([x, batch[k:]]))[k:]

    for eps in (0.05, 1.0):
        adv = jax.jit(lambda x, y: BatchMate(5)(logits_fn, x, y, jax.random.key(0), eps,
                                                eps / 4))(batch[:k], labels[k:BATCH])
        assert float(jnp.max(jnp.abs(adv - batch[:k]))) <= eps + 1e-6
        assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
        assert float(jnp.max(jnp.abs(adv - batch[:k]))) > 0.5 * min(eps, 0.5)


def test_eot_crafts_without_reading_the_partners(tiny_run, data):  # noqa: F811
    images, labels = data
    model = tiny_run.logits_fn("running-mean")
    attack = EOTPartners(attacked=4, draws=3, steps=5)
    craft = jax.jit(lambda batch, y: attack(model, batch, y, jax.random.key(0), 0.1, 0.025,
                                            images))
    batch = images[:BATCH]
    other = batch.copy()
    other[4:] = images[BATCH:2 * BATCH - 4]              # other partners, same attacked
    first, second = craft(batch, labels[:BATCH]), craft(other, labels[:BATCH])
    np.testing.assert_array_equal(first[4:], batch[4:])  # partners returned untouched
    np.testing.assert_array_equal(first[:4], second[:4])  # and never read
    assert float(jnp.max(jnp.abs(first[:4] - batch[:4]))) <= 0.1 + 1e-6
    assert float(first.min()) >= 0.0 and float(first.max()) <= 1.0
    assert float(jnp.max(jnp.abs(first[:4] - batch[:4]))) > 0.05


def test_worst_case_is_the_per_example_conjunction():
    per_example = {"a": [1, 1, 0, 1], "b": [1, 0, 1, 1], "c": [0, 1, 1, 1]}
    worst = strict.worst_case(per_example)
    np.testing.assert_array_equal(worst, [0, 0, 0, 1])
    assert worst.mean() < min(np.mean(v) for v in per_example.values())   # below every one
    assert strict.binomial(worst) == {"accuracy": 0.25, "correct": 1, "n": 4,
                                      "se": pytest.approx((0.25 * 0.75 / 4) ** 0.5)}


def test_part_names_are_portable():
    assert reports.portable_stem("pretrained:cifar10_r20_ann-running mean-batch size 1") == (
        "pretrained-cifar10_r20_ann-running-mean-batch-size-1")


def test_weights_sha256_names_the_weights(tiny_run):  # noqa: F811
    """Equal for equal weights, different when one parameter or BN statistic moves by an ulp."""
    same = dataclasses.replace(tiny_run, params=jax.tree.map(np.array, tiny_run.params))
    assert same.weights_sha256 == tiny_run.weights_sha256
    for field in ("params", "batch_stats"):
        leaves, treedef = jax.tree.flatten(getattr(tiny_run, field))
        leaves[-1] = np.array(leaves[-1])
        leaves[-1].flat[0] = np.nextafter(leaves[-1].flat[0], np.inf)   # one ulp
        changed = dataclasses.replace(tiny_run, **{field: jax.tree.unflatten(treedef, leaves)})
        assert changed.weights_sha256 != tiny_run.weights_sha256, field


def test_harm_sizes():
    assert strict.harm_sizes(500) == (1, 25, 50, 125)
    assert strict.harm_sizes(16) == (1, 2, 4)


def test_strict_study_checklist_harm_controls_report_and_resume(tiny_run, tmp_path,  # noqa: F811
                                                                  monkeypatch):
    run = dataclasses.replace(tiny_run, eval_chunk_size=128)   # 8 batches: one per device
    budgets = strict.Budgets(apgd_steps=10, square_queries=40, eot_attacked=4, eot_draws=2,
                             eot_steps=4, mate_steps=5, mate_unbounded=True,
                             mate_sizes=(1, 8), control_batch_size=8)
    settings = dict(num_examples=64, batch_size=BATCH, eps=0.1, step_size=0.025,
                    budgets=budgets, show_progress=False, cache_dir=str(tmp_path / "parts"))
    study = strict.strict_study(run, ["tracked", "running-mean"], **settings)
    assert study["num_examples"] == 64
    assert study["weights_sha256"] == run.weights_sha256   # parts are keyed by the weights
    for mode, result in study["modes"].items():
        checks = result["checks"]
        assert set(checks) == set(strict.CHECKS)
        for name, stats in checks.items():
            assert stats["n"] == 64, name
            assert checks["worst"]["accuracy"] <= stats["accuracy"], (mode, name)
        assert checks["pgd"]["accuracy"] < checks["clean"]["accuracy"] - 0.2
        assert checks["square"]["accuracy"] < checks["clean"]["accuracy"], mode
        assert [row["k"] for row in result["harm"]] == [1, 8]
        assert [row["attacked"]["n"] for row in result["harm"]] == [60, 32]
        controls = result["controls"]
        assert controls["batch size 1"]["clean"]["n"] == 64
        assert controls["single-class batches of 8"]["clean"]["n"] == controls[
            "mixed batches of 8"]["clean"]["n"] > 0
    tracked, batch_mode = study["modes"]["tracked"], study["modes"]["running-mean"]
    # Per-example controls: crafting under tracked is the white-box attack itself (same
    # key), batch mates are unaffected, and batch size changes nothing.
    assert tracked["checks"]["transfer"] == tracked["checks"]["pgd"]
    assert all(row["flipped"] == 0 and row["attacked"] == row["clean"]
               for row in tracked["harm"])
    assert tracked["controls"]["batch size 1"]["clean"] == tracked["checks"]["clean"]
    # Batch mode: the mates are harmed, and at batch size 1 every image gets one class.
    assert batch_mode["harm"][-1]["flipped"] > 0
    assert (batch_mode["harm"][-1]["attacked"]["accuracy"]
            < batch_mode["harm"][-1]["clean"]["accuracy"])
    assert batch_mode["controls"]["batch size 1"]["clean"]["accuracy"] < 0.5

    # Restarted: every part comes from the cache, nothing is evaluated again; one part
    # lost (a kill in progress) is the only one recomputed, to the same result.
    parts = sorted(os.listdir(tmp_path / "parts"))
    assert len(parts) == 2 * (7 + 2 + 3) and "tiny-running-mean-square.json" in parts
    evaluated, logits = [], Evaluator.logits

    def counted_logits(self, *args, **kwargs):   # every evaluation passes through it
        evaluated.append(kwargs["bn_mode"])
        return logits(self, *args, **kwargs)

    monkeypatch.setattr(Evaluator, "logits", counted_logits)
    assert strict.strict_study(run, ["tracked", "running-mean"], **settings) == study
    assert evaluated == []
    os.remove(tmp_path / "parts" / "tiny-running-mean-square.json")
    assert strict.strict_study(run, ["tracked", "running-mean"], **settings) == study
    assert evaluated == ["running-mean"]

    tables = strict.write_strict([study], str(tmp_path))
    with open(tmp_path / "strict.json") as f:
        assert json.load(f) == [study]
    assert (tmp_path / "strict.md").read_text() == tables + "\n"
    assert (tmp_path / "strict.png").read_bytes()[:4] == b"\x89PNG"
    assert "| worst case | per example" in tables
    assert tables.count("| ") > 30


def _reordered_strict_module(monkeypatch):
    """awn_jax.robustness.strict as if its source listed the checklist in reverse order."""
    source = pathlib.Path(strict.__file__).read_text()
    start = source.index("CHECKS = {")
    end = source.index("}\n", start) + 2
    reordered = "CHECKS = " + repr(dict(reversed(strict.CHECKS.items()))) + "\n"
    spec = importlib.util.spec_from_loader("strict_reordered", loader=None)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)   # for its dataclasses
    exec(compile(source[:start] + reordered + source[end:], strict.__file__, "exec"),
         module.__dict__)
    return module


def test_reordering_the_checklist_changes_no_number(tiny_run, monkeypatch):  # noqa: F811
    """Each evaluation's random key comes from its name (strict.KEY_IDS), not its place."""
    reordered = _reordered_strict_module(monkeypatch)
    assert list(reordered.CHECKS) == list(reversed(strict.CHECKS))
    budgets = dict(apgd_steps=3, square_queries=10, eot_attacked=4, eot_draws=1, eot_steps=2,
                   mate_steps=2, mate_sizes=(4,), control_batch_size=8)
    settings = dict(num_examples=32, batch_size=BATCH, eps=0.1, step_size=0.025,
                    show_progress=False)
    study = strict.strict_study(tiny_run, ["running-mean"], budgets=strict.Budgets(**budgets),
                                **settings)
    assert reordered.strict_study(tiny_run, ["running-mean"],
                                  budgets=reordered.Budgets(**budgets), **settings) == study


def test_only_squares_parts_depend_on_squares_window_rule(tiny_run, tmp_path,  # noqa: F811
                                                           monkeypatch):
    """A change of autoattack.SQUARE_CORNERS recomputes the Square parts and nothing else."""
    budgets = strict.Budgets(apgd_steps=2, square_queries=5, eot_attacked=4, eot_draws=1,
                             eot_steps=1, mate_steps=1, mate_sizes=(4,), control_batch_size=8)
    settings = dict(num_examples=32, batch_size=BATCH, eps=0.1, step_size=0.025,
                    budgets=budgets, show_progress=False, cache_dir=str(tmp_path))
    first = strict.strict_study(tiny_run, ["running-mean"], **settings)
    evaluated, logits = [], Evaluator.logits

    def counted_logits(self, *args, **kwargs):
        evaluated.append(kwargs.get("attack"))
        return logits(self, *args, **kwargs)

    monkeypatch.setattr(Evaluator, "logits", counted_logits)
    monkeypatch.setattr(autoattack, "SQUARE_CORNERS", "another rule")
    second = strict.strict_study(tiny_run, ["running-mean"], **settings)
    assert [attack.name for attack in evaluated] == ["square"]
    assert second["square_corners"] == "another rule" != first["square_corners"]


def test_scoring_the_mates_needs_attacker_images_and_mates(run, data):
    images, labels = data
    for attacked in (None, BATCH):
        with pytest.raises(ValueError, match=r"scoring the mates needs attacked in \[1, 15\]"):
            run.evaluator.mates_logits(images, labels, batch_size=BATCH, bn_mode="tracked",
                                       attacked=attacked)
    with pytest.raises(ValueError, match="score must be"):
        Scoring("tracked", score="others")


def test_cli_strict_reports_bad_budgets_in_one_line(resnet_workdir):  # noqa: F811
    result = subprocess.run(
        [sys.executable, "evaluate.py", "--study", "strict", "--workdir", resnet_workdir,
         "--batch_size", "16", "--eot_attacked", "16"], cwd=REPO_ROOT, capture_output=True,
        text=True, timeout=300)
    assert result.returncode != 0
    assert ("error: EOT's attacked images per batch must be in [1, 15] for batches of 16, "
            "got 16") in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("attack, gradients", [(BatchMate(5), 5),
                                               (EOTPartners(2, draws=2, steps=3), 6)])
def test_batch_attacks_unrolled_equal_the_loop_in_float64(attack, gradients, monkeypatch):
    """On the CPU the batch attacks' loops are unrolled (attack_core.iterate) up to
    UNROLL_MAX_STEPS gradients: the same iterates as the loop, on a batch-dependent toy."""
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(12, 3))
    images, labels = rng.uniform(size=(8, 2, 2, 3)), rng.integers(0, 3, 8)

    def logits_fn(x):   # depends on the batch through its mean, as "-R" does
        flat = x.reshape(x.shape[0], -1)
        return (flat - flat.mean(0)) @ weights

    def run(unroll_max_steps):
        monkeypatch.setattr(attack_core, "UNROLL_MAX_STEPS", unroll_max_steps)
        if isinstance(attack, BatchMate):
            fn = jax.jit(lambda x, key: attack(
                lambda z: logits_fn(x.at[:2].set(z))[2:], x[:2], labels[2:], key, 0.1, 0.025))
        else:
            fn = jax.jit(lambda x, key: attack(logits_fn, x, labels, key, 0.1, 0.025, x))
        args = (jnp.asarray(images), jax.random.key(1))
        return fn(*args), fn.lower(*args).as_text().count("stablehlo.while")

    default = attack_core.UNROLL_MAX_STEPS
    assert gradients <= default
    with jax.enable_x64():
        (rolled, loops), (unrolled, fewer) = run(0), run(default)
    assert loops > fewer
    assert float(jnp.max(jnp.abs(rolled[:2] - images[:2]))) > 0
    np.testing.assert_allclose(unrolled, rolled, rtol=0, atol=1e-12)
