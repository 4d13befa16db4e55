"""The Pallas adder kernels (in interpret mode on CPU) against the plain float64 reference:
values and the official AdderNet backward rules over shapes, strides, paddings, kernel
sizes, channel counts that need padding and grids of several tiles; and the rule by which
``adder_conv2d(implementation="auto")`` picks an implementation."""

import functools
import itertools
import re
import sys
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adder_cases
from awn_jax.ops import adder, adder_pallas
from adder_cases import adder_conv2d_reference, assert_close, assert_matches_reference


# (batch, height, width, cin, cout, kernel_size, stride, padding); kernel_size an int or
# (kh, kw). The default tiles are 64 pixels x 32 channels; SMALL tiles make small shapes
# span several tiles and chunks. Most strided cases have sizes that the stride does not
# divide, so the input gradient's phase classes (ih % s, iw % s) differ in size; some have
# classes that no kernel tap reads or that hold no pixels.
GRID = [
    (2, 8, 8, 3, 4, 3, 1, 1),
    (3, 7, 9, 5, 6, 3, 2, 1),
    (2, 9, 7, 2, 3, 3, 2, 0),
    (2, 8, 8, 6, 5, 1, 2, 0),     # only class (0, 0) is read
    (1, 5, 6, 3, 3, 1, 1, 1),
    (1, 6, 6, 40, 36, 3, 1, 1),   # default tiles: 2 cout tiles, 2 cin tiles, 16 chunks
    (2, 8, 7, 3, 4, 5, 3, 2),     # 1 or 2 taps per axis and class
    (1, 2, 7, 2, 3, (3, 1), 3, 1),    # row class 2 holds no pixels; columns 2 mod 3 alone read
    (2, 5, 7, 3, 2, (1, 3), 2, 2),    # odd rows read by no tap
]
# This file tests the Pallas implementation, interpreted on CPU unless told otherwise.
pallas_conv2d = functools.partial(adder.adder_conv2d, implementation="pallas")

SMALL = adder_pallas.Tiles(pixels=16, channels=4, accumulator=128, warps=1)
TILES = [adder_pallas.Tiles(), SMALL, adder_pallas.Tiles(), SMALL, SMALL,
         adder_pallas.Tiles(), SMALL, SMALL, adder_pallas.Tiles()]


def _inputs(case, dtype, seed=0):
    """:func:`adder_cases.inputs`, also for a (kh, kw) kernel_size: the leading kh x kw
    taps of the square kernel and a cotangent of the output's shape."""
    n, h, w, _, cout, k, stride, padding = case
    if isinstance(k, int):
        return adder_cases.inputs(case, dtype, seed)
    kh, kw = k
    x, kernel, _, _, _ = adder_cases.inputs(case[:5] + (max(k),) + case[6:], dtype, seed)
    ho, wo = (adder.output_size(h, kh, stride, padding),
              adder.output_size(w, kw, stride, padding))
    g = jax.random.normal(jax.random.key(seed + 1), (n, ho, wo, cout), dtype)
    return x, kernel[:kh, :kw], g, stride, padding


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6, 7))
def _pallas_value_and_grads(x, kernel, g, stride, padding, eta, tiles=adder_pallas.Tiles(),
                            interpret=True):
    y, vjp = jax.vjp(lambda a, b: pallas_conv2d(
        a, b, stride, padding, eta, tiles=tiles, interpret=interpret), x, kernel)
    return (y, *vjp(g))


@pytest.mark.parametrize("index", range(len(GRID)))
def test_float64_matches_reference(index):
    case, eta = GRID[index], (0.2, None)[index % 2]   # both eta settings, half the compiles
    with jax.enable_x64():
        x, kernel, g, stride, padding = _inputs(case, jnp.float64)
        y, dx, dw = _pallas_value_and_grads(x, kernel, g, stride, padding, eta, TILES[index])
        chex.assert_type([y, dx, dw], jnp.float64)
        assert_matches_reference(y, dx, dw, x, kernel, g, stride, padding, eta, 1e-12)


@pytest.mark.parametrize("index, eta", [(0, None), (1, 0.2)])
def test_float32_within_1e5_of_float64_reference(index, eta):
    x32, k32, g32, stride, padding = _inputs(GRID[index], jnp.float32, seed=1)
    y, dx, dw = _pallas_value_and_grads(x32, k32, g32, stride, padding, eta, TILES[index])
    chex.assert_type([y, dx, dw], jnp.float32)
    assert_matches_reference(y, dx, dw, x32, k32, g32, stride, padding, eta, 1e-5)
    if eta is not None:
        np.testing.assert_allclose(jnp.linalg.norm(dw), eta * np.sqrt(k32.size), rtol=1e-5)


@pytest.mark.parametrize("stride", [1, 2, 3])
def test_phase_classes_list_exactly_the_taps_that_read_each_input(stride):
    """Every (input position, kernel offset, output position) of one axis, from the phase
    classes, against all output positions and offsets enumerated."""
    for size, k, padding in itertools.product(range(1, 8), range(1, 6), range(3)):
        out = adder.output_size(size, k, stride, padding)
        if out < 1:
            continue
        expected = {(o * stride + t - padding, t, o) for o in range(out) for t in range(k)
                    if 0 <= o * stride + t - padding < size}
        listed = set()
        phases = adder_pallas._phases(size, k, stride, padding)
        assert [phase.start for phase in phases] == list(range(stride))
        for phase in phases:
            assert phase.count == len(range(phase.start, size, stride))
            for a, i in itertools.product(range(phase.count), range(phase.taps)):
                o = a + phase.shift - i
                if 0 <= o < out:
                    listed.add((phase.start + stride * a, phase.first_tap + stride * i, o))
        assert listed == expected, (size, k, padding)


def test_backward_is_the_official_rule_not_the_true_derivative():
    """HardTanh and full precision, not the sign-valued derivative of -|x - w|."""
    x, kernel, g, stride, padding = _inputs(GRID[0], jnp.float32, seed=1)
    x = 3.0 * x   # both |w - p| > 1 (HardTanh = sign) and < 1 (they differ) occur
    _, dx, dw = _pallas_value_and_grads(x, kernel, g, stride, padding, None)
    true_dx, true_dw = jax.vjp(
        lambda a, b: adder_conv2d_reference(a, b, stride, padding), x, kernel)[1](g)
    assert float(jnp.max(jnp.abs(dw - true_dw))) > 1e-2
    assert float(jnp.max(jnp.abs(dx - true_dx))) > 1e-2


def test_bad_tiles_give_a_clear_error():
    x, kernel, _, _, _ = _inputs(GRID[0], jnp.float32)
    with pytest.raises(ValueError, match="tiles.pixels must be a power of two"):
        pallas_conv2d(x, kernel, tiles=adder_pallas.Tiles(pixels=48))
    with pytest.raises(ValueError, match="input_grad_tiles.warps must be a power of two"):
        pallas_conv2d(x, kernel, input_grad_tiles=adder_pallas.Tiles(warps=3))


def test_input_gradient_tiles_of_its_own():
    """Other tiles for the input-gradient kernel only: same values and gradients."""
    x, kernel, g, stride, padding = _inputs(GRID[2], jnp.float32)

    def value_and_grads(input_grad_tiles):
        y, vjp = jax.vjp(lambda a, b: pallas_conv2d(
            a, b, stride, padding, 0.2, input_grad_tiles=input_grad_tiles, interpret=True),
            x, kernel)
        return (y, *vjp(g))

    chex.assert_trees_all_close(value_and_grads(SMALL), value_and_grads(None), rtol=1e-5,
                                atol=1e-5)


def test_bfloat16_inputs_accumulate_in_float32():
    x, kernel, g, stride, padding = _inputs(GRID[1], jnp.float32)
    xb, kb, gb = (a.astype(jnp.bfloat16) for a in (x, kernel, g))
    y, dx, dw = _pallas_value_and_grads(xb, kb, gb, stride, padding, 0.2)
    chex.assert_type([y, dx, dw], jnp.bfloat16)
    y32 = adder_conv2d_reference(xb.astype(jnp.float32), kb.astype(jnp.float32), stride,
                                 padding)
    assert_close(y, y32, 1e-2)


def test_vmap_over_kernels_of_the_gradient():
    x, kernel, g, stride, padding = _inputs(GRID[0], jnp.float32)
    grad_fn = jax.jit(jax.grad(lambda k, x: jnp.sum(
        pallas_conv2d(x, k, stride, padding, interpret=True) * g)))
    stacked = jax.vmap(grad_fn, in_axes=(0, None))(jnp.stack([kernel, 2.0 * kernel]), x)
    chex.assert_trees_all_close(stacked[0], grad_fn(kernel, x), rtol=1e-5)
    chex.assert_trees_all_close(stacked[1], grad_fn(2.0 * kernel, x), rtol=1e-5)


# --- dispatch -------------------------------------------------------------------------------

def _fake_native(available, calls):
    """A stand-in for the native kernel module: records its kernels' calls; its weight
    gradient is all ones, so the op's scaling makes it all eta."""
    module = types.ModuleType("awn_jax.ops.adder_native")
    module.is_available = lambda: available

    def forward(x, kernel, stride, padding):
        calls.append(("forward", stride, padding))
        ho, wo = (adder.output_size(size, k, stride, padding)
                  for size, k in zip(x.shape[1:3], kernel.shape[:2]))
        return jnp.zeros((x.shape[0], ho, wo, kernel.shape[3]), x.dtype)

    def input_grad(x, kernel, g, stride, padding):
        calls.append(("input_grad", stride, padding))
        return jnp.zeros_like(x)

    def weight_grad(x, kernel, g, stride, padding):
        calls.append(("weight_grad", stride, padding))
        return jnp.ones_like(kernel)

    module.forward, module.input_grad, module.weight_grad = forward, input_grad, weight_grad
    return module


@pytest.mark.parametrize("backend, native, expected", [
    ("gpu", "available", "pallas"),
    ("gpu", "absent", "pallas"),
    ("cpu", "available", "native"),
    ("cpu", "unavailable", "xla"),
    ("cpu", "absent", "xla"),
    ("tpu", "available", "xla"),
])
def test_auto_picks_pallas_on_gpu_native_on_cpu_else_xla(monkeypatch, backend, native,
                                                         expected):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    # None in sys.modules makes `import` raise ImportError, as when the module is missing.
    monkeypatch.setitem(sys.modules, "awn_jax.ops.adder_native",
                        None if native == "absent" else _fake_native(native == "available", []))
    assert adder.resolve_implementation("auto") == expected
    for name in ("xla", "pallas", "native"):
        assert adder.resolve_implementation(name) == name
    with pytest.raises(ValueError, match="implementation"):
        adder.resolve_implementation("cuda")


def test_dispatch_calls_the_chosen_implementation(monkeypatch):
    x, kernel, g, stride, padding = _inputs(GRID[1], jnp.float32)
    calls = []
    monkeypatch.setitem(sys.modules, "awn_jax.ops.adder_native", _fake_native(True, calls))
    _, vjp = jax.vjp(lambda a, b: adder.adder_conv2d(a, b, stride, padding, 0.5,
                                                     implementation="native"), x, kernel)
    _, dw = vjp(g)
    # The native kernels ran, with the call's stride and padding, and its eta of 0.5 scaled
    # their weight gradient.
    assert calls == [(name, stride, padding) for name in ("forward", "input_grad", "weight_grad")]
    np.testing.assert_allclose(dw, 0.5, rtol=1e-6)
    monkeypatch.setitem(sys.modules, "awn_jax.ops.adder_native", None)
    with pytest.raises(RuntimeError, match="native"):
        adder.adder_conv2d(x, kernel, stride, padding, implementation="native")

    # On a "GPU" backend, auto runs the Pallas kernels; AWN_PALLAS_INTERPRET=1 lets them run
    # here, on CPU, in interpret mode.
    expected = adder.adder_conv2d(x, kernel, stride, padding, implementation="xla")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setenv("AWN_PALLAS_INTERPRET", "1")
    y = jax.jit(lambda a, b: adder.adder_conv2d(a, b, stride, padding))(x, kernel)
    assert "pallas_call" in str(jax.make_jaxpr(
        lambda a, b: adder.adder_conv2d(a, b, stride, padding))(x, kernel))
    chex.assert_trees_all_close(y, expected, rtol=1e-5)


def test_interpret_default_follows_backend_and_environment(monkeypatch):
    monkeypatch.delenv("AWN_PALLAS_INTERPRET", raising=False)
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert adder_pallas.resolve_interpret(None) is True
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert adder_pallas.resolve_interpret(None) is False
    monkeypatch.setenv("AWN_PALLAS_INTERPRET", "1")
    assert adder_pallas.resolve_interpret(None) is True
    monkeypatch.setenv("AWN_PALLAS_INTERPRET", "0")
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert adder_pallas.resolve_interpret(None) is False
    assert adder_pallas.resolve_interpret(True) is True


@pytest.mark.parametrize("kernel_size, stride, padding, phase_classes", [
    (3, 2, 1, 4),
    (1, 2, 0, 1),   # classes with an odd row or column: no tap reads them, no launch
    (3, 1, 1, 1),
])
def test_kernels_lower_to_triton_for_cuda(kernel_size, stride, padding, phase_classes):
    """Without a GPU, the Triton lowering (the Pallas side of it) still runs: a
    cross-platform lowering of forward and backward at ResNet-20 layer shapes, with one
    input-gradient kernel per phase class that some tap reads."""
    x = jax.ShapeDtypeStruct((8, 16, 16, 32), jnp.float32)
    kernel = jax.ShapeDtypeStruct((kernel_size, kernel_size, 32, 64), jnp.float32)
    fn = jax.jit(jax.value_and_grad(lambda a, b: jnp.sum(
        pallas_conv2d(a, b, stride, padding, interpret=False)), argnums=(0, 1)))
    text = fn.trace(x, kernel).lower(lowering_platforms=("cuda",)).as_text()
    targets = re.findall(r"custom_call @(\S+)", text)
    assert len([t for t in targets if "triton" in t]) == 1 + phase_classes


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiled Triton kernels need a GPU")
@pytest.mark.parametrize("index", range(len(GRID)))
def test_compiled_gpu_kernels_match_reference(index):
    """The kernels as Triton compiles them (not interpreted), float32 against float64.
    Highest matmul precision: the weight gradient's XLA matmul would use TF32 otherwise."""
    x32, k32, g32, stride, padding = _inputs(GRID[index], jnp.float32, seed=2)
    with jax.default_matmul_precision("highest"):
        y, dx, dw = _pallas_value_and_grads(x32, k32, g32, stride, padding, 0.2, TILES[index],
                                            False)
    assert_matches_reference(y, dx, dw, x32, k32, g32, stride, padding, 0.2, 1e-5)
