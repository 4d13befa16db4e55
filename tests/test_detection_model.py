"""The detector's parts: backbone and neck shapes and layer types, the neck shortcuts,
matching and sampling, RPN and RoI losses and proposals on constructed inputs, the final
detection step, and the whole model's static shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from awn_jax.detection import anchors, detector, roi_heads, rpn, targets
from awn_jax.detection import boxes as box_ops
from awn_jax.detection.data import DetectionInfo
from awn_jax.nn.layers import Conv2d
from configs import voc_frcnn_default

INFO = DetectionInfo("toy", 3, ("a", "b", "c"), 64, 4, 8, 8)


def small_config(**overrides):
    config = voc_frcnn_default.get_config()
    config.update(dict(image_size=64, max_boxes=4, fpn_channels=16, box_head_dim=32,
                       anchor_scale=4.0, rpn_pre_nms_topk_train=60, rpn_post_nms_topk_train=30,
                       rpn_pre_nms_topk_test=60, rpn_post_nms_topk_test=30,
                       rpn_batch_size_per_image=32, roi_batch_size_per_image=16,
                       test_candidates_per_class=10, test_detections_per_image=12))
    config.update(overrides)
    return config


@pytest.mark.parametrize("layer_type", ["conv", "adder-awn"])
def test_backbone_and_neck_shapes_and_layer_types(layer_type):
    model = detector.build_detector(small_config(layer_type=layer_type), INFO)
    images = jnp.zeros((2, 64, 64, 3))
    features = model.backbone(images)
    assert [f.shape for f in features] == [(2, 16, 16, 64), (2, 8, 8, 128), (2, 4, 4, 256),
                                           (2, 2, 2, 512)]
    pyramid = model.neck(features)
    assert [p.shape for p in pyramid] == [(2, s, s, 16) for s in (16, 8, 4, 2, 1)]
    neck_types = {m.layer_type for _, m in nnx.iter_graph(model.neck) if isinstance(m, Conv2d)}
    backbone_types = [m.layer_type for _, m in nnx.iter_graph(model.backbone)
                      if isinstance(m, Conv2d)]
    assert neck_types == {layer_type}
    # The stem stays multiplying; all 19 layers inside the blocks have the model's type.
    assert backbone_types.count(layer_type) == (19 if layer_type != "conv" else 20)


def test_neck_shortcut_adds_the_merged_map():
    model = detector.build_detector(small_config(layer_type="adder"), INFO)
    features = model.backbone(jax.random.uniform(jax.random.key(0), (2, 64, 64, 3)))
    with_shortcuts = model.neck(features)
    model.neck.shortcuts = False
    without = model.neck(features)
    # P5's merged map is its lateral alone; P4's adds P5's merged map upsampled 2x.
    lateral5 = model.neck.lateral[3](features[3])
    np.testing.assert_allclose(with_shortcuts[3] - without[3], lateral5, rtol=1e-4, atol=1e-4)
    merged4 = model.neck.lateral[2](features[2]) + jnp.repeat(jnp.repeat(lateral5, 2, 1), 2, 2)
    np.testing.assert_allclose(with_shortcuts[2] - without[2], merged4, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(with_shortcuts[4], with_shortcuts[3][:, ::2, ::2])


def test_label_by_iou_thresholds_and_low_quality_matches():
    gt = jnp.array([[0.0, 0, 10, 10], [50.0, 50, 60, 60], [0.0, 0, 0, 0]])
    gt_valid = jnp.array([True, True, False])
    candidates = jnp.array([[0.0, 0, 10, 10],     # IoU 1 with box 0
                            [0.0, 0, 10, 6],      # 0.6: in between
                            [0.0, 0, 10, 2],      # 0.2: negative
                            [50.0, 50, 60, 55],   # 0.5: box 1's best anchor
                            [100.0, 100, 110, 110]])
    iou, best, best_gt = targets.match(candidates, gt, gt_valid)
    positive, negative = targets.label_by_iou(iou, best, gt_valid, 0.7, 0.3,
                                              low_quality_min_iou=0.3)
    assert positive.tolist() == [True, False, False, True, False]
    assert negative.tolist() == [False, False, True, False, True]
    assert best_gt[3] == 1
    plain_positive, _ = targets.label_by_iou(iou, best, gt_valid, 0.7, 0.3)
    assert plain_positive.tolist() == [True, False, False, False, False]


def test_sample_is_balanced_distinct_and_deterministic():
    rng = np.random.default_rng(0)
    positive = jnp.asarray(rng.random(500) < 0.05)
    negative = ~positive & jnp.asarray(rng.random(500) < 0.8)
    index, is_positive, valid = targets.sample(jax.random.key(1), positive, negative, 64, 0.25)
    chosen = np.asarray(index)[np.asarray(valid)]
    assert valid.sum() == 64 and len(set(chosen.tolist())) == 64
    assert is_positive.sum() == min(16, int(positive.sum()))
    assert np.all(np.asarray(positive)[np.asarray(index)[np.asarray(is_positive)]])
    negatives = np.asarray(index)[np.asarray(valid & ~is_positive)]
    assert np.all(np.asarray(negative)[negatives])
    again = targets.sample(jax.random.key(1), positive, negative, 64, 0.25)
    assert all(np.array_equal(a, b) for a, b in zip((index, is_positive, valid), again))
    # Too few candidates: the slots that cannot be filled are invalid.
    few = targets.sample(jax.random.key(2), jnp.array([True, False, False]),
                         jnp.array([False, True, False]), 8, 0.5)
    assert few[2].tolist() == [True, True] + [False] * 6
    assert few[1].tolist() == [True] + [False] * 7


def rpn_inputs():
    level_anchors = anchors.pyramid_anchors(64, 4.0, (0.5, 1.0, 2.0))
    all_anchors = jnp.asarray(np.concatenate(level_anchors))
    gt = jnp.array([[8.0, 10, 30, 28], [36.0, 30, 60, 62], [0.0, 0, 0, 0]])
    gt_valid = jnp.array([True, True, False])
    return level_anchors, all_anchors, gt, gt_valid


def test_rpn_loss_vanishes_for_perfect_predictions():
    _, all_anchors, gt, gt_valid = rpn_inputs()
    config = small_config()
    iou, best, best_gt = targets.match(all_anchors, gt, gt_valid)
    positive, _ = targets.label_by_iou(iou, best, gt_valid, 0.7, 0.3, 0.3)
    perfect_deltas = box_ops.encode(gt[best_gt].at[:, 2:].max(gt[best_gt][:, :2] + 1),
                                    all_anchors)
    logits = jnp.where(positive, 30.0, -30.0)
    hw = jnp.array([64.0, 64.0])
    objectness, box = rpn.loss(jax.random.key(0), logits, perfect_deltas, all_anchors, gt,
                               gt_valid, hw, config)
    assert float(objectness) < 1e-6 and float(box) < 1e-6
    wrong_objectness, wrong_box = rpn.loss(jax.random.key(0), -logits, perfect_deltas + 0.5,
                                           all_anchors, gt, gt_valid, hw, config)
    assert float(wrong_objectness) > 1.0 and float(wrong_box) > 0.01
    assert jnp.all(jnp.isfinite(jax.grad(lambda d: rpn.loss(
        jax.random.key(0), logits, d, all_anchors, gt, gt_valid, hw, config)[1])(
            jnp.zeros_like(perfect_deltas))))


def test_proposals_recover_boxes_from_exact_deltas():
    level_anchors, all_anchors, gt, gt_valid = rpn_inputs()
    _, best, best_gt = targets.match(all_anchors, gt, gt_valid)
    deltas = box_ops.encode(gt[best_gt].at[:, 2:].max(gt[best_gt][:, :2] + 1), all_anchors)
    logits = best  # the anchors that overlap a box most are proposed first
    sizes = np.cumsum([0] + [len(a) for a in level_anchors])
    split = lambda x: [x[a:b] for a, b in zip(sizes[:-1], sizes[1:])]  # noqa: E731
    propose = jax.jit(lambda hw: rpn.proposals(
        split(logits), split(deltas), [jnp.asarray(a) for a in level_anchors], hw,
        pre_nms_topk=50, post_nms_topk=20, nms_threshold=0.7))
    boxes, valid = propose(jnp.array([64.0, 64.0]))
    assert boxes.shape == (20, 4) and valid.shape == (20,)
    found = box_ops.pairwise_iou(boxes[valid], gt[:2])
    np.testing.assert_allclose(jnp.max(found, axis=0), 1.0, rtol=1e-5)
    # The canvas padding proposes nothing; proposals are clipped to the image.
    boxes, valid = propose(jnp.array([32.0, 32.0]))
    assert valid.any() and jnp.all(boxes[valid] <= 32.0)


def test_sampled_rois_include_the_ground_truth_and_their_targets():
    config = small_config()
    gt = jnp.array([[8.0, 10, 30, 28], [36.0, 30, 60, 62], [0.0, 0, 0, 0]])
    gt_valid, gt_labels = jnp.array([True, True, False]), jnp.array([2, 0, 0])
    junk = jnp.tile(jnp.array([[0.0, 40, 5, 45]]), (30, 1))  # proposals far from any box
    rois, labels, deltas, is_positive, valid = roi_heads.sample_rois(
        jax.random.key(0), junk, jnp.ones(30, bool), gt, gt_labels, gt_valid, 3, config)
    assert rois.shape == (16, 4)
    assert is_positive.sum() == 2 and sorted(labels[is_positive].tolist()) == [0, 2]
    assert jnp.all(labels[valid & ~is_positive] == 3)                   # background
    np.testing.assert_allclose(deltas[is_positive], 0.0, atol=1e-5)    # gt boxes themselves
    assert jnp.all(jnp.isfinite(deltas))


def test_box_head_losses_vanish_for_perfect_predictions():
    labels = jnp.array([0, 2, 3, 3])
    is_positive = labels < 3
    wanted = jnp.array([[0.1, -0.2, 0.3, 0.0], [0.5, 0.5, -0.1, 0.2], [0.0] * 4, [0.0] * 4])
    logits = 40.0 * jax.nn.one_hot(labels, 4) - 20.0
    deltas = jnp.zeros((4, 3, 4)).at[jnp.arange(4), jnp.minimum(labels, 2)].set(wanted)
    classification, box = roi_heads.loss_sums(logits, deltas, labels, wanted, is_positive,
                                              jnp.ones(4, bool))
    assert float(classification) < 1e-6 and float(box) < 1e-9
    _, box = roi_heads.loss_sums(logits, jnp.roll(deltas, 1, axis=1), labels, wanted,
                                 is_positive, jnp.ones(4, bool))
    assert float(box) > 0.1  # deltas of another class do not count


def test_detect_picks_class_boxes_and_suppresses_duplicates():
    config = small_config(test_candidates_per_class=4, test_detections_per_image=5)
    proposals = jnp.array([[10.0, 10, 30, 30], [11.0, 10, 31, 30], [40.0, 40, 60, 60],
                           [0.0, 0, 5, 5]])
    logits = jnp.array([[0.0, 8, 0, 0],    # class 1, confident
                        [0.0, 7, 0, 0],    # class 1, a duplicate of the first
                        [0.0, 0, 6, 0],    # class 2
                        [0.0, 0, 0, 9]])   # background
    wanted = jnp.array([12.0, 12, 28, 30])
    deltas = jnp.zeros((4, 3, 4)).at[0, 1].set(
        box_ops.encode(wanted[None], proposals[:1], roi_heads.BOX_WEIGHTS)[0])
    boxes, scores, labels, valid = jax.jit(lambda *a: roi_heads.detect(*a, config))(
        logits, deltas, proposals, jnp.ones(4, bool), jnp.array([64.0, 64.0]))
    assert boxes.shape == (5, 4) and bool(valid[0])
    assert int(labels[0]) == 1        # the best detection: the decoded class-1 box
    np.testing.assert_allclose(boxes[0], wanted, rtol=1e-5)
    kept = {(int(l), round(float(s), 3)) for l, s in zip(labels[valid], scores[valid])}
    probabilities = jax.nn.softmax(logits, -1)
    assert (1, round(float(probabilities[1, 1]), 3)) not in kept       # suppressed duplicate
    assert (2, round(float(probabilities[2, 2]), 3)) in kept
    assert jnp.all(scores[valid] > config.test_score_threshold)


def test_whole_model_has_static_shapes_and_rejects_wrong_canvas():
    config = small_config(layer_type="conv")
    model = detector.build_detector(config, INFO)
    batch = {"image": jax.random.uniform(jax.random.key(0), (2, 64, 64, 3)),
             "image_hw": jnp.array([[64.0, 64.0], [48.0, 40.0]]),
             "boxes": jnp.array([[[8.0, 10, 30, 28]] * 4] * 2),
             "labels": jnp.zeros((2, 4), jnp.int32),
             "box_valid": jnp.array([[True, False, False, False]] * 2)}
    total, parts = nnx.jit(lambda m, b: m.losses(b, jax.random.key(0)))(model, batch)
    assert jnp.isfinite(total) and set(parts) == {"rpn_objectness", "rpn_box",
                                                  "roi_classification", "roi_box"}
    np.testing.assert_allclose(total, sum(parts.values()), rtol=1e-6)
    out = nnx.jit(lambda m, images, hw: m.detect(images, hw))(model, batch["image"],
                                                               batch["image_hw"])
    assert {k: v.shape for k, v in out.items()} == {"boxes": (2, 12, 4), "scores": (2, 12),
                                                    "labels": (2, 12), "valid": (2, 12)}
    assert jnp.all(out["boxes"][1][..., 2] <= 40.0) and jnp.all(out["boxes"][1][..., 3] <= 48.0)
    with pytest.raises(ValueError, match="images must be"):
        model.detect(jnp.zeros((1, 32, 32, 3)), jnp.ones((1, 2)))
    with pytest.raises(ValueError, match="multiple of 64"):
        detector.build_detector(config, DetectionInfo("toy", 3, ("a", "b", "c"), 96, 4, 8, 8))
