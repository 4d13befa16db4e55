"""A workdir as training leaves it, without training: what the evaluation and analysis tests
load (config.json, dataset_info.json, checkpoints of a randomly initialized model)."""

from awn_jax import data
from awn_jax.training import checkpointing
from awn_jax.training.state import create_train_state
from configs import smoke


def random_workdir(workdir: str, epochs=(1,), edit=None, **overrides) -> str:
    """``workdir`` holding smoke's config with ``overrides`` (synthetic data) and, for each of
    ``epochs``, a checkpoint of the same random model (``edit(epoch, state)`` -> the state
    to save, when given). Returns ``workdir``."""
    config = smoke.get_config()
    config.update(dict(num_devices=1, **overrides))
    dataset = data.get_dataset(config)
    _, _, state = create_train_state(config, dataset.info,
                                     dataset.steps_per_epoch(config.batch_size))
    checkpointing.check_or_save_config(config, workdir)
    checkpointing.save_dataset_info(dataset.info, workdir)
    manager = checkpointing.make_manager(workdir)
    for epoch in epochs:
        checkpointing.save(manager, epoch, edit(epoch, state) if edit else state)
    manager.wait_until_finished()
    manager.close()
    return workdir
