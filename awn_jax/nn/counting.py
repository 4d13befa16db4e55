"""Analytic #Mul / #Add and energy of a model's layers, for one image.

Counting convention, per image; as in AdderNet, only layers with kernels count:

* a multiplying convolution (the stem, the classifier and all layers of a CNN) with a
  ``k x k`` kernel, ``cin`` inputs, ``cout`` outputs and an ``Ho x Wo`` output costs
  ``k*k*cin*cout*Ho*Wo`` multiplications and as many additions (one multiply-accumulate
  per term; padded taps count like the others);
* an adder layer costs ``2*k*k*cin*cout*Ho*Wo`` additions and no multiplication: one
  subtraction and one accumulation per term (the absolute value only clears a sign bit);
* the WS/AWN transform acts on the weights, not on the images: after training it is
  folded into the kernel once, so inference pays nothing for it;
* BatchNorm, ReLU, pooling, the residual additions and the input normalization are
  not counted: they cost a few operations per activation, not per kernel term.

It gives the paper's Table 1 figure for the ResNet-32 CNN, 69.12M multiplications.

Energy uses 45 nm float32 costs (Horowitz, ISSCC 2014, as in AdderNet): a
multiplication 3.7 pJ, an addition 0.9 pJ.

Counts follow the real architecture: every :class:`~awn_jax.nn.Conv2d` call of a
shape-only forward pass (``jax.eval_shape``) is recorded with its output size, so
nothing is computed and even ImageNet models are counted in about a second.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from awn_jax.nn import Conv2d, create_model, set_bn_mode
from awn_jax.nn.layers import record_calls

MUL_ENERGY_PJ = 3.7
ADD_ENERGY_PJ = 0.9


@dataclasses.dataclass(frozen=True)
class LayerCost:
    """Operations of one layer for one image."""

    name: str
    layer_type: str
    kernel_size: int
    in_features: int
    out_features: int
    output_hw: tuple[int, int]
    mul: int
    add: int

    @property
    def energy_pj(self) -> float:
        return self.mul * MUL_ENERGY_PJ + self.add * ADD_ENERGY_PJ


@dataclasses.dataclass(frozen=True)
class ModelCost:
    """Per-layer costs of a model, in execution order, and their totals."""

    layers: tuple[LayerCost, ...]

    @property
    def mul(self) -> int:
        return sum(layer.mul for layer in self.layers)

    @property
    def add(self) -> int:
        return sum(layer.add for layer in self.layers)

    @property
    def energy_pj(self) -> float:
        return sum(layer.energy_pj for layer in self.layers)


def layer_cost(layer: Conv2d, output_hw: tuple[int, int], name: str = "") -> LayerCost:
    """Cost of one layer given its output's spatial size (see the module convention)."""
    terms = (layer.kernel_size ** 2 * layer.in_features * layer.out_features
             * output_hw[0] * output_hw[1])
    if layer.layer_type == "conv":
        mul, add = terms, terms
    else:
        mul, add = 0, 2 * terms
    return LayerCost(name, layer.layer_type, layer.kernel_size, layer.in_features,
                     layer.out_features, tuple(output_hw), mul, add)


def count_model(model: nnx.Module, image_size: int | tuple[int, int] = 32) -> ModelCost:
    """Per-layer and total cost of ``model`` (real or abstract) for one RGB image.

    Layers are listed in the order they run; one called twice is listed twice.
    """
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    graphdef, state = nnx.split(model)
    calls, paths = [], {}

    def forward(state, images):
        clone = nnx.merge(graphdef, state)  # the caller's model keeps its BN modes and stats
        set_bn_mode(clone, "tracked")
        paths.update({id(module): path for path, module in nnx.iter_graph(clone)})
        with record_calls(lambda layer, x, y: calls.append((layer, y.shape))):
            return clone(images)

    jax.eval_shape(forward, state, jax.ShapeDtypeStruct((1, *image_size, 3), jnp.float32))
    return ModelCost(tuple(
        layer_cost(layer, shape[1:3], ".".join(map(str, paths[id(layer)])))
        for layer, shape in calls))


def count_architecture(name: str, layer_type: str, *, num_classes: int = 10,
                       image_size: int | tuple[int, int] = 32, **options) -> ModelCost:
    """Cost of a named architecture (see ``awn_jax.nn.create_model``; ``options``: its
    ``shortcut`` and ``head``), built abstractly."""
    model = nnx.eval_shape(lambda: create_model(
        name, num_classes=num_classes, layer_type=layer_type, mean=(0.0,) * 3,
        std=(1.0,) * 3, rngs=nnx.Rngs(0), **options))
    return count_model(model, image_size)


def format_table(cost: ModelCost) -> str:
    """Per-layer table of ``cost`` with a total line; counts in millions, energy in uJ."""
    header = (f"{'layer':<26} {'type':<9} {'k':>2} {'cin':>5} {'cout':>5} {'out':>7} "
              f"{'#Mul (M)':>10} {'#Add (M)':>10} {'energy (uJ)':>12}")
    rows = [header, "-" * len(header)]
    for layer in cost.layers:
        out = f"{layer.output_hw[0]}x{layer.output_hw[1]}"
        rows.append(f"{layer.name:<26} {layer.layer_type:<9} {layer.kernel_size:>2} "
                    f"{layer.in_features:>5} {layer.out_features:>5} {out:>7} "
                    f"{layer.mul / 1e6:>10.4f} {layer.add / 1e6:>10.4f} "
                    f"{layer.energy_pj / 1e6:>12.4f}")
    rows.append("-" * len(header))
    rows.append(f"{'total':<58} {cost.mul / 1e6:>10.2f} {cost.add / 1e6:>10.2f} "
                f"{cost.energy_pj / 1e6:>12.2f}")
    return "\n".join(rows)
