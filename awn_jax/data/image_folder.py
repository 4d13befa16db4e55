"""A dataset from `<root>/{train,test}/<class>/*.{jpg,jpeg,png}`, held in memory.

Classes are the sub-folders of `train`, sorted alphabetically (label = position). Images
are decoded with PIL, resized to image_size x image_size when they differ, and cached as
uint8 arrays in an .npz keyed by the folder, the size and every file's name, size and
mtime, because decoding 60k JPEGs takes far longer than loading one array file.
Normalization statistics are computed from the train split; ``load_test`` reads only the
test split, for evaluating a run whose statistics were saved with it.
"""

import hashlib
import os
import pathlib

import numpy as np
import tqdm
from absl import logging
from PIL import Image

from awn_jax import paths
from awn_jax.data import pipeline
from awn_jax.errors import MissingDataError, UserError

SPLITS = ("train", "test")
SUFFIXES = (".jpg", ".jpeg", ".png")
CACHE_ENV = paths.CACHE_ENV  # the decoded arrays go to awn_jax.paths.cache_dir()


def load(config):
    """(info, train split, test split) of the image folder at config.data_dir."""
    root = pathlib.Path(config.data_dir).expanduser()
    _check_layout(root)
    classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    train_images, train_labels = _cached_split(root / "train", classes, config.image_size)
    test_images, test_labels = _cached_split(root / "test", classes, config.image_size)
    mean, std = pipeline.channel_stats(train_images)
    info = pipeline.DatasetInfo(
        name=f"image_folder:{root}", num_classes=len(classes),
        image_shape=(config.image_size, config.image_size, 3),
        num_train=len(train_labels), num_test=len(test_labels), mean=mean, std=std,
        class_names=tuple(classes))
    train = pipeline.ArraySplit(train_images, train_labels, crop_padding=config.crop_padding,
                                random_flip=config.random_flip)
    return info, train, pipeline.ArraySplit(test_images, test_labels)


def has_train_split(config):
    return (pathlib.Path(config.data_dir).expanduser() / "train").is_dir()


def load_test(config, info):
    """The test split alone, labelled by the classes of a run trained with dataset ``info``."""
    root = pathlib.Path(config.data_dir).expanduser()
    _check_layout(root, splits=("test",))
    if not info.class_names:
        raise UserError("image_folder: the run saved no class names; the train split at "
                         f"{root / 'train'} is needed to label the test images")
    images, labels = _cached_split(root / "test", list(info.class_names), config.image_size)
    return pipeline.ArraySplit(images, labels)


def _check_layout(root, splits=SPLITS):
    for split in splits:
        if not (root / split).is_dir():
            raise MissingDataError(
                f"image_folder: no directory {root / split}; expected "
                f"<data_dir>/{{train,test}}/<class>/*.jpg|png, set --config.data_dir to its root")


def _list_files(split_dir, classes):
    """(os.DirEntry, label) of every image, in class order then file-name order."""
    unknown = sorted({d.name for d in split_dir.iterdir() if d.is_dir()} - set(classes))
    if unknown:
        raise UserError(
            f"image_folder: classes {unknown} in {split_dir} are not in the train split")
    files = []
    for label, name in enumerate(classes):
        if (split_dir / name).is_dir():
            entries = [e for e in os.scandir(split_dir / name) if e.name.lower().endswith(SUFFIXES)]
            files += [(entry, label) for entry in sorted(entries, key=lambda e: e.name)]
    return files


def _cached_split(split_dir, classes, image_size):
    """Decoded (images, labels) of one split, from the cache when no file has changed."""
    files = _list_files(split_dir, classes)
    if not files:
        raise MissingDataError(f"image_folder: no {'/'.join(SUFFIXES)} images under {split_dir}")
    cache = _cache_path(split_dir, files, image_size)
    if cache.exists():
        with np.load(cache) as arrays:
            return arrays["images"], arrays["labels"]
    logging.info("Decoding %d images under %s (cached afterwards in %s)",
                 len(files), split_dir, cache)
    # Serial on purpose: for small files PIL's per-image Python overhead (under the GIL)
    # dominates, and a thread pool measured slower than this loop.
    images = np.stack([_decode(entry.path, image_size) for entry, _ in tqdm.tqdm(
        files, desc=f"decoding {split_dir.name}/ (once; cached)", unit="image", leave=False,
        mininterval=1.0)])
    labels = np.array([label for _, label in files], np.int32)
    _save_atomically(cache, images=images, labels=labels)
    return images, labels


def _decode(path, size):
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(image)
    except OSError as error:  # not an image, or a truncated one
        raise UserError(f"image_folder: cannot read {path} ({error}); replace or remove "
                        "it") from error


def _cache_path(split_dir, files, image_size):
    digest = hashlib.sha256(f"{split_dir.resolve()}|{image_size}".encode())
    for entry, label in files:
        stat = entry.stat()
        digest.update(f"|{label}/{entry.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return paths.cache_dir() / f"image_folder-{split_dir.name}-{digest.hexdigest()[:20]}.npz"


def _save_atomically(path, **arrays):
    """Writes then renames, so a concurrent or interrupted run never reads half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.npz")
    np.savez(partial, **arrays)
    os.replace(partial, path)
