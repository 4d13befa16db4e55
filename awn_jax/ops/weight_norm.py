"""Kernel transforms of the paper (Eq. 10-11), statistics per output channel.

A kernel's last axis is its output channel (HWIO for convolutions); each output
channel's ``n = kh*kw*cin`` values are standardized with the biased variance and ``eps``
inside the square root. These are plain differentiable functions: gradients through
them (Eq. 12) come from autodiff.
"""

from __future__ import annotations

import jax.numpy as jnp


def standardize(kernel, eps: float = 1e-5):
    """Weight standardization (WS, Eq. 10): ``(W_i - mu_i) / sqrt(var_i + eps)``."""
    axes = tuple(range(kernel.ndim - 1))
    mean = jnp.mean(kernel, axis=axes, keepdims=True)
    centered = kernel - mean
    var = jnp.mean(jnp.square(centered), axis=axes, keepdims=True)
    return centered / jnp.sqrt(var + eps)


def adaptive_normalize(kernel, nu, upsilon, eps: float = 1e-5):
    """Adaptive weight normalization (AWN, Eq. 11): ``nu_i * WS(W)_i + upsilon_i``.

    ``nu`` and ``upsilon`` have shape ``(cout,)``, one per output channel.
    """
    cout = kernel.shape[-1]
    if nu.shape != (cout,) or upsilon.shape != (cout,):
        raise ValueError(
            f"adaptive_normalize: nu and upsilon must have shape ({cout},), "
            f"got {nu.shape} and {upsilon.shape}")
    return nu * standardize(kernel, eps) + upsilon
