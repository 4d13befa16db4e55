"""What every adder implementation shares: the op with AdderNet's backward as one
``jax.custom_vjp``, run per batch shard under a device mesh, and the rules its kernels share.

The op (paper, Eq. 1), for a zero-padded patch ``P`` of ``k*k*cin`` values per output pixel::

    Y(m, n, c) = -sum_{i, j, k} |X(m + i, n + j, k) - W(i, j, k, c)|

Its backward is not the derivative of the l1 distance but the official AdderNet rules (Chen et
al., CVPR 2020, official ``adder.py``; the paper builds on them without numbering them):

* weight gradient, full precision: ``dW_jc = sum g_c * (P_j - W_jc)``;
* input gradient, HardTanh: ``dP_j = sum_c g_c * clip(W_jc - P_j, -1, 1)``, folded back onto
  the input;
* adaptive scaling of the whole weight gradient of the layer,
  ``G <- eta * sqrt(numel(W)) * G / max(||G||_2, 1e-12)`` (``eta=None``: none), before
  momentum and weight decay see it.

:mod:`awn_jax.ops.reference` states these rules as the math (unfold, broadcast, reduce); the
tests hold every implementation to it in float64.

An implementation supplies three kernels (:mod:`~awn_jax.ops.adder_xla`,
:mod:`~awn_jax.ops.adder_native`, :mod:`~awn_jax.ops.adder_pallas`):
``forward(x, kernel, stride, padding)``, ``input_grad(x, kernel, g, stride, padding)``
(the HardTanh rule) and ``weight_grad(x, kernel, g, stride, padding)`` (full precision,
unscaled); :func:`adder_op` makes the op of them, and the scaling is applied there, once,
the same for every implementation.

Data parallelism: traced under a mesh set with ``jax.set_mesh`` (the trainer does), each
kernel runs on each device's shard of the batch through ``jax.shard_map``
(:func:`per_batch_shard`) and the weight gradient is summed over the shards before its
scaling; XLA cannot partition the kernels' custom calls by itself. Without a mesh in context
the op runs whole, so a batch sharded by ``jit`` shardings alone would be gathered onto every
device.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, PartitionSpec


def output_size(size: int, kernel_size: int, stride: int, padding: int) -> int:
    """Spatial output size of a convolution with symmetric zero padding."""
    return (size + 2 * padding - kernel_size) // stride + 1


def accumulation_dtype(dtype):
    """Sums of many absolute differences lose too much in 16-bit floats."""
    return jnp.promote_types(dtype, jnp.float32)


def adaptive_gradient_scale(grad, eta):
    """AdderNet's per-layer scaling: ``eta * sqrt(numel) * G / max(||G||_2, 1e-12)``."""
    norm = jnp.sqrt(jnp.sum(jnp.square(grad.astype(accumulation_dtype(grad.dtype)))))
    scale = eta * jnp.sqrt(float(grad.size)) / jnp.maximum(norm, 1e-12)
    return (grad * scale).astype(grad.dtype)


def batch_axes(batch_size: int) -> tuple:
    """The mesh axes to split the batch over: the non-manual axes of the mesh set with
    ``jax.set_mesh``, when they span several devices and divide ``batch_size``; else
    ``()``, run the op whole."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    axes = tuple(name for name, kind in zip(mesh.axis_names, mesh.axis_types)
                 if kind != AxisType.Manual)
    devices = math.prod(mesh.shape[name] for name in axes)
    return axes if devices > 1 and batch_size % devices == 0 else ()


def per_batch_shard(piece, *, summed: bool):
    """``piece(x, kernel, *arrays, stride, padding)`` run by every device on its own shard
    of the batch (``jax.shard_map``), with ``kernel`` replicated. ``summed``: the results
    are added over the shards (the weight gradient, a sum over the batch) instead of
    concatenated. The Pallas and FFI kernels are custom calls that XLA cannot partition:
    left to XLA under a batch sharding, every device would gather and compute the whole
    batch."""
    @functools.wraps(piece)
    def run(x, kernel, *rest):
        *arrays, stride, padding = rest
        axes = batch_axes(x.shape[0])
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


def adder_op(forward, input_grad, weight_grad):
    """The adder op (Eq. 1) with AdderNet's backward, from one implementation's three
    kernels (module docstring). Under a mesh set with ``jax.set_mesh`` each kernel runs
    per batch shard (:func:`per_batch_shard`); the adaptive scaling is applied here to the
    whole batch's weight gradient. Returns ``op(x, kernel, stride, padding, eta)``, with
    ``stride``, ``padding`` and ``eta`` static; arguments are not checked here (the
    dispatcher, :func:`awn_jax.ops.adder.adder_conv2d`, checks them once)."""
    forward = per_batch_shard(forward, summed=False)
    input_grad = per_batch_shard(input_grad, summed=False)
    weight_grad = per_batch_shard(weight_grad, summed=True)

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
