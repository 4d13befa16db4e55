"""Detection batches with static shapes: resize, flip, pad to a square canvas, pad boxes.

    dataset = get_dataset(config)
    dataset.train_batches(epoch, global_batch_size, process_index=0, process_count=1)
    dataset.test_batches(global_batch_size, num_examples=None, ...)  # (batch, truths)

A source split is a sequence of examples ``{"image": uint8 (h, w, 3), "boxes": (n, 4)
continuous pixels, "labels": (n,), "difficult": (n,)}``. Each image is resized, keeping
its aspect ratio, so that its shorter side is ``min_size`` unless its longer side would
exceed ``max_size`` (Faster R-CNN's rule; VOC: 600 and 1000), mirrored with probability
1/2 in training, and placed at the top-left of a zero ``image_size``-square canvas. Boxes
are padded to ``max_boxes`` per image with ``box_valid`` marking the real ones; in
training only non-difficult boxes are targets (difficult ones are ignored, as in the VOC
protocol). The train order and every flip are functions of (seed, epoch, position) only,
as in the classification pipeline, so a resumed run sees the batches of an uninterrupted
one and processes agree on the global batch.

Batches: ``image`` float32 (b, S, S, 3) in [0, 1]; ``boxes`` float32 (b, M, 4);
``labels`` int32 (b, M); ``box_valid`` bool (b, M) (none in test batches); ``image_hw`` float32 (b, 2), the
resized image's extent on the canvas; ``scale_xy`` float32 (b, 2), resized / original;
``example_valid`` bool (b,), False on the padding of a short last test batch.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses

import numpy as np
from PIL import Image

from awn_jax.data.pipeline import local_batch_size, steps_per_epoch, train_subset
from awn_jax.detection import synthetic
from awn_jax.errors import UserError

# ImageNet statistics: the backbone is an ImageNet ResNet-18 and normalizes with them.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_ORDER, _FLIPS = 0, 1


@dataclasses.dataclass(frozen=True)
class DetectionInfo:
    name: str
    num_classes: int
    class_names: tuple[str, ...]
    image_size: int
    max_boxes: int
    num_train: int
    num_test: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD


def resize_scale(height: int, width: int, min_size: int, max_size: int) -> float:
    """Factor that brings the shorter side to ``min_size``, the longer to at most
    ``max_size``."""
    return min(min_size / min(height, width), max_size / max(height, width))


def _check_example(example, index):
    boxes, labels, difficult = example["boxes"], example["labels"], example["difficult"]
    if boxes.ndim != 2 or boxes.shape[1] != 4 or not len(boxes) == len(labels) == len(difficult):
        raise UserError(f"example {index}: malformed annotation (boxes {boxes.shape}, "
                        f"labels {labels.shape}, difficult {difficult.shape})")
    if example["image"].ndim != 3 or example["image"].shape[-1] != 3:
        raise UserError(f"example {index}: image must be (h, w, 3), got "
                        f"{example['image'].shape}")


class DetectionDataset:
    """Train and test batches of one detection dataset (see the module docstring)."""

    def __init__(self, info: DetectionInfo, train, test, *, seed: int, min_size: int,
                 max_size: int, random_flip: bool, num_train_examples: int = 0):
        if max_size > info.image_size:
            raise UserError(f"max_size {max_size} exceeds image_size {info.image_size}: "
                            "resized images would not fit the canvas")
        if not 0 < min_size <= max_size:
            raise UserError(f"need 0 < min_size <= max_size, got {min_size}, {max_size}")
        self._train_indices, info = train_subset(info, num_train_examples)
        self.info = info
        self._train, self._test = train, test
        self._seed, self._flip = seed, random_flip
        self._min_size, self._max_size = min_size, max_size
        self._pool = concurrent.futures.ThreadPoolExecutor()

    def steps_per_epoch(self, global_batch_size: int) -> int:
        return steps_per_epoch(self.info, global_batch_size)

    def train_batches(self, epoch, global_batch_size, *, process_index=0, process_count=1):
        """This process's slice of each global train batch of ``epoch``."""
        local = local_batch_size(global_batch_size, process_count)
        order = np.random.default_rng([self._seed, epoch, _ORDER]).permutation(
            self.info.num_train)
        order = self._train_indices[order]
        flips = np.random.default_rng([self._seed, epoch, _FLIPS]).random(len(order)) < 0.5
        flips &= self._flip
        for step in range(self.steps_per_epoch(global_batch_size)):
            start = step * global_batch_size + process_index * local
            positions = range(start, start + local)
            examples = self._pool.map(
                lambda p: self._prepare(self._train, int(order[p]), bool(flips[p]), True),
                positions)
            yield _stack([e for e, _ in examples])

    def test_batches(self, global_batch_size, *, num_examples=None, process_index=0,
                     process_count=1):
        """``(batch, truths)`` over the first ``num_examples`` test examples (all by
        default), in order. The last batch is padded to full size (``example_valid``
        False there), so every batch has one shape; ``truths`` holds, for every real
        example of the global batch (they come first), its original-image ground truth
        and ``scale_xy``."""
        local = local_batch_size(global_batch_size, process_count)
        total = min(num_examples or self.info.num_test, self.info.num_test)
        for start in range(0, total, global_batch_size):
            indices = list(range(start, min(start + global_batch_size, total)))
            prepared = list(self._pool.map(
                lambda i: self._prepare(self._test, i, False, False), indices))
            truths = [truth for _, truth in prepared]
            padding = [dict(prepared[0][0], example_valid=False)] * (
                global_batch_size - len(prepared))
            mine = ([e for e, _ in prepared] + padding)[process_index * local:
                                                        (process_index + 1) * local]
            yield _stack(mine), truths

    def _prepare(self, split, index, flip, train):
        """One canvas and its padded boxes; and the untouched ground truth."""
        example = split[index]
        _check_example(example, index)
        image = np.asarray(example["image"], np.uint8)
        height, width = image.shape[:2]
        scale = resize_scale(height, width, self._min_size, self._max_size)
        new_h, new_w = min(round(height * scale), self.info.image_size), min(
            round(width * scale), self.info.image_size)
        if (new_h, new_w) != (height, width):
            image = np.asarray(Image.fromarray(image).resize((new_w, new_h),
                                                             Image.Resampling.BILINEAR))
        scale_xy = np.array([new_w / width, new_h / height], np.float32)
        boxes = np.asarray(example["boxes"], np.float32) * np.tile(scale_xy, 2)
        if flip:
            image = image[:, ::-1]
            boxes = np.stack([new_w - boxes[:, 2], boxes[:, 1], new_w - boxes[:, 0],
                              boxes[:, 3]], axis=1)
        # Training targets: the non-difficult boxes. Test batches carry none (the model
        # does not read them; ``truth`` has them all).
        keep = ~np.asarray(example["difficult"], bool) if train else np.zeros(len(boxes), bool)
        if keep.sum() > self.info.max_boxes:
            raise UserError(f"example {index} of {self.info.name} has {keep.sum()} boxes, "
                            f"more than max_boxes={self.info.max_boxes}; raise "
                            "--config.max_boxes")
        size, slots = self.info.image_size, self.info.max_boxes
        canvas = np.zeros((size, size, 3), np.uint8)
        canvas[:new_h, :new_w] = image
        padded_boxes = np.zeros((slots, 4), np.float32)
        padded_labels = np.zeros(slots, np.int32)
        valid = np.zeros(slots, bool)
        count = int(keep.sum())
        padded_boxes[:count] = boxes[keep][:slots]
        padded_labels[:count] = np.asarray(example["labels"])[keep][:slots]
        valid[:count] = True
        prepared = {"image": canvas, "boxes": padded_boxes, "labels": padded_labels,
                    "box_valid": valid, "image_hw": np.array([new_h, new_w], np.float32),
                    "scale_xy": scale_xy, "example_valid": True}
        truth = {"boxes": np.asarray(example["boxes"], np.float64),
                 "labels": np.asarray(example["labels"], np.int64),
                 "difficult": np.asarray(example["difficult"], bool), "scale_xy": scale_xy}
        return prepared, truth


def _stack(examples):
    batch = {key: np.stack([e[key] for e in examples]) for key in examples[0]}
    batch["image"] = batch["image"].astype(np.float32) / 255.0
    return batch


def _load_synthetic(config):
    size, classes = config.image_size, config.synthetic_num_classes
    make = lambda stream, count: synthetic.SyntheticSplit(  # noqa: E731
        config.seed, stream, count, size, classes, config.synthetic_max_objects)
    train, test = make(0, config.synthetic_num_train), make(1, config.synthetic_num_test)
    info = DetectionInfo("synthetic", classes, synthetic.class_names(classes), size,
                         config.max_boxes, len(train), len(test))
    return info, train, test


def _load_voc(config):
    from awn_jax.detection import voc  # here: synthetic runs need no TFDS
    names, train, test = voc.load(config)
    info = DetectionInfo("voc", len(names), names, config.image_size, config.max_boxes,
                         len(train), len(test))
    return info, train, test


_LOADERS = {"synthetic": _load_synthetic, "voc": _load_voc}


def get_dataset(config) -> DetectionDataset:
    """The detection dataset named by ``config.dataset`` (``voc`` or ``synthetic``)."""
    if config.dataset not in _LOADERS:
        raise UserError(f"unknown detection dataset {config.dataset!r}; set "
                        f"--config.dataset to one of {', '.join(sorted(_LOADERS))}")
    info, train, test = _LOADERS[config.dataset](config)
    return DetectionDataset(info, train, test, seed=config.seed, min_size=config.min_size,
                            max_size=config.max_size, random_flip=config.random_flip,
                            num_train_examples=config.num_train_examples)
