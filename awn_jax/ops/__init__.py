"""Pure functions: the adder convolution and the WS/AWN kernel transforms."""

from awn_jax.ops.adder import IMPLEMENTATIONS, adder_conv2d, resolve_implementation
from awn_jax.ops.adder_vjp import adaptive_gradient_scale, output_size
from awn_jax.ops.weight_norm import adaptive_normalize, standardize

__all__ = ["IMPLEMENTATIONS", "adaptive_gradient_scale", "adaptive_normalize", "adder_conv2d",
           "output_size", "resolve_implementation", "standardize"]
