"""Greedy non-maximum suppression with static shapes, for use inside ``jax.jit``.

Instead of returning a variable number of indices, :func:`nms` returns a mask over its
(fixed number of) inputs. Boxes are visited in descending score order; a box is kept
unless a kept box of higher score overlaps it by more than ``iou_threshold`` (IoU), as in
the classic greedy algorithm. The pairwise IoU matrix is computed once, so ``n`` should be
the few thousand boxes of a top-k, not all anchors.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from awn_jax.detection import boxes as box_ops


def nms(boxes, scores, valid, iou_threshold: float):
    """Keep-mask ``(n,)`` of greedy NMS over ``(n, 4)`` boxes; ``valid=False`` entries are
    never kept and suppress nothing. Equal scores are visited in input order."""
    order = jnp.argsort(-scores, stable=True)
    sorted_boxes, sorted_valid = boxes[order], valid[order]
    overlaps = box_ops.pairwise_iou(sorted_boxes, sorted_boxes) > iou_threshold

    def visit(i, keep):
        # Box i survives if no kept box before it overlaps it; later boxes are unset yet.
        suppressed = jnp.any(keep & overlaps[i])
        return keep.at[i].set(sorted_valid[i] & ~suppressed)

    keep_sorted = jax.lax.fori_loop(0, len(scores), visit, jnp.zeros(len(scores), bool))
    return jnp.zeros(len(scores), bool).at[order].set(keep_sorted)
