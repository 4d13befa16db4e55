"""The one writer of results: ``<stem>.json`` (numpy values as plain numbers), an optional
``<stem>.md`` table beside it, figures drawn outside pyplot, and the cache of a long
study's finished parts.

Every table and study (Table 1, the sweeps, the batch study, the stability studies, the
reproduction report) writes through here, so every result is found and read the same way.
"""

from __future__ import annotations

import json
import math
import os
import re

import jax
import numpy as np


def write(output_dir: str, stem: str, results, markdown: str | None = None) -> str:
    """Write ``results`` as ``<output_dir>/<stem>.json`` and ``markdown`` (if given) as
    ``<stem>.md``, each replaced atomically; returns the JSON's path."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, f"{stem}.json")
    _replace(path, json.dumps(results, indent=2, default=_to_builtin) + "\n")
    if markdown is not None:
        _replace(os.path.join(output_dir, f"{stem}.md"), markdown.rstrip("\n") + "\n")
    return path


def standard_error(p: float, n: int) -> float:
    """Binomial standard error of an accuracy ``p`` measured on ``n`` images,
    ``sqrt(p (1 - p) / n)``. Under the batch BN modes one batch's images are not
    independent, so there it is approximate."""
    return math.sqrt(max(p * (1.0 - p), 0.0) / n) if n else float("nan")


def percent_cell(p: float, n: int) -> str:
    """An accuracy and its standard error in percent: ``"76.10 ± 0.95"``."""
    return f"{100 * p:.2f} ± {100 * standard_error(p, n):.2f}"


def portable_stem(stem: str) -> str:
    """``stem`` with every run of characters other than letters, digits, ``_ . -`` as one
    ``-``: part files whose names every file system (and a Windows checkout) accepts."""
    return re.sub(r"[^\w.-]+", "-", stem)


def cached(output_dir: str, stem: str, key: dict, compute):
    """``compute()``'s result, or the one an earlier call saved as ``<output_dir>/<stem>.json``
    with the same ``key`` (a dict of JSON values saved beside the result, e.g. the settings
    that produced it): a killed study, restarted, loses only the part in progress. Both
    paths return what the JSON reads back (lists, not arrays or tuples)."""
    path = os.path.join(output_dir, f"{stem}.json")
    key = json.loads(json.dumps(key, default=_to_builtin))
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if all(saved.get(name) == value for name, value in key.items()):
            return saved["results"]
    write(output_dir, stem, {**key, "results": compute()})
    with open(path) as f:
        return json.load(f)["results"]


def new_figure(*grid, figsize, **subplots_kwargs):
    """``(figure, axes)`` like ``plt.subplots``, but outside pyplot: results are written
    on any machine without touching the caller's backend (a notebook keeps its inline one),
    and the figure is freed with its last reference."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*grid, **subplots_kwargs)


def save_figure(fig, output_dir: str, stem: str, dpi: int = 100) -> str:
    """``<output_dir>/<stem>.png``; returns its path."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, f"{stem}.png")
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def _replace(path: str, text: str) -> None:
    partial = f"{path}.{os.getpid()}.partial"
    with open(partial, "w") as f:
        f.write(text)
    os.replace(partial, path)


def _to_builtin(value):
    """numpy scalars and arrays in JSON."""
    if isinstance(value, (np.generic, np.ndarray, jax.Array)):
        return np.asarray(value).tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
