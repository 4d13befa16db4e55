"""ResNet-20 AdderNet (ANN) on CIFAR-10, official AdderNet recipe."""

from awn_jax.config import paper_config


def get_config():
    return paper_config("adder")
