"""Matching boxes to ground truth and balanced sampling, per image with static shapes.

Ground truth comes padded: ``gt_valid`` marks the real boxes, padding never matches.
Sampling draws a fixed number of slots; slots it cannot fill (too few candidates) are
marked invalid, so every image yields arrays of one shape.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from awn_jax.detection import boxes as box_ops


def match(candidates, gt_boxes, gt_valid):
    """IoU ``(T, M)`` of candidates with the real ground truth (-1 at padding), each
    candidate's best IoU ``(T,)`` and the index of that box ``(T,)``."""
    iou = jnp.where(gt_valid[None, :], box_ops.pairwise_iou(candidates, gt_boxes), -1.0)
    return iou, jnp.max(iou, axis=1), jnp.argmax(iou, axis=1)


def label_by_iou(iou, best_iou, gt_valid, positive_iou: float, negative_iou: float,
                 low_quality_min_iou: float | None = None):
    """``(positive, negative)`` masks: best IoU >= ``positive_iou`` is positive, below
    ``negative_iou`` negative, in between neither. With ``low_quality_min_iou``, a
    candidate that is the best one for some box (ties included) is positive too if that
    IoU reaches the minimum: every box gets an anchor (Faster R-CNN; MMDetection's RPN
    uses 0.3)."""
    positive = best_iou >= positive_iou
    if low_quality_min_iou is not None:
        best_per_gt = jnp.max(iou, axis=0)
        usable = gt_valid & (best_per_gt >= low_quality_min_iou)
        positive |= jnp.any((iou == best_per_gt[None, :]) & usable[None, :], axis=1)
    negative = (best_iou < negative_iou) & (best_iou >= 0) & ~positive
    return positive, negative


def sample(key, positive, negative, num_samples: int, positive_fraction: float):
    """A random balanced subset: at most ``positive_fraction * num_samples`` positives,
    negatives filling the rest. Returns ``(index, is_positive, valid)``, each
    ``(num_samples,)``, filled slots first."""
    max_positive = int(num_samples * positive_fraction)
    key_pos, key_neg = jax.random.split(key)
    count = positive.shape[0]

    def draw(k, mask, slots):
        priority = jnp.where(mask, jax.random.uniform(k, (count,)), -1.0)
        values, index = jax.lax.top_k(priority, min(slots, count))
        return index, values >= 0

    pos_index, pos_ok = draw(key_pos, positive, max_positive)
    neg_index, neg_ok = draw(key_neg, negative, num_samples)
    neg_ok &= jnp.arange(neg_ok.shape[0]) < num_samples - jnp.sum(pos_ok)
    index = jnp.concatenate([pos_index, neg_index])
    valid = jnp.concatenate([pos_ok, neg_ok])
    is_positive = jnp.concatenate([jnp.ones_like(pos_ok), jnp.zeros_like(neg_ok)])
    order = jnp.argsort(~valid, stable=True)[:num_samples]
    pad = num_samples - order.shape[0]  # only when there are fewer candidates than slots
    if pad > 0:
        order = jnp.concatenate([order, jnp.zeros(pad, order.dtype)])
    valid = valid[order] & (jnp.arange(num_samples) < index.shape[0])
    return index[order], is_positive[order] & valid, valid
