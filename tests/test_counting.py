"""#Mul / #Add / energy counting against hand-derived numbers and the paper's Table 1."""

import functools

import chex
import numpy as np
import pytest
from flax import nnx

from awn_jax.nn import BasicBlock, BatchNorm, Conv2d, ResNet
from awn_jax.nn.counting import (ADD_ENERGY_PJ, MUL_ENERGY_PJ, count_architecture, count_model,
                                 format_table, layer_cost)

count = functools.cache(count_architecture)

# Multiply-accumulate terms (k*k*cin*cout*Ho*Wo) of the CIFAR ResNets, n blocks per stage:
STEM = 3 * 3 * 3 * 16 * 32 * 32            # 442_368
CLASSIFIER = 64 * 10                        # 640
FULL_3X3 = 3 * 3 * 16 * 16 * 32 * 32       # 2_359_296, the same for every non-strided layer
STRIDED_3X3 = 3 * 3 * 16 * 32 * 16 * 16    # 1_179_648 (stages 2 and 3 alike)
SHORTCUT = 16 * 32 * 16 * 16               # 131_072 (stages 2 and 3 alike)


def _block_terms(n):
    """All layers in the blocks: 3 stages x 2n layers, two of them strided, 2 shortcuts."""
    return (3 * 2 * n - 2) * FULL_3X3 + 2 * STRIDED_3X3 + 2 * SHORTCUT


@pytest.mark.parametrize("name,n,expected", [
    ("resnet20", 3, 40_813_184),
    ("resnet32", 5, 69_124_736),
    ("resnet56", 9, 125_747_840),
])
def test_cnn_counts(name, n, expected):
    cost = count(name, "conv")
    assert cost.mul == cost.add == expected == STEM + _block_terms(n) + CLASSIFIER


def test_resnet32_cnn_reproduces_the_paper():
    assert round(count("resnet32", "conv").mul / 1e6, 2) == 69.12  # Table 1


@pytest.mark.parametrize("name,n", [("resnet20", 3), ("resnet32", 5), ("resnet56", 9)])
def test_ann_counts(name, n):
    """Only stem and classifier multiply; an adder term is a subtraction and an addition."""
    cost = count(name, "adder")
    assert cost.mul == STEM + CLASSIFIER == 443_008
    assert cost.add == STEM + CLASSIFIER + 2 * _block_terms(n)


@pytest.mark.parametrize("layer_type", ["adder-ws", "adder-awn"])
def test_weight_normalization_is_free_at_inference(layer_type):
    """WS/AWN transform the kernel, not the images: folded in after training."""
    def ops(cost):
        return [(layer.name, layer.mul, layer.add) for layer in cost.layers]

    assert ops(count("resnet20", layer_type)) == ops(count("resnet20", "adder"))


def test_ann_numbers_next_to_the_paper():
    # Table 1 gives 0.45M and 137.79M for ResNet-32; see the README for the differences.
    assert round(count("resnet20", "adder").add / 1e6, 2) == 81.18
    assert round(count("resnet32", "adder").add / 1e6, 2) == 137.81


def test_energy():
    cnn, ann = count("resnet20", "conv"), count("resnet20", "adder")
    np.testing.assert_allclose(cnn.energy_pj, 40_813_184 * (MUL_ENERGY_PJ + ADD_ENERGY_PJ))
    np.testing.assert_allclose(ann.energy_pj, 443_008 * MUL_ENERGY_PJ + 81_183_360 * ADD_ENERGY_PJ)
    assert cnn.energy_pj / ann.energy_pj > 2.5


def test_layers_in_execution_order():
    layers = count("resnet20", "adder").layers
    assert len(layers) == 1 + 18 + 2 + 1
    assert (layers[0].name, layers[0].mul, layers[0].output_hw) == ("stem_conv", STEM, (32, 32))
    assert (layers[-1].name, layers[-1].mul, layers[-1].output_hw) == ("classifier", CLASSIFIER,
                                                                      (1, 1))
    assert [layer.output_hw[0] for layer in layers[1:-1]] == [32] * 6 + [16] * 7 + [8] * 7
    shortcut = next(layer for layer in layers if layer.name == "stages.1.0.shortcut.conv")
    assert shortcut.add == 2 * SHORTCUT


def test_counts_scale_with_the_image_area():
    # every layer but the classifier, which sees the globally pooled features
    expected = 4 * (40_813_184 - CLASSIFIER) + CLASSIFIER
    assert count_architecture("resnet20", "conv", image_size=64).mul == expected


@pytest.mark.parametrize("name,cnn_mul,ann_mul,ann_add", [
    # AdderNet (Chen et al. 2020), ImageNet at 224x224, in G: R18 1.8 / 0.1 / 3.5;
    # R50 4.1 / 0.1 / 7.7 (the last not reproduced by this convention: 8.1).
    ("resnet18", 1.8, 0.1, 3.5),
    ("resnet50", 4.1, 0.1, 8.1),
])
def test_imagenet_counts(name, cnn_mul, ann_mul, ann_add):
    cnn = count(name, "conv", num_classes=1000, image_size=224)
    ann = count(name, "adder", num_classes=1000, image_size=224)
    assert round(cnn.mul / 1e9, 1) == cnn_mul
    assert round(ann.mul / 1e9, 1) == ann_mul
    assert round(ann.add / 1e9, 1) == ann_add


def _bn_modes(model):
    return [m.mode for _, m in nnx.iter_graph(model) if isinstance(m, BatchNorm)]


def test_count_model_leaves_the_model_untouched():
    model = ResNet(BasicBlock, (1, 1), (4, 4), imagenet_stem=False, num_classes=3,
                   layer_type="adder", mean=(0.5,) * 3, std=(0.25,) * 3, rngs=nnx.Rngs(0))
    state_before = nnx.to_pure_dict(nnx.state(model))
    modes_before = _bn_modes(model)
    cost = count_model(model, image_size=8)
    # stem 3x3x3x4 at 8x8; two 3x3x4x4 at 8x8, two at 4x4 (one strided), 1x1x4x4 at 4x4
    assert cost.mul == 3 * 3 * 3 * 4 * 64 + 4 * 3
    assert cost.add == cost.mul + 2 * (2 * 3 * 3 * 4 * 4 * 64 + 2 * 3 * 3 * 4 * 4 * 16
                                       + 4 * 4 * 16)
    chex.assert_trees_all_equal(nnx.to_pure_dict(nnx.state(model)), state_before)
    assert _bn_modes(model) == modes_before


def test_layer_cost_of_a_single_layer():
    layer = nnx.eval_shape(lambda: Conv2d(8, 16, 3, layer_type="adder-awn", rngs=nnx.Rngs(0)))
    cost = layer_cost(layer, (5, 5), "l")
    assert (cost.mul, cost.add) == (0, 2 * 3 * 3 * 8 * 16 * 25)


def test_format_table():
    cost = count("resnet20", "adder-awn")
    table = format_table(cost)
    lines = table.splitlines()
    assert len(lines) == len(cost.layers) + 4
    assert lines[2].startswith("stem_conv") and lines[-3].startswith("classifier")
    assert lines[-1].split()[:3] == ["total", "0.44", "81.18"]
