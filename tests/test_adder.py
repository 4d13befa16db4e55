"""adder_conv2d (fast path) against the plain float64 reference, values and the official
AdderNet backward rules, over a grid of shapes, strides, paddings and kernel sizes."""

import functools
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from awn_jax.ops import adder, adder_xla
from adder_cases import adder_conv2d_reference, adder_conv2d_reference_grads
from adder_cases import assert_close, assert_matches_reference
from adder_cases import inputs as _inputs

# This file tests the XLA implementation; the Pallas and native kernels have their own files
# with the same checks.
adder_conv2d = functools.partial(adder.adder_conv2d, implementation="xla")


# (batch, height, width, cin, cout, kernel_size, stride, padding)
GRID = [
    (2, 8, 8, 3, 4, 3, 1, 1),
    (3, 7, 9, 5, 6, 3, 2, 1),
    (1, 6, 6, 4, 2, 3, 1, 0),
    (2, 9, 7, 2, 3, 3, 2, 0),
    (2, 8, 8, 6, 5, 1, 2, 0),
    (4, 5, 5, 3, 7, 1, 1, 0),
    (1, 5, 6, 3, 3, 1, 1, 1),
    (2, 10, 10, 16, 8, 3, 2, 1),
]


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _fast_grads(x, kernel, g, stride, padding, eta):
    _, vjp = jax.vjp(lambda a, b: adder_conv2d(a, b, stride, padding, eta), x, kernel)
    return vjp(g)


@pytest.mark.parametrize("case", GRID)
@pytest.mark.parametrize("eta", [0.2, None])
def test_float64_matches_reference(case, eta):
    with jax.enable_x64():
        x, kernel, g, stride, padding = _inputs(case, jnp.float64)
        y = jax.jit(adder_conv2d, static_argnums=(2, 3, 4))(x, kernel, stride, padding, eta)
        dx, dw = _fast_grads(x, kernel, g, stride, padding, eta)
        assert_matches_reference(y, dx, dw, x, kernel, g, stride, padding, eta, 1e-12)


@pytest.mark.parametrize("case", GRID)
@pytest.mark.parametrize("eta", [0.2, None])
def test_float32_within_1e5_of_float64_reference(case, eta):
    x32, k32, g32, stride, padding = _inputs(case, jnp.float32, seed=1)
    y = jax.jit(adder_conv2d, static_argnums=(2, 3, 4))(x32, k32, stride, padding, eta)
    dx, dw = _fast_grads(x32, k32, g32, stride, padding, eta)
    chex.assert_type([y, dx, dw], jnp.float32)
    assert_matches_reference(y, dx, dw, x32, k32, g32, stride, padding, eta, 1e-5)


@pytest.mark.parametrize("case", GRID)
def test_weight_gradient_by_convolution_transpose_matches_reference(case):
    """The Pallas path's weight gradient (a multiplying convolution's kernel gradient)."""
    with jax.enable_x64():
        x, kernel, g, stride, padding = _inputs(case, jnp.float64)
        dw = jax.jit(adder_xla.weight_grad_by_conv, static_argnums=(3, 4))(
            x, kernel, g, stride, padding)
        _, rdw = adder_conv2d_reference_grads(x, kernel, g, stride, padding, None)
        assert_close(dw, rdw, 1e-12)


def test_backward_is_the_official_rule_not_the_true_derivative():
    """The HardTanh input gradient and full-precision weight gradient differ from the
    derivative of -|x - w| (which is sign-valued); the op must use the former."""
    x, kernel, g, stride, padding = _inputs(GRID[0], jnp.float32)
    x = 3.0 * x  # many |w - p| > 1, where HardTanh and sign agree, and many < 1, where not
    dx, dw = _fast_grads(x, kernel, g, stride, padding, None)
    true_dx, true_dw = jax.vjp(
        lambda a, b: adder_conv2d_reference(a, b, stride, padding), x, kernel)[1](g)
    assert float(jnp.max(jnp.abs(dw - true_dw))) > 1e-2
    assert float(jnp.max(jnp.abs(dx - true_dx))) > 1e-2


@pytest.mark.parametrize("eta", [0.2, 1.0])
def test_adaptive_scaling_sets_the_weight_gradient_norm(eta):
    x, kernel, g, stride, padding = _inputs(GRID[1], jnp.float32)
    _, dw = _fast_grads(x, kernel, g, stride, padding, eta)
    np.testing.assert_allclose(jnp.linalg.norm(dw), eta * np.sqrt(kernel.size), rtol=1e-5)


def test_works_under_vmap_and_grad_and_jit():
    x, kernel, g, stride, padding = _inputs(GRID[0], jnp.float32)

    def loss(kernel, x):
        return jnp.sum(adder_conv2d(x, kernel, stride, padding) * g)

    grad_fn = jax.jit(jax.grad(loss))
    dw = grad_fn(kernel, x)
    # vmap over the batch: per-example outputs equal the batched ones.
    per_example = jax.vmap(lambda xi: adder_conv2d(xi[None], kernel, stride, padding)[0])(x)
    chex.assert_trees_all_close(per_example, adder_conv2d(x, kernel, stride, padding),
                                rtol=1e-6)
    # vmap over a stack of kernels: each slice matches its own unbatched gradient.
    kernels = jnp.stack([kernel, 2.0 * kernel])
    stacked = jax.vmap(grad_fn, in_axes=(0, None))(kernels, x)
    chex.assert_trees_all_close(stacked[0], dw, rtol=1e-5)
    chex.assert_trees_all_close(stacked[1], grad_fn(2.0 * kernel, x), rtol=1e-5)


def test_bfloat16_inputs():
    x, kernel, g, stride, padding = _inputs(GRID[1], jnp.float32)
    xb, kb, gb = (a.astype(jnp.bfloat16) for a in (x, kernel, g))
    y = adder_conv2d(xb, kb, stride, padding)
    dx, dw = _fast_grads(xb, kb, gb, stride, padding, 0.2)
    chex.assert_type([y, dx, dw], jnp.bfloat16)
    chex.assert_tree_all_finite([y, dx, dw])
    y32 = adder_conv2d(xb.astype(jnp.float32), kb.astype(jnp.float32), stride, padding)
    assert_close(y, y32, 1e-2)


@pytest.mark.parametrize("x_shape, k_shape, kwargs, message", [
    ((8, 8, 3), (3, 3, 3, 4), {}, "NHWC"),
    ((1, 8, 8, 3), (3, 3, 4), {}, "HWIO"),
    ((1, 8, 8, 3), (3, 3, 5, 4), {}, "channels"),
    ((1, 8, 8, 3), (3, 3, 3, 4), {"stride": 0}, "stride"),
    ((1, 8, 8, 3), (3, 3, 3, 4), {"padding": -1}, "padding"),
])
def test_bad_input_gives_a_clear_error(x_shape, k_shape, kwargs, message):
    with pytest.raises(ValueError, match=message):
        adder_conv2d(jnp.zeros(x_shape), jnp.zeros(k_shape), **kwargs)


def test_environment_overrides_auto_only(monkeypatch):
    monkeypatch.setenv(adder.IMPLEMENTATION_ENV, "pallas")
    assert adder.resolve_implementation("auto") == "pallas"
    assert adder.resolve_implementation("xla") == "xla"
    monkeypatch.setenv(adder.IMPLEMENTATION_ENV, "cuda")
    with pytest.raises(ValueError, match="AWN_JAX_ADDER_IMPLEMENTATION"):
        adder.resolve_implementation("auto")


def test_auto_keeps_the_kernels_on_several_devices(monkeypatch):
    """Several devices no longer mean xla: the kernels run per batch shard under a mesh
    (tests/test_adder_sharding.py)."""
    monkeypatch.delenv(adder.IMPLEMENTATION_ENV, raising=False)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "device_count", lambda: 8)
    assert adder.resolve_implementation("auto") == "pallas"


def test_gpu_without_pallas_falls_back_to_xla(monkeypatch):
    """A JAX without the Pallas Triton lowering (deprecated since 0.11) must not break auto."""
    monkeypatch.delenv(adder.IMPLEMENTATION_ENV, raising=False)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    # None in sys.modules makes `import` raise ImportError, as when the module cannot import.
    monkeypatch.setitem(sys.modules, "awn_jax.ops.adder_pallas", None)
    with pytest.warns(RuntimeWarning, match="Pallas kernels do not import"):
        assert adder.resolve_implementation("auto") == "xla"
    x, kernel, _, stride, padding = _inputs(GRID[0], jnp.float32)
    with pytest.raises(RuntimeError, match="pallas"), pytest.warns(RuntimeWarning):
        adder.adder_conv2d(x, kernel, stride, padding, implementation="pallas")

