"""ResNet-20 AdderNet with AWN on CIFAR-100, with the CIFAR-10 recipe."""

from configs import default


def get_config():
    config = default.get_config()
    config.dataset = "cifar100"
    config.normalization = "cifar100"
    config.layer_type = "adder-awn"
    config.workdir = "workdirs/cifar100_r20_awn"
    return config
