"""``adder_conv2d``: the adder convolution of the paper's Eq. 1, ``Y = -sum |X_patch - W|``, with
the official AdderNet backward (HardTanh input gradient, full-precision weight gradient, adaptive
scaling; :mod:`awn_jax.ops.adder_vjp` states the rules, :mod:`awn_jax.ops.reference` writes
them as the math).

This module is the dispatcher: it checks the arguments once, picks an implementation and runs
that implementation's kernels through the one shared op (:func:`adder_vjp.adder_op`, which
also runs them per batch shard under a mesh). The implementations, all with the same semantics
and tests:

* ``"xla"``: :mod:`awn_jax.ops.adder_xla`, banded loops in plain XLA; runs everywhere;
* ``"native"``: :mod:`awn_jax.ops.adder_native`, compiled C++ CPU kernels through the XLA FFI,
  where a compiler is found (square kernels; others take ``xla``);
* ``"pallas"``: :mod:`awn_jax.ops.adder_pallas`, Pallas kernels lowered to Triton on a GPU,
  interpreted elsewhere (slow, for tests);
* ``"auto"``: ``$AWN_JAX_ADDER_IMPLEMENTATION`` when set, else pallas on a GPU (where it
  imports), native on a CPU where it is built, xla otherwise (:func:`resolve_implementation`).

No kernel module imports this one: native and Pallas are imported here only when chosen, as
each may be missing (an unbuilt extension; a JAX without the Triton lowering).
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings

import jax

from awn_jax.ops import adder_vjp, adder_xla
from awn_jax.ops.adder_vjp import adaptive_gradient_scale, output_size

__all__ = ["IMPLEMENTATIONS", "IMPLEMENTATION_ENV", "adaptive_gradient_scale", "adder_conv2d",
           "output_size", "resolve_implementation"]

IMPLEMENTATIONS = ("auto", "xla", "pallas", "native")

# Overrides "auto" for a whole process (e.g. to evaluate saved runs with another kernel).
IMPLEMENTATION_ENV = "AWN_JAX_ADDER_IMPLEMENTATION"


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


def _native_module():
    """:mod:`awn_jax.ops.adder_native` if it imports and its kernels are available, else
    None (it is optional: a compiled extension that may not be built)."""
    try:  # import_module goes through sys.modules, so tests can stand in for the module
        adder_native = importlib.import_module("awn_jax.ops.adder_native")
    except ImportError:
        return None
    return adder_native if adder_native.is_available() else None


def _pallas_module():
    """:mod:`awn_jax.ops.adder_pallas`, or None where it does not import: its Triton lowering
    is deprecated since JAX 0.11 (Mosaic GPU is the successor) and may be gone from a newer
    JAX, which should then fall back to xla, not fail."""
    try:
        return importlib.import_module("awn_jax.ops.adder_pallas")
    except ImportError as error:
        warnings.warn(f"adder_conv2d: the Pallas kernels do not import ({error}); "
                      "using the XLA formulation", RuntimeWarning, stacklevel=3)
        return None


def resolve_implementation(implementation: str = "auto") -> str:
    """The implementation ``adder_conv2d`` runs: ``"auto"`` is ``$AWN_JAX_ADDER_IMPLEMENTATION``
    when set, else pallas on a GPU (where it imports), native on a CPU where it is built, xla
    otherwise."""
    if implementation == "auto":
        implementation = os.environ.get(IMPLEMENTATION_ENV) or "auto"
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"adder_conv2d: implementation must be one of {IMPLEMENTATIONS}, "
                         f"got {implementation!r} (argument or ${IMPLEMENTATION_ENV})")
    if implementation != "auto":
        return implementation
    backend = jax.default_backend()
    if backend == "gpu" and _pallas_module() is not None:
        return "pallas"
    if backend == "cpu" and _native_module() is not None:
        return "native"
    return "xla"


@functools.lru_cache(maxsize=None)
def _op(kernels, tiles=None, input_grad_tiles=None, interpret=None):
    """The op of one kernel module (and, for Pallas, one tile choice and mode), built once:
    the kernels' module object is part of the key, so a module stood in for in a test gets
    an op of its own."""
    forward, input_grad = kernels.forward, kernels.input_grad
    if tiles is not None:  # Pallas
        forward = functools.partial(forward, tiles=tiles, interpret=interpret)
        input_grad = functools.partial(input_grad, tiles=input_grad_tiles, interpret=interpret)
    return adder_vjp.adder_op(forward, input_grad, kernels.weight_grad)


def adder_conv2d(x, kernel, stride: int = 1, padding: int = 1, eta: float | None = 0.2, *,
                 implementation: str = "auto", tiles=None, input_grad_tiles=None,
                 interpret: bool | None = None):
    """Adder convolution ``-sum |x_patch - w|`` (Eq. 1) with AdderNet's gradients.

    Args:
      x: input, NHWC.
      kernel: weights, HWIO ``(kh, kw, cin, cout)``.
      stride: spatial stride (same for both axes).
      padding: symmetric zero padding; padded taps contribute ``|w|``.
      eta: adaptive gradient scaling factor of the weight gradient, ``None`` for none.
      implementation: ``"auto"``, ``"xla"``, ``"pallas"`` or ``"native"`` (module
        docstring).
      tiles, input_grad_tiles, interpret: options of the Pallas kernels only
        (:class:`awn_jax.ops.adder_pallas.Tiles`, powers of two, of the forward kernel and,
        unless ``input_grad_tiles`` gives its own, of the input-gradient kernel;
        ``interpret``: ``None`` interprets unless the default backend is a GPU or
        ``$AWN_PALLAS_INTERPRET`` says otherwise).
    Returns:
      NHWC output of dtype ``result_type(x, kernel)``.
    """
    _check_args(x, kernel, stride, padding)
    eta = None if eta is None else float(eta)
    chosen = resolve_implementation(implementation)
    if chosen != "pallas" and (tiles, input_grad_tiles, interpret) != (None, None, None):
        raise ValueError("adder_conv2d: tiles, input_grad_tiles and interpret are options of "
                         f"the pallas implementation, not of {chosen!r}")
    if chosen == "native" and kernel.shape[0] != kernel.shape[1]:
        chosen = "xla"  # the native kernels take square windows only
    if chosen == "xla":
        return _op(adder_xla)(x, kernel, stride, padding, eta)
    module = _pallas_module() if chosen == "pallas" else _native_module()
    if module is None:
        raise RuntimeError(f"adder_conv2d: implementation={chosen!r} but "
                           f"awn_jax.ops.adder_{chosen} is not importable or not available")
    if chosen == "native":
        return _op(module)(x, kernel, stride, padding, eta)
    tiles = module.Tiles() if tiles is None else tiles
    input_grad_tiles = tiles if input_grad_tiles is None else input_grad_tiles
    module.check_tiles(tiles, "tiles")
    module.check_tiles(input_grad_tiles, "input_grad_tiles")
    op = _op(module, tiles, input_grad_tiles, module.resolve_interpret(interpret))
    return op(x, kernel, stride, padding, eta)
