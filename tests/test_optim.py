"""The optax chain of the official recipe and AWN's learning-rate multiplier."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from awn_jax.nn import AWNParam
from configs import default
from awn_jax.training import optimizer


class _TwoParams(nnx.Module):
    def __init__(self):
        self.kernel = nnx.Param(jnp.full((4,), 0.5))
        self.nu = AWNParam(jnp.full((4,), 0.5))


def _config(**overrides):
    config = default.get_config()
    config.update(overrides)
    return config


@pytest.mark.parametrize("momentum, weight_decay", [(0.0, 0.0), (0.9, 5e-4)])
def test_awn_multiplier_reaches_nu_and_upsilon(momentum, weight_decay):
    """With equal values and gradients, nu's update is 1e-5 of an ordinary parameter's,
    at every step (momentum and weight decay included)."""
    config = _config(momentum=momentum, weight_decay=weight_decay)
    params = nnx.state(_TwoParams(), nnx.Param)
    tx = optimizer.make_optimizer(config, steps_per_epoch=10)
    opt_state = tx.init(params)
    grads = nnx.state(_TwoParams(), nnx.Param)  # gradient 0.5 everywhere
    for _ in range(3):
        updates, opt_state = tx.update(grads, opt_state, params)
        ratio = np.asarray(updates["nu"][...]) / np.asarray(updates["kernel"][...])
        np.testing.assert_allclose(ratio, config.awn_lr_multiplier, rtol=1e-5)
        assert np.all(np.asarray(updates["kernel"][...]) < 0)


def test_sgd_matches_pytorch_semantics():
    """buf = momentum * buf + (g + wd * p); p -= lr * buf."""
    config = _config(learning_rate=0.1, momentum=0.9, weight_decay=0.01,
                     lr_schedule="constant")
    params = {"w": jnp.array([1.0, -2.0])}
    g = {"w": jnp.array([0.3, 0.1])}
    tx = optimizer.make_optimizer(config, steps_per_epoch=1)
    opt_state = tx.init(params)
    p, buf = np.array([1.0, -2.0]), np.zeros(2)
    for _ in range(3):
        updates, opt_state = tx.update(g, opt_state, params)
        params = {"w": params["w"] + updates["w"]}
        buf = 0.9 * buf + (np.array([0.3, 0.1]) + 0.01 * p)
        p = p - 0.1 * buf
        np.testing.assert_allclose(params["w"], p, rtol=1e-6)


def test_official_cosine_is_constant_within_an_epoch():
    config = _config(num_epochs=4, learning_rate=0.1, lr_schedule="cosine-epoch")
    schedule = optimizer.learning_rate_schedule(config, steps_per_epoch=5)
    for epoch in range(4):
        expected = 0.05 * (1 + math.cos(math.pi * epoch / 4))
        for step in range(epoch * 5, epoch * 5 + 5):
            np.testing.assert_allclose(schedule(step), expected, rtol=1e-6)


def test_warmup_then_cosine_step():
    config = _config(num_epochs=2, learning_rate=1.0, lr_schedule="cosine-step",
                     warmup_epochs=1.0)
    schedule = optimizer.learning_rate_schedule(config, steps_per_epoch=4)
    np.testing.assert_allclose([schedule(s) for s in range(4)], [0.25, 0.5, 0.75, 1.0])
    # The cosine spans the 4 steps after the warmup, starting from the full rate.
    np.testing.assert_allclose(schedule(6), 0.5 * (1 + math.cos(math.pi * 2 / 4)), rtol=1e-6)


@pytest.mark.parametrize("lr_schedule", optimizer.LR_SCHEDULES)
def test_warmup_ends_without_a_jump(lr_schedule):
    """A 2-of-10-epoch warmup reaches the full rate at its last step and the decay starts
    there (the hand-written schedule jumped 0.1 -> 0.0905 at that point)."""
    config = _config(num_epochs=10, learning_rate=0.1, lr_schedule=lr_schedule,
                     warmup_epochs=2.0)
    schedule = optimizer.learning_rate_schedule(config, steps_per_epoch=5)
    rates = np.array([schedule(step) for step in range(50)])
    np.testing.assert_allclose(rates[9], 0.1, rtol=1e-6)    # the warmup's last step
    np.testing.assert_allclose(rates[10], 0.1, rtol=1e-6)   # the decay's first
    assert np.all(np.diff(rates[:10]) > 0) and np.all(np.diff(rates[10:]) <= 1e-9)
    if lr_schedule == "cosine-epoch":
        # Floored to epochs counted from the warmup's end: 8 epochs of cosine.
        for epoch in range(8):
            expected = 0.05 * (1 + math.cos(math.pi * epoch / 8))
            np.testing.assert_allclose(rates[10 + 5 * epoch:15 + 5 * epoch], expected,
                                       rtol=1e-5)


def test_warmup_as_long_as_the_run_is_an_error():
    config = _config(num_epochs=2, lr_schedule="cosine-step", warmup_epochs=2.0)
    with pytest.raises(ValueError, match="warmup_epochs"):
        optimizer.learning_rate_schedule(config, steps_per_epoch=4)


def test_unknown_schedule_is_an_error():
    with pytest.raises(ValueError, match="lr_schedule"):
        optimizer.learning_rate_schedule(_config(lr_schedule="linear"), 10)
