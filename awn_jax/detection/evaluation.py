"""VOC mAP of a detector over a dataset's test split: run the compiled detection step on
every test batch, map the detections back to the original images, score them with
:mod:`awn_jax.detection.voc_eval`, and write the per-class table."""

from __future__ import annotations

import jax
import numpy as np

from awn_jax import reports
from awn_jax.detection import voc_eval


def to_original_image(detections: dict, truths) -> list[dict]:
    """The valid detections of the batch's real examples (the first ``len(truths)``), in
    the original images' pixels (``truth["scale_xy"]``: resized / original)."""
    images = []
    for i, truth in enumerate(truths):
        valid = detections["valid"][i]
        images.append({"boxes": detections["boxes"][i][valid] / np.tile(truth["scale_xy"], 2),
                       "scores": detections["scores"][i][valid],
                       "labels": detections["labels"][i][valid]})
    return images


def evaluate(detect, dataset, batch_size: int, *, metric: str, num_examples: int = 0,
             to_device=lambda batch: batch) -> dict:
    """VOC AP of ``detect(batch) -> detections`` (a compiled step whose outputs cover the
    global batch) on the test split. ``to_device`` turns this process's host batch into
    the step's input (e.g. a sharded global batch). Returns :func:`voc_eval.evaluate`'s
    result plus ``class_names``.
    """
    voc_eval.check_ap_metric(metric)
    found, truths = [], []
    for batch, batch_truths in dataset.test_batches(batch_size, num_examples=num_examples or None,
                                                    process_index=jax.process_index(),
                                                    process_count=jax.process_count()):
        detections = jax.device_get(detect(to_device(batch)))
        found += to_original_image(detections, batch_truths)
        truths += batch_truths
    result = voc_eval.evaluate(found, truths, dataset.info.num_classes, metric)
    result["class_names"] = list(dataset.info.class_names)
    return result


def write_report(result: dict, output_dir: str, epoch: int) -> str:
    """Write ``detection_eval.json`` and ``detection_eval.md``; returns the Markdown."""
    table = voc_eval.ap_table(result, result["class_names"])
    text = f"VOC mAP after epoch {epoch}\n\n{table}\n"
    if jax.process_index() == 0:
        reports.write(output_dir, "detection_eval", dict(result, epoch=epoch), text)
    return text


# Table 2's names of the detectors by layer type of backbone and neck.
DETECTOR_NAMES = {"conv": "CNN-FPN", "adder": "ANN-FPN", "adder-ws": "ANN-WS-FPN",
                  "adder-awn": "ANN-AWN-FPN"}


def summary_table(results) -> str:
    """Table 2's layout for several runs: ``results`` of :func:`evaluate` with ``workdir``,
    ``layer_type`` and ``epoch`` added."""
    lines = ["| model | backbone and neck | run | epoch | mAP |", "|---|---|---|---:|---:|"]
    for r in results:
        lines.append(f"| {DETECTOR_NAMES.get(r['layer_type'], r['layer_type'])} | "
                     f"{r['layer_type']} | {r['workdir']} | {r['epoch']} | "
                     f"{100 * r['map']:.1f} |")
    return "\n".join(lines)
