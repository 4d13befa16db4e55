"""ResNet-20 AdderNet (ANN) on CIFAR-10, official AdderNet recipe."""

from configs import default


def get_config():
    config = default.get_config()
    config.layer_type = "adder"
    config.workdir = "workdirs/cifar10_r20_ann"
    return config
