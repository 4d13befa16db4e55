"""ResNet-20 AdderNet with weight standardization (ANN-WS) on CIFAR-10, as the paper's ablation."""

from awn_jax.config import paper_config


def get_config():
    return paper_config("adder-ws")
