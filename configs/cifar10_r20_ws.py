"""ResNet-20 AdderNet with weight standardization (ANN-WS) on CIFAR-10, as the paper's ablation."""

from configs import default


def get_config():
    config = default.get_config()
    config.layer_type = "adder-ws"
    config.workdir = "workdirs/cifar10_r20_ws"
    return config
