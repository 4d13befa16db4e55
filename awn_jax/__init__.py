"""awn-jax: adder neural networks, AWN and robust BN inference in JAX/Flax."""

__version__ = "0.1.0"
