"""ResNet-20 CNN on CIFAR-10: the multiplying baseline, official AdderNet recipe."""

from configs import default


def get_config():
    config = default.get_config()
    config.layer_type = "conv"
    config.workdir = "workdirs/cifar10_r20_cnn"
    return config
