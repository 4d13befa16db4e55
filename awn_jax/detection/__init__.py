"""Faster R-CNN + FPN with adder backbones and necks (the paper's Sec. 5.3, Table 2).

Geometry (``boxes``, ``anchors``, ``nms``, ``roi_align``), VOC mAP (``voc_eval``), data,
model and training live in their own modules; docs/DETECTION.md describes the design.
"""
