"""Axis-aligned boxes as ``(x1, y1, x2, y2)`` in continuous pixel coordinates.

Pixel ``i`` covers ``[i, i + 1)``, so a box's width is ``x2 - x1`` (no ``+ 1``). The VOC
devkit's 1-based inclusive boxes ``(xmin .. xmax)`` are the continuous boxes
``[xmin - 1, xmax]``; its ``+ 1`` areas are then exactly these areas (see
:mod:`awn_jax.detection.voc_eval`).

Box coding is Faster R-CNN's (Girshick, ICCV 2015, Eq. 2): centre offsets relative to the
reference box's size and log size ratios, each multiplied by a per-coordinate weight (the
RPN uses 1, the box head 10, 10, 5, 5, i.e. targets divided by the usual standard
deviations 0.1, 0.1, 0.2, 0.2).
"""

from __future__ import annotations

import math

import jax.numpy as jnp

# exp() of a decoded log size ratio is clamped here: a box may grow at most 1000/16 times
# (the bound Detectron and MMDetection use), so an untrained head cannot overflow.
MAX_LOG_RATIO = math.log(1000.0 / 16)


def area(boxes):
    """Areas of ``(..., 4)`` boxes; degenerate (inverted) boxes have area 0."""
    width = jnp.maximum(boxes[..., 2] - boxes[..., 0], 0.0)
    height = jnp.maximum(boxes[..., 3] - boxes[..., 1], 0.0)
    return width * height


def pairwise_iou(boxes_a, boxes_b):
    """IoU matrix ``(n, m)`` of ``(n, 4)`` and ``(m, 4)`` boxes; 0 where the union is empty."""
    top_left = jnp.maximum(boxes_a[:, None, :2], boxes_b[None, :, :2])
    bottom_right = jnp.minimum(boxes_a[:, None, 2:], boxes_b[None, :, 2:])
    size = jnp.maximum(bottom_right - top_left, 0.0)
    intersection = size[..., 0] * size[..., 1]
    union = area(boxes_a)[:, None] + area(boxes_b)[None, :] - intersection
    return jnp.where(union > 0, intersection / jnp.where(union > 0, union, 1.0), 0.0)


def _centre_size(boxes):
    size = boxes[..., 2:] - boxes[..., :2]
    return boxes[..., :2] + 0.5 * size, size


def encode(boxes, references, weights=(1.0, 1.0, 1.0, 1.0)):
    """Regression targets ``(dx, dy, dw, dh)`` that turn ``references`` into ``boxes``.

    References must have positive size; boxes too (the log of their size is taken).
    """
    weights = jnp.asarray(weights, boxes.dtype)
    centre, size = _centre_size(boxes)
    ref_centre, ref_size = _centre_size(references)
    offsets = (centre - ref_centre) / ref_size
    log_ratios = jnp.log(size / ref_size)
    return jnp.concatenate([offsets, log_ratios], axis=-1) * weights


def decode(deltas, references, weights=(1.0, 1.0, 1.0, 1.0)):
    """The boxes that ``deltas`` (from :func:`encode`) make of ``references``."""
    weights = jnp.asarray(weights, deltas.dtype)
    deltas = deltas / weights
    ref_centre, ref_size = _centre_size(references)
    centre = ref_centre + deltas[..., :2] * ref_size
    size = ref_size * jnp.exp(jnp.minimum(deltas[..., 2:], MAX_LOG_RATIO))
    return jnp.concatenate([centre - 0.5 * size, centre + 0.5 * size], axis=-1)


def clip(boxes, height, width):
    """Boxes clipped to the image ``[0, width] x [0, height]`` (scalars or broadcastable)."""
    x1 = jnp.clip(boxes[..., 0], 0.0, width)
    y1 = jnp.clip(boxes[..., 1], 0.0, height)
    x2 = jnp.clip(boxes[..., 2], 0.0, width)
    y2 = jnp.clip(boxes[..., 3], 0.0, height)
    return jnp.stack([x1, y1, x2, y2], axis=-1)


def smooth_l1(x, beta):
    """Huber-like loss per element: quadratic below ``beta``, linear above; L1 at beta 0."""
    absolute = jnp.abs(x)
    if beta == 0:
        return absolute
    return jnp.where(absolute < beta, 0.5 * x * x / beta, absolute - 0.5 * beta)
