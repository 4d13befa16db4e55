"""Detection geometry against plain references: IoU, box coding, anchors, NMS, RoIAlign
(values and feature gradients in float64)."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from awn_jax.detection import anchors, nms, roi_align
from awn_jax.detection import boxes as box_ops


def random_boxes(rng, n, size=100.0, min_side=1.0):
    corner = rng.uniform(0, size, (n, 2))
    sides = rng.uniform(min_side, size / 2, (n, 2))
    return np.concatenate([corner, corner + sides], axis=1)


def iou_reference(a, b):
    """One pair at a time, straight from the definition."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def test_pairwise_iou_hand_cases():
    a = jnp.array([[0.0, 0.0, 2.0, 2.0]])
    b = jnp.array([[1.0, 1.0, 3.0, 3.0],    # overlap 1, union 7
                   [0.0, 0.0, 2.0, 2.0],    # same box
                   [2.0, 0.0, 4.0, 2.0],    # touching edge
                   [0.0, 0.0, 1.0, 2.0],    # contained half
                   [5.0, 5.0, 5.0, 5.0]])   # empty box
    np.testing.assert_allclose(box_ops.pairwise_iou(a, b), [[1 / 7, 1.0, 0.0, 0.5, 0.0]],
                               rtol=1e-6)
    empty = jnp.array([[3.0, 3.0, 3.0, 3.0]])
    assert float(box_ops.pairwise_iou(empty, empty)[0, 0]) == 0.0


def test_pairwise_iou_matches_reference():
    rng = np.random.default_rng(0)
    a, b = random_boxes(rng, 17), random_boxes(rng, 13)
    with jax.enable_x64():
        got = np.asarray(box_ops.pairwise_iou(jnp.asarray(a), jnp.asarray(b)))
    expected = np.array([[iou_reference(x, y) for y in b] for x in a])
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)
    assert (expected > 0).mean() > 0.1  # the case exercises overlaps, not only zeros


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_encode_decode_round_trip(weights):
    rng = np.random.default_rng(1)
    boxes, references = random_boxes(rng, 50), random_boxes(rng, 50)
    with jax.enable_x64():
        boxes, references = jnp.asarray(boxes), jnp.asarray(references)
        deltas = box_ops.encode(boxes, references, weights)
        np.testing.assert_allclose(box_ops.decode(deltas, references, weights), boxes,
                                   rtol=1e-12, atol=1e-10)
        np.testing.assert_allclose(box_ops.decode(jnp.zeros_like(deltas), references,
                                                  weights), references, atol=1e-12)
        np.testing.assert_allclose(box_ops.encode(references, references, weights), 0.0,
                                   atol=1e-12)


def test_encode_hand_case_and_decode_clamp():
    reference = jnp.array([[0.0, 0.0, 10.0, 20.0]])    # centre (5, 10), size (10, 20)
    box = jnp.array([[2.0, 4.0, 22.0, 24.0]])          # centre (12, 14), size (20, 20)
    expected = [0.7 * 10, 0.2 * 10, math.log(2.0) * 5, 0.0]
    np.testing.assert_allclose(box_ops.encode(box, reference, (10, 10, 5, 5))[0], expected,
                               rtol=1e-6, atol=1e-6)
    huge = box_ops.decode(jnp.array([[0.0, 0.0, 100.0, 100.0]]), reference)
    np.testing.assert_allclose(huge[0, 2] - huge[0, 0], 10.0 * 1000 / 16, rtol=1e-5)


def test_clip_and_smooth_l1():
    clipped = box_ops.clip(jnp.array([[-5.0, 3.0, 50.0, 70.0]]), height=60.0, width=40.0)
    np.testing.assert_allclose(clipped, [[0.0, 3.0, 40.0, 60.0]])
    x = jnp.array([-2.0, -0.05, 0.0, 0.05, 2.0])
    np.testing.assert_allclose(box_ops.smooth_l1(x, 0.1),
                               [1.95, 0.0125, 0.0, 0.0125, 1.95], rtol=1e-6)
    np.testing.assert_allclose(box_ops.smooth_l1(x, 0.0), np.abs(x))


def test_anchor_counts_per_level():
    per_level = anchors.pyramid_anchors(128, scale=8, ratios=(0.5, 1.0, 2.0))
    assert [len(a) for a in per_level] == [32 * 32 * 3, 16 * 16 * 3, 8 * 8 * 3,
                                           4 * 4 * 3, 2 * 2 * 3]
    with pytest.raises(ValueError, match="multiple of 64"):
        anchors.pyramid_anchors(100, scale=8, ratios=(1.0,))


def test_anchor_sizes_ratios_and_centres():
    ratios = (0.5, 1.0, 2.0)
    for level, stride in enumerate(anchors.FPN_STRIDES):
        boxes = anchors.pyramid_anchors(128, 8, ratios)[level].astype(np.float64)
        width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        np.testing.assert_allclose(width * height, (8 * stride) ** 2, rtol=1e-5)
        np.testing.assert_allclose(height / width, np.tile(ratios, len(boxes) // 3),
                                   rtol=1e-5)
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        side = 128 // stride
        grid = (np.arange(side) + 0.5) * stride
        expected = np.stack(np.meshgrid(grid, grid, indexing="ij")[::-1], -1).reshape(-1, 2)
        np.testing.assert_allclose(centres, np.repeat(expected, 3, axis=0), atol=1e-4)


def nms_reference(boxes, scores, valid, threshold):
    """The textbook loop: take the best remaining box, drop all that overlap it."""
    remaining = [i for i in sorted(range(len(scores)), key=lambda i: -scores[i]) if valid[i]]
    kept = []
    while remaining:
        best = remaining.pop(0)
        kept.append(best)
        remaining = [i for i in remaining if iou_reference(boxes[best], boxes[i]) <= threshold]
    return sorted(kept)


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_nms_matches_reference(threshold):
    rng = np.random.default_rng(int(threshold * 10))
    centres = random_boxes(rng, 6)
    # Clusters of jittered copies, so suppression chains (A kills B, B would kill C) occur.
    boxes = np.concatenate([c + rng.normal(0, 4, (12, 4)) for c in centres])
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    scores = rng.random(len(boxes))
    valid = rng.random(len(boxes)) > 0.1
    keep = nms.nms(jnp.asarray(boxes, jnp.float32), jnp.asarray(scores, jnp.float32),
                   jnp.asarray(valid), threshold)
    expected = nms_reference(boxes, scores, valid, threshold)
    assert np.flatnonzero(np.asarray(keep)).tolist() == expected
    assert 6 <= len(expected) < valid.sum()


def test_nms_ties_keep_the_first():
    boxes = jnp.array([[0.0, 0, 10, 10], [0.0, 0, 10, 10], [20.0, 20, 30, 30]])
    scores = jnp.array([0.5, 0.5, 0.9])
    keep = nms.nms(boxes, scores, jnp.ones(3, bool), 0.5)
    assert keep.tolist() == [True, False, True]


def bilinear_reference(height, width, y, x):
    """Weights {(row, col): w} of one sample, Caffe2/Detectron's RoIAlign rule."""
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return {}
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(math.floor(y)), int(math.floor(x))
    if y_low >= height - 1:
        y_low = y_high = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_low = x_high = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    weights = {}
    for (r, wy), (c, wx) in itertools.product(((y_low, 1 - ly), (y_high, ly)),
                                              ((x_low, 1 - lx), (x_high, lx))):
        weights[(r, c)] = weights.get((r, c), 0.0) + wy * wx
    return weights


def roi_align_matrix(shape, box, stride, output_size, sampling_ratio):
    """``(out*out, H*W)`` matrix M with pooled = M @ features: the direct definition,
    one bin and sample at a time; its transpose maps output gradients to features."""
    height, width = shape
    x1, y1, x2, y2 = (c / stride - 0.5 for c in box)
    bin_h, bin_w = (y2 - y1) / output_size, (x2 - x1) / output_size
    matrix = np.zeros((output_size * output_size, height * width))
    for i, j in itertools.product(range(output_size), repeat=2):
        for a, b in itertools.product(range(sampling_ratio), repeat=2):
            y = y1 + (i + (a + 0.5) / sampling_ratio) * bin_h
            x = x1 + (j + (b + 0.5) / sampling_ratio) * bin_w
            for (r, c), w in bilinear_reference(height, width, y, x).items():
                matrix[i * output_size + j, r * width + c] += w / sampling_ratio ** 2
    return matrix


def test_assign_levels():
    sides = jnp.array([10.0, 111.0, 113.0, 250.0, 500.0, 2000.0])
    boxes = jnp.stack([jnp.zeros(6), jnp.zeros(6), sides, sides], axis=1)
    assert roi_align.assign_levels(boxes, 4).tolist() == [0, 0, 1, 2, 3, 3]


def test_roi_align_values_and_gradients_match_reference():
    rng = np.random.default_rng(3)
    shapes, strides, channels = [(12, 10), (6, 5)], (4, 8), 3
    levels = [rng.standard_normal(s + (channels,)) for s in shapes]
    boxes = np.concatenate([random_boxes(rng, 6, size=40.0, min_side=0.5),
                            [[-10.0, -6.0, 20.0, 12.0],     # sticks out top-left
                             [30.0, 40.0, 60.0, 70.0],      # mostly past the bottom-right
                             [8.0, 8.0, 8.5, 9.0]]])        # smaller than a cell
    level_index = np.array([0, 1] * 4 + [0])
    output_size, sampling_ratio = 3, 2
    cotangent = rng.standard_normal((len(boxes), output_size, output_size, channels))

    with jax.enable_x64():
        def pooled(*maps):
            return roi_align.roi_align(maps, jnp.asarray(boxes), jnp.asarray(level_index),
                                       strides, output_size, sampling_ratio)
        values, vjp = jax.vjp(pooled, *(jnp.asarray(f) for f in levels))
        grads = vjp(jnp.asarray(cotangent))

    expected = np.zeros_like(cotangent)
    expected_grads = [np.zeros_like(f) for f in levels]
    for r, (box, level) in enumerate(zip(boxes, level_index)):
        matrix = roi_align_matrix(shapes[level], box, strides[level], output_size,
                                  sampling_ratio)
        flat = levels[level].reshape(-1, channels)
        expected[r] = (matrix @ flat).reshape(output_size, output_size, channels)
        expected_grads[level] += (matrix.T @ cotangent[r].reshape(-1, channels)).reshape(
            levels[level].shape)
    np.testing.assert_allclose(values, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, expected_grads):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    # The sticking-out box has samples outside the map, the others none: both rules run.
    assert 0 < np.count_nonzero(roi_align_matrix(shapes[0], boxes[6], 4, 3, 2).sum(1) < 1)


def test_roi_align_of_a_constant_map_inside_is_the_constant():
    level = jnp.full((8, 8, 2), 3.0)
    out = roi_align.roi_align([level], jnp.array([[4.0, 4.0, 20.0, 28.0]]),
                              jnp.array([0]), (4,), output_size=7, sampling_ratio=2)
    np.testing.assert_allclose(out, 3.0, rtol=1e-6)
