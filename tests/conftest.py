"""Test-wide JAX setup: 8 fake CPU devices for the data-parallel tests, and a persistent
compilation cache so the many identical train steps of the training tests compile once."""

import os
import tempfile

import jax

# Must happen before any JAX backend is initialized.
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_compilation_cache_dir",
                  os.path.join(tempfile.gettempdir(), "awn_jax_test_compilation_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
