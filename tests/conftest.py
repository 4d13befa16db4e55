"""Test-wide JAX setup: 8 fake CPU devices for the data-parallel tests; a persistent
compilation cache so the many identical train steps of the training tests compile once;
XLA's lowest CPU optimization level, since on the tests' small shapes compiling takes
far longer than running (it roughly halves compile times).

The cache and the optimization level go through the environment, so that the CLIs and
notebooks the tests run as subprocesses get them too (the 8 devices do not: those run
as a user's process would). So does awn-jax's own cache (decoded image folders, compiled
native kernels, re-estimated statistics): a test folder of its own, never the user's."""

import os
import tempfile

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "awn_jax_test_compilation_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ["AWN_JAX_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), "awn_jax_test_cache")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402  (after the environment it reads)

# Must happen before any JAX backend is initialized.
jax.config.update("jax_num_cpu_devices", 8)

# The float64 references use ``jax.enable_x64()``; JAX 0.7 (the declared minimum) has it as
# ``jax.experimental.enable_x64`` only.
if not hasattr(jax, "enable_x64"):
    from jax.experimental import enable_x64

    jax.enable_x64 = enable_x64
