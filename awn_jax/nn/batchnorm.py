"""Batch normalization with the four statistics modes the paper compares.

The paper's robust inference (Eq. 17) normalizes at test time with the current batch's
mean and the tracked variance; its ablation uses both batch statistics. A mode is a
plain attribute of each BatchNorm, so a trained model is switched between them by
:func:`set_bn_mode` without rebuilding or copying parameters.

Conventions follow PyTorch (the paper's models are PyTorch): momentum 0.1 (running =
0.9 * running + 0.1 * batch), the running variance is updated with the unbiased batch
variance while the batch itself is normalized with the biased one, eps = 1e-5.
Statistics are taken over every axis but the last (N, H, W for NHWC). Under ``jax.jit``
with the batch sharded over a mesh, ``jnp.mean`` over the batch axis is already global,
as on one device.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable

import jax.numpy as jnp
from flax import nnx

from awn_jax.errors import UserError

BN_MODES = ("train", "tracked", "running-mean", "running")
"""``train``: batch mean and variance, running averages updated.
``tracked``: running mean and variance (ordinary inference).
``running-mean``: batch mean, running variance (the paper's "-R", Eq. 17).
``running``: batch mean and variance, nothing updated (the paper's "-r")."""


# Every mode but "train", which would update the running statistics while evaluating.
EVAL_BN_MODES = tuple(mode for mode in BN_MODES if mode != "train")


def check_bn_modes(modes, *, allow_train: bool = False) -> tuple[str, ...]:
    """``modes`` as a tuple, or one clear error for the first that is not an evaluation mode
    (nor ``train``, if ``allow_train``)."""
    allowed = BN_MODES if allow_train else EVAL_BN_MODES
    for mode in modes:
        if mode not in allowed:
            what = "BatchNorm" if allow_train else "evaluation BN"
            raise UserError(f"unknown {what} mode {mode!r}; expected one of {allowed}")
    return tuple(modes)


class BatchNorm(nnx.Module):
    """Per-channel batch normalization whose statistics are chosen by ``mode``.

    Only ``train`` changes the running averages. Statistics are computed in float32
    and the output has the input's dtype.
    """

    def __init__(self, num_features: int, *, mode: str = "train", momentum: float = 0.1,
                 eps: float = 1e-5):
        self.num_features = num_features
        (self.mode,) = check_bn_modes([mode], allow_train=True)
        self.momentum = momentum
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        axes = tuple(range(x.ndim - 1))
        if self.mode == "tracked":
            mean = self.mean[...]
        else:
            mean = jnp.mean(x32, axis=axes)
        if self.mode in ("tracked", "running-mean"):
            var = self.var[...]
        else:
            var = jnp.mean(jnp.square(x32 - mean), axis=axes)
        if self.mode == "train":
            self._update_running_stats(mean, var, count=x.size // x.shape[-1])
        y = (x32 - mean) * (self.scale[...] / jnp.sqrt(var + self.eps)) + self.bias[...]
        interceptor = _INTERCEPTOR.get()
        if interceptor is not None:
            y = interceptor(self, x32, y)
        return y.astype(x.dtype)

    def _update_running_stats(self, mean, biased_var, count: int):
        if count < 2:
            raise ValueError("BatchNorm in 'train' mode needs more than 1 value per channel "
                             "(the unbiased variance is undefined)")
        unbiased_var = biased_var * (count / (count - 1))
        m = self.momentum
        _assign(self.mean, (1 - m) * self.mean[...] + m * mean)
        _assign(self.var, (1 - m) * self.var[...] + m * unbiased_var)


def _assign(variable, value) -> None:
    """``variable.set_value(value)`` where Flax has it (0.12.1 on; the indexed form compares
    shardings, slow on tracers), else ``variable[...] = value``: Flax 0.12.0 is the newest
    that runs with JAX 0.7, Colab's preinstalled JAX."""
    if hasattr(type(variable), "set_value"):
        variable.set_value(value)
    else:
        variable[...] = value


_INTERCEPTOR: contextvars.ContextVar[Callable | None] = contextvars.ContextVar(
    "batchnorm_interceptor", default=None)


@contextlib.contextmanager
def intercept(fn: Callable):
    """Inside this context every :class:`BatchNorm` call returns ``fn(module, x, y)``, ``x``
    its input and ``y`` its output (both float32), instead of ``y``.

    For reading what each layer meets (re-estimating statistics, diagnostics) or changing
    what it passes on. It acts while a function is traced: enter it inside the function
    given to ``jax.jit``, not around a call of an already compiled one."""
    token = _INTERCEPTOR.set(fn)
    try:
        yield
    finally:
        _INTERCEPTOR.reset(token)


def set_bn_mode(model: nnx.Module, mode: str) -> None:
    """Switch every :class:`BatchNorm` inside ``model`` to ``mode``, in place."""
    check_bn_modes([mode], allow_train=True)
    for _, module in nnx.iter_graph(model):
        if isinstance(module, BatchNorm):
            module.mode = mode
