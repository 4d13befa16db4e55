"""ResNet-20 CNN on CIFAR-100, with the CIFAR-10 recipe."""

from configs import default


def get_config():
    config = default.get_config()
    config.dataset = "cifar100"
    config.normalization = "cifar100"
    config.layer_type = "conv"
    config.workdir = "workdirs/cifar100_r20_cnn"
    return config
