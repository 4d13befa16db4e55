"""PASCAL VOC from TFDS, as the paper uses it: train on the union of the VOC 2007 and VOC
2012 trainval sets (16,551 images), test on VOC 2007 test (4,952 images).

TFDS's ``voc`` splits are the devkit's image sets: ``train`` and ``validation`` make
trainval. Its boxes are the devkit's 1-based inclusive pixel coordinates divided by the
image size, ``(ymin, xmin, ymax, xmax)``; they become continuous boxes
``[xmin - 1, xmax] x [ymin - 1, ymax]`` (see :mod:`awn_jax.detection.boxes`).
"""

from __future__ import annotations

import numpy as np

from awn_jax.data import tfds_source

TRAIN = (("voc/2007", "train+validation"), ("voc/2012", "train+validation"))
TEST = ("voc/2007", "test")


class VocSplit:
    """Examples of one or more TFDS VOC data sources, one after the other."""

    def __init__(self, sources):
        self._sources = list(sources)
        self._starts = np.cumsum([0] + [len(s) for s in self._sources])

    def __len__(self):
        return int(self._starts[-1])

    def __getitem__(self, index):
        part = int(np.searchsorted(self._starts, index, side="right")) - 1
        return to_example(self._sources[part][index - int(self._starts[part])])


def to_example(record) -> dict:
    """A TFDS VOC record as a detection example (continuous pixel boxes)."""
    image = np.asarray(record["image"], np.uint8)
    objects = record["objects"]
    height, width = image.shape[:2]
    normalized = np.asarray(objects["bbox"], np.float64).reshape(-1, 4)
    ymin, xmin, ymax, xmax = (normalized[:, i] for i in range(4))
    boxes = np.stack([xmin * width - 1, ymin * height - 1, xmax * width, ymax * height], 1)
    return {"image": image, "boxes": boxes.astype(np.float32),
            "labels": np.asarray(objects["label"], np.int32),
            "difficult": np.asarray(objects["is_difficult"], bool)}


def _source(name, split, data_dir):
    # The classification reader's helpers: prepare on first use, ArrayRecord random access.
    builder = tfds_source._prepared_builder(name, data_dir)  # pylint: disable=protected-access
    return builder, tfds_source._data_source(builder, split)  # pylint: disable=protected-access


def load(config):
    """(class names, train split, test split) of VOC 07+12 trainval / 07 test."""
    data_dir = config.data_dir or None
    train_sources = [_source(name, split, data_dir) for name, split in TRAIN]
    builder, test_source = _source(*TEST, data_dir)
    names = tuple(builder.info.features["objects"]["label"].names)
    return names, VocSplit(s for _, s in train_sources), VocSplit([test_source])
