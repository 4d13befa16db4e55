"""Image transforms on uint8 numpy arrays: the CIFAR and ImageNet recipes.

Every random choice comes in as an argument (offsets, flips, a numpy Generator), so the
caller decides how randomness is derived and the transforms stay pure.
"""

import math

import numpy as np
from PIL import Image

IMAGENET_RESIZE_RATIO = 0.875  # resize to 256 and center-crop 224, as the torchvision recipe


def pad_crop_flip(images, offsets, flips, padding):
    """Crop each image from its zero-padded version at `offsets`, mirroring where `flips`.

    images: (n, h, w, c) uint8; offsets: (n, 2) ints in [0, 2 * padding]; flips: (n,) bool.
    One fancy-indexing gather does the whole batch; the flip is folded into the column index.
    """
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    rows = offsets[:, :1] + np.arange(h)
    cols = offsets[:, 1:] + np.arange(w)
    cols = np.where(flips[:, None], cols[:, ::-1], cols)
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def resize_all(images, size):
    """Resizes a stack of images to size x size (bilinear); a no-op when already that size."""
    if images.shape[1:3] == (size, size):
        return images
    return np.stack([_resize(Image.fromarray(image), size) for image in images])


def random_resized_crop(image, size, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """Inception-style crop: a random area fraction and aspect ratio, resized to size x size.

    Ten tries to fit a box inside the image, as in the usual ImageNet recipe; when none fits
    the whole image is used.
    """
    pil = _to_pil(image)
    width, height = pil.size
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        area = width * height * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        box_w = round(math.sqrt(area * aspect))
        box_h = round(math.sqrt(area / aspect))
        if 0 < box_w <= width and 0 < box_h <= height:
            left = int(rng.integers(0, width - box_w + 1))
            top = int(rng.integers(0, height - box_h + 1))
            return _resize(pil, size, box=(left, top, left + box_w, top + box_h))
    return _resize(pil, size)


def resize_center_crop(image, size, ratio=IMAGENET_RESIZE_RATIO):
    """Resizes the shorter side to size / ratio, then takes the central size x size crop."""
    pil = _to_pil(image)
    width, height = pil.size
    short = round(size / ratio)
    scale = short / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    resized = pil.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(resized.crop((left, top, left + size, top + size)))


def _resize(pil, size, box=None):
    return np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR, box=box))


def _to_pil(image):
    """An RGB PIL image from an (h, w), (h, w, 1), (h, w, 3) or (h, w, 4) uint8 array."""
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    return Image.fromarray(image).convert("RGB")
