"""A model as pure pytrees: build it from a config, apply it under any BatchNorm mode.

Training, evaluation, attacks and analyses all work on ``(graphdef, params, batch_stats)`` from
``nnx.split``: plain pytrees that ``jax.jit`` shards and Orbax saves. The BatchNorm mode
is a static attribute of the modules, so it lives in the graphdef: :func:`with_bn_mode`
returns the graphdef of the same model in another mode, and :func:`apply_model` runs it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from awn_jax.errors import UserError
from awn_jax.nn import create_model, set_bn_mode

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build_model(config, info) -> nnx.Module:
    """The configured model for a dataset (``info``: its classes and channel statistics)."""
    if config.compute_dtype not in COMPUTE_DTYPES:
        raise UserError(f"unknown compute_dtype {config.compute_dtype!r}; "
                        f"expected one of {tuple(COMPUTE_DTYPES)}")
    return create_model(
        config.model, num_classes=info.num_classes, layer_type=config.layer_type,
        mean=info.mean, std=info.std, eta=config.eta if config.eta > 0 else None,
        eps=config.weight_norm_eps, compute_dtype=COMPUTE_DTYPES[config.compute_dtype],
        rngs=nnx.Rngs(config.seed), **architecture_options(config))


def architecture_options(config) -> dict:
    """The config's ``shortcut`` and ``head`` (runs saved before these keys existed used
    the projection shortcut and the conv + BN head)."""
    return {"shortcut": config.get("shortcut", "projection"),
            "head": config.get("head", "conv-bn")}


def split_model(model: nnx.Module):
    """``(graphdef, params, batch_stats)``; fails if the model holds any other state."""
    graphdef, params, batch_stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    if jax.tree.leaves(rest):
        raise ValueError(f"model holds state that is neither Param nor BatchStat: {rest}")
    return graphdef, params, batch_stats


def with_bn_mode(graphdef, params, batch_stats, mode: str):
    """The graphdef of the same model with every BatchNorm in ``mode``."""
    model = nnx.merge(graphdef, params, batch_stats)
    set_bn_mode(model, mode)
    return nnx.split(model, nnx.Param, nnx.BatchStat)[0]


def apply_model(graphdef, params, batch_stats, images) -> tuple[jax.Array, Any]:
    """Logits for images in [0, 1], and the batch statistics after the call (changed
    only when the graphdef's BatchNorms are in ``train`` mode)."""
    # copy: fresh Variables at the caller's trace level, so BatchNorm can update them
    # inside jax.grad.
    model = nnx.merge(graphdef, params, batch_stats, copy=True)
    logits = model(images)
    return logits, nnx.state(model, nnx.BatchStat)


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def named_leaves(tree) -> dict[str, np.ndarray]:
    """Leaves of an nnx State (or any pytree) keyed ``"stages.0.0.bn1.mean"``."""
    named = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        parts = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
        named[".".join(p for p in parts if p != "value")] = leaf
    return named


def fill_named(template, arrays, prefix: str = ""):
    """``template``'s pytree with each leaf replaced by ``arrays[prefix + name]`` (names as
    :func:`named_leaves` gives them): weights read back from a file, statistics replaced."""
    names = list(named_leaves(template))
    leaves, treedef = jax.tree_util.tree_flatten(template)
    missing = [n for n in names if prefix + n not in arrays]
    if missing:
        raise UserError(f"the weights file lacks {missing[:3]}...: not this model's weights")
    filled = []
    for leaf, name in zip(leaves, names):
        value = np.asarray(arrays[prefix + name])
        if value.shape != np.shape(leaf):
            raise UserError(f"{name}: shape {value.shape} in the file, {np.shape(leaf)} in "
                            "the model")
        filled.append(value)
    return jax.tree_util.tree_unflatten(treedef, filled)


def bn_drift(previous, current) -> dict:
    """Change of all BN running means and variances over the epoch, relative to their
    current size (1.0 when they started from zero)."""
    def relative(name):
        prev = [np.ravel(v) for k, v in named_leaves(jax.device_get(previous)).items()
                if k.rsplit(".", 1)[-1] == name]
        cur = [np.ravel(v) for k, v in named_leaves(jax.device_get(current)).items()
               if k.rsplit(".", 1)[-1] == name]
        if not prev:
            return 0.0
        prev, cur = np.concatenate(prev), np.concatenate(cur)
        return float(np.linalg.norm(cur - prev) / max(np.linalg.norm(cur), 1e-12))
    return {"bn_mean_drift": relative("mean"), "bn_var_drift": relative("var")}
