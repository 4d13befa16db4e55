"""Plain, slow reference of the adder convolution (the paper's Eq. 1) and its official
backward rules (AdderNet's full-precision weight gradient, HardTanh input gradient and
adaptive scaling; :mod:`awn_jax.ops.adder_vjp` lists them).

Written as the papers state them (unfold to patches, broadcast, reduce; col2im by
explicit accumulation) and independent of the kernels (``adder_xla``, ``adder_native``,
``adder_pallas``), so tests can compare every implementation with it in float64 (inside
``jax.enable_x64()``). Also the "naive" baseline of the benchmarks: ``jax.grad`` through
:func:`adder_conv2d_reference` is what a direct port of the public unfold code costs.
"""

from __future__ import annotations

import jax.numpy as jnp


def unfold_patches(x, kh, kw, stride, padding):
    """im2col: (N, H, W, C) -> (N, Ho, Wo, kh*kw*C), tap-major like an HWIO kernel."""
    n, h, w, c = x.shape
    ho = (h + 2 * padding - kh) // stride + 1
    wo = (w + 2 * padding - kw) // stride + 1
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    cols = []
    for i in range(kh):
        for j in range(kw):
            cols.append(xp[:, i:i + stride * ho:stride, j:j + stride * wo:stride, :])
    return jnp.concatenate(cols, axis=-1)


def fold_patches(dpatches, x_shape, kh, kw, stride, padding):
    """col2im, the adjoint of :func:`unfold_patches`: overlapping taps are summed."""
    n, h, w, c = x_shape
    _, ho, wo, _ = dpatches.shape
    dxp = jnp.zeros((n, h + 2 * padding, w + 2 * padding, c), dpatches.dtype)
    t = 0
    for i in range(kh):
        for j in range(kw):
            dxp = dxp.at[:, i:i + stride * ho:stride, j:j + stride * wo:stride, :].add(
                dpatches[..., t * c:(t + 1) * c])
            t += 1
    return dxp[:, padding:padding + h, padding:padding + w, :]


def adder_conv2d_reference(x, kernel, stride=1, padding=1):
    """Eq. 1, ``Y = -sum_j |P_j - W_jc|``, through the full broadcast tensor."""
    kh, kw, cin, cout = kernel.shape
    patches = unfold_patches(x, kh, kw, stride, padding)          # (N, Ho, Wo, K)
    w2d = kernel.reshape(kh * kw * cin, cout)                       # (K, cout)
    return -jnp.sum(jnp.abs(patches[..., :, None] - w2d), axis=-2)


def adder_conv2d_reference_grads(x, kernel, g, stride=1, padding=1, eta=0.2):
    """The official AdderNet backward: (dL/dx, dL/dW) for upstream gradient ``g``, with
    ``dW = sum g (P - W)`` scaled to ``eta * sqrt(numel) / ||dW||`` (``eta=None``: unscaled)
    and ``dP = sum_c g clip(W - P, -1, 1)`` folded back onto x."""
    kh, kw, cin, cout = kernel.shape
    patches = unfold_patches(x, kh, kw, stride, padding)
    w2d = kernel.reshape(kh * kw * cin, cout)
    diff = patches[..., :, None] - w2d                              # (N, Ho, Wo, K, cout)
    dw = jnp.sum(g[..., None, :] * diff, axis=(0, 1, 2))            # full precision
    if eta is not None:
        dw = eta * jnp.sqrt(dw.size) * dw / jnp.maximum(jnp.linalg.norm(dw), 1e-12)
    dpatches = jnp.sum(g[..., None, :] * jnp.clip(-diff, -1, 1), axis=-1)  # HardTanh
    dx = fold_patches(dpatches, x.shape, kh, kw, stride, padding)
    return dx, dw.reshape(kernel.shape)
