"""PASCAL VOC detection AP at IoU 0.5, as the VOC devkit's ``VOCevaldet.m`` defines it.

Per class, detections of all images are sorted by descending confidence (ties keep their
input order). Each is matched to the ground-truth box of its image and class that it
overlaps most (IoU, ties to the first); with overlap >= 0.5 it is a true positive if that
box is not difficult and not yet matched, a false positive if it is already matched (a
duplicate), and ignored (neither) if the box is difficult; below 0.5 it is a false
positive. Note the devkit's rule: a detection whose best box is taken is a duplicate even
if it overlaps another free box by 0.5. Recall counts only non-difficult boxes.

AP from the precision/recall curve: ``11-point`` (VOC2007: mean over recall thresholds
0, 0.1, ..., 1 of the best precision at recall >= t) or ``all-point`` (VOC2010 on: area
under the curve made monotonically non-increasing). The 11 thresholds are
``np.arange(0.0, 1.1, 0.1)`` as the devkit's Python ports compute them (``ELEVEN_POINTS``).
A class without non-difficult ground truth has no AP (NaN) and is left out of the
mean, as in MMDetection.

Boxes are continuous ``(x1, y1, x2, y2)``: the devkit's 1-based inclusive ``(xmin, xmax)``
is ``[xmin - 1, xmax]``, and its ``+ 1`` widths are these widths, so the IoUs are the
devkit's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from awn_jax.errors import UserError

AP_METRICS = ("11-point", "all-point")
# The recall thresholds of the 11-point AP exactly as the VOC devkit's Python ports
# (py-faster-rcnn's voc_eval, Detectron2, MMDetection) compute them: np.arange's floats,
# 0.30000000000000004, 0.6000000000000001, 0.7000000000000001 among them, so a class whose
# recall reaches exactly 0.3, 0.6 or 0.7 gets the AP those tools report (t / 10 differs).
ELEVEN_POINTS = np.arange(0.0, 1.1, 0.1)


def check_ap_metric(metric: str) -> str:
    if metric not in AP_METRICS:
        raise UserError(f"unknown AP metric {metric!r}; expected one of {AP_METRICS}")
    return metric


def iou_with(box, boxes):
    """IoU of one box with each of ``(m, 4)`` boxes, float64."""
    ix = np.maximum(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0.0)
    iy = np.maximum(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0.0)
    intersection = ix * iy
    union = ((box[2] - box[0]) * (box[3] - box[1])
             + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) - intersection)
    return np.where(union > 0, intersection / np.where(union > 0, union, 1.0), 0.0)


def average_precision(recall, precision, metric: str) -> float:
    """AP of a precision/recall curve (arrays in detection order)."""
    check_ap_metric(metric)
    recall, precision = np.asarray(recall, np.float64), np.asarray(precision, np.float64)
    if metric == "11-point":
        return float(np.mean([precision[recall >= t].max(initial=0.0)
                              for t in ELEVEN_POINTS]))
    recall = np.concatenate([[0.0], recall, [1.0]])
    precision = np.concatenate([[0.0], precision, [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1]) + 1
    return float(np.sum((recall[steps] - recall[steps - 1]) * precision[steps]))


def match_class(detections, ground_truth, iou_threshold: float = 0.5):
    """True/false-positive flags of one class's detections, in descending score order.

    detections: ``(image_index, score, box)`` tuples; ground_truth: per image a pair
    ``(boxes (m, 4), difficult (m,))``. Returns ``(is_tp, num_positives)``; ignored
    detections (best box difficult) are left out, which changes no AP.
    """
    order = sorted(range(len(detections)), key=lambda i: -detections[i][1])
    matched = [np.zeros(len(boxes), bool) for boxes, _ in ground_truth]
    is_tp = []
    for i in order:
        image, _, box = detections[i]
        gt_boxes, difficult = ground_truth[image]
        overlaps = iou_with(np.asarray(box, np.float64), gt_boxes) if len(gt_boxes) else []
        best = int(np.argmax(overlaps)) if len(overlaps) else -1
        if best < 0 or overlaps[best] < iou_threshold:
            is_tp.append(False)
        elif difficult[best]:
            continue
        elif matched[image][best]:
            is_tp.append(False)
        else:
            matched[image][best] = True
            is_tp.append(True)
    num_positives = int(sum(np.count_nonzero(~d) for _, d in ground_truth))
    return np.asarray(is_tp, bool), num_positives


def class_ap(detections, ground_truth, metric: str, iou_threshold: float = 0.5):
    """``(AP, num_positives)`` of one class; AP is NaN without non-difficult boxes."""
    is_tp, num_positives = match_class(detections, ground_truth, iou_threshold)
    if num_positives == 0:
        return float("nan"), 0
    tp = np.cumsum(is_tp)
    fp = np.cumsum(~is_tp)
    recall = tp / num_positives
    precision = tp / np.maximum(tp + fp, 1)
    return average_precision(recall, precision, metric), num_positives


def evaluate(detections: Sequence[dict], ground_truths: Sequence[dict], num_classes: int,
             metric: str = "11-point", iou_threshold: float = 0.5) -> dict:
    """VOC AP per class and their mean over the classes with ground truth.

    detections[i]: ``boxes (n, 4)``, ``scores (n,)``, ``labels (n,)`` of image i;
    ground_truths[i]: ``boxes (m, 4)``, ``labels (m,)``, ``difficult (m,)``; labels in
    ``[0, num_classes)``. Returns ``{"ap": [...], "num_positives": [...], "map": float}``.
    """
    check_ap_metric(metric)
    if len(detections) != len(ground_truths):
        raise ValueError(f"{len(detections)} images of detections but {len(ground_truths)} "
                         "of ground truth")
    aps, positives = [], []
    for label in range(num_classes):
        class_detections = [
            (image, float(score), box)
            for image, found in enumerate(detections)
            for box, score, l in zip(found["boxes"], found["scores"], found["labels"])
            if l == label]
        class_truth = [_class_ground_truth(gt, label) for gt in ground_truths]
        ap, count = class_ap(class_detections, class_truth, metric, iou_threshold)
        aps.append(ap)
        positives.append(count)
    scored = [ap for ap in aps if not np.isnan(ap)]
    return {"ap": aps, "num_positives": positives,
            "map": float(np.mean(scored)) if scored else float("nan"), "metric": metric}


def _class_ground_truth(gt, label):
    """``(boxes, difficult)`` of one image's ground truth of one class."""
    of_class = np.asarray(gt["labels"]) == label
    return (np.asarray(gt["boxes"], np.float64).reshape(-1, 4)[of_class],
            np.asarray(gt["difficult"], bool)[of_class])


def ap_table(result: dict, class_names: Sequence[str]) -> str:
    """Markdown table: one row per class (AP in percent, its ground-truth count), then mAP."""
    if len(class_names) != len(result["ap"]):
        raise ValueError(f"{len(class_names)} class names for {len(result['ap'])} classes")
    lines = [f"| class | ground truth | AP ({result['metric']}, IoU 0.5) |", "|---|---:|---:|"]
    for name, ap, count in zip(class_names, result["ap"], result["num_positives"]):
        lines.append(f"| {name} | {count} | {'-' if np.isnan(ap) else f'{100 * ap:.1f}'} |")
    lines.append(f"| **mAP** | {sum(result['num_positives'])} | **{100 * result['map']:.1f}** |")
    return "\n".join(lines)
