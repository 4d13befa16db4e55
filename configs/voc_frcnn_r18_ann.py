"""Faster R-CNN + FPN, ResNet-18 backbone and neck of layer type adder, on VOC (Table 2).

Set --config.backbone_workdir to the finished configs/imagenet_r18_ann.py run to start from
its ImageNet weights, as the paper does; without it the backbone starts at random.
"""

from configs import voc_frcnn_default


def get_config():
    config = voc_frcnn_default.get_config()
    config.layer_type = "adder"
    config.workdir = "workdirs/voc_frcnn_r18_ann"
    return config
