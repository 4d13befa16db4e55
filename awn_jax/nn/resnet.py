"""ResNets of the official AdderNet code, with the layer type as one switch.

CIFAR (``resnet20.py``): 3x3 stem 3->16, three stages of BasicBlocks, widths 16/32/64.
ImageNet (``resnet50.py``; ResNet-18 uses the same frame with BasicBlocks): 7x7/2 stem
3->64 and a 3x3/2 max pool, four stages, widths 64/128/256/512, the stride of a
Bottleneck on its 3x3 layer. In both, the stem and the classifier are ordinary
(multiplying) convolutions; every layer inside the blocks, the 1x1 projection shortcuts
included, has the model's ``layer_type``. Multiplying kernels start as the official
models' do: PyTorch's default uniform init in the CIFAR ResNets (``resnet20.py`` sets
none), Kaiming-normal (fan_out) in the ImageNet ones (``resnet50.py``). The head is a
global average pool, a 1x1 convolution without bias and a BatchNorm, as in the official code
(``head="conv-bn"``); the public CIFAR ResNet CNNs this project imports use a linear layer
with bias and the parameter-free "option A" shortcut instead (``head="linear"``,
``shortcut="option-a"``). Two documented differences from it, neither changing the
function: the official ImageNet classifier has a bias, which the BatchNorm after it
cancels, so it is left out (the converter folds it into the running mean); its fixed-size
average pools (8 on CIFAR) are written as a global mean, so small test inputs work.

The model takes images in [0, 1] (NHWC) and normalizes them itself, so attacks work in
pixel space; it returns float32 logits of shape (N, num_classes).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax.numpy as jnp
from flax import nnx

from awn_jax.errors import UserError
from awn_jax.nn.batchnorm import BatchNorm
from awn_jax.nn.layers import Conv2d, check_layer_type

MakeLayer = Callable[..., Conv2d]  # (in_features, out_features, kernel_size, stride=1)


class Projection(nnx.Module):
    """Shortcut used where a block changes the shape: strided 1x1 layer + BatchNorm."""

    def __init__(self, in_features: int, out_features: int, stride: int,
                 make_layer: MakeLayer):
        self.conv = make_layer(in_features, out_features, 1, stride)
        self.bn = BatchNorm(out_features)

    def __call__(self, x):
        return self.bn(self.conv(x))


class ZeroPadShortcut(nnx.Module):
    """The parameter-free "option A" shortcut of He et al.'s CIFAR ResNets (as in the
    public ``pytorch_resnet_cifar10``): every second pixel, and the channels zero-padded
    by ``out_features // 4`` on each side (from 16 to 32 and 32 to 64)."""

    def __init__(self, in_features: int, out_features: int, stride: int):
        pad = out_features // 4
        if in_features + 2 * pad != out_features:
            raise ValueError(f"option-A shortcut: {in_features} channels padded by {pad} on "
                             f"each side do not make {out_features}")
        self.stride, self.pad = stride, pad

    def __call__(self, x):
        x = x[:, ::self.stride, ::self.stride, :]
        return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (self.pad, self.pad)))


SHORTCUTS = ("projection", "option-a")
"""Where a block changes the shape: ``projection`` (a strided 1x1 layer of the model's type
+ BatchNorm, the official AdderNet) or ``option-a`` (:class:`ZeroPadShortcut`)."""


def _shortcut(in_features, out_features, stride, make_layer, kind="projection"):
    """Identity (``None``) when the shape is kept, else the ``kind`` of :data:`SHORTCUTS`."""
    if stride == 1 and in_features == out_features:
        return None
    if kind == "option-a":
        return ZeroPadShortcut(in_features, out_features, stride)
    return Projection(in_features, out_features, stride, make_layer)


class BasicBlock(nnx.Module):
    """Two 3x3 layers, each with BatchNorm, plus the shortcut (ResNet-18/20/32/56)."""

    expansion = 1

    def __init__(self, in_features: int, features: int, stride: int, make_layer: MakeLayer,
                 shortcut: str = "projection"):
        self.conv1 = make_layer(in_features, features, 3, stride)
        self.bn1 = BatchNorm(features)
        self.conv2 = make_layer(features, features, 3)
        self.bn2 = BatchNorm(features)
        self.shortcut = _shortcut(in_features, features, stride, make_layer, shortcut)

    def __call__(self, x):
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        residual = x if self.shortcut is None else self.shortcut(x)
        return nnx.relu(y + residual)


class Bottleneck(nnx.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4, each with BatchNorm (ResNet-50)."""

    expansion = 4

    def __init__(self, in_features: int, features: int, stride: int, make_layer: MakeLayer,
                 shortcut: str = "projection"):
        out_features = features * self.expansion
        self.conv1 = make_layer(in_features, features, 1)
        self.bn1 = BatchNorm(features)
        self.conv2 = make_layer(features, features, 3, stride)
        self.bn2 = BatchNorm(features)
        self.conv3 = make_layer(features, out_features, 1)
        self.bn3 = BatchNorm(out_features)
        self.shortcut = _shortcut(in_features, out_features, stride, make_layer, shortcut)

    def __call__(self, x):
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = nnx.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        residual = x if self.shortcut is None else self.shortcut(x)
        return nnx.relu(y + residual)


def stem(images, mean, std, conv, bn, *, max_pool: bool):
    """Normalize [0, 1] images, then convolution, BatchNorm, ReLU and (ImageNet stems) a 3x3/2
    max pool: the ResNet's stem, shared with the detection backbone (``detection.fpn``)."""
    x = (images.astype(jnp.float32) - jnp.asarray(mean)) / jnp.asarray(std)
    x = nnx.relu(bn(conv(x)))
    if max_pool:
        x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    return x


class ResNet(nnx.Module):
    """Stem, stages of residual blocks (stride 2 from the second stage on), head.

    Args:
      block: :class:`BasicBlock` or :class:`Bottleneck`.
      stage_sizes: blocks per stage.
      stage_widths: block width (before expansion) per stage.
      imagenet_stem: 7x7/2 convolution and 3x3/2 max pool instead of a 3x3 convolution.
      num_classes: number of logits.
      layer_type: type of the layers inside the blocks (see ``LAYER_TYPES``).
      mean, std: per-channel input normalization of [0, 1] images.
      eta, eps, compute_dtype: passed to every :class:`Conv2d`.
      conv_init: initializer of the multiplying kernels (``layers.CONV_INITS``); ``None``:
        the official one (``torch-default`` for CIFAR ResNets, ``kaiming-normal`` for
        ImageNet ones).
      shortcut: one of :data:`SHORTCUTS`.
      head: one of :data:`HEADS`.
      rngs: random streams for the kernels.
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], stage_sizes: Sequence[int],
                 stage_widths: Sequence[int], *, imagenet_stem: bool, num_classes: int,
                 layer_type: str, mean: Sequence[float], std: Sequence[float],
                 eta: float | None = 0.2, eps: float = 1e-5, compute_dtype=jnp.float32,
                 conv_init: str | None = None, shortcut: str = "projection",
                 head: str = "conv-bn", rngs: nnx.Rngs):
        check_layer_type(layer_type)
        if shortcut not in SHORTCUTS:
            raise UserError(f"unknown shortcut {shortcut!r}; expected one of {SHORTCUTS}")
        if head not in HEADS:
            raise UserError(f"unknown head {head!r}; expected one of {HEADS}")
        if conv_init is None:
            conv_init = "kaiming-normal" if imagenet_stem else "torch-default"
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need one value per RGB channel, got {mean}, {std}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.imagenet_stem = imagenet_stem

        conv = functools.partial(Conv2d, layer_type="conv", compute_dtype=compute_dtype,
                                 conv_init=conv_init, rngs=rngs)
        make_layer = functools.partial(Conv2d, layer_type=layer_type, eta=eta, eps=eps,
                                       compute_dtype=compute_dtype, conv_init=conv_init,
                                       rngs=rngs)

        if imagenet_stem:
            self.stem_conv = conv(3, stage_widths[0], 7, stride=2)
        else:
            self.stem_conv = conv(3, stage_widths[0], 3)
        self.stem_bn = BatchNorm(stage_widths[0])

        in_features = stage_widths[0]
        stages = []
        for index, (size, width) in enumerate(zip(stage_sizes, stage_widths)):
            blocks = []
            for block_index in range(size):
                stride = 2 if index > 0 and block_index == 0 else 1
                blocks.append(block(in_features, width, stride, make_layer, shortcut))
                in_features = width * block.expansion
            stages.append(nnx.List(blocks))
        self.stages = nnx.List(stages)

        self.classifier = conv(in_features, num_classes, 1)
        if head == "conv-bn":
            self.classifier_bn = BatchNorm(num_classes)
        else:
            self.classifier_bias = nnx.Param(jnp.zeros((num_classes,), jnp.float32))
        self.head = head

    def __call__(self, images):
        x = images
        for segment in self.segments():
            x = segment(x)
        return x

    def segments(self) -> list[Callable]:
        """The forward as a chain of functions of one array each: the stem, every block, the
        head. Re-estimating BN statistics layer by layer keeps the activations between them
        (:mod:`awn_jax.bn_statistics`), so it need not run the forward from the images for
        every layer."""
        return [self._stem, *(block for stage in self.stages for block in stage), self._head]

    def _stem(self, images):
        return stem(images, self.mean, self.std, self.stem_conv, self.stem_bn,
                    max_pool=self.imagenet_stem)

    def _head(self, x):
        x = self.classifier(jnp.mean(x, axis=(1, 2), keepdims=True))
        x = self.classifier_bn(x) if self.head == "conv-bn" else x + self.classifier_bias[...]
        return x.reshape(x.shape[0], -1).astype(jnp.float32)


HEADS = ("conv-bn", "linear")
"""After the global average pool: ``conv-bn`` (a 1x1 multiplying convolution without bias and
a BatchNorm over the logits, the official AdderNet) or ``linear`` (the same convolution with
a bias and no BatchNorm: a linear layer, as in the public CIFAR ResNet CNNs)."""

# name -> (block, blocks per stage, stage widths, ImageNet stem)
ARCHITECTURES = {
    "resnet20": (BasicBlock, (3, 3, 3), (16, 32, 64), False),
    "resnet32": (BasicBlock, (5, 5, 5), (16, 32, 64), False),
    "resnet56": (BasicBlock, (9, 9, 9), (16, 32, 64), False),
    "resnet18": (BasicBlock, (2, 2, 2, 2), (64, 128, 256, 512), True),
    "resnet50": (Bottleneck, (3, 4, 6, 3), (64, 128, 256, 512), True),
}


def create_model(name: str, *, num_classes: int, layer_type: str, mean: Sequence[float],
                 std: Sequence[float], eta: float | None = 0.2, eps: float = 1e-5,
                 compute_dtype=jnp.float32, shortcut: str = "projection",
                 head: str = "conv-bn", rngs: nnx.Rngs) -> ResNet:
    """Build one of :data:`ARCHITECTURES` by name."""
    if name not in ARCHITECTURES:
        raise UserError(f"unknown model {name!r}; expected one of {tuple(ARCHITECTURES)}")
    block, stage_sizes, stage_widths, imagenet_stem = ARCHITECTURES[name]
    return ResNet(block, stage_sizes, stage_widths, imagenet_stem=imagenet_stem,
                  num_classes=num_classes, layer_type=layer_type, mean=mean, std=std,
                  eta=eta, eps=eps, compute_dtype=compute_dtype, shortcut=shortcut,
                  head=head, rngs=rngs)
