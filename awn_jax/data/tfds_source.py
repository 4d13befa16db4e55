"""TFDS datasets read through `tfds.data_source` (random access, no TensorFlow at read time).

Reading prepared ArrayRecord files needs only numpy and PIL. Preparing a dataset the first
time (download + conversion) is TFDS's own builder code, which uses TensorFlow; it runs only
when the dataset is missing, with TensorFlow kept off the accelerators.
"""

import dataclasses
import os
import socket

import numpy as np
from absl import logging

from awn_jax.data import pipeline, transforms
from awn_jax.errors import MissingDataError


@dataclasses.dataclass(frozen=True)
class _Spec:
    test_split: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    in_memory: bool  # small enough to decode once and keep as uint8 arrays
    download_host: str | None = None  # where TFDS downloads it from (None: a manual download)


_TORONTO = "www.cs.toronto.edu"
DATASETS = {
    # The official AdderNet CIFAR-10 normalization (main.py of the AdderNet repository).
    "cifar10": _Spec("test", (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), True,
                     _TORONTO),
    "cifar100": _Spec("test", (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), True,
                      _TORONTO),
    "imagenet2012": _Spec("validation", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), False),
}
IMAGE_FOLDER_HINT = ("without network, train on an image folder (<root>/{train,test}/<class>/"
                     "*.jpg): --config.dataset=image_folder --config.data_dir=<root>")


def load(config):
    """(info, train split, test split) of the TFDS dataset `config.dataset`."""
    spec = DATASETS[config.dataset]
    builder = _prepared_builder(config.dataset, config.data_dir or None)
    train, test = (_data_source(builder, split) for split in ("train", spec.test_split))
    if spec.in_memory:
        train = _read_all(train, config.image_size, crop_padding=config.crop_padding,
                          random_flip=config.random_flip)
        test = _read_all(test, config.image_size)
    else:
        train = pipeline.StreamSplit(train, config.image_size, random_flip=config.random_flip)
        test = pipeline.StreamSplit(test, config.image_size)
    info = pipeline.DatasetInfo(
        name=config.dataset,
        num_classes=builder.info.features["label"].num_classes,
        image_shape=(config.image_size, config.image_size, 3),
        num_train=len(train), num_test=len(test), mean=spec.mean, std=spec.std)
    return info, train, test


def is_prepared(name: str, data_dir: str | None = None) -> bool:
    """Whether TFDS has ``name`` prepared in ``data_dir`` (its default when None): reading it
    then needs no network."""
    base = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    if not os.path.isdir(os.path.join(os.path.expanduser(base), name)):
        return False  # without asking TFDS, which warns about (and may create) the folder
    import tensorflow_datasets as tfds

    return tfds.builder(name, data_dir=data_dir, file_format="array_record").is_prepared()


def _looks_like_image_folder(data_dir) -> bool:
    """``train/`` or ``test/`` holding class folders: an image folder, not a TFDS data_dir."""
    if not data_dir:
        return False
    for split in ("train", "test"):
        path = os.path.join(os.path.expanduser(data_dir), split)
        if os.path.isdir(path) and any(entry.is_dir() for entry in os.scandir(path)):
            return True
    return False


def _reachable(host: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``host``'s HTTPS port opens within ``timeout`` seconds
    (TFDS itself retries for minutes before giving up)."""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _prepared_builder(name, data_dir):
    """The dataset's builder, downloading and preparing it (as ArrayRecord) when missing;
    one clear error, within seconds and writing nothing, when ``data_dir`` is an image
    folder or the download site cannot be reached."""
    if _looks_like_image_folder(data_dir):
        raise MissingDataError(
            f"{data_dir} is an image folder, not a TFDS data directory: pass "
            f"--config.dataset=image_folder --config.data_dir={data_dir}")
    import tensorflow_datasets as tfds  # here: image folders and synthetic data need no TFDS

    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
        host = DATASETS[name].download_host if name in DATASETS else None
        if host and not _reachable(host):
            raise MissingDataError(
                f"TFDS dataset {name!r} is not prepared in {builder.data_dir} and its download "
                f"site {host} cannot be reached (offline?); {IMAGE_FOLDER_HINT}, or prepare "
                f"it elsewhere: `tfds build {name} --file_format=array_record --data_dir=DIR`, "
                "then --config.data_dir=DIR")
        logging.info("Preparing TFDS dataset %s in %s", name, builder.data_dir)
        _keep_tensorflow_off_accelerators()
        try:
            builder.download_and_prepare()
        # Network and file errors, a package TFDS's builder needs, a manual download not in
        # place (TFDS raises AssertionError for it) and a failed download.
        except (OSError, ImportError, AssertionError, tfds.download.DownloadError) as error:
            raise MissingDataError(
                f"TFDS dataset {name!r} is not prepared in {builder.data_dir} and preparing it "
                f"failed ({type(error).__name__}: {error}). Prepare it first, e.g. "
                f"`tfds build {name} --file_format=array_record --data_dir=DIR` on a machine "
                f"with network access, then pass --config.data_dir=DIR; or "
                f"{IMAGE_FOLDER_HINT}") from error
    return builder


def _data_source(builder, split):
    try:
        return builder.as_data_source(split=split)
    except NotImplementedError as error:  # prepared as TFRecord, which has no random access
        raise MissingDataError(
            f"TFDS dataset {builder.name!r} in {builder.data_dir} has no ArrayRecord files; "
            f"rebuild it with `tfds build {builder.name} --file_format=array_record`") from error


def _keep_tensorflow_off_accelerators():
    """TFDS preparation imports TensorFlow; it must not reserve the GPU memory JAX needs."""
    try:
        import tensorflow as tf  # pylint: disable=import-outside-toplevel
    except ImportError:
        return  # TFDS reports the missing package itself
    tf.config.set_visible_devices([], "GPU")


def _read_all(source, image_size, **augmentation):
    """Decodes a whole split once into uint8 arrays (CIFAR: 150 MB for 50k images)."""
    logging.info("Decoding %d examples of %s", len(source), source)
    examples = [source[i] for i in range(len(source))]
    images = np.stack([example["image"] for example in examples])
    labels = np.array([example["label"] for example in examples], np.int32)
    return pipeline.ArraySplit(transforms.resize_all(images, image_size), labels, **augmentation)
