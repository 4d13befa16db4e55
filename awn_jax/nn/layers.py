"""The 2-D feature layer of the networks: a multiplying convolution or an adder layer.

One module covers the four layer types of the paper, so a model is switched between
the CNN baseline, AdderNet and its WS/AWN variants by a single string. For the adder
types the kernel transform (none, WS or AWN) is applied every time the kernel is read:
the stored parameter stays the raw kernel ``W`` and gradients flow through the
transform into it (and into AWN's ``nu``, ``upsilon``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from awn_jax.errors import UserError
from awn_jax.ops import adaptive_normalize, adder_conv2d, standardize

LAYER_TYPES = ("conv", "adder", "adder-ws", "adder-awn")

# Initializers of multiplying kernels, as the official models use them:
# "kaiming-normal": fan_out mode, ReLU gain, std = sqrt(2 / (kh * kw * cout)) (resnet50.py);
# "torch-default": PyTorch's Conv2d default, kaiming-uniform with a = sqrt(5), i.e.
# U(+-1 / sqrt(kh * kw * cin)) (resnet20.py sets no init of its own).
CONV_INITS = {
    "kaiming-normal": nnx.initializers.variance_scaling(2.0, "fan_out", "normal"),
    "torch-default": nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"),
}


class AWNParam(nnx.Param):
    """AWN's per-channel scale ``nu`` and shift ``upsilon``.

    A type of their own so an optimizer can select them (``nnx.state(model, AWNParam)``)
    and give them their own learning rate (the paper: base rate times 1e-5).
    """


def check_layer_type(layer_type: str) -> str:
    """Return ``layer_type`` if it is one of :data:`LAYER_TYPES`, else raise UserError."""
    if layer_type not in LAYER_TYPES:
        raise UserError(f"unknown layer_type {layer_type!r}; expected one of {LAYER_TYPES}")
    return layer_type


class Conv2d(nnx.Module):
    """2-D layer without bias: ``conv`` multiplies, the ``adder*`` types take -l1 distances.

    Inputs are NHWC, the kernel is HWIO ``(kh, kw, cin, cout)``, zero padding is symmetric.

    Initialization follows the official AdderNet code: adder kernels from a standard
    normal (``adder.py``), ordinary convolutions by ``conv_init`` (see :data:`CONV_INITS`:
    the ImageNet ``resnet50.py`` uses Kaiming-normal, the CIFAR ``resnet20.py`` PyTorch's
    default). AWN starts at ``nu = 1``, ``upsilon = 0``, i.e. equal to WS.

    Args:
      in_features, out_features: input and output channels.
      kernel_size: square kernel side.
      stride: spatial stride.
      padding: symmetric zero padding; ``None`` keeps the size at stride 1 (``k // 2``).
      layer_type: one of :data:`LAYER_TYPES`.
      conv_init: initializer of a ``conv`` kernel, a key of :data:`CONV_INITS`.
      eta: adaptive gradient scaling of adder kernels (``None``: off); unused by ``conv``.
      eps: variance epsilon of the WS/AWN standardization.
      compute_dtype: dtype the input and the (transformed) kernel are cast to for the
        layer's arithmetic, e.g. ``jnp.bfloat16``; parameters stay float32.
      rngs: random streams; the kernel is drawn from ``rngs.params()``.
    """

    def __init__(self, in_features: int, out_features: int, kernel_size: int,
                 stride: int = 1, padding: int | None = None, layer_type: str = "conv", *,
                 eta: float | None = 0.2, eps: float = 1e-5, compute_dtype=jnp.float32,
                 conv_init: str = "kaiming-normal", rngs: nnx.Rngs):
        if conv_init not in CONV_INITS:
            raise ValueError(f"unknown conv_init {conv_init!r}; expected one of "
                             f"{tuple(CONV_INITS)}")
        self.in_features = in_features
        self.out_features = out_features
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = kernel_size // 2 if padding is None else padding
        self.layer_type = check_layer_type(layer_type)
        self.eta = eta
        self.eps = eps
        self.compute_dtype = compute_dtype

        shape = (kernel_size, kernel_size, in_features, out_features)
        key = rngs.params()
        if layer_type == "conv":
            self.kernel = nnx.Param(CONV_INITS[conv_init](key, shape, jnp.float32))
        else:
            self.kernel = nnx.Param(jax.random.normal(key, shape, jnp.float32))
        if layer_type == "adder-awn":
            self.nu = AWNParam(jnp.ones((out_features,), jnp.float32))
            self.upsilon = AWNParam(jnp.zeros((out_features,), jnp.float32))

    def effective_kernel(self):
        """The kernel the layer computes with: ``W``, ``WS(W)`` or ``AWN(W; nu, upsilon)``."""
        kernel = self.kernel[...]
        if self.layer_type == "adder-ws":
            return standardize(kernel, self.eps)
        if self.layer_type == "adder-awn":
            return adaptive_normalize(kernel, self.nu[...], self.upsilon[...], self.eps)
        return kernel

    def __call__(self, x):
        x = x.astype(self.compute_dtype)
        kernel = self.effective_kernel().astype(self.compute_dtype)
        if self.layer_type == "conv":
            return lax.conv_general_dilated(
                x, kernel, (self.stride, self.stride), [(self.padding, self.padding)] * 2,
                dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return adder_conv2d(x, kernel, self.stride, self.padding, self.eta)


@contextlib.contextmanager
def record_calls(callback: Callable):
    """Inside this context every :class:`Conv2d` call also calls ``callback(layer, x, y)``
    (its input and output), in call order: for counting operations, or reading what each
    layer meets while a function is traced. Wraps ``Conv2d.__call__`` for the duration;
    not thread-safe."""
    original_call = Conv2d.__call__

    def recording_call(self, x):
        y = original_call(self, x)
        callback(self, x, y)
        return y

    Conv2d.__call__ = recording_call
    try:
        yield
    finally:
        Conv2d.__call__ = original_call
