"""What the stability studies share: scoring a parameter set, naming runs and tensors,
writing the JSON and PNG of a study."""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from awn_jax.state import apply_model

LAYER_TYPE_LABELS = {"conv": "CNN", "adder": "ANN", "adder-ws": "ANN-WS", "adder-awn": "ANN-AWN"}


def run_label(config) -> str:
    """The paper's name of a run's model (CNN, ANN, ANN-WS, ANN-AWN)."""
    return LAYER_TYPE_LABELS.get(config["layer_type"], config["layer_type"])


def unique_labels(labels, workdirs) -> list[str]:
    """``labels``, with the workdir's base name appended where two runs share one."""
    return [f"{label} ({os.path.basename(os.path.normpath(w))})" if labels.count(label) > 1
            else label for label, w in zip(labels, workdirs)]


@functools.partial(jax.jit, static_argnums=0)
def _loss_and_correct(graphdef, params, batch_stats, images, labels):
    logits, _ = apply_model(graphdef, params, batch_stats, images)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.sum(losses), jnp.sum(jnp.argmax(logits, -1) == labels)


def evaluate(graphdef, params, batch_stats, batches) -> dict:
    """Mean test loss and accuracy over ``batches`` (the graphdef fixes the BN mode)."""
    loss_sum, correct, count = 0.0, 0, 0
    for batch in batches:
        loss, right = _loss_and_correct(graphdef, params, batch_stats, batch["image"],
                                        batch["label"])
        loss_sum, correct, count = loss_sum + float(loss), correct + int(right), count + len(
            batch["label"])
    return {"test_loss": loss_sum / count, "test_accuracy": correct / count, "num_examples": count}


def write_json(output_dir: str, stem: str, results) -> str:
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, f"{stem}.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2, default=_to_builtin)
    return path


def new_figure(*grid, figsize, **subplots_kwargs):
    """``(figure, axes)`` like ``plt.subplots``, but outside pyplot: the studies write files
    on any machine without touching the caller's backend (a notebook keeps its inline one),
    and the figure is freed with its last reference."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*grid, **subplots_kwargs)


def save_figure(fig, output_dir: str, stem: str) -> str:
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, f"{stem}.png")
    fig.savefig(path, dpi=90, bbox_inches="tight")
    return path


def _to_builtin(value):
    """numpy scalars and arrays in JSON."""
    if isinstance(value, (np.generic, jax.Array)):
        return np.asarray(value).tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
