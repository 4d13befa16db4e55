"""ResNet-32 AdderNet (ANN) on CIFAR-10, official AdderNet recipe."""

from configs import default


def get_config():
    config = default.get_config()
    config.model = "resnet32"
    config.layer_type = "adder"
    config.workdir = "workdirs/cifar10_r32_ann"
    return config
