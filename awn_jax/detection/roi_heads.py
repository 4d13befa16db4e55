"""The Fast R-CNN box head on RoIAlign features of P2-P5 (multiplying, as in the paper).

Two shared fully connected layers (1024 wide, ReLU) over the flattened 7x7 RoIAlign
features, then class logits (the classes plus background, last) and class-specific box
deltas (coded with weights 10, 10, 5, 5). Training: the proposals plus the ground-truth
boxes are matched by IoU (>= 0.5 foreground, below background), 512 per image are sampled
with at most a quarter foreground; the loss is softmax cross-entropy plus smooth-L1
(beta 1) on the foreground's deltas of its class, both divided by the number of samples.
Inference: per class, the proposals scoring above a threshold are decoded, the best
``test_candidates_per_class`` go through NMS at 0.5, and the best detections over all
classes are kept.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from awn_jax.detection import boxes as box_ops
from awn_jax.detection import nms, roi_align, targets

BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
ROI_STRIDES = (4, 8, 16, 32)  # RoIs read P2..P5


class BoxHead(nnx.Module):
    def __init__(self, channels: int, pool_size: int, hidden: int, num_classes: int, *,
                 rngs: nnx.Rngs):
        xavier = nnx.initializers.xavier_uniform()
        self.num_classes = num_classes
        self.fc1 = nnx.Linear(pool_size * pool_size * channels, hidden, kernel_init=xavier,
                              rngs=rngs)
        self.fc2 = nnx.Linear(hidden, hidden, kernel_init=xavier, rngs=rngs)
        self.classifier = nnx.Linear(hidden, num_classes + 1,
                                     kernel_init=nnx.initializers.normal(0.01), rngs=rngs)
        self.regressor = nnx.Linear(hidden, 4 * num_classes,
                                    kernel_init=nnx.initializers.normal(0.001), rngs=rngs)

    def __call__(self, features):
        """``(R, p, p, C)`` RoI features -> logits ``(R, K + 1)``, deltas ``(R, K, 4)``."""
        x = features.reshape(features.shape[0], -1).astype(jnp.float32)
        x = nnx.relu(self.fc2(nnx.relu(self.fc1(x))))
        return self.classifier(x), self.regressor(x).reshape(-1, self.num_classes, 4)


def pool(levels, rois, config):
    """RoIAlign features ``(R, p, p, C)`` of one image's RoIs from its P2..P5."""
    levels = levels[:len(ROI_STRIDES)]
    return roi_align.roi_align(levels, rois, roi_align.assign_levels(rois, len(levels)),
                               ROI_STRIDES, config.roi_pool_size, config.roi_sampling_ratio)


def sample_rois(key, proposals, proposal_valid, gt_boxes, gt_labels, gt_valid, num_classes,
                config):
    """Training RoIs of one image and their targets: ``rois (S, 4)``, ``labels (S,)``
    (``num_classes`` = background), ``deltas (S, 4)``, ``is_positive``, ``valid``."""
    candidates = jnp.concatenate([proposals, gt_boxes])
    candidate_valid = jnp.concatenate([proposal_valid, gt_valid])
    iou, best_iou, best_gt = targets.match(candidates, gt_boxes, gt_valid)
    positive, negative = targets.label_by_iou(iou, best_iou, gt_valid,
                                              config.roi_positive_iou, config.roi_positive_iou)
    index, is_positive, valid = targets.sample(
        key, positive & candidate_valid, negative & candidate_valid,
        config.roi_batch_size_per_image, config.roi_positive_fraction)
    rois = candidates[index]
    labels = jnp.where(is_positive, gt_labels[best_gt[index]], num_classes)
    matched = jnp.where(is_positive[:, None], gt_boxes[best_gt[index]], rois)
    # Non-positive slots may be degenerate boxes; their targets are never used.
    safe_rois = jnp.where(is_positive[:, None], rois, jnp.array([0.0, 0.0, 1.0, 1.0]))
    deltas = box_ops.encode(jnp.where(is_positive[:, None], matched, safe_rois), safe_rois,
                            BOX_WEIGHTS)
    return rois, labels, deltas, is_positive, valid


def loss_sums(logits, deltas, labels, wanted, is_positive, valid):
    """Summed classification and box losses of one image's sampled RoIs."""
    classification = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    class_index = jnp.minimum(labels, deltas.shape[1] - 1)
    predicted = jnp.take_along_axis(deltas, class_index[:, None, None], axis=1)[:, 0]
    box = box_ops.smooth_l1(predicted - wanted, beta=1.0).sum(-1)
    return (jnp.sum(jnp.where(valid, classification, 0.0)),
            jnp.sum(jnp.where(is_positive, box, 0.0)))


def detect(logits, deltas, proposals, proposal_valid, image_hw, config):
    """Final detections of one image: ``boxes (D, 4)``, ``scores (D,)``, ``labels (D,)``,
    ``valid (D,)``, best first, in canvas pixels."""
    num_classes = deltas.shape[1]
    probabilities = jax.nn.softmax(logits, axis=-1)[:, :num_classes]      # (R, K)
    boxes = box_ops.decode(deltas, proposals[:, None, :], BOX_WEIGHTS)    # (R, K, 4)
    boxes = box_ops.clip(boxes, image_hw[0], image_hw[1])
    candidates = min(config.test_candidates_per_class, proposals.shape[0])

    def per_class(class_boxes, class_scores):
        usable = proposal_valid & (class_scores > config.test_score_threshold) & (
            box_ops.area(class_boxes) > 0)
        scores, index = jax.lax.top_k(jnp.where(usable, class_scores, -jnp.inf), candidates)
        keep = nms.nms(class_boxes[index], scores, usable[index], config.test_nms_threshold)
        return class_boxes[index], jnp.where(keep, scores, -jnp.inf)

    class_boxes, class_scores = jax.vmap(per_class, in_axes=(1, 1))(boxes, probabilities)
    labels = jnp.broadcast_to(jnp.arange(num_classes)[:, None], class_scores.shape)
    count = min(config.test_detections_per_image, class_scores.size)
    scores, best = jax.lax.top_k(class_scores.reshape(-1), count)
    valid = scores > -jnp.inf
    return (class_boxes.reshape(-1, 4)[best], jnp.where(valid, scores, 0.0),
            labels.reshape(-1)[best], valid)
