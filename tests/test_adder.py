"""``adder_conv2d`` against the plain float64 reference, once per implementation: XLA,
the native CPU kernels (``awn_jax.ops.adder_native``, where a compiler is found) and the
Pallas kernels (interpreted on CPU). Values and the official AdderNet backward rules over
shapes, strides, paddings and kernel sizes, dtypes and transformations; then each
implementation's own checks, and the rule by which ``implementation="auto"`` picks one.
"""

import contextlib
import functools
import itertools
import os
import re
import subprocess
import sys
import textwrap
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adder_cases import adder_conv2d_reference, adder_conv2d_reference_grads
from adder_cases import assert_close, assert_matches_reference
from adder_cases import inputs as _inputs
from awn_jax.ops import adder, adder_native, adder_xla, reference

try:
    from awn_jax.ops import adder_pallas
except ImportError:  # a JAX without the Pallas Triton lowering: auto falls back to XLA
    adder_pallas = None

needs_native = pytest.mark.skipif(
    not adder_native.is_available(),
    reason=f"native adder kernels unavailable: {adder_native.unavailable_reason()}")
needs_pallas = pytest.mark.skipif(
    adder_pallas is None, reason="awn_jax.ops.adder_pallas does not import (this JAX has no "
    "Pallas Triton lowering)")

# (batch, height, width, cin, cout, kernel_size, stride, padding), per implementation.
GRIDS = {
    "xla": [
        (2, 8, 8, 3, 4, 3, 1, 1),
        (3, 7, 9, 5, 6, 3, 2, 1),
        (1, 6, 6, 4, 2, 3, 1, 0),
        (2, 9, 7, 2, 3, 3, 2, 0),
        (2, 8, 8, 6, 5, 1, 2, 0),
        (4, 5, 5, 3, 7, 1, 1, 0),
        (1, 5, 6, 3, 3, 1, 1, 1),
        (2, 10, 10, 16, 8, 3, 2, 1),
    ],
    # Channel counts cover multiples of the vector width (8 float32 / 4 float64 lanes) and
    # of the register blocks (16), odd counts that need zero-padding, and cin not divisible
    # by the weight gradient's block of 6/12 input channels; pixel counts leave short last
    # blocks.
    "native": [
        (2, 8, 8, 3, 4, 3, 1, 1),
        (3, 7, 9, 5, 6, 3, 2, 1),
        (2, 9, 7, 2, 3, 3, 2, 0),
        (2, 8, 8, 6, 5, 1, 2, 0),
        (1, 5, 6, 3, 3, 1, 1, 1),
        (1, 9, 11, 17, 33, 3, 1, 1),
        (2, 8, 8, 16, 32, 3, 2, 1),
        (1, 7, 7, 13, 24, 1, 2, 0),
        (2, 4, 5, 8, 9, 3, 1, 2),   # padding wider than the kernel reach: all-zero taps
    ],
    # kernel_size an int or (kh, kw). The default tiles are 64 pixels x 32 channels; SMALL
    # tiles make small shapes span several tiles and chunks. Most strided cases have sizes
    # that the stride does not divide, so the input gradient's phase classes (ih % s,
    # iw % s) differ in size; some have classes that no kernel tap reads or that hold no
    # pixels.
    "pallas": [
        (2, 8, 8, 3, 4, 3, 1, 1),
        (3, 7, 9, 5, 6, 3, 2, 1),
        (2, 9, 7, 2, 3, 3, 2, 0),
        (2, 8, 8, 6, 5, 1, 2, 0),     # only class (0, 0) is read
        (1, 5, 6, 3, 3, 1, 1, 1),
        (1, 6, 6, 40, 36, 3, 1, 1),   # default tiles: 2 cout tiles, 2 cin tiles, 16 chunks
        (2, 8, 7, 3, 4, 5, 3, 2),     # 1 or 2 taps per axis and class
        (1, 2, 7, 2, 3, (3, 1), 3, 1),    # row class 2 holds no pixels; columns 2 mod 3 alone read
        (2, 5, 7, 3, 2, (1, 3), 2, 2),    # odd rows read by no tap
    ],
}
if adder_pallas is not None:
    SMALL = adder_pallas.Tiles(pixels=16, channels=4, accumulator=128, warps=1)
    PALLAS_TILES = [adder_pallas.Tiles(), SMALL, adder_pallas.Tiles(), SMALL, SMALL,
                    adder_pallas.Tiles(), SMALL, SMALL, adder_pallas.Tiles()]
MARKS = {"xla": (), "native": (needs_native,), "pallas": (needs_pallas,)}


def _params(*pairs):
    """pytest params ``(implementation, *values)``, skipped where that implementation is
    missing (native: no compiler; Pallas: a JAX without its Triton lowering)."""
    return [pytest.param(name, *values, marks=MARKS[name], id="-".join(map(str, (name, *values))))
            for name, *values in pairs]


def _conv(name, tiles=None, interpret=True):
    """``adder_conv2d`` of one implementation (Pallas interpreted, with ``tiles``)."""
    if name == "pallas":
        return functools.partial(adder.adder_conv2d, implementation="pallas",
                                 tiles=tiles or adder_pallas.Tiles(), interpret=interpret)
    return functools.partial(adder.adder_conv2d, implementation=name)


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6, 7, 8))
def _value_and_grads(name, x, kernel, g, stride, padding, eta, tiles=None, interpret=True):
    y, vjp = jax.vjp(lambda a, b: _conv(name, tiles, interpret)(a, b, stride, padding, eta),
                     x, kernel)
    return (y, *vjp(g))


def _tiles(name, index):
    return PALLAS_TILES[index] if name == "pallas" else None


# ------------------------------------------------------- every implementation, same checks

@pytest.mark.parametrize("name, index, eta", _params(
    *itertools.product(["xla"], range(len(GRIDS["xla"])), [0.2, None]),
    *itertools.product(["native"], range(len(GRIDS["native"])), [0.2, None]),
    # Pallas: both eta settings over the grid, half the (slow, interpreted) compiles.
    *(("pallas", i, (0.2, None)[i % 2]) for i in range(len(GRIDS["pallas"])))))
def test_float64_matches_reference(name, index, eta):
    with jax.enable_x64():
        x, kernel, g, stride, padding = _inputs(GRIDS[name][index], jnp.float64)
        y, dx, dw = _value_and_grads(name, x, kernel, g, stride, padding, eta,
                                     _tiles(name, index))
        chex.assert_type([y, dx, dw], jnp.float64)
        assert_matches_reference(y, dx, dw, x, kernel, g, stride, padding, eta, 1e-12)


@pytest.mark.parametrize("name, index, eta", _params(
    *itertools.product(["xla"], range(len(GRIDS["xla"])), [0.2, None]),
    *(("native", i, 0.2) for i in range(0, len(GRIDS["native"]), 2)),
    ("pallas", 0, None), ("pallas", 1, 0.2)))
def test_float32_within_1e5_of_float64_reference(name, index, eta):
    x32, k32, g32, stride, padding = _inputs(GRIDS[name][index], jnp.float32, seed=1)
    y, dx, dw = _value_and_grads(name, x32, k32, g32, stride, padding, eta, _tiles(name, index))
    chex.assert_type([y, dx, dw], jnp.float32)
    assert_matches_reference(y, dx, dw, x32, k32, g32, stride, padding, eta, 1e-5)
    if eta is not None:
        np.testing.assert_allclose(jnp.linalg.norm(dw), eta * np.sqrt(k32.size), rtol=1e-5)


@pytest.mark.parametrize("name, index, seed", _params(
    ("xla", 0, 0), ("native", 5, 0), ("pallas", 0, 1)))
def test_backward_is_the_official_rule_not_the_true_derivative(name, index, seed):
    """The HardTanh input gradient and full-precision weight gradient differ from the
    derivative of -|x - w| (which is sign-valued); the op must use the former. x is scaled
    up so that both |w - x| > 1 (HardTanh saturates, as sign) and < 1 (they differ) occur."""
    x, kernel, g, stride, padding = _inputs(GRIDS[name][index], jnp.float32, seed)
    x = 3.0 * x
    _, dx, dw = _value_and_grads(name, x, kernel, g, stride, padding, None)
    true_dx, true_dw = jax.jit(jax.vjp(
        lambda a, b: reference.adder_conv2d_reference(a, b, stride, padding), x, kernel)[1])(g)
    assert float(jnp.max(jnp.abs(dw - true_dw))) > 1e-2
    assert float(jnp.max(jnp.abs(dx - true_dx))) > 1e-2
    with jax.enable_x64():
        args = (jnp.asarray(a, jnp.float64) for a in (x, kernel, g))
        rdx, _ = adder_conv2d_reference_grads(*args, stride, padding, None)
    assert_close(dx, rdx, 1e-5)


@pytest.mark.parametrize("name, index, eta", _params(
    ("xla", 1, 0.2), ("xla", 1, 1.0), ("native", 6, 0.5)))
def test_adaptive_scaling_sets_the_weight_gradient_norm(name, index, eta):
    """(Pallas: checked in the float32 test above.)"""
    x, kernel, g, stride, padding = _inputs(GRIDS[name][index], jnp.float32)
    _, _, dw = _value_and_grads(name, x, kernel, g, stride, padding, eta)
    np.testing.assert_allclose(jnp.linalg.norm(dw), eta * np.sqrt(kernel.size), rtol=1e-5)


@pytest.mark.parametrize("name, index", _params(("xla", 0), ("native", 1), ("pallas", 0)))
def test_vmap_over_kernels_of_the_gradient(name, index):
    """jit(grad) under vmap over a stack of kernels, through the custom backward: each slice
    matches its own unbatched gradient."""
    x, kernel, g, stride, padding = _inputs(GRIDS[name][index], jnp.float32)
    grad_fn = jax.jit(jax.grad(lambda k, x: jnp.sum(_conv(name)(x, k, stride, padding) * g)))
    stacked = jax.vmap(grad_fn, in_axes=(0, None))(jnp.stack([kernel, 2.0 * kernel]), x)
    chex.assert_trees_all_close(stacked[0], grad_fn(kernel, x), rtol=1e-5)
    chex.assert_trees_all_close(stacked[1], grad_fn(2.0 * kernel, x), rtol=1e-5)


@pytest.mark.parametrize("name, index", _params(("xla", 0), ("native", 1)))
def test_grad_under_jit_and_vmap_over_examples(name, index):
    """jit(grad) equals the op's vjp; vmap over single examples equals the batched call."""
    x, kernel, g, stride, padding = _inputs(GRIDS[name][index], jnp.float32)
    conv = _conv(name)
    grad_fn = jax.jit(jax.grad(lambda k, x: jnp.sum(conv(x, k, stride, padding) * g),
                               argnums=(0, 1)))
    dw, dx = grad_fn(kernel, x)
    _, rdx, rdw = _value_and_grads(name, x, kernel, g, stride, padding, 0.2)
    assert_close(dx, rdx, 1e-6)
    assert_close(dw, rdw, 1e-6)
    per_example = jax.vmap(lambda xi: conv(xi[None], kernel, stride, padding)[0])(x)
    assert_close(per_example, conv(x, kernel, stride, padding), 1e-6)


@pytest.mark.parametrize("name", _params(("xla",), ("native",), ("pallas",)))
def test_bfloat16_inputs_give_bfloat16_accumulated_in_float32(name):
    x, kernel, g, stride, padding = _inputs(GRIDS[name][1], jnp.float32)
    xb, kb, gb = (a.astype(jnp.bfloat16) for a in (x, kernel, g))
    y, dx, dw = _value_and_grads(name, xb, kb, gb, stride, padding, 0.2)
    chex.assert_type([y, dx, dw], jnp.bfloat16)
    chex.assert_tree_all_finite([y, dx, dw])
    x32, k32 = xb.astype(jnp.float32), kb.astype(jnp.float32)
    assert_close(y, adder_conv2d_reference(x32, k32, stride, padding), 1e-2)
    if name != "pallas":  # (interpreted Pallas: the reference suffices)
        y32 = _conv(name)(x32, k32, stride, padding)
        assert_close(y, y32, 1e-2)
        if name == "native":  # computed in float32 and cast back: exactly that result
            np.testing.assert_array_equal(np.asarray(y), np.asarray(y32.astype(jnp.bfloat16)))


@pytest.mark.parametrize("name", _params(("xla",), ("native",), ("pallas",)))
@pytest.mark.parametrize("x_shape, k_shape, kwargs, message", [
    ((8, 8, 3), (3, 3, 3, 4), {}, "NHWC"),
    ((1, 8, 8, 3), (3, 3, 4), {}, "HWIO"),
    ((1, 8, 8, 3), (3, 3, 5, 4), {}, "channels"),
    ((1, 8, 8, 3), (3, 3, 3, 4), {"stride": 0}, "stride"),
    ((1, 8, 8, 3), (3, 3, 3, 4), {"padding": -1}, "padding"),
])
def test_bad_input_gives_a_clear_error(name, x_shape, k_shape, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _conv(name)(jnp.zeros(x_shape), jnp.zeros(k_shape), **kwargs)


# ------------------------------------------------------------------------------------ XLA

@pytest.mark.parametrize("case", GRIDS["xla"])
def test_weight_gradient_by_convolution_transpose_matches_reference(case):
    """The Pallas path's weight gradient (a multiplying convolution's kernel gradient)."""
    with jax.enable_x64():
        x, kernel, g, stride, padding = _inputs(case, jnp.float64)
        dw = jax.jit(adder_xla.weight_grad_by_conv, static_argnums=(3, 4))(
            x, kernel, g, stride, padding)
        _, rdw = adder_conv2d_reference_grads(x, kernel, g, stride, padding, None)
        assert_close(dw, rdw, 1e-12)


# --------------------------------------------------------------------------------- native

@needs_native
def test_native_non_square_kernel_takes_the_xla_path():
    x = jax.random.normal(jax.random.key(0), (2, 6, 7, 3))
    kernel = jax.random.normal(jax.random.key(1), (1, 3, 3, 5))
    y = _conv("native")(x, kernel, 1, 1)
    with jax.enable_x64():
        expected = adder_conv2d_reference(jnp.asarray(x, jnp.float64),
                                          jnp.asarray(kernel, jnp.float64), 1, 1)
    assert_close(y, expected, 1e-5)


@pytest.mark.parametrize("env", [{"AWN_JAX_NATIVE": "0"}, {"CXX": "/nonexistent/c++"}])
def test_native_unavailable_without_compiler_or_when_disabled(env, tmp_path):
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


# --------------------------------------------------------------------------------- Pallas

@needs_pallas
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_pallas_phase_classes_list_exactly_the_taps_that_read_each_input(stride):
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


@needs_pallas
def test_pallas_bad_tiles_give_a_clear_error():
    x, kernel, _, _, _ = _inputs(GRIDS["pallas"][0], jnp.float32)
    pallas_conv2d = functools.partial(adder.adder_conv2d, implementation="pallas")
    with pytest.raises(ValueError, match="tiles.pixels must be a power of two"):
        pallas_conv2d(x, kernel, tiles=adder_pallas.Tiles(pixels=48))
    with pytest.raises(ValueError, match="input_grad_tiles.warps must be a power of two"):
        pallas_conv2d(x, kernel, input_grad_tiles=adder_pallas.Tiles(warps=3))


@needs_pallas
def test_pallas_input_gradient_tiles_of_its_own():
    """Other tiles for the input-gradient kernel only: same values and gradients."""
    x, kernel, g, stride, padding = _inputs(GRIDS["pallas"][2], jnp.float32)

    def value_and_grads(input_grad_tiles):
        y, vjp = jax.vjp(lambda a, b: adder.adder_conv2d(
            a, b, stride, padding, 0.2, implementation="pallas",
            input_grad_tiles=input_grad_tiles, interpret=True), x, kernel)
        return (y, *vjp(g))

    chex.assert_trees_all_close(value_and_grads(SMALL), value_and_grads(None), rtol=1e-5,
                                atol=1e-5)


@needs_pallas
def test_pallas_interpret_default_follows_backend_and_environment(monkeypatch):
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


@needs_pallas
@pytest.mark.parametrize("kernel_size, stride, padding, phase_classes", [
    (3, 2, 1, 4),
    (1, 2, 0, 1),   # classes with an odd row or column: no tap reads them, no launch
    (3, 1, 1, 1),
])
def test_pallas_kernels_lower_to_triton_for_cuda(kernel_size, stride, padding, phase_classes):
    """Without a GPU, the Triton lowering (the Pallas side of it) still runs: a
    cross-platform lowering of forward and backward at ResNet-20 layer shapes, with one
    input-gradient kernel per phase class that some tap reads. The GPU is an abstract
    device (JAX >= 0.12 reads its compute capability from it; older JAX assumed 9.0)."""
    x = jax.ShapeDtypeStruct((8, 16, 16, 32), jnp.float32)
    kernel = jax.ShapeDtypeStruct((kernel_size, kernel_size, 32, 64), jnp.float32)
    fn = jax.jit(jax.value_and_grad(lambda a, b: jnp.sum(
        _conv("pallas", interpret=False)(a, b, stride, padding)), argnums=(0, 1)))
    if hasattr(jax.sharding, "AbstractDevice"):
        gpu = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=132,
                                          platform="gpu")
        device = jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh(
            (1,), ("gpu",), (jax.sharding.AxisType.Explicit,), abstract_device=gpu))
    else:  # JAX 0.7 has no abstract devices and assumes compute capability 9.0
        device = contextlib.nullcontext()
    with device:
        text = fn.trace(x, kernel).lower(lowering_platforms=("cuda",)).as_text()
    targets = re.findall(r"custom_call @(\S+)", text)
    assert len([t for t in targets if "triton" in t]) == 1 + phase_classes


@needs_pallas
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiled Triton kernels need a GPU")
@pytest.mark.parametrize("index", range(len(GRIDS["pallas"])))
def test_pallas_compiled_gpu_kernels_match_reference(index):
    """The kernels as Triton compiles them (not interpreted), float32 against float64.
    Highest matmul precision: the weight gradient's XLA matmul would use TF32 otherwise."""
    x32, k32, g32, stride, padding = _inputs(GRIDS["pallas"][index], jnp.float32, seed=2)
    with jax.default_matmul_precision("highest"):
        y, dx, dw = _value_and_grads("pallas", x32, k32, g32, stride, padding, 0.2,
                                     PALLAS_TILES[index], False)
    assert_matches_reference(y, dx, dw, x32, k32, g32, stride, padding, 0.2, 1e-5)


# ------------------------------------------------------------------------------- dispatch

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


@needs_pallas
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


def test_environment_overrides_auto_only(monkeypatch):
    monkeypatch.setenv(adder.IMPLEMENTATION_ENV, "pallas")
    assert adder.resolve_implementation("auto") == "pallas"
    assert adder.resolve_implementation("xla") == "xla"
    monkeypatch.setenv(adder.IMPLEMENTATION_ENV, "cuda")
    with pytest.raises(ValueError, match="AWN_JAX_ADDER_IMPLEMENTATION"):
        adder.resolve_implementation("auto")


@needs_pallas
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
    x, kernel, _, stride, padding = _inputs(GRIDS["xla"][0], jnp.float32)
    with pytest.raises(RuntimeError, match="pallas"), pytest.warns(RuntimeWarning):
        adder.adder_conv2d(x, kernel, stride, padding, implementation="pallas")


@needs_pallas
def test_dispatch_calls_the_chosen_implementation(monkeypatch):
    x, kernel, g, stride, padding = _inputs(GRIDS["pallas"][1], jnp.float32)
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
