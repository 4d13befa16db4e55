"""Faster R-CNN + FPN (Ren et al., NeurIPS 2015; Lin et al., CVPR 2017) as one NNX module.

``losses(batch, key)`` is the training objective (RPN objectness + box, RoI classification
+ box; ``key`` drives the anchor and RoI sampling), ``detect(images, image_hw)`` the
inference. Both are pure functions of fixed shapes: images on a square canvas, padded
boxes, fixed numbers of proposals, samples and detections, so one ``jax.jit`` compiles
each, and the batch can be sharded over a mesh (every per-image step is a ``vmap``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from awn_jax.detection import anchors, roi_heads, rpn
from awn_jax.detection.fpn import FPN, Backbone
from awn_jax.errors import UserError
from awn_jax.nn import create_model
from awn_jax.nn.layers import check_layer_type
from awn_jax.nn.resnet import ResNet

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class HeadSettings:
    """The RPN, RoI and test hyper-parameters (config keys of the same names)."""

    rpn_positive_iou: float
    rpn_negative_iou: float
    rpn_batch_size_per_image: int
    rpn_positive_fraction: float
    rpn_pre_nms_topk_train: int
    rpn_post_nms_topk_train: int
    rpn_pre_nms_topk_test: int
    rpn_post_nms_topk_test: int
    rpn_nms_threshold: float
    roi_positive_iou: float
    roi_batch_size_per_image: int
    roi_positive_fraction: float
    roi_pool_size: int
    roi_sampling_ratio: int
    test_score_threshold: float
    test_nms_threshold: float
    test_candidates_per_class: int
    test_detections_per_image: int

    @classmethod
    def from_config(cls, config):
        return cls(**{f.name: config[f.name] for f in dataclasses.fields(cls)})


class FasterRCNN(nnx.Module):
    """Backbone (C2-C5) -> FPN (P2-P6) -> RPN -> RoIAlign -> two-FC box head."""

    def __init__(self, backbone: Backbone, num_classes: int, *, image_size: int,
                 layer_type: str, fpn_channels: int, neck_shortcuts: bool,
                 anchor_scale: float, anchor_ratios, box_head_dim: int,
                 settings: HeadSettings, eta=0.2, eps=1e-5, compute_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        anchors.level_shapes(image_size)  # validates the canvas size
        self.image_size = image_size
        self.num_classes = num_classes
        self.anchor_scale = float(anchor_scale)
        self.anchor_ratios = tuple(float(r) for r in anchor_ratios)
        self.settings = settings
        self.backbone = backbone
        self.neck = FPN(backbone.out_channels, fpn_channels, layer_type=layer_type,
                        shortcuts=neck_shortcuts, eta=eta, eps=eps,
                        compute_dtype=compute_dtype, rngs=rngs)
        self.rpn_head = rpn.RPNHead(fpn_channels, len(self.anchor_ratios), rngs=rngs)
        self.box_head = roi_heads.BoxHead(fpn_channels, settings.roi_pool_size, box_head_dim,
                                          num_classes, rngs=rngs)

    def _anchors(self):
        return [jnp.asarray(a) for a in anchors.pyramid_anchors(
            self.image_size, self.anchor_scale, self.anchor_ratios)]

    def _check_images(self, images):
        expected = (self.image_size, self.image_size, 3)
        if images.shape[1:] != expected:
            raise ValueError(f"images must be (N, {self.image_size}, {self.image_size}, 3), "
                             f"got {images.shape}")

    def _proposals(self, images, image_hw, train: bool):
        self._check_images(images)
        pyramid = self.neck(self.backbone(images))
        logits, deltas = self.rpn_head(pyramid)
        s = self.settings
        propose = functools.partial(
            rpn.proposals, nms_threshold=s.rpn_nms_threshold,
            pre_nms_topk=s.rpn_pre_nms_topk_train if train else s.rpn_pre_nms_topk_test,
            post_nms_topk=s.rpn_post_nms_topk_train if train else s.rpn_post_nms_topk_test)
        level_anchors = self._anchors()
        boxes, valid = jax.vmap(lambda l, d, hw: propose(l, d, level_anchors, hw))(
            logits, deltas, image_hw)
        return pyramid, logits, deltas, level_anchors, boxes, valid

    def _box_head(self, pyramid, rois):
        """Logits ``(N, R, K + 1)`` and deltas ``(N, R, K, 4)`` of per-image RoIs."""
        pooled = jax.vmap(lambda levels, r: roi_heads.pool(levels, r, self.settings))(
            pyramid[:len(roi_heads.ROI_STRIDES)], rois)
        n, r = rois.shape[:2]
        logits, deltas = self.box_head(pooled.reshape((n * r,) + pooled.shape[2:]))
        return logits.reshape(n, r, -1), deltas.reshape(n, r, self.num_classes, 4)

    def losses(self, batch, key):
        """``(total loss, {component: value})`` of a training batch (see data.py)."""
        pyramid, logits, deltas, level_anchors, proposals, proposal_valid = self._proposals(
            batch["image"], batch["image_hw"], train=True)
        s, n = self.settings, batch["image"].shape[0]
        keys = jax.random.split(key, 2 * n)
        rpn_keys, roi_keys = keys[:n], keys[n:]
        all_anchors = jnp.concatenate(level_anchors)
        objectness, rpn_box = jax.vmap(functools.partial(rpn.loss, config=s))(
            rpn_keys, jnp.concatenate(logits, axis=1), jnp.concatenate(deltas, axis=1),
            jnp.broadcast_to(all_anchors, (n,) + all_anchors.shape), batch["boxes"],
            batch["box_valid"], batch["image_hw"])
        rois, labels, wanted, is_positive, valid = jax.vmap(functools.partial(
            roi_heads.sample_rois, num_classes=self.num_classes, config=s))(
                roi_keys, proposals, proposal_valid, batch["boxes"], batch["labels"],
                batch["box_valid"])
        class_logits, box_deltas = self._box_head(pyramid, rois)
        classification, roi_box = jax.vmap(roi_heads.loss_sums)(
            class_logits, box_deltas, labels, wanted, is_positive, valid)
        normalizer = n * s.roi_batch_size_per_image
        components = {"rpn_objectness": jnp.mean(objectness), "rpn_box": jnp.mean(rpn_box),
                      "roi_classification": jnp.sum(classification) / normalizer,
                      "roi_box": jnp.sum(roi_box) / normalizer}
        return sum(components.values()), components

    def detect(self, images, image_hw):
        """Detections per image: ``boxes (N, D, 4)`` in canvas pixels, ``scores``,
        ``labels`` (class indices), ``valid`` (N, D)."""
        pyramid, _, _, _, proposals, proposal_valid = self._proposals(images, image_hw,
                                                                      train=False)
        class_logits, box_deltas = self._box_head(pyramid, proposals)
        boxes, scores, labels, valid = jax.vmap(functools.partial(
            roi_heads.detect, config=self.settings))(
                class_logits, box_deltas, proposals, proposal_valid, image_hw)
        return {"boxes": boxes, "scores": scores, "labels": labels, "valid": valid}


def build_detector(config, info, resnet: ResNet | None = None) -> FasterRCNN:
    """The configured detector for a dataset (``info``: classes, canvas size, input
    statistics). ``resnet``: the backbone to start from (e.g. a trained classification
    model); by default a fresh ``config.model`` from ``config.seed``."""
    check_layer_type(config.layer_type)
    if config.compute_dtype not in COMPUTE_DTYPES:
        raise UserError(f"unknown compute_dtype {config.compute_dtype!r}; "
                        f"expected one of {tuple(COMPUTE_DTYPES)}")
    eta = config.eta if config.eta > 0 else None
    dtype = COMPUTE_DTYPES[config.compute_dtype]
    rngs = nnx.Rngs(config.seed)
    if resnet is None:
        resnet = create_model(config.model, num_classes=1, layer_type=config.layer_type,
                              mean=info.mean, std=info.std, eta=eta,
                              eps=config.weight_norm_eps, compute_dtype=dtype, rngs=rngs)
    return FasterRCNN(
        Backbone(resnet), info.num_classes, image_size=info.image_size,
        layer_type=config.layer_type, fpn_channels=config.fpn_channels,
        neck_shortcuts=config.neck_shortcuts, anchor_scale=config.anchor_scale,
        anchor_ratios=config.anchor_ratios, box_head_dim=config.box_head_dim,
        settings=HeadSettings.from_config(config), eta=eta, eps=config.weight_norm_eps,
        compute_dtype=dtype, rngs=rngs)
