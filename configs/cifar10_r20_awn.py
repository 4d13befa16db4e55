"""ResNet-20 AdderNet with adaptive weight normalization (ANN-AWN) on CIFAR-10."""

from awn_jax.config import paper_config


def get_config():
    return paper_config("adder-awn")
