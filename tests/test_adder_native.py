"""Native CPU adder kernels (awn_jax.ops.adder_native, ``implementation="native"``) against the
plain float64 reference: values and the official AdderNet backward rules, over shapes that
exercise the vector loops' tails (odd channel counts, short last pixel blocks), strides,
paddings and kernel sizes; plus dtypes, transformations and the fallback when no compiler is
found."""

import functools
import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from awn_jax.ops import adder, adder_native
from awn_jax.ops import reference
from adder_cases import adder_conv2d_reference, adder_conv2d_reference_grads
from adder_cases import assert_close, assert_matches_reference
from adder_cases import inputs as _inputs

needs_native = pytest.mark.skipif(
    not adder_native.is_available(),
    reason=f"native adder kernels unavailable: {adder_native.unavailable_reason()}")

adder_conv2d = functools.partial(adder.adder_conv2d, implementation="native")


# (batch, height, width, cin, cout, kernel_size, stride, padding). Channel counts cover
# multiples of the vector width (8 float32 / 4 float64 lanes) and of the register blocks
# (16), odd counts that need zero-padding, and cin not divisible by the weight gradient's
# block of 6/12 input channels; pixel counts leave short last blocks.
GRID = [
    (2, 8, 8, 3, 4, 3, 1, 1),
    (3, 7, 9, 5, 6, 3, 2, 1),
    (2, 9, 7, 2, 3, 3, 2, 0),
    (2, 8, 8, 6, 5, 1, 2, 0),
    (1, 5, 6, 3, 3, 1, 1, 1),
    (1, 9, 11, 17, 33, 3, 1, 1),
    (2, 8, 8, 16, 32, 3, 2, 1),
    (1, 7, 7, 13, 24, 1, 2, 0),
    (2, 4, 5, 8, 9, 3, 1, 2),   # padding wider than the kernel reach: all-zero taps
]


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _native_grads(x, kernel, g, stride, padding, eta):
    _, vjp = jax.vjp(lambda a, b: adder_conv2d(a, b, stride, padding, eta),
                     x, kernel)
    return vjp(g)


@needs_native
@pytest.mark.parametrize("case", GRID)
@pytest.mark.parametrize("eta", [0.2, None])
def test_float64_matches_reference(case, eta):
    with jax.enable_x64():
        x, kernel, g, stride, padding = _inputs(case, jnp.float64)
        y = jax.jit(adder_conv2d, static_argnums=(2, 3, 4))(
            x, kernel, stride, padding, eta)
        assert y.dtype == jnp.float64
        dx, dw = _native_grads(x, kernel, g, stride, padding, eta)
        assert_matches_reference(y, dx, dw, x, kernel, g, stride, padding, eta, 1e-12)


@needs_native
@pytest.mark.parametrize("case", GRID[::2])
def test_float32_within_1e5_of_float64_reference(case):
    x32, k32, g32, stride, padding = _inputs(case, jnp.float32, seed=1)
    y = jax.jit(adder_conv2d, static_argnums=(2, 3, 4))(
        x32, k32, stride, padding, 0.2)
    dx, dw = _native_grads(x32, k32, g32, stride, padding, 0.2)
    chex.assert_type([y, dx, dw], jnp.float32)
    assert_matches_reference(y, dx, dw, x32, k32, g32, stride, padding, 0.2, 1e-5)


@needs_native
def test_hardtanh_rule_not_the_true_derivative():
    """Most |w - x| > 1 with x scaled up: HardTanh saturates there, so dx differs from the
    sign-valued true derivative only where |w - x| < 1; both regimes must be exercised."""
    x, kernel, g, stride, padding = _inputs(GRID[5], jnp.float32)
    x = 3.0 * x
    dx, _ = _native_grads(x, kernel, g, stride, padding, None)
    true_dx = jax.jit(jax.vjp(
        lambda a: reference.adder_conv2d_reference(a, kernel, stride, padding), x)[1])(g)[0]
    assert float(jnp.max(jnp.abs(dx - true_dx))) > 1e-2
    with jax.enable_x64():
        args = (jnp.asarray(a, jnp.float64) for a in (x, kernel, g))
        rdx, _ = adder_conv2d_reference_grads(*args, stride, padding, None)
    assert_close(dx, rdx, 1e-5)


@needs_native
def test_grad_jit_and_vmap():
    x, kernel, g, stride, padding = _inputs(GRID[1], jnp.float32)

    def loss(kernel, x):
        return jnp.sum(adder_conv2d(x, kernel, stride, padding) * g)

    grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1)))
    dw, dx = grad_fn(kernel, x)
    rdx, rdw = _native_grads(x, kernel, g, stride, padding, 0.2)
    assert_close(dx, rdx, 1e-6)
    assert_close(dw, rdw, 1e-6)
    # vmap over single examples: equal to the batched call.
    per_example = jax.vmap(
        lambda xi: adder_conv2d(xi[None], kernel, stride, padding)[0])(x)
    assert_close(per_example, adder_conv2d(x, kernel, stride, padding), 1e-6)
    # vmap over a stack of kernels, through the custom backward.
    stacked = jax.vmap(grad_fn, in_axes=(0, None))(jnp.stack([kernel, 2.0 * kernel]), x)
    assert_close(stacked[0][0], dw, 1e-5)
    assert_close(stacked[0][1], grad_fn(2.0 * kernel, x)[0], 1e-5)


@needs_native
def test_adaptive_scaling_sets_the_weight_gradient_norm():
    x, kernel, g, stride, padding = _inputs(GRID[6], jnp.float32)
    _, dw = _native_grads(x, kernel, g, stride, padding, 0.5)
    np.testing.assert_allclose(jnp.linalg.norm(dw), 0.5 * np.sqrt(kernel.size), rtol=1e-5)


@needs_native
def test_bfloat16_computed_in_float32_and_cast_back():
    x, kernel, g, stride, padding = _inputs(GRID[1], jnp.float32)
    xb, kb, gb = (a.astype(jnp.bfloat16) for a in (x, kernel, g))
    y = adder_conv2d(xb, kb, stride, padding)
    dx, dw = _native_grads(xb, kb, gb, stride, padding, 0.2)
    chex.assert_type([y, dx, dw], jnp.bfloat16)
    y32 = adder_conv2d(xb.astype(jnp.float32), kb.astype(jnp.float32), stride,
                                    padding)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y32.astype(jnp.bfloat16)))


@needs_native
def test_non_square_kernel_takes_the_xla_path():
    x = jax.random.normal(jax.random.key(0), (2, 6, 7, 3))
    kernel = jax.random.normal(jax.random.key(1), (1, 3, 3, 5))
    y = adder_conv2d(x, kernel, 1, 1)
    with jax.enable_x64():
        expected = adder_conv2d_reference(jnp.asarray(x, jnp.float64),
                                          jnp.asarray(kernel, jnp.float64), 1, 1)
    assert_close(y, expected, 1e-5)


@needs_native
def test_bad_input_gives_a_clear_error():
    with pytest.raises(ValueError, match="channels"):
        adder_conv2d(jnp.zeros((1, 8, 8, 3)), jnp.zeros((3, 3, 5, 4)))


@pytest.mark.parametrize("env", [{"AWN_JAX_NATIVE": "0"}, {"CXX": "/nonexistent/c++"}])
def test_unavailable_without_compiler_or_when_disabled(env, tmp_path):
    """A fresh process with no usable compiler (and an empty cache) reports the native path
    unavailable, with the reason, instead of failing; the caller then uses XLA."""
    script = textwrap.dedent("""
        from awn_jax.ops import adder_native
        assert not adder_native.is_available()
        print("REASON:", adder_native.unavailable_reason())
    """)
    environ = {**os.environ, **env, "AWN_JAX_NATIVE_CACHE": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", script], env=environ, capture_output=True,
                            text=True, timeout=120,
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    assert result.returncode == 0, result.stderr
    expected = "AWN_JAX_NATIVE=0" if "AWN_JAX_NATIVE" in env else "/nonexistent/c++"
    assert expected in result.stdout
    assert "unavailable" in result.stderr  # logged once as a warning
    assert not list(tmp_path.iterdir())  # no partial build left behind
