"""ResNet-18 AdderNet with weight standardization (ANN-WS) on ImageNet (see
imagenet_common.py for the recipe); the backbone of the paper's ANN-WS-FPN detector."""

from configs import imagenet_common


def get_config():
    return imagenet_common.resnet18_config("adder-ws", workdir="workdirs/imagenet_r18_ws")
