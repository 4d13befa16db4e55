"""Sec. 3 on a trained adder network (awn_jax.stability.layer_variance), checked where the
paper's assumptions hold exactly: a rectified Gaussian input and a Laplace kernel."""

import math

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from awn_jax.model import split_model
from awn_jax.nn import BatchNorm, Conv2d
from awn_jax.stability import layer_variance
from awn_jax.stability import variance_theory as theory
from awn_jax.training.runs import Run


class Block(nnx.Module):
    def __init__(self, rngs):
        self.conv1 = Conv2d(8, 256, 3, layer_type="adder", rngs=rngs)
        self.bn1 = BatchNorm(256)


class Toy(nnx.Module):
    """relu(x) -> one adder layer -> BN, named like a ResNet's first block."""

    def __init__(self, rngs):
        self.stages = nnx.List([Block(rngs)])

    def __call__(self, x):
        block = self.stages[0]
        return jnp.mean(block.bn1(block.conv1(nnx.relu(x))), axis=(1, 2))


def test_measured_moments_match_the_exact_ones_under_the_papers_assumptions():
    sigma, mu, b = 0.8, 0.3, 1.5
    graphdef, params, stats = split_model(Toy(nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    kernel = rng.laplace(mu, b, params["stages"][0]["conv1"]["kernel"].shape)
    params["stages"][0]["conv1"]["kernel"][...] = kernel.astype(np.float32)
    run = Run("toy", ml_collections.ConfigDict({"layer_type": "adder"}), None, 1, graphdef,
              params, stats)
    # Padding would add zeros to the input; 12x12 images, outputs away from the border
    # are most, but the input statistics here are the rectified Gaussian's exactly.
    images = rng.normal(0, sigma, (64, 12, 12, 8)).astype(np.float32)
    (row,) = layer_variance.analyze(run, images, batch_size=32)["layers"]
    assert row["layer"] == "stages.0.conv1" and row["n"] == 72
    assert row["laplace_b"] == pytest.approx(b, rel=0.05)
    assert row["sigma"] == pytest.approx(sigma, rel=0.02)
    assert row["x_mean"] == pytest.approx(sigma / math.sqrt(2 * math.pi), rel=0.02)
    exact_mean, exact_var = theory.adder_exact_moments(sigma, b, mu, 72)
    # zero padding: the border outputs see zeros in place of rectified inputs
    assert row["y_mean"] == pytest.approx(exact_mean, rel=0.03)
    assert row["y_var_pooled"] == pytest.approx(exact_var, rel=0.2)
    fitted = (row["sigma"], row["laplace_b"], row["laplace_mu"], 72)  # what the row used
    assert row["exact_mean"] == pytest.approx(theory.adder_exact_moments(*fitted)[0])
    assert row["eq7_mean_bound"] == pytest.approx(theory.adder_mean_bound(*fitted))
    assert row["eq8_var_bound"] == pytest.approx(theory.adder_var_bound(*fitted))
    # Over inputs alone, per channel: far below the variance over inputs and kernels.
    assert row["y_var_per_channel"] < 0.5 * row["y_var_pooled"]
    assert row["bn_mean"] == 0.0 and row["bn_var_per_channel"] == 1.0
    markdown = layer_variance.format_markdown([layer_variance.analyze(run, images)])
    assert "| stages.0.conv1 | 72 |" in markdown
