"""Detection data: the synthetic source, resize/flip/pad with static shapes, determinism
from (seed, epoch), process slices, and the TFDS VOC path under tfds.testing.mock_data."""

import chex
import numpy as np
import pytest
import tensorflow_datasets as tfds

from awn_jax.detection import data, synthetic
from configs import voc_frcnn_default


def synthetic_config(**overrides):
    config = voc_frcnn_default.get_config()
    config.update(dict(dataset="synthetic", image_size=64, min_size=64, max_size=64,
                       synthetic_num_train=24, synthetic_num_test=10, max_boxes=4))
    config.update(overrides)
    return config


def pairwise_iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_synthetic_source_is_deterministic_and_well_formed():
    split = synthetic.SyntheticSplit(0, 0, 40, 64, 3, 3)
    again = synthetic.SyntheticSplit(0, 0, 40, 64, 3, 3)
    other = synthetic.SyntheticSplit(1, 0, 40, 64, 3, 3)
    chex.assert_trees_all_equal(list(split), list(again))
    assert not np.array_equal(split[0]["image"], other[0]["image"])
    counts = []
    for example in split:
        boxes = example["boxes"]
        counts.append(len(boxes))
        assert example["image"].shape == (64, 64, 3) and example["image"].dtype == np.uint8
        assert np.all(boxes >= 0) and np.all(boxes <= 64)
        sides = boxes[:, 2:] - boxes[:, :2]
        assert np.all(sides >= 0.2 * 64 - 1e-4) and np.all(sides <= 0.5 * 64 + 1e-4)
        assert set(example["labels"]) <= {0, 1, 2}
        for i in range(len(boxes)):
            for j in range(i):
                assert pairwise_iou(boxes[i], boxes[j]) <= 0.2
    assert set(counts) == {1, 2, 3}


def test_synthetic_objects_are_drawn_inside_their_boxes():
    """The class colour covers much of its box (the shapes fill 50-100% of it)."""
    split = synthetic.SyntheticSplit(0, 0, 20, 64, 3, 1)
    for example in split:
        (x1, y1, x2, y2), label = example["boxes"][0], example["labels"][0]
        inside = example["image"][int(np.ceil(y1)):int(y2), int(np.ceil(x1)):int(x2)] / 255
        close = np.abs(inside - synthetic.PALETTE[label]).max(-1) < 0.3
        assert close.mean() > 0.4


def test_synthetic_arguments_are_validated():
    with pytest.raises(ValueError, match="synthetic_num_classes"):
        synthetic.SyntheticSplit(0, 0, 1, 64, 9, 3)
    with pytest.raises(ValueError, match="synthetic_max_objects"):
        synthetic.SyntheticSplit(0, 0, 1, 64, 3, 0)


def test_train_batches_depend_only_on_seed_and_epoch_and_split_over_processes():
    dataset, again = data.get_dataset(synthetic_config()), data.get_dataset(synthetic_config())
    epoch0 = list(dataset.train_batches(0, 8))
    chex.assert_trees_all_equal(epoch0, list(again.train_batches(0, 8)))
    epoch1 = list(dataset.train_batches(1, 8))
    assert not np.array_equal(epoch0[0]["image"], epoch1[0]["image"])
    halves = [list(dataset.train_batches(0, 8, process_index=p, process_count=2))
              for p in range(2)]
    for step, batch in enumerate(epoch0):
        joined = {k: np.concatenate([halves[0][step][k], halves[1][step][k]]) for k in batch}
        chex.assert_trees_all_equal(batch, joined)
    batch = epoch0[0]
    assert batch["image"].shape == (8, 64, 64, 3) and batch["image"].dtype == np.float32
    assert batch["boxes"].shape == (8, 4, 4) and batch["labels"].shape == (8, 4)
    assert batch["box_valid"].any(axis=1).all()
    assert len(epoch0) == 3


def test_flips_mirror_images_and_boxes():
    config = synthetic_config()
    dataset = data.get_dataset(config)
    split = data.get_dataset(config)._train  # pylint: disable=protected-access
    flipped = 0
    for epoch in range(2):
        for step, batch in enumerate(dataset.train_batches(epoch, 8)):
            order = np.random.default_rng([config.seed, epoch, 0]).permutation(24)
            for slot in range(8):
                example = split[int(order[step * 8 + slot])]
                count = len(example["boxes"])
                boxes = batch["boxes"][slot, :count]
                image = np.round(batch["image"][slot] * 255).astype(np.uint8)
                if np.array_equal(image, example["image"]):
                    np.testing.assert_allclose(boxes, example["boxes"], rtol=1e-6)
                else:
                    flipped += 1
                    np.testing.assert_array_equal(image, example["image"][:, ::-1])
                    mirrored = np.stack([64 - example["boxes"][:, 2], example["boxes"][:, 1],
                                         64 - example["boxes"][:, 0], example["boxes"][:, 3]], 1)
                    np.testing.assert_allclose(boxes, mirrored, rtol=1e-6)
    assert 10 < flipped < 38  # about half of 48
    no_flip = data.get_dataset(synthetic_config(random_flip=False))
    batch = next(no_flip.train_batches(0, 8))
    order = np.random.default_rng([config.seed, 0, 0]).permutation(24)
    np.testing.assert_array_equal(np.round(batch["image"][0] * 255).astype(np.uint8),
                                  split[int(order[0])]["image"])


class ListSplit:
    def __init__(self, examples):
        self.examples = examples

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, index):
        return self.examples[index]


def example(height, width, boxes, labels, difficult):
    rng = np.random.default_rng(height * width)
    return {"image": rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
            "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
            "labels": np.asarray(labels, np.int32),
            "difficult": np.asarray(difficult, bool)}


def small_dataset(examples, **kwargs):
    info = data.DetectionInfo("toy", 3, ("a", "b", "c"), 128, 2, len(examples), len(examples))
    options = dict(seed=0, min_size=60, max_size=100, random_flip=False)
    options.update(kwargs)
    return data.DetectionDataset(info, ListSplit(examples), ListSplit(examples), **options)


def test_resize_keeps_aspect_and_pads_to_the_canvas():
    examples = [example(30, 40, [[2, 4, 20, 24]], [1], [False]),          # short side 30 -> 60
                example(30, 90, [[0, 0, 90, 30], [1, 1, 5, 5]], [0, 2], [False, True])]  # long 90 -> 100
    batch = next(small_dataset(examples).train_batches(0, 2))
    order = np.random.default_rng([0, 0, 0]).permutation(2)
    for slot, index in enumerate(order):
        expected_hw = {0: (60, 80), 1: (33, 100)}[index]
        np.testing.assert_array_equal(batch["image_hw"][slot], expected_hw)
        assert not batch["image"][slot, expected_hw[0]:].any()
        assert not batch["image"][slot, :, expected_hw[1]:].any()
        assert batch["image"][slot, :expected_hw[0], :expected_hw[1]].any()
    slot0 = int(np.flatnonzero(order == 0)[0])
    np.testing.assert_allclose(batch["boxes"][slot0, 0], [4, 8, 40, 48])
    np.testing.assert_allclose(batch["scale_xy"][slot0], [2.0, 2.0])
    slot1 = int(np.flatnonzero(order == 1)[0])
    # The difficult box is not a training target.
    assert batch["box_valid"][slot1].tolist() == [True, False]
    np.testing.assert_allclose(batch["boxes"][slot1, 0], [0, 0, 100, 33])
    assert data.resize_scale(375, 500, 600, 1000) == pytest.approx(1.6)
    assert data.resize_scale(300, 1000, 600, 1000) == pytest.approx(1.0)


def test_test_batches_pad_the_last_batch_and_return_original_truths():
    examples = [example(30, 40, [[2, 4, 20, 24]], [1], [False]) for _ in range(3)]
    examples[2] = example(40, 30, [[1, 1, 9, 9], [3, 3, 7, 8]], [0, 2], [True, False])
    batches = list(small_dataset(examples).test_batches(2))
    assert len(batches) == 2
    (first, truths_first), (last, truths_last) = batches
    assert first["example_valid"].tolist() == [True, True]
    assert last["example_valid"].tolist() == [True, False]
    assert last["image"].shape == first["image"].shape == (2, 128, 128, 3)
    assert len(truths_first) == 2 and len(truths_last) == 1
    np.testing.assert_allclose(truths_last[0]["boxes"], examples[2]["boxes"])
    assert truths_last[0]["difficult"].tolist() == [True, False]
    assert not last["box_valid"].any()  # test batches carry no targets
    np.testing.assert_allclose(last["scale_xy"][0], [2.0, 2.0])


def test_bad_inputs_are_clear_errors():
    crowded = [example(30, 40, [[0, 0, 5, 5]] * 3, [0, 1, 2], [False] * 3)]
    with pytest.raises(ValueError, match="more than max_boxes=2"):
        next(small_dataset(crowded).train_batches(0, 1))
    malformed = [dict(example(30, 40, [[0, 0, 5, 5]], [0], [False]), labels=np.zeros(2))]
    with pytest.raises(ValueError, match="malformed annotation"):
        next(small_dataset(malformed).train_batches(0, 1))
    with pytest.raises(ValueError, match="exceeds image_size"):
        small_dataset(crowded, max_size=200)
    with pytest.raises(ValueError, match="unknown detection dataset"):
        data.get_dataset(synthetic_config(dataset="coco"))
    with pytest.raises(ValueError, match="batch size 48 exceeds"):
        data.get_dataset(synthetic_config()).steps_per_epoch(48)


def voc_record(height, width, boxes, labels, difficult):
    """A TFDS voc record: devkit 1-based inclusive boxes divided by the image size."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)   # (xmin, ymin, xmax, ymax), 1-based
    bbox = np.stack([boxes[:, 1] / height, boxes[:, 0] / width,
                     boxes[:, 3] / height, boxes[:, 2] / width], 1).astype(np.float32)
    image = np.full((height, width, 3), len(labels) * 40, np.uint8)
    return {"image": image, "objects": {"bbox": bbox, "label": np.asarray(labels, np.int64),
                                        "is_difficult": np.asarray(difficult, bool)}}


def test_voc_reads_07_plus_12_trainval_and_07_test_under_mock_data():
    records = {
        ("2007", "train+validation"): [voc_record(100, 200, [[1, 1, 50, 100]], [14], [False]),
                                       voc_record(50, 60, [[11, 21, 30, 40], [2, 2, 9, 9]],
                                                  [7, 1], [False, True])],
        ("2012", "train+validation"): [voc_record(80, 80, [[5, 5, 80, 80]], [19], [False])],
        ("2007", "test"): [voc_record(120, 90, [[3, 4, 60, 70], [1, 1, 4, 4]], [0, 0],
                                      [False, True])],
    }
    requested = []

    def as_data_source(builder, split, **kwargs):
        del kwargs
        requested.append((builder.name, builder.builder_config.name, split))
        return records[(builder.builder_config.name, split)]

    config = voc_frcnn_default.get_config()
    config.update(dict(image_size=256, min_size=100, max_size=200, batch_size=3,
                       random_flip=False))
    with tfds.testing.mock_data(as_data_source_fn=as_data_source):
        dataset = data.get_dataset(config)
    assert sorted(requested) == [("voc", "2007", "test"), ("voc", "2007", "train+validation"),
                                 ("voc", "2012", "train+validation")]
    info = dataset.info
    assert (info.num_classes, info.num_train, info.num_test) == (20, 3, 1)
    assert info.class_names[14] == "person" and info.class_names[19] == "tvmonitor"
    # Devkit (xmin=11, xmax=30) is the continuous [10, 30].
    np.testing.assert_allclose(dataset._train[1]["boxes"],  # pylint: disable=protected-access
                               [[10, 20, 30, 40], [1, 1, 9, 9]], atol=1e-4)
    batch = next(dataset.train_batches(0, 3))
    order = np.random.default_rng([0, 0, 0]).permutation(3)
    slot = int(np.flatnonzero(order == 1)[0])           # the 50x60 image, scale 2
    assert batch["box_valid"][slot].sum() == 1          # its difficult box is not a target
    np.testing.assert_allclose(batch["boxes"][slot, 0], [20, 40, 60, 80], atol=1e-3)
    assert batch["labels"][slot, 0] == 7
    (test_batch, truths), = list(dataset.test_batches(1))
    np.testing.assert_allclose(truths[0]["boxes"], [[2, 3, 60, 70], [0, 0, 4, 4]], atol=1e-4)
    assert truths[0]["difficult"].tolist() == [False, True]
    np.testing.assert_allclose(test_batch["image_hw"][0], [133, 100])
