"""Shared by the adder op's tests (tests/test_adder.py, tests/test_adder_sharding.py): the
plain reference, compiled once per shape (op-by-op dispatch of its unrolled taps is what is
slow), random inputs of a case, and the comparison of an implementation's value and
gradients with the float64 reference."""

import jax
import jax.numpy as jnp
import numpy as np

from awn_jax.ops import reference

adder_conv2d_reference = jax.jit(reference.adder_conv2d_reference, static_argnums=(2, 3))
adder_conv2d_reference_grads = jax.jit(reference.adder_conv2d_reference_grads,
                                       static_argnums=(3, 4, 5))


def inputs(case, dtype, seed=0):
    """x, kernel, cotangent g, stride, padding of a case
    (batch, height, width, cin, cout, kernel_size, stride, padding). A (kh, kw)
    kernel_size takes the leading kh x kw taps of the square kernel of side max(kh, kw)
    and a cotangent of the output's shape."""
    n, h, w, cin, cout, k, stride, padding = case
    if not isinstance(k, int):
        kh, kw = k
        x, kernel, _, _, _ = inputs(case[:5] + (max(k),) + case[6:], dtype, seed)
        ho = (h + 2 * padding - kh) // stride + 1
        wo = (w + 2 * padding - kw) // stride + 1
        g = jax.random.normal(jax.random.key(seed + 1), (n, ho, wo, cout), dtype)
        return x, kernel[:kh, :kw], g, stride, padding
    kx, kw, kg = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (n, h, w, cin), dtype)
    kernel = jax.random.normal(kw, (k, k, cin, cout), dtype)
    ho = (h + 2 * padding - k) // stride + 1
    wo = (w + 2 * padding - k) // stride + 1
    g = jax.random.normal(kg, (n, ho, wo, cout), dtype)
    return x, kernel, g, stride, padding


def assert_close(actual, expected, rtol):
    """Relative to the largest magnitude of the expected tensor, so near-zero entries of a
    sum with cancellation do not dominate."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    np.testing.assert_allclose(actual, expected, rtol=rtol,
                               atol=rtol * max(np.abs(expected).max(), 1e-30))


def assert_matches_reference(y, dx, dw, x, kernel, g, stride, padding, eta, rtol):
    """An implementation's output ``y`` and AdderNet gradients ``dx``, ``dw`` at (x, kernel,
    cotangent g) against the reference computed in float64 from the same inputs."""
    with jax.enable_x64():
        x, kernel, g = (jnp.asarray(a, jnp.float64) for a in (x, kernel, g))
        assert_close(y, adder_conv2d_reference(x, kernel, stride, padding), rtol)
        rdx, rdw = adder_conv2d_reference_grads(x, kernel, g, stride, padding, eta)
        assert_close(dx, rdx, rtol)
        assert_close(dw, rdw, rtol)

