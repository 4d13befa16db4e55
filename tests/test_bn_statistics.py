"""Re-estimated BatchNorm statistics (awn_jax.bn_statistics): a float64 reference layer by
layer, the trained statistics kept, 1 against 8 devices, the consistency with training-mode
BN, the cache beside a workdir, and bad settings."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from awn_jax import bn_statistics
from awn_jax.bn_statistics import BNStats, reestimate
from awn_jax.distributed import make_mesh
from awn_jax.errors import UserError
from awn_jax.model import apply_model, fill_named, named_leaves, split_model, with_bn_mode
from awn_jax.nn import BatchNorm, Conv2d, create_model
from awn_jax.ops.reference import adder_conv2d_reference
from awn_jax.training.runs import load_run
from workdirs import random_workdir


class Toy(nnx.Module):
    """A WS adder stem, an adder layer beside a 1x1 multiplying shortcut, summed: three BNs
    whose inputs depend on earlier BNs, one pair in parallel."""

    def __init__(self, rngs):
        self.conv1 = Conv2d(3, 4, 3, layer_type="adder-ws", rngs=rngs)
        self.bn1 = BatchNorm(4)
        self.conv2 = Conv2d(4, 5, 3, stride=2, layer_type="adder", rngs=rngs)
        self.bn2 = BatchNorm(5)
        self.short = Conv2d(4, 5, 1, stride=2, padding=0, layer_type="conv", rngs=rngs)
        self.bn3 = BatchNorm(5)

    def __call__(self, x):
        y = nnx.relu(self.bn1(self.conv1(x)))
        z = nnx.relu(self.bn2(self.conv2(y)) + self.bn3(self.short(y)))
        return jnp.mean(z, axis=(1, 2))


def _toy():
    """The toy with non-trivial affine parameters and trained statistics far from what the
    images give, so a layer that used the old statistics of an earlier one would show."""
    graphdef, params, batch_stats = split_model(Toy(nnx.Rngs(0)))
    rng = np.random.default_rng(1)
    params = jax.tree.map(np.array, params)  # writable copies, set in place below
    batch_stats = jax.tree.map(np.array, batch_stats)
    for name in ("bn1", "bn2", "bn3"):
        params[name]["scale"][...] = rng.uniform(0.5, 2.0, params[name]["scale"].shape)
        params[name]["bias"][...] = rng.normal(0, 0.5, params[name]["bias"].shape)
        batch_stats[name]["mean"][...] = rng.normal(-30, 5, batch_stats[name]["mean"].shape)
        batch_stats[name]["var"][...] = rng.uniform(10, 50, batch_stats[name]["var"].shape)
    params = jax.tree.map(lambda p: np.asarray(p, np.float32), params)
    batch_stats = jax.tree.map(lambda p: np.asarray(p, np.float32), batch_stats)
    return graphdef, params, batch_stats


def _batches(sizes=(4, 4, 3), seed=2, size=8):
    rng = np.random.default_rng(seed)
    return [rng.random((n, size, size, 3), dtype=np.float32) for n in sizes]


def _reference(model, params, batches, source):
    """The statistics computed directly in float64, layer after layer, as the docstring of
    awn_jax.bn_statistics defines them."""
    p = {k: np.asarray(v, np.float64) for k, v in named_leaves(params).items()}
    kernels = {name: np.asarray(getattr(model, name).effective_kernel(), np.float64)
               for name in ("conv1", "conv2", "short")}
    stats = {}

    def moments(xs):
        values = np.concatenate([x.reshape(-1, x.shape[-1]) for x in xs])
        mean = values.mean(0)
        if source == "reestimate":
            return mean, values.var(0, ddof=1)
        counts = [x[..., 0].size for x in xs]
        within = [x.reshape(-1, x.shape[-1]).var(0, ddof=1) for x in xs]
        return mean, np.average(within, axis=0, weights=counts)

    def bn(name, x):
        mean = x.mean(axis=(0, 1, 2)) if source == "reestimate-running-mean" else stats[name][0]
        return ((x - mean) / np.sqrt(stats[name][1] + 1e-5) * p[f"{name}.scale"]
                + p[f"{name}.bias"])

    with jax.enable_x64():
        xs = [np.asarray(x, np.float64) for x in batches]
        x1 = [np.asarray(adder_conv2d_reference(x, kernels["conv1"], 1, 1)) for x in xs]
        stats["bn1"] = moments(x1)
        y = [np.maximum(bn("bn1", x), 0) for x in x1]
        x2 = [np.asarray(adder_conv2d_reference(v, kernels["conv2"], 2, 1)) for v in y]
        stats["bn2"] = moments(x2)
        x3 = [np.asarray(lax.conv_general_dilated(v, kernels["short"], (2, 2), [(0, 0)] * 2,
                                                  dimension_numbers=("NHWC", "HWIO", "NHWC")))
              for v in y]
        stats["bn3"] = moments(x3)
    return stats


@pytest.mark.parametrize("source", ["reestimate", "reestimate-running-mean"])
def test_statistics_match_a_float64_computation_layer_by_layer(source):
    graphdef, params, batch_stats = _toy()
    batches = _batches()
    new = reestimate(graphdef, params, batch_stats, lambda: iter(batches), source=source,
                     mesh=make_mesh(1))
    expected = _reference(nnx.merge(graphdef, params, batch_stats), params, batches, source)
    for name, (mean, var) in expected.items():
        np.testing.assert_allclose(new[name]["mean"][...], mean, rtol=2e-5, atol=1e-4,
                                   err_msg=f"{name} mean")
        np.testing.assert_allclose(new[name]["var"][...], var, rtol=2e-4, err_msg=f"{name} var")
        assert new[name]["var"][...].dtype == np.float32
    # The reference itself is far from the trained statistics it replaced.
    assert not np.allclose(expected["bn2"][1], batch_stats["bn2"]["var"][...], rtol=0.1)


def _resnet():
    """A ResNet-20 of AWN adder layers on 8x8 images, its trained statistics far from what
    the images give: the model whose forward re-estimation walks segment by segment."""
    model = create_model("resnet20", num_classes=10, layer_type="adder-awn", mean=(0.5,) * 3,
                         std=(0.25,) * 3, rngs=nnx.Rngs(3))
    graphdef, params, batch_stats = split_model(model)
    rng = np.random.default_rng(4)
    wrong = {name: (rng.uniform(10, 50, np.shape(value)) if name.endswith(".var")
                    else rng.normal(-30, 5, np.shape(value)))
             for name, value in named_leaves(batch_stats).items()}
    return graphdef, params, fill_named(batch_stats, wrong)


@pytest.mark.parametrize("source", ["reestimate", "reestimate-running-mean"])
def test_resnet_segments_give_the_statistics_of_forwards_from_the_images(source):
    """Kept between a ResNet's segments, the activations give the statistics that forwards
    from the images give (``cache_bytes=0`` forces those, the way the float64 test above
    checks), while the images are read a few times instead of once per BN."""
    graphdef, params, batch_stats = _resnet()
    batches = _batches(sizes=(6, 6, 5))
    reads = {}
    results = {}
    for cache_bytes in (bn_statistics.CACHE_BYTES, 0):
        reads[cache_bytes] = 0

        def read():
            reads[cache_bytes] += 1
            return iter(batches)

        results[cache_bytes] = reestimate(graphdef, params, batch_stats, read, source=source,
                                          mesh=make_mesh(1), cache_bytes=cache_bytes)
    segmented, whole = (named_leaves(results[c]) for c in (bn_statistics.CACHE_BYTES, 0))
    for name, value in whole.items():
        np.testing.assert_allclose(segmented[name], value, rtol=1e-4, atol=1e-4, err_msg=name)
    assert not np.allclose(whole["classifier_bn.var"],
                           named_leaves(batch_stats)["classifier_bn.var"], rtol=0.1)
    num_bns = sum(name.endswith(".var") for name in whole)
    assert reads[0] >= num_bns == 22
    assert reads[bn_statistics.CACHE_BYTES] <= 4


def test_trained_statistics_and_parameters_are_untouched():
    graphdef, params, batch_stats = _toy()
    before = jax.tree.map(np.copy, (params, batch_stats))
    new = reestimate(graphdef, params, batch_stats, lambda: iter(_batches()),
                     mesh=make_mesh(1))
    after = (params, batch_stats)
    for old, now in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(old, now)
    assert jax.tree.structure(new) == jax.tree.structure(batch_stats)
    assert not np.allclose(new["bn1"]["var"][...], batch_stats["bn1"]["var"][...])


@pytest.mark.parametrize("source", ["reestimate", "reestimate-running-mean"])
def test_one_and_eight_devices_give_the_same_statistics(source):
    graphdef, params, batch_stats = _toy()
    batches = _batches(sizes=(8, 8, 8))
    one, eight = (reestimate(graphdef, params, batch_stats, lambda: iter(batches),
                             source=source, mesh=make_mesh(n)) for n in (1, 8))
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_statistics_of_the_training_batch_reproduce_train_mode():
    """Re-estimated on exactly one batch, every BN's statistics are that batch's with the
    earlier layers normalized as in training, except that the stored variance is unbiased
    and training normalizes with the biased one: each BN's output is off by the factor
    sqrt((n-1)/n), n the values per channel, i.e. by 1/(2n) relative. So ``tracked`` with
    these statistics reproduces the ``train``-mode logits up to about the sum of 1/(2n)
    over the BNs, and the gap shrinks like 1/n: 4x fewer per side, 4x more values."""
    graphdef, params, batch_stats = _toy()
    tracked = with_bn_mode(graphdef, params, batch_stats, "tracked")
    gaps = {}
    for side in (16, 32):
        images = _batches(sizes=(16,), size=side)[0]
        new = reestimate(graphdef, params, batch_stats, lambda: iter([images]),
                         mesh=make_mesh(1))
        train = apply_model(with_bn_mode(graphdef, params, batch_stats, "train"), params,
                            batch_stats, images)[0]
        gaps[side] = float(jnp.max(jnp.abs(apply_model(tracked, params, new, images)[0]
                                           - train)))
        values = [16 * side * side, 16 * (side // 2) ** 2, 16 * (side // 2) ** 2]  # bn1-3
        bound = sum(1 / (2 * n) for n in values) * float(jnp.max(jnp.abs(train)))
        assert gaps[side] < 2 * bound, (side, gaps[side], bound)
        # With the trained statistics, tracked is far from train mode on this batch.
        assert float(jnp.max(jnp.abs(apply_model(tracked, params, batch_stats, images)[0]
                                     - train))) > 1000 * bound
    assert 3 < gaps[16] / gaps[32] < 6


def test_settings_are_checked():
    with pytest.raises(UserError, match="unknown BN statistics"):
        BNStats("precise")
    with pytest.raises(UserError, match="at least 2"):
        BNStats("reestimate", num_images=1)
    graphdef, params, batch_stats = _toy()
    with pytest.raises(UserError, match="at least one batch"):
        reestimate(graphdef, params, batch_stats, lambda: iter([]))
    with pytest.raises(UserError, match="cannot re-estimate"):
        reestimate(graphdef, params, batch_stats, lambda: iter(_batches()), source="trained")
    assert BNStats().label() == "trained"
    assert BNStats("reestimate", 500, augment=True).label() == "reestimate-500-aug"
    assert "un-augmented" in BNStats("reestimate").describe()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A workdir with an epoch-1 checkpoint of a random ResNet-20 ANN-WS on 8x8 images."""
    return random_workdir(str(tmp_path_factory.mktemp("bn_stats_workdir")),
                          layer_type="adder-ws", image_size=8, crop_padding=1,
                          synthetic_num_train=64, synthetic_num_test=32, batch_size=32)


def _files(directory):
    return sorted(os.path.relpath(os.path.join(root, f), directory)
                  for root, _, files in os.walk(directory) for f in files)


def test_a_run_keeps_its_statistics_and_caches_the_new_ones(workdir, monkeypatch):
    checkpoint_files = _files(os.path.join(workdir, "checkpoints"))
    run = load_run(workdir)
    settings = BNStats("reestimate", num_images=48, batch_size=16)
    new = run.with_bn_stats(settings)
    assert new.bn_stats == settings and run.bn_stats == BNStats()
    assert new.weights_sha256 != run.weights_sha256
    for a, b in zip(jax.tree.leaves(run.params), jax.tree.leaves(new.params)):
        assert a is b
    reloaded = load_run(workdir)
    for a, b in zip(jax.tree.leaves(run.batch_stats), jax.tree.leaves(reloaded.batch_stats)):
        np.testing.assert_array_equal(a, b)
    assert _files(os.path.join(workdir, "checkpoints")) == checkpoint_files
    cached = os.listdir(os.path.join(workdir, "bn_stats"))
    assert len(cached) == 1 and "epoch1-reestimate-48" in cached[0]

    # A second call reads the file; other settings compute anew.
    monkeypatch.setattr(bn_statistics, "reestimate",
                        lambda *a, **k: pytest.fail("recomputed cached statistics"))
    again = reloaded.with_bn_stats(settings)
    for a, b in zip(jax.tree.leaves(new.batch_stats), jax.tree.leaves(again.batch_stats)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(pytest.fail.Exception):
        reloaded.with_bn_stats(dataclasses.replace(settings, num_images=32))
    assert reloaded.with_bn_stats(BNStats()) is reloaded


def test_statistics_batches_are_fixed_and_need_the_training_split(workdir):
    run = load_run(workdir)
    first = [b["image"] for b in run.dataset.statistics_batches(40, 16)]
    second = [b["image"] for b in run.dataset.statistics_batches(40, 16)]
    assert [len(b) for b in first] == [16, 16, 8]
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    augmented = [b["image"] for b in run.dataset.statistics_batches(40, 16, augment=True)]
    assert not np.array_equal(augmented[0], first[0])
    with pytest.raises(UserError, match="cannot take"):
        next(run.dataset.statistics_batches(65, 16))
    test_only = dataclasses.replace(run, dataset=None)
    with pytest.raises(UserError, match="training images"):
        test_only.with_bn_stats(BNStats("reestimate"))
