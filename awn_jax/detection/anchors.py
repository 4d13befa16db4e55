"""Anchor boxes of the RPN, one set per FPN level (Lin et al., CVPR 2017, Sec. 4.1).

Level ``l`` (P2..P6, stride ``2**l``) has anchors of one size, ``scale * stride`` (FPN's
32..512 px for scale 8), at each aspect ratio ``h / w`` in ``ratios``, all of that area.
They are centred on the feature cells, at ``((x + 0.5) * stride, (y + 0.5) * stride)`` in
continuous pixel coordinates. The order, ``(y, x, ratio)`` flattened, is the order in
which the RPN head's ``(N, H, W, A)`` outputs are flattened.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from awn_jax.errors import UserError

FPN_STRIDES = (4, 8, 16, 32, 64)  # P2 .. P6


def level_shapes(image_size: int, strides: Sequence[int] = FPN_STRIDES):
    """Feature map side per level for a square input of ``image_size`` (a multiple of the
    largest stride, so every level divides it exactly)."""
    if image_size % max(strides):
        raise UserError(f"image_size {image_size} must be a multiple of {max(strides)} "
                        "(the stride of P6)")
    return tuple(image_size // stride for stride in strides)


def cell_anchors(size: float, ratios: Sequence[float]) -> np.ndarray:
    """``(A, 4)`` anchors of one size centred at the origin, one per ratio ``h / w``."""
    ratios = np.asarray(ratios, np.float64)
    widths = size / np.sqrt(ratios)
    heights = size * np.sqrt(ratios)
    return np.stack([-widths / 2, -heights / 2, widths / 2, heights / 2], axis=-1)


def level_anchors(side: int, stride: int, size: float, ratios: Sequence[float]) -> np.ndarray:
    """``(side * side * A, 4)`` anchors of one level, float32."""
    centres = (np.arange(side) + 0.5) * stride
    cy, cx = np.meshgrid(centres, centres, indexing="ij")
    shifts = np.stack([cx, cy, cx, cy], axis=-1).reshape(-1, 1, 4)
    return (shifts + cell_anchors(size, ratios)[None]).reshape(-1, 4).astype(np.float32)


def pyramid_anchors(image_size: int, scale: float, ratios: Sequence[float],
                    strides: Sequence[int] = FPN_STRIDES) -> list[np.ndarray]:
    """Anchors of every level for a square input, finest level first."""
    return [level_anchors(side, stride, scale * stride, ratios)
            for side, stride in zip(level_shapes(image_size, strides), strides)]
