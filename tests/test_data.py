"""Input pipeline: every source, determinism, resumption, process sharding, coverage, errors."""

import dataclasses
import io
import os
import pathlib
import shutil
import subprocess
import sys

import chex
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.image_classification import cifar

from awn_jax.data import dataset_for_run, get_dataset, image_folder, tfds_source, transforms
from configs import default

CIFAR_JPEG_TAR = pathlib.Path(__file__).parents[2] / "shared" / "data" / "cifar10-jpeg.tar"


def _config(**overrides):
    config = default.get_config()
    config.update(dataset="synthetic", synthetic_num_train=96, synthetic_num_test=40,
                  synthetic_num_classes=4, image_size=8, crop_padding=2)
    config.update(**overrides)
    return config


def _all(batches):
    batches = list(batches)
    return {k: np.concatenate([b[k] for b in batches]) for k in ("image", "label")}


def _check_batch(batch, size, image_size, num_classes):
    chex.assert_shape(batch["image"], (size, image_size, image_size, 3))
    chex.assert_type(batch["image"], np.float32)
    chex.assert_shape(batch["label"], (size,))
    chex.assert_type(batch["label"], np.int32)
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert 0 <= batch["label"].min() and batch["label"].max() < num_classes


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A private decode cache for image_folder, so tests never touch ~/.cache."""
    path = tmp_path / "cache"
    monkeypatch.setenv(image_folder.CACHE_ENV, str(path))
    return path


@pytest.fixture
def folder(tmp_path):
    """A tiny image folder: PNG and JPEG files, one odd-sized, three classes (test: two)."""
    rng = np.random.default_rng(0)
    layout = {"train": {"cat": 3, "ant": 2, "bee": 2}, "test": {"bee": 1, "ant": 2}}
    for split, classes in layout.items():
        for name, count in classes.items():
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(count):
                image = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
                image.save(tmp_path / split / name / f"{i}.png")
    Image.new("RGB", (12, 10), (255, 0, 0)).save(tmp_path / "train" / "ant" / "big.jpg")
    (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")
    return tmp_path


# --- synthetic -----------------------------------------------------------------------------

def test_synthetic_shapes_and_info():
    dataset = get_dataset(_config())
    info = dataset.info
    assert (info.name, info.num_classes, info.image_shape) == ("synthetic", 4, (8, 8, 3))
    assert (info.num_train, info.num_test) == (96, 40)
    assert len(info.mean) == len(info.std) == 3 and all(s > 0 for s in info.std)
    assert dataset.steps_per_epoch(32) == 3
    batches = list(dataset.train_batches(0, 32))
    assert len(batches) == 3
    for batch in batches:
        _check_batch(batch, 32, 8, 4)


def test_synthetic_is_learnable():
    """Nearest class mean, fitted on train, classifies the test split well."""
    dataset = get_dataset(_config(synthetic_num_train=400, crop_padding=0, random_flip=False))
    train = _all(dataset.train_batches(0, 100))
    test = _all(dataset.test_batches(40))
    means = np.stack([train["image"][train["label"] == c].mean(0) for c in range(4)])
    distances = ((test["image"][:, None] - means[None]) ** 2).sum(axis=(2, 3, 4))
    assert (distances.argmin(1) == test["label"]).mean() > 0.9


def test_synthetic_follows_the_seed():
    first, again, other = (_all(get_dataset(_config(seed=s)).test_batches(40)) for s in (0, 0, 1))
    chex.assert_trees_all_equal(first, again)
    assert not np.array_equal(first["image"], other["image"])


# --- order, augmentation, resumption, sharding -----------------------------------------------

def test_train_batches_are_a_function_of_seed_and_epoch():
    a, b = get_dataset(_config()), get_dataset(_config())
    list(b.train_batches(0, 32))  # b has already run epoch 0: resuming must not matter
    chex.assert_trees_all_equal(list(a.train_batches(1, 32)), list(b.train_batches(1, 32)))
    epoch0, epoch1 = _all(a.train_batches(0, 32)), _all(a.train_batches(1, 32))
    assert not np.array_equal(epoch0["label"], epoch1["label"])
    other_seed = _all(get_dataset(_config(seed=1)).train_batches(1, 32))
    assert not np.array_equal(other_seed["image"], epoch1["image"])


def test_without_augmentation_an_epoch_is_a_permutation():
    def sorted_images(config, epoch):
        images = _all(get_dataset(config).train_batches(epoch, 32))["image"].reshape(96, -1)
        return images[np.lexsort(images.T)], images

    plain = _config(crop_padding=0, random_flip=False)
    (sorted0, order0), (sorted1, order1) = sorted_images(plain, 0), sorted_images(plain, 1)
    np.testing.assert_array_equal(sorted0, sorted1)
    assert not np.array_equal(order0, order1)
    augmented, _ = sorted_images(_config(), 0)
    assert not np.array_equal(augmented, sorted0)


def test_remainder_is_dropped():
    dataset = get_dataset(_config())
    assert dataset.steps_per_epoch(40) == 2
    assert sum(len(b["label"]) for b in dataset.train_batches(0, 40)) == 80


@pytest.mark.parametrize("count", [2, 4])
def test_process_shards_concatenate_to_the_global_batch(count):
    dataset = get_dataset(_config())
    whole = list(dataset.train_batches(2, 32))
    shards = [list(dataset.train_batches(2, 32, process_index=p, process_count=count))
              for p in range(count)]
    for step, batch in enumerate(whole):
        parts = [shard[step] for shard in shards]
        assert all(len(part["label"]) == 32 // count for part in parts)
        chex.assert_trees_all_equal(batch, _all(parts))
    test_whole = list(dataset.test_batches(16))  # 40 = 16 + 16 + 8
    test_shards = [list(dataset.test_batches(16, process_index=p, process_count=count))
                   for p in range(count)]
    for step, batch in enumerate(test_whole):
        chex.assert_trees_all_equal(batch, _all(shard[step] for shard in test_shards))


def test_test_batches_cover_every_example_once_in_a_fixed_order():
    dataset = get_dataset(_config())
    batches = list(dataset.test_batches(16))
    assert [len(b["label"]) for b in batches] == [16, 16, 8]
    everything = _all(batches)
    chex.assert_trees_all_equal(everything, next(dataset.test_batches(40)))
    chex.assert_trees_all_equal(everything, _all(dataset.test_batches(7)))
    assert len(np.unique(everything["image"].reshape(40, -1), axis=0)) == 40
    first = _all(dataset.test_batches(16, num_examples=20))
    chex.assert_trees_all_equal(first, {k: v[:20] for k, v in everything.items()})


def test_train_subset_is_fixed_and_shuffled_per_epoch():
    full = get_dataset(_config())
    subset = get_dataset(_config(num_train_examples=32))
    assert subset.info.num_train == 32 and subset.steps_per_epoch(8) == 4
    epoch0 = _all(subset.train_batches(0, 8))
    epoch1 = _all(subset.train_batches(1, 8))
    assert not np.array_equal(epoch0["label"], epoch1["label"])
    np.testing.assert_array_equal(np.sort(epoch0["label"]), np.sort(epoch1["label"]))
    assert full.info.num_train > 32
    with pytest.raises(ValueError, match="num_train_examples"):
        get_dataset(_config(num_train_examples=10 ** 6))


def test_batch_size_errors():
    dataset = get_dataset(_config())
    with pytest.raises(ValueError, match="not divisible"):
        next(dataset.train_batches(0, 30, process_count=4))
    with pytest.raises(ValueError, match="not divisible"):
        next(dataset.test_batches(30, process_count=4))
    with pytest.raises(ValueError, match="exceeds"):
        dataset.steps_per_epoch(128)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'.*synthetic"):
        get_dataset(_config(dataset="mnist"))


# --- transforms ------------------------------------------------------------------------------

def test_pad_crop_flip():
    images = np.arange(2 * 4 * 4 * 1, dtype=np.uint8).reshape(2, 4, 4, 1) + 1
    centered = transforms.pad_crop_flip(images, np.full((2, 2), 2), np.array([False, True]), 2)
    np.testing.assert_array_equal(centered[0], images[0])
    np.testing.assert_array_equal(centered[1], images[1, :, ::-1])
    corner = transforms.pad_crop_flip(images, np.zeros((2, 2), int), np.zeros(2, bool), 2)
    np.testing.assert_array_equal(corner[0, :2], 0)
    np.testing.assert_array_equal(corner[0, 2:, 2:], images[0, :2, :2])


def test_imagenet_transforms():
    image = np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    rng = np.random.default_rng(1)
    crops = [transforms.random_resized_crop(image, 16, rng) for _ in range(5)]
    assert all(c.shape == (16, 16, 3) and c.dtype == np.uint8 for c in crops)
    assert len({c.tobytes() for c in crops}) == 5
    center = transforms.resize_center_crop(image, 16)
    assert center.shape == (16, 16, 3)
    grey = transforms.resize_center_crop(image[..., 0], 16)
    assert grey.shape == (16, 16, 3)


# --- TFDS (mocked: no network, no TensorFlow) -------------------------------------------------

@pytest.mark.parametrize("name, num_classes, image_size", [
    ("cifar10", 10, 32), ("cifar100", 100, 32), ("imagenet2012", 1000, 24)])
def test_tfds_sources(name, num_classes, image_size, monkeypatch):
    # The download site counts as reachable: mock_data stands in for the download.
    monkeypatch.setattr(tfds_source, "_reachable", lambda host: True)
    config = _config(dataset=name, image_size=image_size, crop_padding=4)
    with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
        dataset = get_dataset(config)
        again = get_dataset(config)
        info = dataset.info
        assert (info.name, info.num_classes, info.image_shape) == (
            name, num_classes, (image_size, image_size, 3))
        assert (info.num_train, info.num_test) == (24, 24)
        shards = [list(dataset.train_batches(0, 8, process_index=p, process_count=2))
                  for p in range(2)]
        whole = list(again.train_batches(0, 8))
        test = list(dataset.test_batches(10))
        chex.assert_trees_all_equal(test, list(again.test_batches(10)))
    assert len(whole) == 3 and [len(b["label"]) for b in test] == [10, 10, 4]
    for step, batch in enumerate(whole):
        _check_batch(shards[0][step], 4, image_size, num_classes)
        chex.assert_trees_all_equal(batch, _all([shards[0][step], shards[1][step]]))
    if name == "cifar10":  # the official AdderNet normalization
        assert info.mean == (0.4914, 0.4822, 0.4465) and info.std == (0.2023, 0.1994, 0.2010)


def test_tfds_prepared_array_record_is_read_without_tensorflow(tmp_path, monkeypatch):
    """The real read path (ArrayRecord, numpy parsing, PIL decoding) on a locally built
    cifar10 whose image colour encodes its index; TensorFlow is made unimportable."""
    with tfds.core.registered.skip_registration():
        class LocalCifar10(cifar.Cifar10):
            name = "cifar10"

            def _split_generators(self, dl_manager):
                return {"train": self._generate_examples(30), "test": self._generate_examples(10)}

            def _generate_examples(self, count):
                for i in range(count):
                    png = io.BytesIO()
                    Image.new("RGB", (32, 32), (i, 2 * i, 255 - i)).save(png, format="PNG")
                    yield i, {"id": str(i), "image": png.getvalue(), "label": i % 10}

    LocalCifar10(data_dir=tmp_path, file_format="array_record").download_and_prepare()
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    dataset = get_dataset(_config(dataset="cifar10", data_dir=str(tmp_path), image_size=32))
    assert (dataset.info.num_train, dataset.info.num_test) == (30, 10)
    test = _all(dataset.test_batches(4))
    index = np.round(test["image"][:, 0, 0, 0] * 255).astype(int)
    np.testing.assert_array_equal(np.sort(index), np.arange(10))
    np.testing.assert_array_equal(test["label"], index % 10)
    np.testing.assert_array_equal(np.round(test["image"][:, 5, 5] * 255),
                                  np.stack([index, 2 * index, 255 - index], axis=1))


def test_tfds_unavailable_is_one_clear_error(tmp_path, monkeypatch):
    """The site answers, the download fails: TFDS's error in one line (an unreachable site
    is refused before TFDS tries: tests/test_errors.py)."""
    def offline(self, *args, **kwargs):
        raise ConnectionError("no network")
    monkeypatch.setattr(tfds_source, "_reachable", lambda host: True)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", offline)
    with pytest.raises(FileNotFoundError, match="--config.data_dir") as error:
        get_dataset(_config(dataset="cifar10", data_dir=str(tmp_path)))
    assert "no network" in str(error.value) and "\n" not in str(error.value)


# --- image folder -----------------------------------------------------------------------------

def test_image_folder(folder, cache_dir):
    dataset = get_dataset(_config(dataset="image_folder", data_dir=str(folder), image_size=8,
                                  crop_padding=0, random_flip=False))
    info = dataset.info
    assert (info.num_classes, info.num_train, info.num_test) == (3, 8, 3)
    test = _all(dataset.test_batches(2))
    np.testing.assert_array_equal(np.sort(test["label"]), [0, 0, 1])  # ant, ant, bee (sorted)
    png = np.asarray(Image.open(folder / "test" / "ant" / "0.png")) / np.float32(255)
    assert sum(np.array_equal(image, png) for image in test["image"]) == 1
    train = _all(dataset.train_batches(0, 8))["image"]
    red = (train[..., 0].min(axis=(1, 2)) > 0.95) & (train[..., 1:].max(axis=(1, 2, 3)) < 0.05)
    assert red.sum() == 1  # big.jpg, resized from 12x10 to 8x8
    assert len(list(cache_dir.glob("*.npz"))) == 2


def test_normalization_is_measured_or_the_named_official_constants(folder, cache_dir):
    config = dict(dataset="image_folder", data_dir=str(folder), image_size=8)
    measured = get_dataset(_config(**config, normalization="dataset")).info
    train = np.concatenate([np.asarray(Image.open(p).convert("RGB").resize((8, 8)))[None]
                            for p in sorted((folder / "train").rglob("*.*"))
                            if p.suffix in (".png", ".jpg")]) / 255.0
    np.testing.assert_allclose(measured.mean, train.mean(axis=(0, 1, 2)), atol=2e-3)
    official = get_dataset(_config(**config, normalization="cifar10")).info
    assert official.mean == (0.4914, 0.4822, 0.4465)
    assert official.std == (0.2023, 0.1994, 0.2010)
    assert dataclasses.replace(official, mean=measured.mean, std=measured.std) == measured
    with pytest.raises(ValueError, match="normalization 'cifar'"):
        get_dataset(_config(**config, normalization="cifar"))


def test_image_folder_cache_is_used_and_invalidated(folder, cache_dir, monkeypatch):
    config = _config(dataset="image_folder", data_dir=str(folder), image_size=8)
    first = get_dataset(config)
    decode = image_folder._decode
    monkeypatch.setattr(image_folder, "_decode", lambda *a: pytest.fail("decoded again"))
    chex.assert_trees_all_equal(list(first.test_batches(4)),
                                list(get_dataset(config).test_batches(4)))
    monkeypatch.setattr(image_folder, "_decode", decode)
    changed = folder / "test" / "bee" / "0.png"
    Image.new("RGB", (8, 8), (0, 0, 255)).save(changed)
    os.utime(changed, ns=(1, 1))
    test = _all(get_dataset(config).test_batches(4))
    bee = test["image"][test["label"] == 1]
    np.testing.assert_array_equal(bee[0, 0, 0], [0, 0, 1])


def test_image_folder_errors(folder, tmp_path, cache_dir):
    with pytest.raises(FileNotFoundError, match="--config.data_dir"):
        get_dataset(_config(dataset="image_folder", data_dir=str(tmp_path / "missing")))
    (folder / "test" / "wasp").mkdir()
    with pytest.raises(ValueError, match="wasp"):
        get_dataset(_config(dataset="image_folder", data_dir=str(folder)))


def test_dataset_for_run_needs_only_the_test_split(folder, cache_dir):
    config = _config(dataset="image_folder", data_dir=str(folder), image_size=8)
    full = get_dataset(config)
    shutil.rmtree(folder / "train")
    test_only = dataset_for_run(config, full.info)
    assert test_only.info == full.info
    chex.assert_trees_all_equal(list(full.test_batches(2)), list(test_only.test_batches(2)))
    with pytest.raises(ValueError, match="without its train split"):
        next(test_only.train_batches(0, 2))
    with pytest.raises(ValueError, match="'ant'"):  # a test class the run never saw
        dataset_for_run(config, dataclasses.replace(full.info, class_names=("bee", "cat")))


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR_JPEG_TAR.exists(), reason=f"{CIFAR_JPEG_TAR} is absent")
@pytest.mark.skipif(shutil.which("tar") is None, reason="no tar command (Python's tarfile "
                    "takes a minute on these 60k files)")
def test_real_cifar10_jpeg_folder(tmp_path, cache_dir):
    subprocess.run(["tar", "-xf", str(CIFAR_JPEG_TAR), "-C", str(tmp_path)], check=True)
    dataset = get_dataset(_config(dataset="image_folder", data_dir=str(tmp_path), image_size=32,
                                  crop_padding=4, normalization="dataset"))
    info = dataset.info
    assert (info.num_classes, info.num_train, info.num_test, info.image_shape) == (
        10, 50000, 10000, (32, 32, 3))
    np.testing.assert_allclose(info.mean, (0.4914, 0.4822, 0.4465), atol=2e-3)
    test = _all(dataset.test_batches(1000))
    np.testing.assert_array_equal(np.bincount(test["label"]), [1000] * 10)
    _check_batch(next(dataset.train_batches(0, 256)), 256, 32, 10)


def test_jpeg_pack_round_trips_an_image_folder(folder, tmp_path_factory, cache_dir):
    from awn_jax.data import jpeg_pack

    tmp_path = tmp_path_factory.mktemp("packed")  # `folder` is the test's own tmp_path
    packed = str(tmp_path / "new_dir" / "folder.jpack.npz")  # its folder made on the way
    assert jpeg_pack.pack(str(folder), packed) == 11  # 10 PNGs and big.jpg, no notes.txt
    assert jpeg_pack.unpack(packed, str(tmp_path / "copy")) == 11
    for path in folder.rglob("*"):
        if path.suffix in (".png", ".jpg"):
            assert (tmp_path / "copy" / path.relative_to(folder)).read_bytes() == path.read_bytes()
    config = dict(dataset="image_folder", image_size=8, crop_padding=0, random_flip=False)
    original = get_dataset(_config(data_dir=str(folder), **config))
    copied = get_dataset(_config(data_dir=str(tmp_path / "copy"), **config))
    chex.assert_trees_all_equal(list(original.test_batches(2)), list(copied.test_batches(2)))
    with pytest.raises(ValueError, match="no .* images"):
        jpeg_pack.pack(str(tmp_path / "copy" / "nothing"), packed)
