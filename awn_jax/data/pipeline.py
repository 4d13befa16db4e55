"""Ordering, augmentation randomness, batching and process sharding, shared by all sources.

A source supplies two splits that turn example indices into uint8 images; the Dataset
decides which indices form which batch. The train order and every augmentation draw are a
function of (seed, epoch, position in the epoch) only. So a run resumed at an epoch
boundary sees the batches of an uninterrupted run, and the global batches do not depend on
how many processes share them: each process materializes only its own contiguous slice.
"""

import concurrent.futures
import dataclasses

import numpy as np

from awn_jax.data import transforms
from awn_jax.errors import UserError

# Distinct streams of randomness derived from (seed, epoch).
_ORDER, _CROPS, _EXAMPLE = 0, 1, 2
# The test order and the train subset are the same for every run, whatever its seed, so
# runs are compared on the same images. The test order is shuffled once because image
# folders list examples class by class, and batch statistics (BN modes "running-mean" and
# "running") must not see single-class batches.
_FIXED_SEED, _SUBSET, _TEST_ORDER, _STATISTICS_ORDER = 2021, 0, 1, 2


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the model and trainer need to know about a dataset.

    mean and std are per channel in [0, 1] pixel units; normalization lives in the model.
    """

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    num_train: int
    num_test: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] = ()  # label order, where the source names its classes


class ArraySplit:
    """A split held in memory as uint8 arrays; trains with pad-and-crop plus flips (CIFAR)."""

    def __init__(self, images, labels, *, crop_padding=0, random_flip=False):
        self.images = images
        self.labels = labels.astype(np.int32)
        self._padding = crop_padding
        self._flip = random_flip
        self._draws = (None, None)

    def __len__(self):
        return len(self.labels)

    def read(self, indices):
        return self.images[indices], self.labels[indices]

    def read_augmented(self, indices, positions, seed, epoch):
        offsets, flips = self._epoch_draws(seed, epoch)
        images = transforms.pad_crop_flip(
            self.images[indices], offsets[positions], flips[positions], self._padding)
        return images, self.labels[indices]

    def _epoch_draws(self, seed, epoch):
        """Crop offsets and flips for every position of the epoch, kept for the current epoch."""
        key, draws = self._draws
        if key != (seed, epoch):
            rng = np.random.default_rng([seed, epoch, _CROPS])
            offsets = rng.integers(0, 2 * self._padding + 1, size=(len(self), 2))
            flips = rng.random(len(self)) < 0.5 if self._flip else np.zeros(len(self), bool)
            draws = offsets, flips
            self._draws = (seed, epoch), draws
        return draws


class StreamSplit:
    """A split decoded per example from a random-access source (ImageNet).

    Trains with random-resized-crop plus flips, evaluates with resize and center crop;
    examples of a batch are decoded on a thread pool (PIL releases the GIL). Each example's
    augmentation has its own generator, seeded by (seed, epoch, position).
    """

    def __init__(self, source, image_size, *, random_flip=True):
        self._source = source
        self._size = image_size
        self._flip = random_flip
        self._pool = concurrent.futures.ThreadPoolExecutor()

    def __len__(self):
        return len(self._source)

    def read(self, indices):
        return self._stack(self._pool.map(self._test_example, map(int, indices)))

    def read_augmented(self, indices, positions, seed, epoch):
        entropies = [(seed, epoch, _EXAMPLE, int(p)) for p in positions]
        return self._stack(self._pool.map(self._train_example, map(int, indices), entropies))

    def _stack(self, examples):
        examples = list(examples)
        if not examples:
            return np.zeros((0, self._size, self._size, 3), np.uint8), np.zeros(0, np.int32)
        images, labels = zip(*examples)
        return np.stack(images), np.asarray(labels, np.int32)

    def _train_example(self, index, entropy):
        example = self._source[index]
        rng = np.random.default_rng(entropy)
        image = transforms.random_resized_crop(example["image"], self._size, rng)
        if self._flip and rng.random() < 0.5:
            image = image[:, ::-1]
        return image, example["label"]

    def _test_example(self, index):
        example = self._source[index]
        return transforms.resize_center_crop(example["image"], self._size), example["label"]


def train_subset(info, num_train_examples: int):
    """``(indices, info)``: the training examples a run uses, all of them or (when
    ``num_train_examples`` > 0) a fixed random subset of that size, the same whatever the
    run's seed, and ``info`` with ``num_train`` set to their count. Any dataset info with
    ``num_train`` and ``name`` fields (classification and detection)."""
    if not num_train_examples:
        return np.arange(info.num_train), info
    if num_train_examples > info.num_train:
        raise UserError(f"num_train_examples={num_train_examples} exceeds the "
                        f"{info.num_train} training examples of {info.name}")
    subset = np.random.default_rng([_FIXED_SEED, _SUBSET]).permutation(info.num_train)
    return (np.sort(subset[:num_train_examples]),
            dataclasses.replace(info, num_train=num_train_examples))


class Dataset:
    """Train and test batches of one dataset, as float32 images in [0, 1] and int32 labels.

    ``num_train_examples`` > 0 trains on a fixed random subset of that size (short CPU runs).
    ``train`` is None for a test-only dataset (evaluation of a saved run).
    """

    def __init__(self, info, train, test, *, seed, num_train_examples=0):
        self._train_indices, info = train_subset(info, num_train_examples)
        self._test_order = np.random.default_rng([_FIXED_SEED, _TEST_ORDER]).permutation(
            info.num_test)
        self.info = info
        self._train = train
        self._test = test
        self._seed = seed

    def steps_per_epoch(self, global_batch_size):
        return steps_per_epoch(self.info, global_batch_size)

    def train_batches(self, epoch, global_batch_size, *, process_index=0, process_count=1):
        """This process's slice of each global train batch of `epoch`, shuffled and augmented."""
        if self._train is None:
            raise UserError(f"{self.info.name}: this dataset was loaded without its train split")
        local = local_batch_size(global_batch_size, process_count)
        order = np.random.default_rng([self._seed, epoch, _ORDER]).permutation(self.info.num_train)
        order = self._train_indices[order]
        for step in range(self.steps_per_epoch(global_batch_size)):
            start = step * global_batch_size + process_index * local
            positions = np.arange(start, start + local)
            images, labels = self._train.read_augmented(
                order[positions], positions, self._seed, epoch)
            yield _batch(images, labels)

    def statistics_batches(self, num_examples, batch_size, *, augment=False, seed=0):
        """Batches of the first ``num_examples`` of a fixed shuffled order of the training
        examples, the same whatever the run's seed: the images BatchNorm statistics are
        re-estimated on (:mod:`awn_jax.bn_statistics`). ``augment``: with the training
        augmentation, drawn from ``seed`` (as epoch 0 of a run with that seed)."""
        if self._train is None:
            raise UserError(f"{self.info.name}: re-estimating BatchNorm statistics needs the "
                            "training split, and this dataset was loaded without it")
        if not 1 <= num_examples <= self.info.num_train:
            raise UserError(f"cannot take {num_examples} of the {self.info.num_train} "
                            f"training examples of {self.info.name}")
        order = np.random.default_rng([_FIXED_SEED, _STATISTICS_ORDER]).permutation(
            self.info.num_train)[:num_examples]
        order = self._train_indices[order]
        for start in range(0, num_examples, batch_size):
            positions = np.arange(start, min(start + batch_size, num_examples))
            if augment:
                yield _batch(*self._train.read_augmented(order[positions], positions, seed, 0))
            else:
                yield _batch(*self._train.read(order[positions]))

    def test_batches(self, global_batch_size, *, num_examples=None, process_index=0,
                     process_count=1):
        """The first `num_examples` test examples (all by default) of the fixed shuffled
        test order, each once.

        The last global batch may be smaller; it is split over processes as evenly as possible.
        """
        local_batch_size(global_batch_size, process_count)
        total = self.info.num_test
        if num_examples:
            total = min(num_examples, total)
        for start in range(0, total, global_batch_size):
            stop = min(start + global_batch_size, total)
            positions = np.array_split(np.arange(start, stop), process_count)[process_index]
            yield _batch(*self._test.read(self._test_order[positions]))


def channel_stats(images):
    """Per-channel mean and std of uint8 images in [0, 1] units, exact, from histograms.

    Counting the 256 values per channel is exact and faster than float sums over the array.
    """
    flat = images.reshape(-1, images.shape[-1])
    hists = np.stack([np.bincount(flat[:, c], minlength=256) for c in range(flat.shape[1])])
    values = np.arange(256) / 255.0
    mean = hists @ values / len(flat)
    std = np.sqrt(np.maximum(hists @ np.square(values) / len(flat) - np.square(mean), 0.0))
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def steps_per_epoch(info, global_batch_size: int) -> int:
    """Full batches per epoch; the remainder of the shuffled train split is dropped."""
    steps = info.num_train // global_batch_size
    if steps == 0:
        raise UserError(f"batch size {global_batch_size} exceeds the {info.num_train} "
                        f"training examples of {info.name}; lower --config.batch_size")
    return steps


def local_batch_size(global_batch_size: int, process_count: int) -> int:
    """This process's share of a global batch (every dataset splits batches this way)."""
    if global_batch_size % process_count:
        raise UserError(f"batch size {global_batch_size} is not divisible by the "
                        f"{process_count} processes; choose a multiple of {process_count}")
    return global_batch_size // process_count


def _batch(images, labels):
    images = images.astype(np.float32)
    images /= 255.0
    return {"image": images, "label": labels.astype(np.int32)}
