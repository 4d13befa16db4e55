"""Every adder implementation under a data-parallel mesh (``jax.set_mesh``): each device runs
its own batch shard (``adder_vjp.per_batch_shard``), values and AdderNet gradients equal the
single-device op's, and nothing gathers the batch. 8 fake CPU devices (tests/conftest.py)."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from adder_cases import inputs
from awn_jax.ops import adder, adder_native, adder_vjp

needs_devices = pytest.mark.skipif(len(jax.devices()) < 8,
                                   reason="tests/conftest.py asks for 8 CPU devices")

IMPLEMENTATIONS = [
    "xla",
    pytest.param("native", marks=pytest.mark.skipif(
        not adder_native.is_available(), reason="native kernels not built here")),
    "pallas",  # interpret mode on CPU
]

# (batch, height, width, cin, cout, kernel_size, stride, padding)
CASES = [(16, 6, 6, 3, 4, 3, 1, 1), (8, 7, 5, 4, 3, 3, 2, 0), (8, 6, 6, 4, 8, 1, 2, 0)]


def _mesh(devices):
    return Mesh(np.asarray(jax.devices()[:devices]), ("data",))


def _value_and_grads(implementation):
    """jit of (y, dx, dw) through the op's custom backward, eta on."""
    def run(x, kernel, g, stride, padding):
        y, vjp = jax.vjp(lambda a, b: adder.adder_conv2d(
            a, b, stride, padding, 0.2, implementation=implementation), x, kernel)
        return (y, *vjp(g))
    return jax.jit(run, static_argnums=(3, 4))


@needs_devices
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("devices", [2, 8])
def test_sharded_batch_gives_the_single_device_results(implementation, case, devices):
    x, kernel, g, stride, padding = inputs(case, jnp.float32)
    run = _value_and_grads(implementation)
    expected = run(x, kernel, g, stride, padding)
    mesh = _mesh(devices)
    batch, whole = NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())
    with jax.set_mesh(mesh):
        actual = run(jax.device_put(x, batch), jax.device_put(kernel, whole),
                     jax.device_put(g, batch), stride, padding)
    # The adaptive scaling saw the whole batch's weight gradient, not one shard's.
    chex.assert_trees_all_close(actual, expected, rtol=2e-5, atol=2e-5)
    assert actual[2].sharding.is_fully_replicated


@needs_devices
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_each_device_runs_only_its_shard(implementation):
    x, kernel, g, stride, padding = inputs(CASES[0], jnp.float32)
    run = _value_and_grads(implementation)
    with jax.set_mesh(_mesh(8)):
        jaxpr = str(jax.make_jaxpr(run, static_argnums=(3, 4))(x, kernel, g, stride, padding))
        hlo = run.lower(x, kernel, g, stride, padding).compile().as_text()
    assert jaxpr.count("shard_map") == 3  # forward, input gradient, weight gradient
    assert "all-gather" not in hlo
    if implementation == "native":
        # The FFI kernels' operands and results: a batch of 16 / 8 devices = 2 per call.
        calls = [line for line in hlo.splitlines() if 'custom_call_target="awn_adder' in line]
        assert len(calls) == 3
        for line in calls:
            assert re.search(r"f32\[2,6,6,", line) or re.search(r"f32\[3,3,3,", line), line


@needs_devices
def test_without_a_mesh_or_an_even_split_the_op_runs_whole():
    x, kernel, g, stride, padding = inputs(CASES[0], jnp.float32)
    run = _value_and_grads("xla")
    assert "shard_map" not in str(jax.make_jaxpr(run, static_argnums=(3, 4))(
        x, kernel, g, stride, padding))
    with jax.set_mesh(_mesh(8)):
        odd = x[:12]  # 12 images do not split over 8 devices
        assert adder_vjp.batch_axes(odd.shape[0]) == ()
        chex.assert_trees_all_close(run(odd, kernel, g[:12], stride, padding),
                                    _value_and_grads("xla")(odd, kernel, g[:12], stride, padding))
    with jax.set_mesh(_mesh(1)):
        assert adder_vjp.batch_axes(16) == ()


@needs_devices
def test_inside_a_users_shard_map_the_op_runs_on_the_local_shard():
    """Manual mesh axes are already split: the op does not split again."""
    x, kernel, _, stride, padding = inputs(CASES[0], jnp.float32)
    mesh = _mesh(8)
    per_shard = jax.jit(jax.shard_map(
        lambda a, b: adder.adder_conv2d(a, b, stride, padding, implementation="xla"),
        mesh=mesh, in_specs=(PartitionSpec("data"), PartitionSpec()),
        out_specs=PartitionSpec("data")))
    chex.assert_trees_all_close(per_shard(x, kernel),
                                adder.adder_conv2d(x, kernel, stride, padding,
                                                   implementation="xla"), rtol=1e-5)
