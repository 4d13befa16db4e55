"""Default hyper-parameters: the official AdderNet CIFAR-10 recipe, ResNet-20 ANN-AWN.

The keys, their values and meanings are in ``awn_jax/config.py`` (``default_config``), where
the library's reproduction campaign builds its runs from them too.
"""

from awn_jax.config import default_config


def get_config():
    return default_config()
