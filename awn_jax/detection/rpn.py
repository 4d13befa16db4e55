"""Region proposal network (Ren et al., NeurIPS 2015) on the FPN levels.

One head shared by all levels: a 3x3 convolution + ReLU, then per anchor an objectness
logit and four box deltas (1x1 convolutions; multiplying, as the paper's heads are).
Training: anchors are labelled by IoU (>= 0.7 positive, < 0.3 negative, plus each box's
best anchors from IoU 0.3), 256 per image are sampled with at most half positive, and the
loss is binary cross-entropy plus smooth-L1 (beta 1/9) on the positives' deltas, both
summed over the samples and divided by their number. Anchors whose centre lies outside
the resized image (on the canvas padding) are neither trained nor proposed. Proposals:
per level the top-k anchors by objectness, decoded and clipped to the image, NMS at 0.7
within the level, then the best over all levels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from awn_jax.detection import boxes as box_ops
from awn_jax.detection import nms, targets


class RPNHead(nnx.Module):
    def __init__(self, channels: int, num_anchors: int, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.01)
        self.num_anchors = num_anchors
        self.conv = nnx.Conv(channels, channels, (3, 3), kernel_init=init, rngs=rngs)
        self.objectness = nnx.Conv(channels, num_anchors, (1, 1), kernel_init=init, rngs=rngs)
        self.deltas = nnx.Conv(channels, 4 * num_anchors, (1, 1), kernel_init=init, rngs=rngs)

    def __call__(self, pyramid):
        """Per level: logits ``(N, H*W*A)`` and deltas ``(N, H*W*A, 4)`` (float32)."""
        logits, deltas = [], []
        for p in pyramid:
            x = nnx.relu(self.conv(p.astype(jnp.float32)))
            n = x.shape[0]
            logits.append(self.objectness(x).reshape(n, -1))
            deltas.append(self.deltas(x).reshape(n, -1, 4))
        return logits, deltas


def anchor_inside(anchors, image_hw):
    """Anchors whose centre lies on the resized image (not on the canvas padding)."""
    centre = (anchors[:, :2] + anchors[:, 2:]) / 2
    return (centre[:, 0] < image_hw[1]) & (centre[:, 1] < image_hw[0])


def loss(key, logits, deltas, anchors, gt_boxes, gt_valid, image_hw, config):
    """``(objectness loss, box loss)`` of one image: logits ``(T,)``, deltas ``(T, 4)``,
    anchors ``(T, 4)`` (all levels concatenated)."""
    iou, best_iou, best_gt = targets.match(anchors, gt_boxes, gt_valid)
    positive, negative = targets.label_by_iou(
        iou, best_iou, gt_valid, config.rpn_positive_iou, config.rpn_negative_iou,
        low_quality_min_iou=config.rpn_negative_iou)
    inside = anchor_inside(anchors, image_hw)
    index, is_positive, valid = targets.sample(
        key, positive & inside, negative & inside, config.rpn_batch_size_per_image,
        config.rpn_positive_fraction)
    normalizer = config.rpn_batch_size_per_image
    objectness = optax.sigmoid_binary_cross_entropy(logits[index],
                                                    is_positive.astype(jnp.float32))
    objectness_loss = jnp.sum(jnp.where(valid, objectness, 0.0)) / normalizer
    # Targets of non-positives are the anchors themselves: finite (padding boxes have
    # size 0, whose log would be -inf and poison the gradient through the mask).
    matched = jnp.where(is_positive[:, None], gt_boxes[best_gt[index]], anchors[index])
    wanted = box_ops.encode(matched, anchors[index])
    box = box_ops.smooth_l1(deltas[index] - wanted, beta=1.0 / 9).sum(-1)
    box_loss = jnp.sum(jnp.where(is_positive, box, 0.0)) / normalizer
    return objectness_loss, box_loss


def proposals(logits, deltas, anchors, image_hw, *, pre_nms_topk: int, post_nms_topk: int,
              nms_threshold: float):
    """``(boxes (K, 4), valid (K,))`` of one image from per-level logits ``(T_l,)``,
    deltas ``(T_l, 4)`` and anchors ``(T_l, 4)``; no gradient flows into them."""
    level_boxes, level_scores, level_valid = [], [], []
    for level_logits, level_deltas, level_anchors in zip(logits, deltas, anchors):
        level_logits = jax.lax.stop_gradient(level_logits)
        inside = anchor_inside(level_anchors, image_hw)
        scores, index = jax.lax.top_k(jnp.where(inside, level_logits, -jnp.inf),
                                      min(pre_nms_topk, level_logits.shape[0]))
        decoded = box_ops.decode(jax.lax.stop_gradient(level_deltas[index]),
                                 level_anchors[index])
        decoded = box_ops.clip(decoded, image_hw[0], image_hw[1])
        valid = inside[index] & (box_ops.area(decoded) > 0)
        keep = nms.nms(decoded, scores, valid, nms_threshold)
        level_boxes.append(decoded)
        level_scores.append(jnp.where(keep, scores, -jnp.inf))
        level_valid.append(keep)
    all_scores = jnp.concatenate(level_scores)
    k = min(post_nms_topk, all_scores.shape[0])
    _, best = jax.lax.top_k(all_scores, k)
    return jnp.concatenate(level_boxes)[best], jnp.concatenate(level_valid)[best]
