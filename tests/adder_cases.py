"""Shared by the adder kernels' test files: the plain reference, compiled once per shape
(op-by-op dispatch of its unrolled taps is what is slow), and random inputs of a case."""

import jax

from awn_jax.ops import reference

adder_conv2d_reference = jax.jit(reference.adder_conv2d_reference, static_argnums=(2, 3))
adder_conv2d_reference_grads = jax.jit(reference.adder_conv2d_reference_grads,
                                       static_argnums=(3, 4, 5))


def inputs(case, dtype, seed=0):
    """x, kernel, cotangent g, stride, padding of a case
    (batch, height, width, cin, cout, kernel_size, stride, padding)."""
    n, h, w, cin, cout, k, stride, padding = case
    kx, kw, kg = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (n, h, w, cin), dtype)
    kernel = jax.random.normal(kw, (k, k, cin, cout), dtype)
    ho = (h + 2 * padding - k) // stride + 1
    wo = (w + 2 * padding - k) // stride + 1
    g = jax.random.normal(kg, (n, ho, wo, cout), dtype)
    return x, kernel, g, stride, padding
