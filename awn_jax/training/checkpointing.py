"""Orbax checkpoints of the train state, one per epoch, and the run's resolved config.

A checkpoint that cannot be restored (corrupt, or written by an incompatible config) stops
the run with one clear error and is never overwritten; the same holds for a ``workdir``
whose saved config disagrees with the current one on anything but bookkeeping keys.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import orbax.checkpoint as ocp

from awn_jax.errors import UserError

# Keys that may change between the runs of one workdir (extending or re-evaluating a run).
RESUMABLE_CHANGES = frozenset({
    "num_epochs", "workdir", "log_every_steps", "eval_batch_size", "eval_bn_mode",
    "max_checkpoints_to_keep", "num_devices", "data_dir"})


# Keys added to the config after runs were saved, with the value those runs had: a saved
# config without the key is the same run.
ADDED_KEYS = {"shortcut": "projection", "head": "conv-bn"}


class CheckpointError(UserError):
    """A checkpoint or workdir that cannot be used; nothing in it was changed."""


def _config_path(workdir):
    return os.path.join(workdir, "config.json")


def load_config_dict(workdir: str) -> dict:
    """The resolved config a run saved in its workdir."""
    path = _config_path(workdir)
    if not os.path.isdir(workdir):
        raise CheckpointError(f"no such workdir: {workdir}")
    if not os.path.exists(path):
        raise CheckpointError(f"{workdir} holds no config.json: not a training workdir")
    return _read_json(path)


def _read_json(path: str):
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{path} is damaged ({error}); restore it or use another "
                                  "--workdir") from error


def check_config(config, workdir: str) -> None:
    """Refuse a workdir trained with a different config; writes nothing."""
    if not os.path.exists(_config_path(workdir)):
        return
    current = json.loads(config.to_json_best_effort())
    added = {k: v for k, v in ADDED_KEYS.items() if k in current}  # configs that have them
    saved = {**added, **load_config_dict(workdir)}
    changed = sorted(k for k in set(saved) | set(current)
                     if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k))
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
        raise CheckpointError(f"{workdir} was trained with another config ({details}); "
                              "use a new --workdir or the same config")


def check_or_save_config(config, workdir: str) -> None:
    """:func:`check_config`, then save the resolved config."""
    check_config(config, workdir)
    if jax.process_index() == 0:
        tmp = _config_path(workdir) + ".tmp"
        with open(tmp, "w") as f:
            json.dump(json.loads(config.to_json_best_effort()), f, indent=2, sort_keys=True)
        os.replace(tmp, _config_path(workdir))


def _dataset_info_path(workdir):
    return os.path.join(workdir, "dataset_info.json")


def save_dataset_info(info, workdir: str) -> None:
    """Save what the model was built with (classes, sizes, normalization), so the run can
    be evaluated later without reading its training split."""
    if jax.process_index() == 0:
        tmp = _dataset_info_path(workdir) + ".tmp"
        with open(tmp, "w") as f:
            json.dump(dataclasses.asdict(info), f, indent=2)
        os.replace(tmp, _dataset_info_path(workdir))


def load_dataset_info(workdir: str) -> dict | None:
    """The dataset info a run saved (a dict of DatasetInfo's fields), None for older runs."""
    path = _dataset_info_path(workdir)
    if not os.path.exists(path):
        return None
    return _read_json(path)


def make_manager(workdir: str, max_to_keep: int = 0) -> ocp.CheckpointManager:
    """Checkpoints under ``workdir/checkpoints``, named by epoch; 0 keeps them all."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep or None, create=True)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                 options=options)


def save(manager: ocp.CheckpointManager, epoch: int, state) -> None:
    manager.save(epoch, args=ocp.args.StandardSave(state))


def restore(manager: ocp.CheckpointManager, epoch: int, target):
    """The state saved after ``epoch``, laid out (shapes, dtypes, shardings) like ``target``."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
        _check_step_metadata(manager, epoch)
        return manager.restore(epoch, args=ocp.args.StandardRestore(abstract))
    # Orbax and TensorStore raise ValueError for unparsable metadata and another model's
    # tree or shapes, OSError for a file that cannot be read, and a plain Exception for
    # damaged array data ("Encountered error while reading array index ..."): at this
    # boundary every exception of the restore means the checkpoint cannot be used.
    except Exception as error:  # noqa: BLE001
        reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
        raise CheckpointError(
            f"cannot restore the checkpoint of epoch {epoch} in {manager.directory} "
            f"({type(error).__name__}: {reason}); it is corrupt or from an incompatible model. "
            "It was left untouched: move it away to start over, or use another --workdir"
        ) from error


def _check_step_metadata(manager, epoch: int) -> None:
    """Orbax restores without reading the step's own metadata, but writes it again later:
    a damaged one is refused like any damaged file of the checkpoint."""
    path = os.path.join(str(manager.directory), str(epoch), "_CHECKPOINT_METADATA")
    if os.path.exists(path):
        with open(path) as f:
            json.load(f)


def saved_epochs(workdir: str) -> list[int]:
    """The epochs of ``workdir``'s checkpoints, in order."""
    manager = make_manager(workdir)
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()


def restore_epoch(workdir: str, epoch: int | None, target):
    """``(state, epoch)`` saved after ``epoch`` in ``workdir`` (the latest when None), laid
    out like ``target``; a CheckpointError naming the saved epochs when it is not there."""
    manager = make_manager(workdir)
    try:
        epochs = sorted(manager.all_steps())
        if not epochs:
            raise CheckpointError(f"{workdir} holds no checkpoint yet")
        epoch = epochs[-1] if epoch is None else epoch
        if epoch not in epochs:
            raise CheckpointError(
                f"{workdir} has no checkpoint of epoch {epoch}; saved epochs: {epochs}")
        return restore(manager, epoch, target), epoch
    finally:
        manager.close()


def restore_latest(manager: ocp.CheckpointManager, target):
    """``(state, epoch)`` of the latest checkpoint, or ``(target, 0)`` when there is none."""
    epoch = manager.latest_step()
    if epoch is None:
        return target, 0
    return restore(manager, epoch, target), epoch
