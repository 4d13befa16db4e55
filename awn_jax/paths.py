"""Where awn-jax keeps what it can recompute: decoded image folders, compiled kernels,
re-estimated BatchNorm statistics of shipped models.

``$AWN_JAX_CACHE_DIR`` when set, else ``$XDG_CACHE_HOME/awn_jax``, else ``~/.cache/awn_jax``.
"""

from __future__ import annotations

import os
import pathlib

CACHE_ENV = "AWN_JAX_CACHE_DIR"


def cache_dir(*parts: str) -> pathlib.Path:
    """The cache folder, or a folder inside it (not created)."""
    if os.environ.get(CACHE_ENV):
        base = pathlib.Path(os.environ[CACHE_ENV]).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (pathlib.Path(xdg) if xdg else pathlib.Path.home() / ".cache") / "awn_jax"
    return base.joinpath(*parts)
