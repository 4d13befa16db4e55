"""ResNet-18 CNN on ImageNet (see imagenet_common.py for the recipe)."""

from configs import imagenet_common


def get_config():
    return imagenet_common.resnet18_config("conv", workdir="workdirs/imagenet_r18_cnn")
