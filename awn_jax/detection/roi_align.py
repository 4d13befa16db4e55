"""RoIAlign (He et al., ICCV 2017) over the levels of a feature pyramid, static shapes.

Each RoI is split into ``output_size x output_size`` bins; each bin averages
``sampling_ratio**2`` bilinear samples at regularly spaced points. Coordinates are
"aligned" (Detectron2's ROIAlignV2): a box in pixels maps to ``box / stride - 0.5`` in
feature coordinates, so sample points sit on pixel centres, and RoIs are not forced to a
minimum size. A sample further than one cell outside the map contributes zero; one
within a cell of the border reads the border (the Caffe2/Detectron rule).

All levels of one image are flattened into one ``(sum H_l W_l, C)`` table, and every RoI
gathers from the rows of its own level: one gather for all levels, rather than pooling
every RoI on every level and selecting. The RoI boxes get no gradient (Faster R-CNN does
not backpropagate into proposal coordinates); the features do, through the gather.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def assign_levels(boxes, num_levels: int, finest_scale: float = 56.0):
    """FPN level index (0 = finest) per RoI, FPN's Eq. 1: ``floor(log2(sqrt(wh) / 56))``
    clipped to the levels, i.e. RoIs under 112 px to P2, 224 to P3, 448 to P4, else P5."""
    scale = jnp.sqrt(jnp.maximum((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
                                 0.0))
    level = jnp.floor(jnp.log2(scale / finest_scale + 1e-6))
    return jnp.clip(level, 0, num_levels - 1).astype(jnp.int32)


def _axis_samples(start, length, cells, output_size, sampling_ratio):
    """Per RoI and sample along one axis: the two cell indices and their bilinear weights
    (zero for samples outside the map). ``start``, ``length``, ``cells``: ``(R,)``."""
    steps = (jnp.arange(output_size * sampling_ratio) + 0.5) / sampling_ratio  # in bins
    coord = start[:, None] + steps[None, :] * (length / output_size)[:, None]
    limit = cells[:, None].astype(coord.dtype)
    inside = (coord >= -1.0) & (coord <= limit)
    coord = jnp.clip(coord, 0.0, limit - 1)
    low = jnp.floor(coord).astype(jnp.int32)
    high = jnp.minimum(low + 1, cells[:, None] - 1)
    frac = coord - low
    return low, high, jnp.where(inside, 1.0 - frac, 0.0), jnp.where(inside, frac, 0.0)


def roi_align(levels: Sequence[jax.Array], boxes, level_index, strides: Sequence[int],
              output_size: int = 7, sampling_ratio: int = 2):
    """``(R, output_size, output_size, C)`` features of ``(R, 4)`` pixel boxes of one image.

    ``levels``: ``(H_l, W_l, C)`` maps; ``level_index``: ``(R,)`` which map each RoI reads;
    ``strides``: pixels per cell of each map.
    """
    heights = np.array([f.shape[0] for f in levels], np.int32)
    widths = np.array([f.shape[1] for f in levels], np.int32)
    offsets = np.concatenate([[0], np.cumsum(heights * widths)[:-1]]).astype(np.int32)
    table = jnp.concatenate([f.reshape(-1, f.shape[-1]) for f in levels], axis=0)

    boxes = jax.lax.stop_gradient(boxes)
    scale = 1.0 / jnp.asarray(strides, boxes.dtype)[level_index]
    h, w = jnp.asarray(heights)[level_index], jnp.asarray(widths)[level_index]
    x1, y1 = boxes[:, 0] * scale - 0.5, boxes[:, 1] * scale - 0.5
    x2, y2 = boxes[:, 2] * scale - 0.5, boxes[:, 3] * scale - 0.5
    y_lo, y_hi, wy_lo, wy_hi = _axis_samples(y1, y2 - y1, h, output_size, sampling_ratio)
    x_lo, x_hi, wx_lo, wx_hi = _axis_samples(x1, x2 - x1, w, output_size, sampling_ratio)

    base = jnp.asarray(offsets)[level_index][:, None, None]
    row_width = w[:, None, None]
    samples = 0.0
    for rows, wy in ((y_lo, wy_lo), (y_hi, wy_hi)):
        for cols, wx in ((x_lo, wx_lo), (x_hi, wx_hi)):
            index = base + rows[:, :, None] * row_width + cols[:, None, :]
            weight = (wy[:, :, None] * wx[:, None, :])[..., None].astype(table.dtype)
            samples = samples + weight * table[index]
    num_rois, channels = boxes.shape[0], table.shape[-1]
    samples = samples.reshape(num_rois, output_size, sampling_ratio, output_size,
                              sampling_ratio, channels)
    return samples.mean(axis=(2, 4))
