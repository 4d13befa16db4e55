"""Speed of the adder convolution against ``lax.conv_general_dilated`` on ResNet-20's layers.

What is measured, for every distinct adder-layer shape of the CIFAR ResNet-20 of the official
AdderNet (3x3 convolutions with padding 1, 1x1 stride-2 shortcuts with padding 0):

* fwd: the forward of ``awn_jax.ops.adder_conv2d`` and of ``lax.conv_general_dilated``;
* fwd+bwd: ``value_and_grad`` of ``sum(output * cotangent)`` (a fixed random cotangent) with
  respect to both the input and the kernel; the adder uses its official backward, ``eta=0.2``;
* ref: optionally the same two for the naive ``adder_conv2d_reference`` (unfold, broadcast,
  reduce; its gradient is plain ``jax.grad``), only where its broadcast tensor stays under
  ``--reference-max-mb``, since it materializes ``N*Ho*Wo x k*k*cin x cout`` floats.

Why: the multiplying convolution is the speed an adder layer should approach (the targets are
fwd within 2x of lax.conv, fwd+bwd within 3x); the adder's throughput, in absolute differences
per second (``N*Ho*Wo*k*k*cin*cout / time``), compares with the figures of
``shared/PERFORMANCE_NOTES.md``.

Every function is jit-compiled and warmed up before timing; a sample is the mean of enough
back-to-back calls (each waited for with ``block_until_ready``) to last ``--min-sample-ms``;
the table gives the median of ``--repeats`` samples, in milliseconds.

    python bench/adder_conv.py --batch 32 256 --repeats 5
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from awn_jax.ops import adder_conv2d
from awn_jax.ops.reference import adder_conv2d_reference

ETA = 0.2


class Layer(NamedTuple):
    kernel_size: int
    stride: int
    cin: int
    cout: int
    size: int  # input height = width

    @property
    def padding(self) -> int:
        return self.kernel_size // 2

    @property
    def out_size(self) -> int:
        return (self.size + 2 * self.padding - self.kernel_size) // self.stride + 1

    def name(self) -> str:
        k = self.kernel_size
        return f"{k}x{k} s{self.stride} {self.cin}->{self.cout} @{self.size}x{self.size}"

    def abs_diffs(self, batch: int) -> int:
        """Absolute differences of one forward: N*Ho*Wo * k*k*cin * cout."""
        return batch * self.out_size ** 2 * self.kernel_size ** 2 * self.cin * self.cout

    def broadcast_bytes(self, batch: int) -> int:
        """Size of the naive float32 broadcast tensor (N, Ho, Wo, k*k*cin, cout)."""
        return 4 * self.abs_diffs(batch)


# The distinct adder layers of ResNet-20 (CIFAR, 32x32 input; the first conv is not an adder).
RESNET20_LAYERS = (
    Layer(3, 1, 16, 16, 32),
    Layer(3, 2, 16, 32, 32),
    Layer(3, 1, 32, 32, 16),
    Layer(3, 2, 32, 64, 16),
    Layer(3, 1, 64, 64, 8),
    Layer(1, 2, 16, 32, 32),
    Layer(1, 2, 32, 64, 16),
)


def forward_fns(layer: Layer):
    """The three forwards ``f(x, kernel)`` on ``layer``: adder, lax.conv, naive reference."""
    s, p = layer.stride, layer.padding

    def adder(x, kernel):
        return adder_conv2d(x, kernel, stride=s, padding=p, eta=ETA)

    def conv(x, kernel):
        return lax.conv_general_dilated(x, kernel, (s, s), [(p, p)] * 2,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def reference(x, kernel):
        return adder_conv2d_reference(x, kernel, stride=s, padding=p)

    return {"adder": adder, "conv": conv, "ref": reference}


def fwd_bwd(forward):
    """``(x, kernel, ct) -> (sum(f(x, kernel) * ct), (dx, dkernel))``."""
    return jax.value_and_grad(lambda x, kernel, ct: jnp.sum(forward(x, kernel) * ct),
                              argnums=(0, 1))


def make_inputs(layer: Layer, batch: int, seed: int = 0):
    """Input (NHWC), kernel (HWIO) and output cotangent, float32 standard normal."""
    kx, kw, kg = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (batch, layer.size, layer.size, layer.cin))
    kernel = jax.random.normal(
        kw, (layer.kernel_size, layer.kernel_size, layer.cin, layer.cout))
    ct = jax.random.normal(kg, (batch, layer.out_size, layer.out_size, layer.cout))
    return x, kernel, ct


def time_ms(fn, args, repeats: int, min_sample_ms: float) -> float:
    """Median over ``repeats`` samples of the mean time of one call, compilation excluded."""
    def run(number):
        start = time.perf_counter()
        for _ in range(number):
            jax.block_until_ready(fn(*args))
        return (time.perf_counter() - start) * 1e3 / number

    run(1)  # compile and warm up
    number = max(1, round(min_sample_ms / run(1)))
    return statistics.median(run(number) for _ in range(repeats))


def machine_info() -> str:
    cpu = platform.processor() or "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return (f"{cpu}, nproc={len(os.sched_getaffinity(0))}, jax {jax.__version__} "
            f"({jax.default_backend()}), loadavg (1/5/15 min) {load}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-sample-ms", type=float, default=20.0,
                        help="a sample averages back-to-back calls until it lasts this long")
    parser.add_argument("--reference-max-mb", type=float, default=512.0,
                        help="time the naive reference only where its broadcast tensor is "
                             "at most this many MB (0: never)")
    args = parser.parse_args()

    print(f"date: {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"start: {machine_info()}\n")
    print("| layer | N | adder fwd | conv fwd | fwd ratio | adder f+b | conv f+b | f+b ratio "
          "| adder fwd G abs-diff/s | ref fwd | ref f+b |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    skipped = []
    for batch in args.batch:
        for layer in RESNET20_LAYERS:
            inputs = make_inputs(layer, batch)
            fns = forward_fns(layer)
            names = ["adder", "conv"]
            if layer.broadcast_bytes(batch) <= args.reference_max_mb * 2 ** 20:
                names.append("ref")
            else:
                skipped.append(f"{layer.name()} N={batch} "
                               f"({layer.broadcast_bytes(batch) / 2 ** 30:.1f} GiB broadcast)")
            fwd, fb = {}, {}
            for name in names:
                fwd[name] = time_ms(jax.jit(fns[name]), inputs[:2], args.repeats,
                                    args.min_sample_ms)
                fb[name] = time_ms(jax.jit(fwd_bwd(fns[name])), inputs, args.repeats,
                                   args.min_sample_ms)
            gps = layer.abs_diffs(batch) / (fwd["adder"] * 1e-3) / 1e9
            ref = (f"{fwd['ref']:.2f} | {fb['ref']:.2f}" if "ref" in fwd else "- | -")
            print(f"| {layer.name()} | {batch} | {fwd['adder']:.2f} | {fwd['conv']:.2f} "
                  f"| {fwd['adder'] / fwd['conv']:.1f}x | {fb['adder']:.2f} | {fb['conv']:.2f} "
                  f"| {fb['adder'] / fb['conv']:.1f}x | {gps:.2f} | {ref} |", flush=True)

    print("\nTimes in ms (median of samples). ratio = adder / conv. ref = naive "
          "adder_conv2d_reference, its f+b by plain jax.grad.")
    if skipped:
        print(f"ref skipped (broadcast tensor over {args.reference_max_mb:g} MB): "
              + "; ".join(skipped))
    print(f"end: {machine_info()}")


if __name__ == "__main__":
    main()
