"""ResNet-32 AdderNet with adaptive weight normalization (ANN-AWN) on CIFAR-10."""

from configs import default


def get_config():
    config = default.get_config()
    config.model = "resnet32"
    config.layer_type = "adder-awn"
    config.workdir = "workdirs/cifar10_r32_awn"
    return config
