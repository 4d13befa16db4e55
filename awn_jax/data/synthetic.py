"""A learnable synthetic dataset for smoke runs and tests: no files, no network.

Each class has a smooth colour pattern (a random 4x4 RGB grid, upsampled); an example is
its class pattern plus Gaussian noise. A small network separates the classes within a few
epochs, so a smoke run shows the loss going down. Everything follows from config.seed.
"""

import numpy as np

from awn_jax.data import pipeline

_GRID = 4
_NOISE = 0.2


def load(config):
    """(info, train split, test split) of the synthetic dataset described by config."""
    size, num_classes = config.image_size, config.synthetic_num_classes
    rng = np.random.default_rng([config.seed, 0x5EED])
    patterns = _class_patterns(rng, num_classes, size)
    train_images, train_labels = _draw(rng, patterns, config.synthetic_num_train)
    test_images, test_labels = _draw(rng, patterns, config.synthetic_num_test)
    mean, std = pipeline.channel_stats(train_images)
    info = pipeline.DatasetInfo(
        name="synthetic", num_classes=num_classes, image_shape=(size, size, 3),
        num_train=len(train_labels), num_test=len(test_labels), mean=mean, std=std)
    train = pipeline.ArraySplit(train_images, train_labels, crop_padding=config.crop_padding,
                                random_flip=config.random_flip)
    return info, train, pipeline.ArraySplit(test_images, test_labels)


def _class_patterns(rng, num_classes, size):
    """(classes, size, size, 3) patterns in [0.2, 0.8]: a coarse grid, nearest-upsampled."""
    grid = rng.uniform(0.2, 0.8, size=(num_classes, _GRID, _GRID, 3)).astype(np.float32)
    cells = np.arange(size) * _GRID // size
    return grid[:, cells][:, :, cells]


def _draw(rng, patterns, count):
    labels = rng.integers(0, len(patterns), size=count).astype(np.int32)
    noise = rng.standard_normal((count,) + patterns.shape[1:], dtype=np.float32) * _NOISE
    images = np.clip(patterns[labels] + noise, 0.0, 1.0)
    return np.round(images * 255).astype(np.uint8), labels
