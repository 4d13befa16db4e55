"""A synthetic detection source: filled shapes of known classes on textured backgrounds.

Class ``k`` is a shape (square, disk, triangle, diamond, in turn) in a colour of its own
(a fixed palette, jittered per object), so classes differ in both. Backgrounds are smooth
random colour fields plus pixel noise, which the objects carry too. Each image holds 1 to
``max_objects`` objects of random class, size (20-50% of the image side) and position,
placed so that no two overlap by more than IoU 0.2. A pixel belongs to a shape when its
centre does; the box is the shape's exact continuous extent. Everything follows from the
seed; no files, no network.
"""

from __future__ import annotations

import numpy as np

from awn_jax.errors import UserError

SHAPES = ("square", "disk", "triangle", "diamond")
PALETTE = np.array([[0.95, 0.2, 0.2], [0.2, 0.9, 0.3], [0.25, 0.4, 1.0], [1.0, 0.85, 0.1],
                    [0.9, 0.3, 0.95], [0.1, 0.9, 0.95], [1.0, 0.55, 0.1], [0.95, 0.95, 0.95]])
MAX_CLASSES = len(PALETTE)
_SIZE_RANGE = (0.2, 0.5)
_MAX_IOU = 0.2
_NOISE = 0.05


def class_names(num_classes: int) -> tuple[str, ...]:
    return tuple(f"{SHAPES[k % len(SHAPES)]}{k}" for k in range(num_classes))


def _mask(kind: str, box, size: int) -> np.ndarray:
    """Pixels (by centre) inside shape ``kind`` filling ``box`` (a square)."""
    x1, y1, x2, y2 = box
    centres = np.arange(size) + 0.5
    x, y = centres[None, :], centres[:, None]
    u, v = (x - x1) / (x2 - x1), (y - y1) / (y2 - y1)  # in [0, 1] across the box
    inside = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    if kind == "disk":
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    if kind == "triangle":  # apex at the top centre, base along the bottom
        return inside & (np.abs(u - 0.5) <= 0.5 * v)
    if kind == "diamond":
        return np.abs(u - 0.5) + np.abs(v - 0.5) <= 0.5
    return inside


def _background(rng, size: int) -> np.ndarray:
    grid = rng.uniform(0.1, 0.55, size=(4, 4, 3))
    cells = np.arange(size) * 4 // size
    return grid[cells][:, cells]


def _overlaps(box, boxes) -> bool:
    for other in boxes:
        ix = max(0.0, min(box[2], other[2]) - max(box[0], other[0]))
        iy = max(0.0, min(box[3], other[3]) - max(box[1], other[1]))
        inter = ix * iy
        union = ((box[2] - box[0]) * (box[3] - box[1])
                 + (other[2] - other[0]) * (other[3] - other[1]) - inter)
        if inter / union > _MAX_IOU:
            return True
    return False


def draw_example(rng, size: int, num_classes: int, max_objects: int) -> dict:
    """One image (uint8) with its boxes (continuous pixels), labels and difficult flags."""
    image = _background(rng, size)
    boxes, labels = [], []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _ in range(20):  # tries to place it without heavy overlap
            side = rng.uniform(*_SIZE_RANGE) * size
            x1, y1 = rng.uniform(0, size - side, size=2)
            box = (x1, y1, x1 + side, y1 + side)
            if not _overlaps(box, boxes):
                break
        else:
            continue
        label = int(rng.integers(num_classes))
        colour = np.clip(PALETTE[label] + rng.uniform(-0.1, 0.1, 3), 0, 1)
        image[_mask(SHAPES[label % len(SHAPES)], box, size)] = colour
        boxes.append(box)
        labels.append(label)
    image = np.clip(image + rng.normal(0, _NOISE, image.shape), 0, 1)
    return {"image": np.round(image * 255).astype(np.uint8),
            "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
            "labels": np.asarray(labels, np.int32),
            "difficult": np.zeros(len(labels), bool)}


class SyntheticSplit:
    """``count`` examples drawn once from their own stream of ``seed``."""

    def __init__(self, seed: int, stream: int, count: int, size: int, num_classes: int,
                 max_objects: int):
        if not 1 <= num_classes <= MAX_CLASSES:
            raise UserError(f"synthetic_num_classes must be in [1, {MAX_CLASSES}], "
                            f"got {num_classes}")
        if max_objects < 1:
            raise UserError(f"synthetic_max_objects must be >= 1, got {max_objects}")
        rng = np.random.default_rng([seed, 0xDE7EC7, stream])
        self._examples = [draw_example(rng, size, num_classes, max_objects)
                          for _ in range(count)]

    def __len__(self):
        return len(self._examples)

    def __getitem__(self, index):
        return self._examples[index]
