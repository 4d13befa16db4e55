"""Flax NNX modules: the conv/adder layer, BatchNorm with statistics modes, ResNets."""

from awn_jax.nn.batchnorm import BN_MODES, BatchNorm, set_bn_mode
from awn_jax.nn.layers import LAYER_TYPES, AWNParam, Conv2d
from awn_jax.nn.resnet import (ARCHITECTURES, HEADS, SHORTCUTS, BasicBlock, Bottleneck,
                               Projection, ResNet, ZeroPadShortcut, create_model)

__all__ = ["ARCHITECTURES", "AWNParam", "BN_MODES", "BasicBlock", "BatchNorm", "Bottleneck",
           "Conv2d", "HEADS", "LAYER_TYPES", "Projection", "ResNet", "SHORTCUTS",
           "ZeroPadShortcut", "create_model", "set_bn_mode"]
