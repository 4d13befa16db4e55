"""Faster R-CNN + FPN, ResNet-18 ANN-AWN, on PASCAL VOC: the paper's Sec. 5.3 recipe.

The detection trainer reads these keys (``task = "detection"`` sends ``train.py`` to it);
names shared with configs/default.py keep their meaning there. The paper: train on VOC
2007 + 2012 trainval, test on VOC 2007 test, mAP at IoU 0.5; SGD lr 0.008 with 500
iterations of linear warmup, momentum 0.9, weight decay 1e-4, cosine decay, 12 epochs,
batch 4; BatchNorm trained. Input size and the Faster R-CNN settings it does not state
are MMDetection's defaults for VOC (which Chen et al., NeurIPS 2021, whose neck it
follows, used): shorter side 600, longer at most 1000; RPN and RoI sampling as in
Faster R-CNN + FPN. docs/DETECTION.md describes the model.
"""

import ml_collections


def get_config():
    config = ml_collections.ConfigDict()
    config.task = "detection"
    config.seed = 0
    config.workdir = "workdirs/voc_frcnn_default"

    # Data: voc (TFDS voc/2007 + voc/2012) | synthetic (shapes on textured backgrounds).
    config.dataset = "voc"
    config.data_dir = ""                # TFDS data_dir
    config.image_size = 1024            # side of the square canvas images are padded to
    config.min_size = 600               # resize: shorter side to min_size ...
    config.max_size = 1000              # ... unless the longer side would exceed max_size
    config.random_flip = True
    config.max_boxes = 64               # boxes per image, padded (VOC has at most 56)
    config.num_train_examples = 0       # >0: train on a fixed random subset
    config.num_test_examples = 0        # >0: evaluate on the first N test images
    config.synthetic_num_train = 512
    config.synthetic_num_test = 128
    config.synthetic_num_classes = 3
    config.synthetic_max_objects = 3

    # Model: ImageNet ResNet-18 backbone (C2-C5), FPN neck (P2-P6), RPN, two-FC box head.
    config.model = "resnet18"
    config.layer_type = "adder-awn"     # of the backbone and the neck: conv | adder | adder-ws | adder-awn
    config.eta = 0.2                    # adaptive gradient scaling of adder layers (<=0: off)
    config.weight_norm_eps = 1e-5
    config.compute_dtype = "float32"
    config.backbone_workdir = ""        # classification workdir to start the backbone from; "": random init
    config.fpn_channels = 256
    config.neck_shortcuts = True        # identity shortcut around each 3x3 neck layer (Chen et al.)
    config.anchor_scale = 8.0           # anchor side = scale * stride: 32..512 px on P2..P6
    config.anchor_ratios = (0.5, 1.0, 2.0)
    config.rpn_positive_iou = 0.7
    config.rpn_negative_iou = 0.3
    config.rpn_batch_size_per_image = 256
    config.rpn_positive_fraction = 0.5
    config.rpn_pre_nms_topk_train = 2000  # per level
    config.rpn_post_nms_topk_train = 1000
    config.rpn_pre_nms_topk_test = 1000
    config.rpn_post_nms_topk_test = 1000
    config.rpn_nms_threshold = 0.7
    config.roi_positive_iou = 0.5
    config.roi_batch_size_per_image = 512
    config.roi_positive_fraction = 0.25
    config.roi_pool_size = 7
    config.roi_sampling_ratio = 2
    config.box_head_dim = 1024
    config.test_score_threshold = 0.05
    config.test_nms_threshold = 0.5
    config.test_candidates_per_class = 100  # best boxes per class that enter its NMS
    config.test_detections_per_image = 100

    # Optimization (the paper's recipe).
    config.batch_size = 4               # global batch, split over devices
    config.num_devices = 0
    config.num_epochs = 12
    config.learning_rate = 0.008
    config.lr_schedule = "cosine-epoch"  # cosine-epoch | cosine-step | constant
    config.warmup_steps = 500           # linear warmup, in iterations
    config.momentum = 0.9
    config.nesterov = False
    config.weight_decay = 1e-4
    config.awn_lr_multiplier = 1e-5

    # Evaluation and bookkeeping.
    config.eval_batch_size = 8          # divides the 4,952 VOC 2007 test images
    config.eval_bn_mode = "tracked"
    config.eval_every_epochs = 4        # and after the last epoch
    config.ap_metric = "11-point"       # 11-point (VOC2007 devkit) | all-point
    config.max_checkpoints_to_keep = 3
    config.log_every_steps = 50
    return config
