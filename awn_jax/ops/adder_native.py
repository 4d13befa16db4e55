"""The adder op's kernels on CPU as native C++ (``native/adder_kernels.cc``, XLA FFI):
``implementation="native"`` of :func:`awn_jax.ops.adder.adder_conv2d`.

The three kernels of :mod:`awn_jax.ops.adder_vjp`: the forward of Eq. 1,
``Y = -sum |X_patch - W|``, the HardTanh input gradient and the full-precision weight gradient
(its adaptive scaling is the shared op's). The forward and the input gradient, the two
subtract-abs/clip reductions that XLA:CPU does not vectorize well, and the patch term ``P^T g``
of the weight gradient run in register-blocked vector loops on XLA's intra-op thread pool (the
native weight gradient measured about 3x faster than the per-tap XLA matrix products of
``adder_xla.weight_grad`` on 3x3 layers, see ``bench/RESULTS.md``). The kernels take square
windows only; the dispatcher sends other kernels to the XLA implementation.

The C++ source is compiled on first use with the system compiler (``$CXX``, else ``c++``,
``g++`` or ``clang++``; ``-O3 -march=native``) into a cache directory
(``$AWN_JAX_NATIVE_CACHE``, default ``native/`` in :func:`awn_jax.paths.cache_dir`), keyed
by a hash of the source, flags, compiler, JAX version and CPU, so a build is reused across processes and
never shared between machines that would need different code. Without a compiler, or if
the build fails, :func:`is_available` is False (the reason is logged once) and callers use
the pure-XLA path. ``AWN_JAX_NATIVE=0`` turns the native path off.

float32 and float64 run natively; other floating dtypes are computed in float32 (the
forward's result cast back), as the XLA kernels accumulate them in float32 anyway.

The FFI calls have no partitioning rule of their own; under a mesh set with
``jax.set_mesh`` (the trainer's data-parallel mesh) ``adder_vjp.adder_op`` runs them on each
device's shard of the batch.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from awn_jax import paths
from awn_jax.ops.adder_vjp import output_size

_log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "native" / "adder_kernels.cc"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")

# (kernel, dtype) -> (FFI target name, exported symbol).
_TARGETS = {
    ("forward", "float32"): ("awn_adder_forward_f32", "AwnAdderForwardF32"),
    ("forward", "float64"): ("awn_adder_forward_f64", "AwnAdderForwardF64"),
    ("input_grad", "float32"): ("awn_adder_input_grad_f32", "AwnAdderInputGradF32"),
    ("input_grad", "float64"): ("awn_adder_input_grad_f64", "AwnAdderInputGradF64"),
    ("weight_grad", "float32"): ("awn_adder_weight_grad_f32", "AwnAdderWeightGradF32"),
    ("weight_grad", "float64"): ("awn_adder_weight_grad_f64", "AwnAdderWeightGradF64"),
}
# Vector width of the kernels (32 bytes) in elements: the vectorized channel axis is
# zero-padded to a multiple of it.
_LANES = {"float32": 8, "float64": 4}

_lock = threading.Lock()
_status: dict = {}  # "available": bool, "reason": str, "library": ctypes.CDLL, "path": Path


def _compiler() -> str | None:
    return os.environ.get("CXX") or next(
        (c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)


def _cache_dir() -> Path:
    if "AWN_JAX_NATIVE_CACHE" in os.environ:
        return Path(os.environ["AWN_JAX_NATIVE_CACHE"])
    return paths.cache_dir("native")


def _cpu_identity() -> str:
    """Model and feature flags: ``-march=native`` code is only valid on the same kind of CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _build_key(compiler: str) -> str:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    parts = [SOURCE.read_bytes(), " ".join(FLAGS).encode(), version.encode(),
             jax.__version__.encode(), platform.machine().encode(), _cpu_identity().encode()]
    digest = hashlib.sha256()
    for part in parts:
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()[:20]


def _build() -> Path:
    """Compile (or find in the cache) the shared library; raise with the reason on failure."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found ($CXX, c++, g++, clang++)")
    cache = _cache_dir()
    target = cache / f"adder_kernels-{_build_key(compiler)}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    # Build under a unique name, then rename: concurrent processes each build a complete
    # file and the rename is atomic, so no process ever loads a partial library.
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=target.stem + ".", suffix=".tmp")
    os.close(fd)
    try:
        command = [compiler, *FLAGS, "-isystem", jax.ffi.include_dir(), str(SOURCE), "-o", tmp]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


def _load() -> dict:
    with _lock:
        if _status:
            return _status
        if os.environ.get("AWN_JAX_NATIVE", "1") == "0":
            _status.update(available=False, reason="disabled by AWN_JAX_NATIVE=0")
        else:
            try:
                path = _build()
                library = ctypes.CDLL(str(path))
                for name, symbol in _TARGETS.values():
                    jax.ffi.register_ffi_target(
                        name, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
                _status.update(available=True, reason="", library=library, path=path)
            # No compiler or a failed build (RuntimeError, a compiler that hangs), a library
            # that does not load (OSError) or lacks a kernel (AttributeError), a rejected
            # FFI registration (JAX's runtime errors are RuntimeErrors): use XLA instead.
            except (RuntimeError, OSError, subprocess.SubprocessError, AttributeError) as error:
                _status.update(available=False, reason=f"{type(error).__name__}: {error}")
        if not _status["available"]:
            _log.warning("awn_jax native adder kernels unavailable (pure-XLA path used "
                         "instead): %s", _status["reason"])
        return _status


def is_available() -> bool:
    """Whether the native kernels are built and registered (builds them on the first call)."""
    return _load()["available"]


def unavailable_reason() -> str:
    """Why :func:`is_available` is False (empty when it is True)."""
    return _load()["reason"]


def _target(kernel: str, dtype: str) -> str:
    """The registered FFI target of a kernel; raises when the kernels are unavailable."""
    status = _load()
    if not status["available"]:
        raise RuntimeError(f"native adder kernels unavailable: {status['reason']}")
    return _TARGETS[kernel, dtype][0]


def _compute_dtype(dtype) -> str:
    return "float64" if jnp.dtype(dtype) == jnp.float64 else "float32"


def _pad_axis(a, axis, multiple):
    extra = -a.shape[axis] % multiple
    if not extra:
        return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, extra)
    return jnp.pad(a, widths)


def _in_compute_dtype(*arrays):
    """The arrays in the kernels' dtype: float64 for a float64 op, else float32."""
    dtype = _compute_dtype(jnp.result_type(*arrays[:2]))
    return dtype, [jnp.asarray(a, dtype) for a in arrays]


def forward(x, kernel, stride, padding):
    """Eq. 1, ``Y = -sum_j |P_j - W_jc|``, natively; cout padded to the vector width. The
    result has the dtype ``result_type(x, kernel)``."""
    out_dtype = jnp.result_type(x, kernel)
    dtype, (x, kernel) = _in_compute_dtype(x, kernel)
    kh, kw, _, cout = kernel.shape
    n, h, w, _ = x.shape
    ho, wo = output_size(h, kh, stride, padding), output_size(w, kw, stride, padding)
    kernel = _pad_axis(kernel, 3, _LANES[dtype])
    out = jax.ffi.ffi_call(
        _target("forward", dtype),
        jax.ShapeDtypeStruct((n, ho, wo, kernel.shape[3]), x.dtype),
        vmap_method="sequential",
    )(x, kernel, stride=np.int64(stride), padding=np.int64(padding))
    return out[..., :cout].astype(out_dtype)


def input_grad(x, kernel, g, stride, padding):
    """The HardTanh rule, natively, in the compute dtype; cin padded to the vector width."""
    dtype, (x, kernel, g) = _in_compute_dtype(x, kernel, g)
    kh, kw, cin, cout = kernel.shape
    x = _pad_axis(x, 3, _LANES[dtype])
    # (tap, cout, cin): the kernel's vector axis is cin.
    taps = _pad_axis(kernel, 2, _LANES[dtype]).reshape(kh * kw, -1, cout).transpose(0, 2, 1)
    dx = jax.ffi.ffi_call(
        _target("input_grad", dtype),
        jax.ShapeDtypeStruct(x.shape, x.dtype),
        vmap_method="sequential",
    )(x, taps, g, stride=np.int64(stride), padding=np.int64(padding),
      kernel_size=np.int64(kh))
    return dx[..., :cin]


def weight_grad(x, kernel, g, stride, padding):
    """The full-precision rule ``dW = P^T g - W * sum(g)`` (unscaled), in the compute dtype;
    the native kernel computes ``P^T g`` (cout padded to the vector width)."""
    dtype, (x, kernel, g) = _in_compute_dtype(x, kernel, g)
    kh, kw, cin, cout = kernel.shape
    g_padded = _pad_axis(g, 3, _LANES[dtype])
    patches_t_g = jax.ffi.ffi_call(
        _target("weight_grad", dtype),
        jax.ShapeDtypeStruct((kh, kw, cin, g_padded.shape[3]), x.dtype),
        vmap_method="sequential",
    )(x, g_padded, stride=np.int64(stride), padding=np.int64(padding))
    return patches_t_g[..., :cout] - kernel * jnp.sum(g, axis=(0, 1, 2))
