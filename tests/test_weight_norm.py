"""WS and AWN kernel transforms, and gradients through them into the adder layer."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from awn_jax.ops import adaptive_normalize, adder_conv2d, standardize
from awn_jax.ops.reference import adder_conv2d_reference_grads

SHAPES = [(3, 3, 4, 5), (1, 1, 6, 3), (3, 3, 16, 8)]


def _numpy_standardize(w, eps):
    flat = np.asarray(w, np.float64).reshape(-1, w.shape[-1])
    mean = flat.mean(0)
    std = np.sqrt(((flat - mean) ** 2).mean(0) + eps)
    return ((flat - mean) / std).reshape(w.shape)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("eps", [1e-5, 1e-2])
def test_standardize_per_output_channel(shape, eps):
    w = 3.0 * jax.random.normal(jax.random.key(0), shape) + 1.5
    ws = standardize(w, eps)
    np.testing.assert_allclose(ws, _numpy_standardize(w, eps), rtol=1e-5, atol=1e-6)
    per_channel = np.asarray(ws).reshape(-1, shape[-1])
    np.testing.assert_allclose(per_channel.mean(0), 0.0, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_adaptive_normalize_is_affine_per_channel(shape):
    keys = jax.random.split(jax.random.key(1), 3)
    w = jax.random.normal(keys[0], shape)
    nu = jax.random.uniform(keys[1], shape[-1:], minval=0.5, maxval=2.0)
    upsilon = jax.random.normal(keys[2], shape[-1:])
    expected = nu * _numpy_standardize(w, 1e-5) + upsilon
    np.testing.assert_allclose(adaptive_normalize(w, nu, upsilon), expected, rtol=1e-5,
                               atol=1e-5)
    ones, zeros = jnp.ones(shape[-1]), jnp.zeros(shape[-1])
    chex.assert_trees_all_close(adaptive_normalize(w, ones, zeros), standardize(w))


def test_adaptive_normalize_rejects_wrong_parameter_shape():
    with pytest.raises(ValueError, match="shape"):
        adaptive_normalize(jnp.ones((3, 3, 2, 4)), jnp.ones(3), jnp.zeros(4))


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_transform_gradients_match_finite_differences(shape):
    with jax.enable_x64():
        keys = jax.random.split(jax.random.key(2), 3)
        w = jax.random.normal(keys[0], shape, jnp.float64)
        nu = jax.random.uniform(keys[1], shape[-1:], jnp.float64, 0.5, 2.0)
        upsilon = jax.random.normal(keys[2], shape[-1:], jnp.float64)
        check_grads(standardize, (w,), order=1, modes=["rev"])
        check_grads(adaptive_normalize, (w, nu, upsilon), order=1, modes=["rev"])


@pytest.mark.parametrize("kind", ["ws", "awn"])
@pytest.mark.parametrize("eta", [0.2, None])
def test_gradients_flow_through_the_transform_into_the_adder(kind, eta):
    """d loss / d (W, nu, upsilon) = (official adder rule for dW') pulled back through the
    transform by autodiff (the paper's Eq. 12)."""
    with jax.enable_x64():
        keys = jax.random.split(jax.random.key(3), 5)
        x = jax.random.normal(keys[0], (2, 6, 6, 4), jnp.float64)
        w = jax.random.normal(keys[1], (3, 3, 4, 5), jnp.float64)
        nu = jax.random.uniform(keys[2], (5,), jnp.float64, 0.5, 2.0)
        upsilon = jax.random.normal(keys[3], (5,), jnp.float64)
        g = jax.random.normal(keys[4], (2, 6, 6, 5), jnp.float64)
        if kind == "ws":
            params, transform = (w,), standardize
        else:
            params, transform = (w, nu, upsilon), adaptive_normalize

        def loss(*p):
            return jnp.sum(adder_conv2d(x, transform(*p), 1, 1, eta) * g)

        grads = jax.jit(jax.grad(loss, argnums=tuple(range(len(params)))))(*params)
        w_prime, pull_back = jax.vjp(transform, *params)
        _, dw_prime = jax.jit(adder_conv2d_reference_grads, static_argnums=(3, 4, 5))(
            x, w_prime, g, 1, 1, eta)
        expected = pull_back(dw_prime)
        chex.assert_trees_all_close(grads, expected, rtol=1e-10, atol=1e-12)
        chex.assert_tree_all_finite(grads)
