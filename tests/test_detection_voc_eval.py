"""VOC AP on cases computed by hand: duplicates, difficult boxes, the devkit's best-box
rule, no detections, a class without ground truth, both AP definitions."""

import math

import numpy as np
import pytest

from awn_jax.detection import voc_eval


def image(boxes=(), labels=(), difficult=None, scores=None):
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    labels = np.asarray(labels, np.int64)
    out = {"boxes": boxes, "labels": labels}
    if scores is not None:
        out["scores"] = np.asarray(scores, np.float64)
    if difficult is not None or scores is None:
        out["difficult"] = np.asarray(difficult if difficult is not None
                                      else [False] * len(labels), bool)
    return out


GT_A, GT_B = [0, 0, 10, 10], [20, 20, 30, 30]
MISS = [50, 50, 60, 60]


def test_duplicates_are_false_positives():
    # TP (A), duplicate of A, TP (B), miss: recall .5 .5 1 1, precision 1 .5 2/3 .5
    gt = [image([GT_A, GT_B], [0, 0])]
    dets = [image([GT_A, [0, 0, 10, 9], GT_B, MISS], [0] * 4, scores=[0.9, 0.8, 0.7, 0.6])]
    all_point = voc_eval.evaluate(dets, gt, 1, "all-point")
    assert all_point["ap"][0] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    eleven = voc_eval.evaluate(dets, gt, 1, "11-point")
    assert eleven["ap"][0] == pytest.approx((6 * 1 + 5 * 2 / 3) / 11)
    assert all_point["num_positives"] == [2]


def test_difficult_boxes_are_ignored():
    # A normal, B difficult. Detections: on B (ignored), a miss (FP), on A (TP).
    # Ignored: F T with one positive -> AP 0.5. (B counted as normal: 0.833; the detection
    # on B counted as a false positive: 0.333.)
    gt = [image([GT_A, GT_B], [0, 0], difficult=[False, True])]
    dets = [image([GT_B, MISS, GT_A], [0] * 3, scores=[0.9, 0.8, 0.7])]
    result = voc_eval.evaluate(dets, gt, 1, "all-point")
    assert result["ap"][0] == pytest.approx(0.5)
    assert result["num_positives"] == [1]
    assert voc_eval.evaluate(dets, gt, 1, "11-point")["ap"][0] == pytest.approx(0.5)


def test_a_detection_whose_best_box_is_taken_is_a_duplicate():
    # Two overlapping boxes; the second detection overlaps A by 0.905 (taken) and B by
    # 0.739 (free): the devkit matches it to A only, so it is a false positive.
    gt = [image([GT_A, [2, 0, 12, 10]], [0, 0])]
    dets = [image([GT_A, [0.5, 0, 10.5, 10]], [0, 0], scores=[0.9, 0.8])]
    result = voc_eval.evaluate(dets, gt, 1, "all-point")
    assert result["ap"][0] == pytest.approx(0.5)
    assert voc_eval.evaluate(dets, gt, 1, "11-point")["ap"][0] == pytest.approx(6 / 11)


def test_iou_of_exactly_half_matches():
    gt = [image([[0, 0, 10, 10]], [0])]
    half = [0, 0, 10, 5]                                   # IoU 50 / 100 = 0.5
    assert voc_eval.evaluate([image([half], [0], scores=[1.0])], gt, 1)["ap"][0] == 1.0
    below = [0, 0, 10, 4.99]
    assert voc_eval.evaluate([image([below], [0], scores=[1.0])], gt, 1)["ap"][0] == 0.0


def test_no_detections_and_a_class_without_ground_truth():
    # Class 0: two boxes, never detected (AP 0). Class 1: one box, found (AP 1).
    # Class 2: no ground truth at all; its detection does not count anywhere.
    gt = [image([GT_A, GT_B], [0, 1]), image([MISS], [0])]
    dets = [image([GT_B, MISS], [1, 2], scores=[0.9, 0.8]), image()]
    dets[1]["scores"] = np.zeros(0)
    result = voc_eval.evaluate(dets, gt, 3, "all-point")
    assert result["ap"][:2] == [0.0, 1.0]
    assert math.isnan(result["ap"][2])
    assert result["map"] == pytest.approx(0.5)
    assert result["num_positives"] == [2, 1, 0]
    table = voc_eval.ap_table(result, ["cat", "dog", "cow"])
    assert "| cow | 0 | - |" in table and "| dog | 1 | 100.0 |" in table
    assert "**50.0**" in table


def test_detection_in_an_image_without_boxes_of_its_class_is_false_positive():
    gt = [image([GT_A], [0]), image([GT_B], [1])]
    # Best detection is on the second image, which has no class-0 box.
    dets = [image([GT_A], [0], scores=[0.5]), image([GT_B], [0], scores=[0.9])]
    result = voc_eval.evaluate(dets, gt, 2, "all-point")
    assert result["ap"][0] == pytest.approx(0.5)   # F T: precision 1/2 at recall 1


def test_average_precision_definitions():
    # Recall reaches exactly 3/10: the devkit's ports loop over np.arange(0., 1.1, 0.1),
    # whose fourth threshold is 0.30000000000000004, so 0.3 does not reach it: 3 of 11.
    recall = np.array([1, 2, 3]) / 10
    precision = np.array([1.0, 1.0, 1.0])
    devkit = np.mean([precision[recall >= t].max(initial=0.0)
                      for t in np.arange(0.0, 1.1, 0.1)])
    assert voc_eval.average_precision(recall, precision, "11-point") == devkit == 3 / 11
    assert voc_eval.average_precision(recall, precision, "all-point") == pytest.approx(0.3)
    # A dip in precision is filled by the later maximum (the envelope).
    recall = np.array([0.25, 0.25, 0.5, 0.75])
    precision = np.array([1.0, 0.5, 2 / 3, 0.75])
    assert voc_eval.average_precision(recall, precision, "all-point") == pytest.approx(
        0.25 * 1.0 + 0.25 * 0.75 + 0.25 * 0.75)
    with pytest.raises(ValueError, match="unknown AP metric"):
        voc_eval.average_precision(recall, precision, "coco")


def test_ties_in_score_keep_input_order():
    # Equal scores: the first listed (a miss) ranks first -> F T -> AP 0.5, not 1.
    gt = [image([GT_A], [0])]
    dets = [image([MISS, GT_A], [0, 0], scores=[0.5, 0.5])]
    assert voc_eval.evaluate(dets, gt, 1, "all-point")["ap"][0] == pytest.approx(0.5)


def test_mismatched_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="images of detections"):
        voc_eval.evaluate([image(scores=[])], [], 1)
    with pytest.raises(ValueError, match="class names"):
        voc_eval.ap_table({"ap": [1.0], "num_positives": [1], "map": 1.0,
                           "metric": "11-point"}, ["a", "b"])
