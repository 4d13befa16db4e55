"""Input pipeline: TFDS (cifar10, cifar100, imagenet2012), image folders and synthetic data.

    dataset = get_dataset(config)
    dataset.info                                   # DatasetInfo: classes, shapes, sizes, mean/std
    dataset.steps_per_epoch(global_batch_size)     # full batches; the remainder is dropped
    dataset.train_batches(epoch, global_batch_size, process_index=0, process_count=1)
    dataset.test_batches(global_batch_size, num_examples=None, process_index=0, process_count=1)
    dataset_for_run(config, info)                  # for a saved run: test split suffices

Batches are dicts of numpy arrays: image float32 (local_batch, H, W, C) in [0, 1] (the model
normalizes with info.mean/std) and label int32 (local_batch,).
"""

import dataclasses

from awn_jax.data import image_folder, synthetic, tfds_source
from awn_jax.data.pipeline import Dataset, DatasetInfo
from awn_jax.errors import UserError

_LOADERS = {
    **{name: tfds_source.load for name in tfds_source.DATASETS},
    "image_folder": image_folder.load,
    "synthetic": synthetic.load,
}
DATASET_NAMES = tuple(sorted(_LOADERS))
# config.normalization: the source's own statistics, or a TFDS dataset's official ones.
NORMALIZATIONS = ("dataset", *tfds_source.DATASETS)

__all__ = ["DATASET_NAMES", "Dataset", "DatasetInfo", "NORMALIZATIONS", "dataset_for_run",
           "get_dataset"]


def get_dataset(config):
    """The dataset named by config.dataset, with its augmentation and sizes from config."""
    if config.dataset not in _LOADERS:
        raise UserError(f"unknown dataset {config.dataset!r}; set --config.dataset to one of "
                        f"{', '.join(DATASET_NAMES)}")
    info, train, test = _LOADERS[config.dataset](config)
    info = _with_normalization(info, config.normalization)
    return Dataset(info, train, test, seed=config.seed,
                   num_train_examples=config.num_train_examples)


def dataset_for_run(config, info):
    """The dataset of a saved run whose DatasetInfo was ``info``: the full dataset when its
    train split is at hand (studies that re-estimate BN statistics need it), else, for image
    folders, the test split alone, so a run can be evaluated where only test images are."""
    if config.dataset == "image_folder" and not image_folder.has_train_split(config):
        return Dataset(info, None, image_folder.load_test(config, info), seed=config.seed)
    return get_dataset(config)


def _with_normalization(info, normalization):
    """``info`` with the channel statistics ``config.normalization`` names: ``dataset``
    keeps the source's own (TFDS's constants, or those measured on an image folder's or
    the synthetic train split); a TFDS dataset name takes its official constants, so
    CIFAR-10 read from a folder normalizes exactly as the official recipe does."""
    if normalization == "dataset":
        return info
    if normalization not in NORMALIZATIONS:
        raise UserError(f"unknown normalization {normalization!r}; expected one of "
                        f"{', '.join(NORMALIZATIONS)}")
    spec = tfds_source.DATASETS[normalization]
    return dataclasses.replace(info, mean=spec.mean, std=spec.std)
