"""The adder op's kernels in plain XLA (``implementation="xla"``): the forward, the HardTanh
input gradient and the full-precision weight gradient of Eq. 1 (the rules: :mod:`.adder_vjp`;
as the math: :mod:`.reference`).

The forward and the input gradient walk bands of output rows, and in each band the
``kh*kw`` kernel taps, in loops: a tap meets a shifted (strided) window of the padded
input, reduced over ``cin`` against that tap's ``(cin, cout)`` weights in one XLA fusion
(forward) or contracted with ``g`` (input gradient). A band is sized so that its
``pixels x cin x cout`` tensor is cache-sized, so the ``cout x k*k*cin x N*H*W``
broadcast of the naive unfold formulation never exists in memory. The weight gradient is
linear in the patches, ``P^T g - W * sum(g)``: one matrix product per tap
(:func:`weight_grad`), or one multiplying convolution's kernel gradient
(:func:`weight_grad_by_conv`, what the Pallas path uses on a GPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from awn_jax.ops.adder_vjp import accumulation_dtype, output_size


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


def forward(x, kernel, stride, padding):
    """Eq. 1, ``Y = -sum_j |P_j - W_jc|``. Bands of output rows one after another, and in
    each the kernel taps one after another: one tap's subtract-abs-reduce over cin is a
    single fused loop, and loops (not unrolling) keep the compiled program small."""
    kh, kw, _, cout = kernel.shape
    acc = accumulation_dtype(jnp.result_type(x, kernel))
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


def input_grad(x, kernel, g, stride, padding):
    """The HardTanh rule, ``dP_j = sum_c g_c clip(W_jc - P_j, -1, 1)``, folded back onto x.

    Band by band and tap by tap: the tap's clip tensor (band pixels x cin x cout,
    cache-sized) is contracted with g as a matrix product and added onto the input
    positions the tap read."""
    kh, kw, _, _ = kernel.shape
    acc = accumulation_dtype(jnp.result_type(x, kernel))
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


def weight_grad(x, kernel, g, stride, padding):
    """The full-precision rule, ``dW = P^T g - W * sum(g)`` (unscaled); per tap, ``P^T g``
    is one matrix product of the tap's (pixels x cin) window with g (pixels x cout)."""
    kh, kw, cin, cout = kernel.shape
    acc = accumulation_dtype(jnp.result_type(x, kernel))
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


def weight_grad_by_conv(x, kernel, g, stride, padding):
    """:func:`weight_grad` with ``P^T g`` as the kernel gradient of a multiplying
    convolution (``jax.linear_transpose`` of ``lax.conv`` in its kernel): one cuDNN
    weight-gradient call on a GPU instead of a loop of ``kh*kw`` matrix products, each its own
    kernel launch. (On a CPU XLA's convolution gradients are slow; ``weight_grad`` stays.)"""
    acc = accumulation_dtype(jnp.result_type(x, kernel))

    def conv(k):
        # HIGHEST, as in weight_grad: no TF32 rounding before the cancellation.
        return lax.conv_general_dilated(
            x.astype(acc), k, (stride, stride), [(padding, padding)] * 2,
            dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=lax.Precision.HIGHEST)

    patches_t_g, = jax.linear_transpose(conv, jax.ShapeDtypeStruct(kernel.shape, acc))(
        g.astype(acc))
    return patches_t_g - kernel.astype(acc) * jnp.sum(g, axis=(0, 1, 2), dtype=acc)
