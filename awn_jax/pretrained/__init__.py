"""Shipped trained models: parameters and BatchNorm statistics (no optimizer state), one
small ``.npz`` per model, with a manifest saying how each was trained and what it scores.

    run = awn_jax.pretrained.load("cifar10_r20_awn")          # offline, on a fresh clone
    run.logits_fn("running-mean")(images)                     # images NHWC in [0, 1]
    run = awn_jax.pretrained.load("cifar10_r20_awn", data_dir="~/cifar10")  # + test data
    run = awn_jax.pretrained.load("cifar10_r20_awn", data_dir="~/cifar10",
                                  bn_stats=BNStats("reestimate"))  # precise BN statistics

``manifest.json`` (beside the weights) holds, per model: the training config and dataset
info, the budget, the clean accuracy per BN mode on the stated test images, the logits of
a fixed input (checked by the tests), and the file's sha256 (checked at every load).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil

import jax
import ml_collections
import numpy as np

from awn_jax import data
from awn_jax.data import tfds_source
from awn_jax.bn_statistics import BNStats
from awn_jax.errors import UserError
from awn_jax.model import build_model, fill_named, named_leaves, split_model
from awn_jax.training.runs import Run

WEIGHTS_DIR = os.path.join(os.path.dirname(__file__), "weights")
MANIFEST = "manifest.json"
# The fixed input whose logits the manifest records: uniform images from this seed.
CHECK_SEED, CHECK_SHAPE = 0, (16, 32, 32, 3)
CHECK_BN_MODES = ("tracked", "running-mean")


def check_images() -> np.ndarray:
    return np.random.default_rng(CHECK_SEED).random(CHECK_SHAPE, dtype=np.float32)


def manifest(directory: str = WEIGHTS_DIR) -> dict:
    """``{name: entry}`` of the models in ``directory`` (empty when none are shipped)."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def names(directory: str = WEIGHTS_DIR) -> list[str]:
    return sorted(manifest(directory))


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _info(entry) -> data.DatasetInfo:
    return data.DatasetInfo(**{k: tuple(v) if isinstance(v, list) else v
                               for k, v in entry["dataset_info"].items()})


def load(name: str, data_dir: str | None = None, directory: str = WEIGHTS_DIR,
         bn_stats: BNStats = BNStats()) -> Run:
    """The shipped model ``name`` as a :class:`Run`. ``data_dir``: a CIFAR-10 image folder
    (``<dir>/{train,test}/<class>/``) for its test images (``run.test_set``, evaluations)
    and training images (re-estimated statistics), or a TFDS data directory; without it the
    run has no dataset unless the model names a TFDS dataset prepared in TFDS's default
    folder (loading never downloads).
    ``bn_stats``: other BN statistics than the shipped ones, e.g. ``BNStats("reestimate")``
    (re-estimated on the training images of ``data_dir``, then kept in the user cache)."""
    models = manifest(directory)
    if name not in models:
        raise UserError(f"no shipped model {name!r}; shipped: {', '.join(models) or 'none'}")
    entry = models[name]
    path = os.path.join(directory, entry["file"])
    if file_sha256(path) != entry["sha256"]:
        raise UserError(f"{path} does not match its sha256 in the manifest: a damaged or "
                        "replaced file (on a clone, `git lfs`/checkout problems)")
    config = ml_collections.ConfigDict(entry["config"])
    info = _info(entry)
    graphdef, params, batch_stats = split_model(build_model(config, info))
    with np.load(path) as arrays:
        params = fill_named(params, arrays, "params/")
        batch_stats = fill_named(batch_stats, arrays, "batch_stats/")
    dataset = None
    if data_dir:
        config.data_dir = os.path.abspath(os.path.expanduser(data_dir))
        if os.path.isdir(os.path.join(config.data_dir, "test")):  # an image folder
            config.dataset = "image_folder"
        dataset = data.dataset_for_run(config, info)
    elif config.dataset in tfds_source.DATASETS and tfds_source.is_prepared(
            config.dataset, config.data_dir or None):  # never a download on load
        dataset = data.dataset_for_run(config, info)
    return Run(f"pretrained:{name}", config, dataset, entry["epoch"], graphdef, params,
               batch_stats).with_bn_stats(bn_stats)


def copy_models(source: str, directory: str = WEIGHTS_DIR) -> list[str]:
    """Add every model of the shipped-model folder ``source`` (files and manifest entries;
    e.g. a campaign's ``report/pretrained/``) to ``directory``, the package's by default,
    replacing models of the same name; each file checked against its sha256 first."""
    source = os.path.expanduser(source)
    models = manifest(source)
    if not models:
        raise UserError(f"{source} holds no {MANIFEST} with models")
    for entry in models.values():
        if file_sha256(os.path.join(source, entry["file"])) != entry["sha256"]:
            raise UserError(f"{source}/{entry['file']} does not match its sha256 in the manifest")
    os.makedirs(directory, exist_ok=True)
    for entry in models.values():
        shutil.copyfile(os.path.join(source, entry["file"]), os.path.join(directory, entry["file"]))
    _write_manifest(directory, {**manifest(directory), **models})
    return sorted(models)


def _write_manifest(directory: str, models: dict) -> None:
    with open(os.path.join(directory, MANIFEST), "w") as f:
        json.dump(models, f, indent=1, sort_keys=True)


def export(run: Run, name: str, directory: str, info: data.DatasetInfo | None = None,
           **details) -> dict:
    """Write ``run``'s parameters and BN statistics as ``<directory>/<name>.npz`` and add
    its entry to the manifest there (``details``: budget, accuracies, commands, ...).
    ``info``: the dataset the model is for, when ``run`` has no dataset."""
    info = info or run.dataset.info
    os.makedirs(directory, exist_ok=True)
    arrays = {f"params/{k}": np.asarray(v) for k, v in named_leaves(run.params).items()}
    arrays.update({f"batch_stats/{k}": np.asarray(v)
                   for k, v in named_leaves(run.batch_stats).items()})
    path = os.path.join(directory, f"{name}.npz")
    np.savez_compressed(path, **arrays)
    images = check_images()
    entry = {
        "file": f"{name}.npz", "sha256": file_sha256(path), "epoch": run.epoch,
        "config": run.config.to_dict(), "dataset_info": dataclasses.asdict(info),
        "check_input": {"seed": CHECK_SEED, "shape": list(CHECK_SHAPE)},
        "check_logits": {mode: np.asarray(jax.jit(run.logits_fn(mode))(images)).tolist()
                         for mode in CHECK_BN_MODES},
        **details,
    }
    _write_manifest(directory, {**manifest(directory), name: entry})
    return entry

