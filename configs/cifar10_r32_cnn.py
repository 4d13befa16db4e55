"""ResNet-32 CNN on CIFAR-10, official AdderNet recipe."""

from configs import default


def get_config():
    config = default.get_config()
    config.model = "resnet32"
    config.layer_type = "conv"
    config.workdir = "workdirs/cifar10_r32_cnn"
    return config
