"""Adder convolution: ``Y = -sum |X_patch - W|`` with the official AdderNet backward.

The backward is not the true derivative of the l1 distance (Chen et al., CVPR 2020,
official ``adder.py``):

* weight gradient: full precision, ``dW_jc = sum g_c * (P_j - W_jc)``; it is linear in
  the patches, so it is computed as a convolution's weight-gradient (a matrix product)
  minus ``W * sum(g)``;
* input gradient: HardTanh, ``dP_j = sum_c g_c * clip(W_jc - P_j, -1, 1)``, folded back
  onto the input;
* adaptive scaling of the whole weight gradient of the layer,
  ``G <- eta * sqrt(numel(W)) * G / max(||G||_2, 1e-12)`` (``eta=None`` turns it off).

The forward and the input gradient walk the ``kh*kw`` kernel taps one at a time: each tap
is a shifted (strided) window of the padded input, reduced over ``cin`` against that tap's
``(cin, cout)`` weights. XLA fuses each tap's broadcast-subtract-abs-reduce, so the
``cout x k*k*cin x N*H*W`` broadcast tensor of the naive unfold formulation never exists
in memory.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

_CONV_DIMS = ("NHWC", "HWIO", "NHWC")


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


def _tap_windows(x, kh, kw, stride, padding):
    """The ``kh*kw`` shifted windows of the zero-padded input, each (N, Ho, Wo, cin)."""
    _, h, w, _ = x.shape
    ho, wo = output_size(h, kh, stride, padding), output_size(w, kw, stride, padding)
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    return [
        lax.slice(xp, (0, i, j, 0),
                  (xp.shape[0], i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, xp.shape[3]),
                  (1, stride, stride, 1))
        for i in range(kh) for j in range(kw)
    ]


def _forward(x, kernel, stride, padding):
    kh, kw, _, _ = kernel.shape
    acc = _accumulation_dtype(jnp.result_type(x, kernel))
    taps = kernel.reshape(kh * kw, *kernel.shape[2:])
    out = None
    for window, w_tap in zip(_tap_windows(x, kh, kw, stride, padding), taps):
        # (N, Ho, Wo, cin, 1) - (cin, cout), reduced over cin inside one XLA fusion.
        dist = jnp.sum(jnp.abs(window[..., :, None] - w_tap), axis=-2, dtype=acc)
        out = dist if out is None else out + dist
    return (-out).astype(jnp.result_type(x, kernel))


def _input_grad(x, kernel, g, stride, padding):
    """HardTanh rule: dP_j = sum_c g_c clip(W_jc - P_j, -1, 1), folded back onto x."""
    kh, kw, _, _ = kernel.shape
    acc = _accumulation_dtype(jnp.result_type(x, kernel))
    windows, fold = jax.vjp(lambda v: _tap_windows(v, kh, kw, stride, padding), x)
    taps = kernel.reshape(kh * kw, *kernel.shape[2:])
    g_acc = g.astype(acc)
    tap_grads = [
        jnp.sum(g_acc[..., None, :] * jnp.clip(w_tap - window[..., :, None], -1, 1),
                axis=-1, dtype=acc).astype(x.dtype)
        for window, w_tap in zip(windows, taps)
    ]
    (dx,) = fold(tap_grads)
    return dx


def _weight_grad(x, kernel, g, stride, padding):
    """Full-precision rule: dW = P^T g - W * sum(g), the first term a conv weight-gradient."""
    acc = _accumulation_dtype(jnp.result_type(x, kernel))

    def conv(k):
        return lax.conv_general_dilated(
            x.astype(acc), k, (stride, stride), [(padding, padding)] * 2,
            dimension_numbers=_CONV_DIMS)

    _, conv_vjp = jax.vjp(conv, kernel.astype(acc))
    (patches_t_g,) = conv_vjp(g.astype(acc))
    return patches_t_g - kernel.astype(acc) * jnp.sum(g, axis=(0, 1, 2), dtype=acc)


def adaptive_gradient_scale(grad, eta):
    """AdderNet's per-layer scaling: ``eta * sqrt(numel) * G / max(||G||_2, 1e-12)``."""
    norm = jnp.sqrt(jnp.sum(jnp.square(grad.astype(_accumulation_dtype(grad.dtype)))))
    scale = eta * jnp.sqrt(float(grad.size)) / jnp.maximum(norm, 1e-12)
    return (grad * scale).astype(grad.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _adder_conv2d(x, kernel, stride, padding, eta):
    return _forward(x, kernel, stride, padding)


def _adder_conv2d_fwd(x, kernel, stride, padding, eta):
    return _forward(x, kernel, stride, padding), (x, kernel)


def _adder_conv2d_bwd(stride, padding, eta, residuals, g):
    x, kernel = residuals
    dx = _input_grad(x, kernel, g, stride, padding)
    dw = _weight_grad(x, kernel, g, stride, padding)
    if eta is not None:
        dw = adaptive_gradient_scale(dw, eta)
    return dx.astype(x.dtype), dw.astype(kernel.dtype)


_adder_conv2d.defvjp(_adder_conv2d_fwd, _adder_conv2d_bwd)


def adder_conv2d(x, kernel, stride: int = 1, padding: int = 1, eta: float | None = 0.2):
    """Adder convolution ``-sum |x_patch - w|`` with AdderNet's gradients.

    Args:
      x: input, NHWC.
      kernel: weights, HWIO ``(kh, kw, cin, cout)``.
      stride: spatial stride (same for both axes).
      padding: symmetric zero padding; padded taps contribute ``|w|``.
      eta: adaptive gradient scaling factor of the weight gradient, ``None`` for none.
    Returns:
      NHWC output of dtype ``result_type(x, kernel)``.
    """
    _check_args(x, kernel, stride, padding)
    return _adder_conv2d(x, kernel, stride, padding, None if eta is None else float(eta))
