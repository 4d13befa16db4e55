"""Backbone (the project's ImageNet ResNet-18, C2-C5) and FPN neck (P2-P6).

The neck is FPN (Lin et al., CVPR 2017): a 1x1 lateral layer per backbone stage, a
top-down path adding each coarser map (nearest-upsampled 2x) to the next finer lateral,
a 3x3 output layer per level, and P6 as P5 subsampled by 2 (a stride-2 max pool of size
1), the Faster R-CNN variant. Its lateral and output layers are :class:`Conv2d` of the
backbone's layer type, so an ANN detector adds in its neck too (the paper: "replaces the
convolution layers with adder layers in the pretrained ResNet-18 backbone and neck").

Two choices of this implementation, both documented in docs/DETECTION.md:

* Shortcuts (the paper: "following [Chen et al., NeurIPS 2021], we insert more shortcuts
  in the neck part"). Chen et al. add "residual connections for each 3x3 adder filter"
  of their neck, since identity mapping is hard for adder layers; here that is
  ``P_l = BN(layer3x3(M_l)) + M_l`` for each merged map ``M_l`` (``neck_shortcuts``).
  Their reversed bottom-up-first neck (R-PAFPN) is a different neck, not FPN, and is
  not built: Table 2 names the detectors "-FPN".
* Normalization: each neck layer is followed by a BatchNorm, in every variant. An adder
  layer's output is ``-sum |x - w|``, all negative and growing with the fan-in; it needs
  a normalization after it, as everywhere in AdderNets, and giving the multiplying neck
  the same BatchNorms keeps the variants identical but for the layer type. The BatchNorm
  also stands in for the biases of FPN's convolutions.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from flax import nnx

from awn_jax.errors import UserError
from awn_jax.nn.batchnorm import BatchNorm
from awn_jax.nn.layers import Conv2d
from awn_jax.nn.resnet import ResNet, stem


class Backbone(nnx.Module):
    """The stem and stages of an ImageNet ResNet, returning every stage's output (C2-C5).

    It takes over the modules of ``resnet`` (random or trained); the classifier is left
    behind. Parameter paths (``stem_conv``, ``stages.0.1.conv2`` ...) are those of the
    classification model, so its checkpoints map one to one.
    """

    def __init__(self, resnet: ResNet):
        if not resnet.imagenet_stem:
            raise UserError("the detection backbone needs an ImageNet ResNet (resnet18 or "
                            "resnet50): its stem reduces by 4 before C2")
        self.mean, self.std = resnet.mean, resnet.std
        self.stem_conv, self.stem_bn, self.stages = resnet.stem_conv, resnet.stem_bn, resnet.stages
        self.out_channels = tuple(stage[-1].expansion * stage[-1].bn1.num_features
                                  for stage in resnet.stages)

    def __call__(self, images):
        x = stem(images, self.mean, self.std, self.stem_conv, self.stem_bn, max_pool=True)
        outputs = []
        for stage in self.stages:
            for block in stage:
                x = block(x)
            outputs.append(x)
        return outputs


class NeckLayer(nnx.Module):
    """A neck layer of the model's type followed by BatchNorm."""

    def __init__(self, in_features, out_features, kernel_size, make_layer):
        self.conv = make_layer(in_features, out_features, kernel_size)
        self.bn = BatchNorm(out_features)

    def __call__(self, x):
        return self.bn(self.conv(x))


def _upsample2(x):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class FPN(nnx.Module):
    """C2-C5 -> P2-P6, all ``channels`` wide (see the module docstring)."""

    def __init__(self, in_channels, channels: int, *, layer_type: str, shortcuts: bool,
                 eta=0.2, eps=1e-5, compute_dtype=jnp.float32, rngs: nnx.Rngs):
        make_layer = functools.partial(Conv2d, layer_type=layer_type, eta=eta, eps=eps,
                                       compute_dtype=compute_dtype, rngs=rngs)
        self.shortcuts = shortcuts
        self.lateral = nnx.List([NeckLayer(c, channels, 1, make_layer) for c in in_channels])
        self.output = nnx.List([NeckLayer(channels, channels, 3, make_layer)
                                for _ in in_channels])

    def __call__(self, features):
        merged = [None] * len(features)
        top = None
        for level in reversed(range(len(features))):
            lateral = self.lateral[level](features[level])
            top = lateral if top is None else lateral + _upsample2(top)
            merged[level] = top
        pyramid = []
        for layer, m in zip(self.output, merged):
            p = layer(m)
            pyramid.append(p + m if self.shortcuts else p)
        pyramid.append(pyramid[-1][:, ::2, ::2])  # P6
        return pyramid
