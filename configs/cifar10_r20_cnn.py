"""ResNet-20 CNN on CIFAR-10: the multiplying baseline, official AdderNet recipe."""

from awn_jax.config import paper_config


def get_config():
    return paper_config("conv")
