"""A CPU-minutes detection run: synthetic shapes at 64x64, ResNet-18 ANN-AWN + FPN.

The VOC recipe (voc_frcnn_default.py) shrunk to what a CPU trains in minutes: a 64-pixel
canvas (C2..C5 of 16..2 cells), a 64-wide neck, anchors of 16..256 px, fewer proposals
and samples, a smaller box head, and a learning rate for training from scratch.
"""

from configs import voc_frcnn_default


def get_config():
    config = voc_frcnn_default.get_config()
    config.dataset = "synthetic"
    config.synthetic_num_train = 512
    config.synthetic_num_test = 128
    config.synthetic_num_classes = 3
    config.synthetic_max_objects = 3
    config.image_size = 64
    config.min_size = 64
    config.max_size = 64
    config.max_boxes = 4
    config.fpn_channels = 64
    config.anchor_scale = 4.0
    config.rpn_batch_size_per_image = 64
    config.rpn_pre_nms_topk_train = 200
    config.rpn_post_nms_topk_train = 100
    config.rpn_pre_nms_topk_test = 200
    config.rpn_post_nms_topk_test = 100
    config.roi_batch_size_per_image = 64
    config.box_head_dim = 256
    config.test_candidates_per_class = 50
    config.test_detections_per_image = 20
    config.batch_size = 8
    config.num_epochs = 4
    config.learning_rate = 0.02
    config.warmup_steps = 50
    config.eval_batch_size = 32
    config.eval_every_epochs = 1
    config.log_every_steps = 8
    config.workdir = "workdirs/voc_frcnn_smoke"
    return config
