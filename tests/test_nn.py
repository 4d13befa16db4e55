"""NNX modules: the conv/adder layer, BatchNorm's statistics modes, the ResNets."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from awn_jax.nn import (BN_MODES, LAYER_TYPES, AWNParam, BasicBlock, BatchNorm, Conv2d,
                        ResNet, ZeroPadShortcut, create_model, set_bn_mode)
from awn_jax.ops import adaptive_normalize, adder_conv2d, standardize

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def _build_abstract_model(name, layer_type, num_classes=10):
    """Shapes only, no arithmetic: every architecture can be checked quickly."""
    return nnx.eval_shape(lambda: create_model(
        name, num_classes=num_classes, layer_type=layer_type, mean=MEAN, std=STD,
        rngs=nnx.Rngs(0)))


_abstract_model = functools.cache(_build_abstract_model)  # for tests that don't mutate it


def _tiny_resnet(layer_type, *, mean=MEAN, std=STD, compute_dtype=jnp.float32, seed=0):
    """Two stages of one BasicBlock, 4 channels wide (the second with a strided 1x1
    projection shortcut): real arithmetic at little compile time."""
    return ResNet(BasicBlock, (1, 1), (4, 4), imagenet_stem=False, num_classes=3,
                  layer_type=layer_type, mean=mean, std=std, compute_dtype=compute_dtype,
                  rngs=nnx.Rngs(seed))


def _param_count(model, filter_=nnx.Param):
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, filter_)))


def _images(shape, seed=0):
    return jax.random.uniform(jax.random.key(seed), shape)


@nnx.jit
def _forward(model, images):
    return model(images)


# --- Conv2d ------------------------------------------------------------------------------

def _set_awn_params(layer):
    cout = layer.out_features
    layer.nu[...] = jnp.linspace(0.5, 2.0, cout)
    layer.upsilon[...] = jnp.linspace(-0.3, 0.3, cout)


@nnx.jit
def _layer_and_references(layer, x):
    """The layer's output; the ops applied to its kernel as the layer type says; the
    plain adder op on the raw kernel (to show the transform matters)."""
    kernel, stride, padding = layer.kernel[...], layer.stride, layer.padding
    if layer.layer_type == "conv":
        expected = lax.conv_general_dilated(x, kernel, (stride, stride), [(padding, padding)] * 2,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
    elif layer.layer_type == "adder":
        expected = adder_conv2d(x, kernel, stride, padding)
    elif layer.layer_type == "adder-ws":
        expected = adder_conv2d(x, standardize(kernel), stride, padding)
    else:
        expected = adder_conv2d(x, adaptive_normalize(kernel, layer.nu[...], layer.upsilon[...]),
                                stride, padding)
    return layer(x), expected, adder_conv2d(x, kernel, stride, padding)


@pytest.mark.parametrize("layer_type", LAYER_TYPES)
@pytest.mark.parametrize("kernel_size,stride", [(3, 1), (1, 2)])
def test_layer_applies_its_kernel_transform(layer_type, kernel_size, stride):
    layer = Conv2d(3, 4, kernel_size, stride, layer_type=layer_type, rngs=nnx.Rngs(0))
    if layer_type == "adder-awn":
        _set_awn_params(layer)
    x = jax.random.normal(jax.random.key(1), (2, 7, 7, 3))
    out, expected, plain_adder = _layer_and_references(layer, x)
    size = 7 if stride == 1 else 4
    chex.assert_shape(out, (2, size, size, 4))
    chex.assert_trees_all_close(out, expected, rtol=1e-5, atol=1e-4)
    if layer_type != "adder":  # the transform must matter, or the check above proves nothing
        assert not np.allclose(out, plain_adder, atol=1e-2)


def test_layer_rejects_unknown_type():
    with pytest.raises(ValueError, match="layer_type"):
        Conv2d(3, 4, 3, layer_type="adder_awn", rngs=nnx.Rngs(0))


@pytest.mark.parametrize("layer_type", LAYER_TYPES)
def test_layer_parameters(layer_type):
    layer = Conv2d(64, 64, 3, layer_type=layer_type, rngs=nnx.Rngs(0))
    kernel = layer.kernel[...]
    chex.assert_shape(kernel, (3, 3, 64, 64))
    chex.assert_type(kernel, jnp.float32)
    # conv: Kaiming normal, fan_out = 3*3*64 -> std sqrt(2/576); adder: standard normal.
    expected_std = np.sqrt(2 / 576) if layer_type == "conv" else 1.0
    np.testing.assert_allclose(np.std(kernel), expected_std, rtol=0.03)
    awn = nnx.state(layer, AWNParam)
    if layer_type == "adder-awn":  # starts equal to WS
        chex.assert_trees_all_equal(
            {"nu": layer.nu[...], "upsilon": layer.upsilon[...]},
            {"nu": jnp.ones(64), "upsilon": jnp.zeros(64)})
        assert set(awn.keys()) == {"nu", "upsilon"}
    else:
        assert not jax.tree.leaves(awn)


@pytest.mark.parametrize("layer_type", LAYER_TYPES)
def test_layer_bfloat16_compute_keeps_float32_params(layer_type):
    layer = Conv2d(3, 4, 3, layer_type=layer_type, compute_dtype=jnp.bfloat16,
                   rngs=nnx.Rngs(0))
    out = nnx.jit(lambda layer, x: layer(x))(layer, jnp.ones((1, 5, 5, 3)))
    chex.assert_type(out, jnp.bfloat16)
    chex.assert_type(jax.tree.leaves(nnx.state(layer, nnx.Param)), jnp.float32)


def test_awn_gradients_reach_kernel_nu_and_upsilon():
    layer = Conv2d(3, 4, 3, layer_type="adder-awn", rngs=nnx.Rngs(0))
    _set_awn_params(layer)
    x = jax.random.normal(jax.random.key(1), (2, 6, 6, 3))
    target = jax.random.normal(jax.random.key(2), (2, 6, 6, 4))

    @nnx.jit
    def grads_fn(layer):
        return nnx.grad(lambda layer: jnp.mean((layer(x) / 10 - target) ** 2))(layer)

    grads = grads_fn(layer)
    assert set(nnx.state(grads, AWNParam).keys()) == {"nu", "upsilon"}
    for name in ("kernel", "nu", "upsilon"):
        g = grads[name][...]
        chex.assert_tree_all_finite(g)
        assert np.all(np.abs(g) > 0), name


# --- BatchNorm ---------------------------------------------------------------------------

def _bn_with_running_stats(num_features=3):
    bn = BatchNorm(num_features)
    bn.scale[...] = jnp.array([1.0, 2.0, 0.5])
    bn.bias[...] = jnp.array([0.0, 1.0, -1.0])
    bn.mean[...] = jnp.array([3.0, -2.0, 0.5])
    bn.var[...] = jnp.array([4.0, 0.25, 9.0])
    return bn


def _bn_input():
    # Batch statistics far from the running ones, so every mode gives a different output.
    return 1.5 * jax.random.normal(jax.random.key(0), (4, 3, 3, 3)) - 1.0


@pytest.mark.parametrize("mode", BN_MODES)
def test_batchnorm_modes_pick_their_statistics(mode):
    bn = _bn_with_running_stats()
    bn.mode = mode
    x = _bn_input()
    running_mean, running_var = bn.mean[...], bn.var[...]
    batch_mean = np.mean(x, axis=(0, 1, 2))
    batch_var = np.var(x, axis=(0, 1, 2))  # biased, used for normalizing
    mean, var = {
        "train": (batch_mean, batch_var),
        "tracked": (running_mean, running_var),
        "running-mean": (batch_mean, running_var),
        "running": (batch_mean, batch_var),
    }[mode]
    expected = (x - mean) / np.sqrt(var + 1e-5) * bn.scale[...] + bn.bias[...]

    chex.assert_trees_all_close(bn(x), expected, rtol=1e-5, atol=1e-5)

    if mode == "train":  # PyTorch: momentum 0.1, unbiased variance in the running average
        n = x.size // 3
        chex.assert_trees_all_close(
            (bn.mean[...], bn.var[...]),
            (0.9 * running_mean + 0.1 * batch_mean,
             0.9 * running_var + 0.1 * batch_var * n / (n - 1)), rtol=1e-5)
    else:
        chex.assert_trees_all_equal((bn.mean[...], bn.var[...]), (running_mean, running_var))


def test_batchnorm_modes_differ_on_this_input():
    x = _bn_input()
    outputs = []
    for mode in ("tracked", "running-mean", "running"):
        bn = _bn_with_running_stats()
        bn.mode = mode
        outputs.append(np.asarray(bn(x)))
    for i in range(3):
        for j in range(i):
            assert not np.allclose(outputs[i], outputs[j], atol=1e-2)


def test_batchnorm_train_updates_running_stats_under_jit():
    bn = _bn_with_running_stats()
    before = bn.mean[...]
    nnx.jit(lambda bn, x: bn(x))(bn, _bn_input())
    assert not np.allclose(bn.mean[...], before)


def test_batchnorm_statistics_are_global_over_a_sharded_batch():
    devices = jax.devices()
    if len(devices) < 2:
        pytest.skip("needs several (fake CPU) devices")
    mesh = jax.make_mesh((len(devices),), ("data",))
    x = 1.5 * jax.random.normal(jax.random.key(0), (2 * len(devices), 3, 3, 3)) - 1.0
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    sharded_x = jax.device_put(x, sharding)
    results = []
    for inputs in (x, sharded_x):
        bn = _bn_with_running_stats()
        out = nnx.jit(lambda bn, x: bn(x))(bn, inputs)
        results.append((out, bn.mean[...], bn.var[...]))
    chex.assert_trees_all_close(results[0], results[1], rtol=1e-5, atol=1e-6)


def test_batchnorm_keeps_input_dtype():
    out = BatchNorm(3)(_bn_input().astype(jnp.bfloat16))
    chex.assert_type(out, jnp.bfloat16)


def test_batchnorm_rejects_unknown_mode_and_single_value_training():
    with pytest.raises(ValueError, match="mode"):
        BatchNorm(3, mode="eval")
    with pytest.raises(ValueError, match="more than 1 value"):
        BatchNorm(3)(jnp.ones((1, 3)))


def test_set_bn_mode_switches_every_batchnorm():
    model = _build_abstract_model("resnet20", "adder")
    batchnorms = [m for _, m in nnx.iter_graph(model) if isinstance(m, BatchNorm)]
    assert len(batchnorms) == 1 + 18 + 2 + 1  # stem, 9 blocks x 2, 2 shortcuts, classifier
    for mode in BN_MODES:
        set_bn_mode(model, mode)
        assert {bn.mode for bn in batchnorms} == {mode}
    with pytest.raises(ValueError, match="mode"):
        set_bn_mode(model, "robust")


# --- ResNets -----------------------------------------------------------------------------

@pytest.mark.parametrize("name,layer_type", [
    *[("resnet20", layer_type) for layer_type in LAYER_TYPES],
    # The others with the layer type that runs the most code (the adder types differ only
    # in the kernel transform, checked for every layer type above and in the layer tests).
    *[(name, "adder-awn") for name in ("resnet32", "resnet56", "resnet18", "resnet50")],
])
def test_model_output_shape(name, layer_type):
    """A shape-only trace of the real forward, on a batch of two 32x32 images."""
    graphdef, state = nnx.split(_abstract_model(name, layer_type))
    logits = jax.eval_shape(lambda state, x: nnx.merge(graphdef, state)(x), state,
                            jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
    chex.assert_shape(logits, (2, 10))
    chex.assert_type(logits, jnp.float32)


@pytest.mark.parametrize("name,layer_type,expected", [
    # CIFAR, n blocks per stage. Kernels: stem 3*3*3*16 = 432; stage 1: 2n * 3*3*16*16;
    # stage 2: 3*3*16*32 + (2n-1) * 3*3*32*32 + 1x1 shortcut 16*32; stage 3: 3*3*32*64
    # + (2n-1) * 3*3*64*64 + 32*64; classifier 64*10 = 640. BatchNorm scale + bias:
    # 2 * (16 + 2n*16 + (2n+1)*32 + (2n+1)*64 + 10) = 244 + 448n.
    # n=3: 432 + 13824 + 51200 + 204800 + 640 = 270896 kernels, + 1588 = 272484.
    ("resnet20", "conv", 272_484),
    ("resnet32", "conv", 466_916),  # n=5: 464432 + 2484
    ("resnet56", "conv", 855_780),  # n=9: 851504 + 4276
    # AWN adds nu and upsilon per output channel of the 2n + 2n+1 + 2n+1 adder layers:
    # 2 * (2n*16 + (2n+1)*32 + (2n+1)*64) = 448n + 192 = 1536 for n=3.
    ("resnet20", "adder", 272_484),
    ("resnet20", "adder-awn", 274_020),
])
def test_cifar_parameter_counts(name, layer_type, expected):
    assert _param_count(_abstract_model(name, layer_type)) == expected


@pytest.mark.parametrize("name,expected", [
    # The public CIFAR ResNets (pytorch_resnet_cifar10, the imported CNNs) state 269,722 and
    # 464,154 parameters: the projection model's count less its two 1x1 projections with their
    # BatchNorm (16*32 + 2*32 + 32*64 + 2*64 = 2,752) and the logits' BatchNorm (20), plus the
    # linear layer's bias (10).
    ("resnet20", 269_722),
    ("resnet32", 464_154),
])
def test_option_a_linear_head_cnn_parameter_counts(name, expected):
    model = nnx.eval_shape(lambda: create_model(
        name, num_classes=10, layer_type="conv", mean=MEAN, std=STD, shortcut="option-a",
        head="linear", rngs=nnx.Rngs(0)))
    assert _param_count(model) == expected


def test_option_a_shortcut_subsamples_and_zero_pads_the_channels():
    x = np.asarray(_images((2, 6, 6, 16)))
    expected = np.zeros((2, 3, 3, 32), np.float32)
    expected[..., 8:24] = x[:, ::2, ::2]
    np.testing.assert_array_equal(np.asarray(ZeroPadShortcut(16, 32, 2)(jnp.asarray(x))),
                                  expected)
    with pytest.raises(ValueError, match="option-A"):
        ZeroPadShortcut(16, 48, 2)


@pytest.mark.parametrize("head", ["linear", "conv-bn"])
def test_linear_head_is_affine_in_the_classifier_and_conv_bn_head_normalizes_it(head):
    """Under ``running`` (batch statistics everywhere) doubling the classifier's kernel doubles
    the linear head's logits less its bias and leaves the BatchNorm head's unchanged (centred
    over the batch: its shift is 0 at initialization)."""
    model = ResNet(BasicBlock, (1, 1), (4, 8), imagenet_stem=False, num_classes=3,
                   layer_type="conv", mean=MEAN, std=STD, shortcut="option-a", head=head,
                   rngs=nnx.Rngs(0))
    set_bn_mode(model, "running")
    images = _images((4, 8, 8, 3))
    if head == "linear":
        model.classifier_bias[...] = jnp.array([0.5, -1.0, 2.0])
    bias = model.classifier_bias[...] if head == "linear" else 0.0
    before = _forward(model, images)
    model.classifier.kernel[...] = 2 * model.classifier.kernel[...]
    after = _forward(model, images)
    if head == "linear":
        assert not hasattr(model, "classifier_bn")
        chex.assert_trees_all_close(after - bias, 2 * (before - bias), rtol=1e-5, atol=1e-5)
    else:
        assert not hasattr(model, "classifier_bias")
        chex.assert_trees_all_close(after, before, atol=1e-3)   # up to BatchNorm's eps
        chex.assert_trees_all_close(after.mean(axis=0), jnp.zeros(3), atol=1e-5)


@pytest.mark.parametrize("name,expected", [
    # torchvision's counts (11689512, 25557032) less the fc bias (1000), plus the
    # classifier BatchNorm (2000): the official AdderNet head.
    ("resnet18", 11_690_512),
    ("resnet50", 25_558_032),
])
def test_imagenet_parameter_counts(name, expected):
    assert _param_count(_abstract_model(name, "conv", num_classes=1000)) == expected


@pytest.mark.parametrize("name,num_adder_layers", [
    ("resnet20", 2 * 9 + 2), ("resnet32", 2 * 15 + 2), ("resnet56", 2 * 27 + 2),
    ("resnet18", 2 * 8 + 3), ("resnet50", 3 * 16 + 4),
])
def test_stem_and_classifier_multiply_every_other_layer_has_the_layer_type(
        name, num_adder_layers):
    model = _abstract_model(name, "adder-awn")
    layers = {path: m for path, m in nnx.iter_graph(model) if isinstance(m, Conv2d)}
    assert layers.pop(("stem_conv",)).layer_type == "conv"
    assert layers.pop(("classifier",)).layer_type == "conv"
    assert {m.layer_type for m in layers.values()} == {"adder-awn"}
    assert len(layers) == num_adder_layers


@pytest.mark.parametrize("name", ["resnet20", "resnet18"])
def test_multiplying_kernels_start_as_in_the_official_models(name):
    """CIFAR: PyTorch's default U(+-1/sqrt(fan_in)) (resnet20.py sets no init); ImageNet:
    Kaiming-normal, fan_out (resnet50.py)."""
    model = create_model(name, num_classes=10, layer_type="conv", mean=MEAN, std=STD,
                         rngs=nnx.Rngs(0))
    for path, layer in nnx.iter_graph(model):
        if not isinstance(layer, Conv2d):
            continue
        kernel = np.asarray(layer.kernel[...])
        kh, kw, cin, cout = kernel.shape
        if name == "resnet20":
            bound = 1 / np.sqrt(kh * kw * cin)
            assert np.abs(kernel).max() <= bound, path
            if kernel.size >= 400:
                np.testing.assert_allclose(kernel.std(), bound / np.sqrt(3), rtol=0.1)
        elif kernel.size >= 400:
            np.testing.assert_allclose(kernel.std(), np.sqrt(2 / (kh * kw * cout)), rtol=0.1)
    if name == "resnet20":  # the numbers of the official models
        np.testing.assert_allclose(np.std(model.classifier.kernel[...]), 0.072, rtol=0.1)
        np.testing.assert_allclose(np.std(model.stem_conv.kernel[...]), 0.111, rtol=0.1)


def test_layer_rejects_unknown_conv_init():
    with pytest.raises(ValueError, match="conv_init"):
        Conv2d(3, 4, 3, conv_init="xavier", rngs=nnx.Rngs(0))


def test_awn_params_are_selectable_by_type():
    model = _abstract_model("resnet20", "adder-awn")
    awn = nnx.state(model, AWNParam)
    others = nnx.state(model, nnx.All(nnx.Param, nnx.Not(AWNParam)))
    assert _param_count(model, AWNParam) == 1536
    assert _param_count(model) == _param_count(model, AWNParam) + sum(
        x.size for x in jax.tree.leaves(others))
    assert {path[-1] for path, _ in nnx.to_flat_state(awn)} == {"nu", "upsilon"}


def test_create_model_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown model"):
        create_model("resnet34", num_classes=10, layer_type="adder", mean=MEAN, std=STD,
                     rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="layer_type"):
        _abstract_model("resnet20", "ann")


@pytest.mark.parametrize("layer_type", ["conv", "adder-awn"])
def test_tiny_model_forward_is_finite(layer_type):
    model = _tiny_resnet(layer_type)
    set_bn_mode(model, "running-mean")
    logits = _forward(model, _images((2, 8, 8, 3)))
    chex.assert_shape(logits, (2, 3))
    chex.assert_tree_all_finite(logits)


def test_model_normalizes_its_input():
    images = _images((2, 8, 8, 3))
    inside = _tiny_resnet("conv", seed=3)
    outside = _tiny_resnet("conv", mean=(0.0,) * 3, std=(1.0,) * 3, seed=3)
    for model in (inside, outside):
        set_bn_mode(model, "tracked")
    normalized = (images - jnp.array(MEAN)) / jnp.array(STD)
    chex.assert_trees_all_close(_forward(inside, images), _forward(outside, normalized),
                                rtol=1e-5, atol=1e-5)


def test_bfloat16_model_returns_float32_logits():
    model = _tiny_resnet("conv", compute_dtype=jnp.bfloat16)
    logits = _forward(model, _images((2, 8, 8, 3)))
    chex.assert_type(logits, jnp.float32)
    chex.assert_tree_all_finite(logits)
