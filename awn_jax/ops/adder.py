"""Adder convolution: ``Y = -sum |X_patch - W|`` with the official AdderNet backward.

The backward is not the true derivative of the l1 distance (Chen et al., CVPR 2020,
official ``adder.py``):

* weight gradient: full precision, ``dW_jc = sum g_c * (P_j - W_jc)``; it is linear in
  the patches, so it is computed as matrix products ``P^T g`` minus ``W * sum(g)``;
* input gradient: HardTanh, ``dP_j = sum_c g_c * clip(W_jc - P_j, -1, 1)``, folded back
  onto the input;
* adaptive scaling of the whole weight gradient of the layer,
  ``G <- eta * sqrt(numel(W)) * G / max(||G||_2, 1e-12)`` (``eta=None`` turns it off).

The forward and the input gradient walk bands of output rows, and in each band the
``kh*kw`` kernel taps, in loops: a tap meets a shifted (strided) window of the padded
input, reduced over ``cin`` against that tap's ``(cin, cout)`` weights in one XLA fusion
(forward) or contracted with ``g`` (input gradient). A band is sized so that its
``pixels x cin x cout`` tensor is cache-sized, so the ``cout x k*k*cin x N*H*W``
broadcast of the naive unfold formulation never exists in memory; the weight gradient is
one matrix product per tap.

Implementations (``adder_conv2d(..., implementation=...)``), all with the same semantics and
tests: ``"xla"`` (this module), ``"pallas"`` (:mod:`awn_jax.ops.adder_pallas`, GPU kernels,
interpreted on CPU), ``"native"`` (:mod:`awn_jax.ops.adder_native`, a compiled CPU kernel,
when built). ``"auto"`` picks pallas on a GPU, native on a CPU where it is built, else
xla (see :func:`resolve_implementation`).

Data parallelism: traced under a mesh set with ``jax.set_mesh`` (``train.Trainer`` does), every
implementation runs on each device's shard of the batch through ``jax.shard_map`` and the
weight gradient is summed over the shards before its scaling; XLA cannot partition the
kernels' custom calls by itself. Without a mesh in context the op runs whole, so a batch
sharded by ``jit`` shardings alone would be gathered onto every device.
"""

from __future__ import annotations

import functools
import importlib
import math
import os
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, PartitionSpec


def _check_args(x, kernel, stride, padding):
    if x.ndim != 4:
        raise ValueError(f"adder_conv2d: x must be NHWC (4-D), got shape {x.shape}")
    if kernel.ndim != 4:
        raise ValueError(f"adder_conv2d: kernel must be HWIO (4-D), got shape {kernel.shape}")
    if x.shape[-1] != kernel.shape[2]:
        raise ValueError(
            f"adder_conv2d: input has {x.shape[-1]} channels but kernel expects "
            f"{kernel.shape[2]} (kernel shape {kernel.shape})")
    if not (isinstance(stride, int) and stride >= 1):
        raise ValueError(f"adder_conv2d: stride must be a positive int, got {stride!r}")
    if not (isinstance(padding, int) and padding >= 0):
        raise ValueError(f"adder_conv2d: padding must be a non-negative int, got {padding!r}")


def output_size(size: int, kernel_size: int, stride: int, padding: int) -> int:
    """Spatial output size of a convolution with symmetric zero padding."""
    return (size + 2 * padding - kernel_size) // stride + 1


def _accumulation_dtype(dtype):
    """Sums of many absolute differences lose too much in 16-bit floats."""
    return jnp.promote_types(dtype, jnp.float32)


# Elements of one band's (pixels x cin x cout) tensor per kernel tap: ~2 MB in float32,
# cache-sized; a band is at least one output row of the whole batch.
_BAND_ELEMENTS = 1 << 19


def _band_rows(n, ho, wo, cin, cout):
    """Output rows per band: the most that fit _BAND_ELEMENTS, dividing ``ho``."""
    rows = max(1, min(ho, _BAND_ELEMENTS // (n * wo * cin * cout)))
    while ho % rows:
        rows -= 1
    return rows


def _bands(x, kernel, stride, padding):
    """(padded input, rows per band, number of bands, input rows read by one band)."""
    kh, kw, cin, cout = kernel.shape
    n, h, w, _ = x.shape
    ho, wo = output_size(h, kh, stride, padding), output_size(w, kw, stride, padding)
    rows = _band_rows(n, ho, wo, cin, cout)
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    return xp, rows, ho // rows, (rows - 1) * stride + kh


def _window(x_band, tap, kw, rows, wo, stride):
    """The (N, rows, Wo, cin) input values that kernel tap ``tap`` (traced) meets."""
    i, j = tap // kw, tap % kw
    n, _, _, cin = x_band.shape
    span = (n, stride * (rows - 1) + 1, stride * (wo - 1) + 1, cin)
    window = lax.dynamic_slice(x_band, (0, i, j, 0), span)
    return window[:, ::stride, ::stride, :]


def _add_window(dx_band, grad, tap, kw, stride):
    """Adjoint of :func:`_window`: add ``grad`` where the tap's window was read."""
    i, j = tap // kw, tap % kw
    zero = jnp.zeros((), grad.dtype)
    spread = lax.pad(grad, zero, ((0, 0, 0), (0, 0, stride - 1), (0, 0, stride - 1), (0, 0, 0)))
    current = lax.dynamic_slice(dx_band, (0, i, j, 0), spread.shape)
    return lax.dynamic_update_slice(dx_band, current + spread, (0, i, j, 0))


def _forward(x, kernel, stride, padding):
    """Bands of output rows one after another, and in each the kernel taps one after
    another: one tap's subtract-abs-reduce over cin is a single fused loop, and loops
    (not unrolling) keep the compiled program small."""
    kh, kw, _, cout = kernel.shape
    acc = _accumulation_dtype(jnp.result_type(x, kernel))
    xp, rows, num_bands, in_rows = _bands(x, kernel, stride, padding)
    taps = kernel.reshape(kh * kw, *kernel.shape[2:])
    n, wo = x.shape[0], output_size(x.shape[2], kw, stride, padding)

    def band(index):
        x_band = lax.dynamic_slice_in_dim(xp, index * rows * stride, in_rows, axis=1)

        def tap_term(tap):
            window = _window(x_band, tap, kw, rows, wo, stride)
            return jnp.sum(jnp.abs(window[..., :, None] - taps[tap]), axis=-2, dtype=acc)

        # Started from the first tap, not zeros: inside a shard_map the carry then has the
        # input's varying-axes type.
        return lax.fori_loop(1, kh * kw, lambda tap, out: out + tap_term(tap), tap_term(0))

    out = lax.map(band, jnp.arange(num_bands))          # (bands, N, rows, Wo, cout)
    out = jnp.moveaxis(out, 0, 1).reshape(n, num_bands * rows, wo, cout)
    return (-out).astype(jnp.result_type(x, kernel))


def _input_grad(x, kernel, g, stride, padding):
    """HardTanh rule: dP_j = sum_c g_c clip(W_jc - P_j, -1, 1), folded back onto x.

    Band by band and tap by tap: the tap's clip tensor (band pixels x cin x cout,
    cache-sized) is contracted with g as a matrix product and added onto the input
    positions the tap read."""
    kh, kw, _, _ = kernel.shape
    acc = _accumulation_dtype(jnp.result_type(x, kernel))
    xp, rows, num_bands, in_rows = _bands(x, kernel, stride, padding)
    taps = kernel.reshape(kh * kw, *kernel.shape[2:])
    wo = g.shape[2]

    def add_band(dxp, index):
        start = index * rows * stride
        x_band = lax.dynamic_slice_in_dim(xp, start, in_rows, axis=1)
        g_pixels = lax.dynamic_slice_in_dim(g, index * rows, rows, axis=1)
        g_pixels = g_pixels.reshape(-1, g.shape[-1])

        def add_tap(tap, dx_band):
            window = _window(x_band, tap, kw, rows, wo, stride)
            clipped = jnp.clip(taps[tap] - window.reshape(-1, window.shape[-1])[:, :, None], -1, 1)
            grad = jnp.einsum("pjc,pc->pj", clipped, g_pixels, preferred_element_type=acc)
            return _add_window(dx_band, grad.astype(x.dtype).reshape(window.shape), tap, kw,
                               stride)

        dx_band = lax.fori_loop(0, kh * kw, add_tap, jnp.zeros_like(x_band))
        current = lax.dynamic_slice_in_dim(dxp, start, in_rows, axis=1)
        return lax.dynamic_update_slice_in_dim(dxp, current + dx_band, start, axis=1), None

    dxp, _ = lax.scan(add_band, jnp.zeros_like(xp), jnp.arange(num_bands))
    n, h, w, _ = x.shape
    return dxp[:, padding:padding + h, padding:padding + w, :]


def _weight_grad(x, kernel, g, stride, padding):
    """Full-precision rule: dW = P^T g - W * sum(g); per tap, P^T g is one matrix
    product of the tap's (pixels x cin) window with g (pixels x cout)."""
    kh, kw, cin, cout = kernel.shape
    acc = _accumulation_dtype(jnp.result_type(x, kernel))
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    _, ho, wo, _ = g.shape
    g_pixels = g.reshape(-1, cout)

    def tap_product(tap):
        window = _window(xp, tap, kw, ho, wo, stride).reshape(-1, cin)
        # HIGHEST: on GPUs the default float32 matmul rounds inputs to TF32, and P^T g minus
        # W * sum(g) cancels, which measured 2e-4 relative error in dW on an H200.
        return jnp.matmul(window.T, g_pixels, preferred_element_type=acc,
                          precision=lax.Precision.HIGHEST)

    patches_t_g = lax.map(tap_product, jnp.arange(kh * kw)).reshape(kernel.shape)
    return patches_t_g - kernel.astype(acc) * jnp.sum(g, axis=(0, 1, 2), dtype=acc)


def _weight_grad_by_conv(x, kernel, g, stride, padding):
    """:func:`_weight_grad` with ``P^T g`` as the kernel gradient of a multiplying
    convolution (``jax.linear_transpose`` of ``lax.conv`` in its kernel): one cuDNN
    weight-gradient call on a GPU instead of a loop of ``kh*kw`` matrix products, each its own
    kernel launch. (On a CPU XLA's convolution gradients are slow; ``_weight_grad`` stays.)"""
    acc = _accumulation_dtype(jnp.result_type(x, kernel))

    def conv(k):
        # HIGHEST, as in _weight_grad: no TF32 rounding before the cancellation.
        return lax.conv_general_dilated(
            x.astype(acc), k, (stride, stride), [(padding, padding)] * 2,
            dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=lax.Precision.HIGHEST)

    patches_t_g, = jax.linear_transpose(conv, jax.ShapeDtypeStruct(kernel.shape, acc))(
        g.astype(acc))
    return patches_t_g - kernel.astype(acc) * jnp.sum(g, axis=(0, 1, 2), dtype=acc)


def adaptive_gradient_scale(grad, eta):
    """AdderNet's per-layer scaling: ``eta * sqrt(numel) * G / max(||G||_2, 1e-12)``."""
    norm = jnp.sqrt(jnp.sum(jnp.square(grad.astype(_accumulation_dtype(grad.dtype)))))
    scale = eta * jnp.sqrt(float(grad.size)) / jnp.maximum(norm, 1e-12)
    return (grad * scale).astype(grad.dtype)


def _batch_axes(batch_size: int) -> tuple:
    """The mesh axes to split the batch over: the non-manual axes of the mesh set with
    ``jax.set_mesh`` (as ``train.Trainer`` does), when they span several devices and
    divide ``batch_size``; else ``()``, run the op whole."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    axes = tuple(name for name, kind in zip(mesh.axis_names, mesh.axis_types)
                 if kind != AxisType.Manual)
    devices = math.prod(mesh.shape[name] for name in axes)
    return axes if devices > 1 and batch_size % devices == 0 else ()


def _per_batch_shard(piece, *, summed: bool):
    """``piece(x, kernel, *arrays, stride, padding)`` run by every device on its own shard
    of the batch (``jax.shard_map``), with ``kernel`` replicated. ``summed``: the results
    are added over the shards (the weight gradient, a sum over the batch) instead of
    concatenated. The Pallas and FFI kernels are custom calls that XLA cannot partition:
    left to XLA under a batch sharding, every device would gather and compute the whole
    batch."""
    @functools.wraps(piece)
    def run(x, kernel, *rest):
        *arrays, stride, padding = rest
        axes = _batch_axes(x.shape[0])
        if not axes:
            return piece(x, kernel, *arrays, stride, padding)

        def local(x, kernel, *arrays):
            out = piece(x, kernel, *arrays, stride, padding)
            return lax.psum(out, axes) if summed else out

        batch = PartitionSpec(axes)
        # check_vma=False: custom calls carry no varying-axes type; the specs say it all.
        return jax.shard_map(local, in_specs=(batch, PartitionSpec()) + (batch,) * len(arrays),
                             out_specs=PartitionSpec() if summed else batch,
                             check_vma=False)(x, kernel, *arrays)

    return run


def adder_vjp(forward, input_grad, weight_grad):
    """The adder op with AdderNet's backward, from one implementation's three pieces:
    ``forward(x, kernel, stride, padding)``, ``input_grad(x, kernel, g, stride, padding)``
    (HardTanh rule) and ``weight_grad(x, kernel, g, stride, padding)`` (full precision,
    unscaled). Under a mesh set with ``jax.set_mesh`` each piece runs per batch shard
    (:func:`_per_batch_shard`), and the adaptive scaling is applied here, once, to the whole
    batch's weight gradient, the same for every implementation. Returns
    ``op(x, kernel, stride, padding, eta)``."""
    forward = _per_batch_shard(forward, summed=False)
    input_grad = _per_batch_shard(input_grad, summed=False)
    weight_grad = _per_batch_shard(weight_grad, summed=True)

    @functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
    def op(x, kernel, stride, padding, eta):
        return forward(x, kernel, stride, padding)

    def op_fwd(x, kernel, stride, padding, eta):
        return forward(x, kernel, stride, padding), (x, kernel)

    def op_bwd(stride, padding, eta, residuals, g):
        x, kernel = residuals
        dx = input_grad(x, kernel, g, stride, padding)
        dw = weight_grad(x, kernel, g, stride, padding)
        if eta is not None:
            dw = adaptive_gradient_scale(dw, eta)
        return dx.astype(x.dtype), dw.astype(kernel.dtype)

    op.defvjp(op_fwd, op_bwd)
    return op


_adder_conv2d = adder_vjp(_forward, _input_grad, _weight_grad)


IMPLEMENTATIONS = ("auto", "xla", "pallas", "native")


def _native_module():
    """:mod:`awn_jax.ops.adder_native` if it imports and its kernel is available, else
    None (it is optional: a compiled extension that may not be built)."""
    try:  # import_module goes through sys.modules, so tests can stand in for the module
        adder_native = importlib.import_module("awn_jax.ops.adder_native")
    except ImportError:
        return None
    return adder_native if adder_native.is_available() else None


def _pallas_module():
    """:mod:`awn_jax.ops.adder_pallas`, or None where it does not import: its Triton lowering
    is deprecated since JAX 0.11 (Mosaic GPU is the successor) and may be gone from a newer
    JAX, which should then fall back to xla, not fail."""
    try:
        return importlib.import_module("awn_jax.ops.adder_pallas")
    except ImportError as error:
        warnings.warn(f"adder_conv2d: the Pallas kernels do not import ({error}); "
                      "using the XLA formulation", RuntimeWarning, stacklevel=3)
        return None


# Overrides "auto" for a whole process (e.g. to evaluate saved runs with another kernel).
IMPLEMENTATION_ENV = "AWN_JAX_ADDER_IMPLEMENTATION"


def resolve_implementation(implementation: str = "auto") -> str:
    """The implementation ``adder_conv2d`` runs: ``"auto"`` is ``$AWN_JAX_ADDER_IMPLEMENTATION``
    when set, else pallas on a GPU (where it imports), native on a CPU where it is built, xla
    otherwise."""
    if implementation == "auto":
        implementation = os.environ.get(IMPLEMENTATION_ENV) or "auto"
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"adder_conv2d: implementation must be one of {IMPLEMENTATIONS}, "
                         f"got {implementation!r} (argument or ${IMPLEMENTATION_ENV})")
    if implementation != "auto":
        return implementation
    backend = jax.default_backend()
    if backend == "gpu" and _pallas_module() is not None:
        return "pallas"
    if backend == "cpu" and _native_module() is not None:
        return "native"
    return "xla"


def adder_conv2d(x, kernel, stride: int = 1, padding: int = 1, eta: float | None = 0.2, *,
                 implementation: str = "auto"):
    """Adder convolution ``-sum |x_patch - w|`` with AdderNet's gradients.

    Args:
      x: input, NHWC.
      kernel: weights, HWIO ``(kh, kw, cin, cout)``.
      stride: spatial stride (same for both axes).
      padding: symmetric zero padding; padded taps contribute ``|w|``.
      eta: adaptive gradient scaling factor of the weight gradient, ``None`` for none.
      implementation: ``"auto"``, ``"xla"``, ``"pallas"`` or ``"native"`` (module
        docstring); pallas off a GPU runs in Pallas interpret mode (slow, for tests).
    Returns:
      NHWC output of dtype ``result_type(x, kernel)``.
    """
    _check_args(x, kernel, stride, padding)
    eta = None if eta is None else float(eta)
    chosen = resolve_implementation(implementation)
    if chosen == "xla":
        return _adder_conv2d(x, kernel, stride, padding, eta)
    module = _pallas_module() if chosen == "pallas" else _native_module()
    if module is None:
        raise RuntimeError(f"adder_conv2d: implementation={chosen!r} but "
                           f"awn_jax.ops.adder_{chosen} is not importable or not available")
    return module.adder_conv2d(x, kernel, stride, padding, eta)
