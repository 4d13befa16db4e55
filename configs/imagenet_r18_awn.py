"""ResNet-18 AdderNet with AWN on ImageNet (see imagenet_common.py for the recipe)."""

from configs import imagenet_common


def get_config():
    return imagenet_common.resnet18_config("adder-awn", workdir="workdirs/imagenet_r18_awn")
