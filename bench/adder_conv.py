"""Speed of the adder convolution's implementations against ``lax.conv_general_dilated`` on
ResNet-20's layers, with a correctness check of each implementation first.

What is measured, for every distinct adder-layer shape of the CIFAR ResNet-20 of the official
AdderNet (3x3 convolutions with padding 1, 1x1 stride-2 shortcuts with padding 0), and for each
implementation named in ``--impl``:

* fwd: the forward of ``adder_conv2d`` and of ``lax.conv_general_dilated``;
* fwd+bwd: ``value_and_grad`` of ``sum(output * cotangent)`` (a fixed random cotangent) with
  respect to both the input and the kernel; the adder uses its official backward, ``eta=0.2``;
* ratio: implementation / lax.conv, both timed in the same run.

Implementations (``--impl``, comma-separated): ``auto``, ``xla``, ``pallas``, ``native`` (the
``implementation=`` of ``awn_jax.ops.adder_conv2d``); ``pallas:pixels=128:warps=8`` and the like
(the Pallas kernels with other ``adder_pallas.Tiles``; keys starting ``dx_``, e.g.
``pallas:dx_pixels=32``, change only the input-gradient kernel's tiles); ``file=PATH``: the
kernels ``forward``, ``input_grad``, ``weight_grad`` of a Python file, run through the shared
op (``adder_vjp.adder_op``), e.g. a kernel module of an earlier commit (``git show
REV:awn_jax/ops/adder_pallas.py > old_pallas.py``), so two versions are timed in one run (a
file with an ``adder_conv2d(x, kernel, stride, padding, eta)`` instead is called as it is;
kernel modules from before the op was split into ``adder_vjp`` import helpers that are gone
and do not load); ``naive``: the plain
``adder_conv2d_reference`` (unfold, broadcast, reduce; its f+b is plain ``jax.grad``, the true
l1 gradient), only where its broadcast tensor stays under ``--reference-max-mb``;
``conv-fp32``: lax.conv itself at ``Precision.HIGHEST``, i.e. in float32 arithmetic where the
default may use TF32 tensor cores on a GPU (the adder has no tensor-core form, so this is the
multiplying convolution with the adder's kind of arithmetic). Off a GPU, ``pallas`` runs in
Pallas interpret mode (slow; for checking the script, not for timing).

Correctness check (``--check-batch``, on by default): each implementation's values, input
gradient and weight gradient (official rules, eta on) on four of the layer shapes (every
stride, padding and kernel size) at a small batch, against the float64 reference computed on
the CPU; max abs error, absolute and relative to the largest reference magnitude. An
implementation that fails to compile there is reported and left out of the timings; one that
fails to compile later is reported in its row.

Why: the multiplying convolution is the speed an adder layer should approach (the targets are
fwd within 2x of lax.conv, fwd+bwd within 3x); the adder's throughput, in absolute differences
per second (``N*Ho*Wo*k*k*cin*cout / time``), compares with what was measured on the
project's CPU machine (AMD EPYC, 2 cores, AVX2 + FMA; 2026-11-25, medians of 5 repetitions,
ResNet-20 layer shapes, batch 32): 0.5-3 G/s for XLA's patches + broadcast + abs + sum, 2-7 G/s
for its per-tap sum of 9 shifted windows (both on 2 threads), and 12.8-22.5 G/s for a
register-blocked AVX2 loop in C on one thread; ``bench/adder_native.py --ceiling`` measures
that one-core ceiling on the machine at hand.

Every function is jit-compiled and warmed up before timing; a sample is the mean of enough
back-to-back calls (each waited for with ``block_until_ready``) to last ``--min-sample-ms``;
the table gives the median of ``--repeats`` samples, in milliseconds. Rows are printed (and
appended to ``--output``) as they are measured; ``--time-budget-s`` stops starting new
measurements once spent, so a run in a fixed time slot still reports what it finished.

    python bench/adder_conv.py --batch 32 256 --repeats 5
    python bench/adder_conv.py --batch 256 --impl pallas,xla,naive,conv-fp32 --output gpu.md
    python bench/adder_conv.py --batch 256 --impl pallas,file=old_pallas.py --layers 1,3
    python bench/adder_conv.py --shapes detection --batch 1 --layers 0,10,14 --repeats 3

``--shapes detection`` times the layers of the ResNet-18 + FPN detector instead (at the VOC
input size; its P2 output layer is 256 -> 256 at 256 x 256): detection feeds the adder maps
64 times larger than CIFAR's, at batch 1-4.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import statistics
import time
import sys
import traceback
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # awn_jax
from awn_jax.ops import adder_conv2d, adder_pallas, adder_vjp, resolve_implementation  # noqa: E402
from awn_jax.ops.reference import (adder_conv2d_reference,  # noqa: E402
                                   adder_conv2d_reference_grads)

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


# The distinct adder layers a Faster R-CNN + FPN detector with a ResNet-18 backbone feeds at
# the VOC input size (configs/voc_frcnn_default.py: images on a 1024 x 1024 canvas, so C2 is
# 256 x 256): the backbone's stages (the 7x7 stem multiplies), then the neck's 1x1 laterals
# (C2-C5 -> 256) and 3x3 outputs (256 -> 256 at P2-P5), as awn_jax/detection/fpn.py builds it.
DETECTION_LAYERS = (
    Layer(3, 1, 64, 64, 256),
    Layer(3, 2, 64, 128, 256),
    Layer(1, 2, 64, 128, 256),
    Layer(3, 1, 128, 128, 128),
    Layer(3, 2, 128, 256, 128),
    Layer(1, 2, 128, 256, 128),
    Layer(3, 1, 256, 256, 64),
    Layer(3, 2, 256, 512, 64),
    Layer(1, 2, 256, 512, 64),
    Layer(3, 1, 512, 512, 32),
    Layer(1, 1, 64, 256, 256),
    Layer(1, 1, 128, 256, 128),
    Layer(1, 1, 256, 256, 64),
    Layer(1, 1, 512, 256, 32),
    Layer(3, 1, 256, 256, 256),
    Layer(3, 1, 256, 256, 128),
    Layer(3, 1, 256, 256, 32),
)

SHAPES = {"resnet20": RESNET20_LAYERS, "detection": DETECTION_LAYERS}


# The correctness check's layers: stride 1 and 2, padding 1 and 0, kernels 3 and 1, one and
# two channel tiles of the Pallas kernels (fewer compilations than all seven).
CHECK_LAYERS = tuple(RESNET20_LAYERS[i] for i in (0, 3, 4, 6))


class Impl(NamedTuple):
    """A named implementation: ``make(stride, padding) -> f(x, kernel)``; ``kind`` is
    "adder" (checked against the reference), "naive" or "conv"."""
    label: str
    make: Callable
    kind: str = "adder"


def load_adder_from_file(path: str):
    """``adder_conv2d(x, kernel, stride, padding, eta)`` of the Python file at ``path`` (it
    may import ``awn_jax``): the shared op over its three kernels, or its own function."""
    module_spec = importlib.util.spec_from_file_location(
        "bench_adder_" + os.path.splitext(os.path.basename(path))[0], path)
    if module_spec is None:
        raise SystemExit(f"--impl file={path}: not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if all(hasattr(module, name) for name in ("forward", "input_grad", "weight_grad")):
        return adder_vjp.adder_op(module.forward, module.input_grad, module.weight_grad)
    return module.adder_conv2d


def parse_impl(spec: str) -> Impl:
    """``xla`` / ``pallas`` / ``native`` / ``auto`` / ``naive`` / ``conv-fp32`` /
    ``pallas:key=value:...`` / ``file=PATH``."""
    spec = spec.strip()
    if spec.startswith("file="):
        path = spec[len("file="):]
        function = load_adder_from_file(path)
        return Impl(f"file {os.path.basename(path)}",
                    lambda s, p: lambda x, k: function(x, k, s, p, ETA))
    if spec == "naive":
        return Impl("naive", lambda s, p: lambda x, k: adder_conv2d_reference(x, k, s, p),
                    kind="naive")
    if spec == "conv-fp32":
        return Impl(spec, lambda s, p: conv_fn(s, p, lax.Precision.HIGHEST), kind="conv")
    if spec.startswith("pallas:"):
        fields = dict(item.split("=", 1) for item in spec[len("pallas:"):].split(":"))
        tiles = adder_pallas.Tiles(**{key: int(value) for key, value in fields.items()
                                      if not key.startswith("dx_")})
        dx_tiles = tiles._replace(**{key[len("dx_"):]: int(value)
                                     for key, value in fields.items() if key.startswith("dx_")})
        return Impl(spec, lambda s, p: lambda x, k: adder_conv2d(
            x, k, s, p, ETA, implementation="pallas", tiles=tiles, input_grad_tiles=dx_tiles))
    label = spec if spec != "auto" else f"auto ({resolve_implementation('auto')})"
    resolve_implementation(spec)  # an unknown name fails here, before any measurement
    return Impl(label, lambda s, p: lambda x, k: adder_conv2d(x, k, s, p, ETA,
                                                               implementation=spec))


def parse_layers(parser: argparse.ArgumentParser, spec: str,
                 shapes: str = "resnet20") -> list[Layer]:
    """``--layers``: comma-separated indices into ``SHAPES[shapes]``; empty: all of them."""
    table = SHAPES[shapes]
    try:
        layers = [table[int(i)] for i in spec.split(",") if i.strip()]
    except (ValueError, IndexError):
        parser.error(f"--layers: indices 0-{len(table) - 1} of --shapes {shapes}, got {spec!r}")
    return layers or list(table)


def add_shape_arguments(parser: argparse.ArgumentParser, default_layers: str = ""):
    """``--shapes`` (which network's layers) and ``--layers`` (which of them)."""
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="resnet20",
                        help="resnet20: the CIFAR ResNet-20's seven adder layers; detection: "
                             "the ResNet-18 + FPN detector's at the VOC input size")
    parser.add_argument("--layers", default=default_layers,
                        help="comma-separated indices (in the table's order) into --shapes' "
                             "layers; empty: all of them")


def conv_fn(stride: int, padding: int, precision=None):
    return lambda x, kernel: lax.conv_general_dilated(
        x, kernel, (stride, stride), [(padding, padding)] * 2,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision)


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


def short_error(error: BaseException) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    text = f"{type(error).__name__}: {lines[0] if lines else ''}"
    return text[:300].replace("|", "/")


def machine_info() -> str:
    cpu = platform.processor() or "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    device = jax.devices()[0]
    return (f"{cpu}, nproc={len(os.sched_getaffinity(0))}, jax {jax.__version__} "
            f"({jax.default_backend()}: {device.device_kind}), loadavg (1/5/15 min) {load}")


class Report:
    """Prints lines and appends them to ``path`` (if any) as they come."""

    def __init__(self, path: str | None):
        self.path = path
        if path:
            open(path, "w").close()

    def __call__(self, line: str = ""):
        print(line, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(line + "\n")


def reference_float64(layer: Layer, x, kernel, ct):
    """(y, dx, dw) of the float64 reference with the official rules, computed on the CPU
    (on the default device where JAX_PLATFORMS hides the CPU)."""
    try:
        device = jax.devices("cpu")[0]
    except RuntimeError:
        device = jax.devices()[0]
    with jax.enable_x64(True):
        args = [jax.device_put(np.asarray(a, np.float64), device) for a in (x, kernel, ct)]
        y = jax.jit(adder_conv2d_reference, static_argnums=(2, 3))(
            args[0], args[1], layer.stride, layer.padding)
        dx, dw = jax.jit(adder_conv2d_reference_grads, static_argnums=(3, 4, 5))(
            *args, layer.stride, layer.padding, ETA)
        return [np.asarray(a) for a in (y, dx, dw)]


def check(impls, batch: int, report: Report) -> set[str]:
    """Errors of each implementation against the float64 reference; returns the labels of
    those that failed to run."""
    report(f"## Correctness: max abs error against the float64 reference (batch {batch}, "
           f"eta={ETA}), absolute (relative to the largest reference value)\n")
    report("| layer | impl | y | dx | dw |")
    report("|---|---|---:|---:|---:|")
    failed = set()
    for layer in CHECK_LAYERS:
        x, kernel, ct = make_inputs(layer, batch, seed=1)
        expected = reference_float64(layer, x, kernel, ct)
        for impl in impls:
            if impl.kind != "adder" or impl.label in failed:
                continue
            forward = impl.make(layer.stride, layer.padding)

            @jax.jit
            def value_and_grads(x, kernel, ct, forward=forward):
                y, vjp = jax.vjp(forward, x, kernel)
                return (y, *vjp(ct))

            try:
                actual = [np.asarray(a, np.float64) for a in value_and_grads(x, kernel, ct)]
            # Any failure of one implementation (a Pallas LoweringError is a bare Exception)
            # is reported with its traceback; the other implementations go on.
            except Exception as error:  # pylint: disable=broad-except
                failed.add(impl.label)
                report(f"| {layer.name()} | {impl.label} | error: {short_error(error)} | | |")
                traceback.print_exc()
                continue
            cells = []
            for a, e in zip(actual, expected):
                err = float(np.max(np.abs(a - e)))
                cells.append(f"{err:.2e} ({err / max(float(np.max(np.abs(e))), 1e-30):.1e})")
            report(f"| {layer.name()} | {impl.label} | " + " | ".join(cells) + " |")
    report()
    return failed


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--impl", default="auto",
                        help="comma-separated implementations: auto, xla, pallas, native, "
                             "naive, conv-fp32, "
                             "pallas:pixels=..:channels=..:accumulator=..:warps=.. "
                             "(dx_pixels=.. etc.: input-gradient kernel only), file=PATH")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-sample-ms", type=float, default=20.0,
                        help="a sample averages back-to-back calls until it lasts this long")
    parser.add_argument("--reference-max-mb", type=float, default=512.0,
                        help="time the naive reference only where its broadcast tensor is "
                             "at most this many MB (0: never)")
    parser.add_argument("--check-batch", type=int, default=2,
                        help="batch of the correctness check (0: no check)")
    parser.add_argument("--time-budget-s", type=float, default=0.0,
                        help="start no new measurement after this many seconds (0: no limit)")
    add_shape_arguments(parser)
    parser.add_argument("--output", help="also write the report (Markdown) to this file")
    args = parser.parse_args()
    layers = parse_layers(parser, args.layers, args.shapes)

    start = time.perf_counter()
    impls = [parse_impl(spec) for spec in args.impl.split(",") if spec.strip()]
    report = Report(args.output)
    report(f"date: {datetime.datetime.now().isoformat(timespec='seconds')}")
    report(f"start: {machine_info()}")
    report(f"command: python bench/adder_conv.py {' '.join(sys.argv[1:])}")
    if jax.default_backend() != "gpu" and any(i.label.startswith("pallas") or
                                              i.label == "auto (pallas)" for i in impls):
        report("note: no GPU, so the Pallas kernels run in interpret mode (not a timing)")
    report()

    failed = set()
    if args.check_batch > 0:
        try:
            failed = check(impls, args.check_batch, report)
        # The check is no reason to lose the timings; its traceback is printed.
        except Exception as error:  # pylint: disable=broad-except
            report(f"correctness check failed: {short_error(error)}\n")
            traceback.print_exc()

    report("## Speed: times in ms (median of samples); ratio = implementation / lax.conv\n")
    report("| layer | N | impl | fwd | conv fwd | fwd ratio | f+b | conv f+b | f+b ratio "
           "| fwd G abs-diff/s (MAC/s for conv) |")
    report("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    skipped = []
    for batch in args.batch:
        for layer in layers:
            if args.time_budget_s and time.perf_counter() - start > args.time_budget_s:
                skipped.append(f"{layer.name()} N={batch} (time budget)")
                continue
            inputs = make_inputs(layer, batch)
            conv = conv_fn(layer.stride, layer.padding)
            conv_fwd = time_ms(jax.jit(conv), inputs[:2], args.repeats, args.min_sample_ms)
            conv_fb = time_ms(jax.jit(fwd_bwd(conv)), inputs, args.repeats,
                              args.min_sample_ms)
            for impl in impls:
                if impl.label in failed:
                    continue
                broadcast = layer.broadcast_bytes(batch)
                if impl.kind == "naive" and broadcast > args.reference_max_mb * 2 ** 20:
                    skipped.append(f"naive {layer.name()} N={batch} "
                                   f"({broadcast / 2 ** 30:.1f} GiB broadcast)")
                    continue
                if args.time_budget_s and time.perf_counter() - start > args.time_budget_s:
                    skipped.append(f"{impl.label} {layer.name()} N={batch} (time budget)")
                    continue
                forward = impl.make(layer.stride, layer.padding)
                try:
                    fwd = time_ms(jax.jit(forward), inputs[:2], args.repeats,
                                  args.min_sample_ms)
                    fb = time_ms(jax.jit(fwd_bwd(forward)), inputs, args.repeats,
                                 args.min_sample_ms)
                # As in check(): a kernel that fails here is reported, the rest go on.
                except Exception as error:  # pylint: disable=broad-except
                    report(f"| {layer.name()} | {batch} | {impl.label} | error: "
                           f"{short_error(error)} | | | | | | |")
                    traceback.print_exc()
                    continue
                gps = layer.abs_diffs(batch) / (fwd * 1e-3) / 1e9
                report(f"| {layer.name()} | {batch} | {impl.label} | {fwd:.3f} | {conv_fwd:.3f} "
                       f"| {fwd / conv_fwd:.2f}x | {fb:.3f} | {conv_fb:.3f} "
                       f"| {fb / conv_fb:.2f}x | {gps:.1f} |")

    report()
    report("naive = adder_conv2d_reference (unfold, broadcast, reduce), its f+b by plain "
           "jax.grad; conv-fp32 = lax.conv at Precision.HIGHEST; the adder implementations "
           "use the official backward with eta=0.2. conv = lax.conv at default precision.")
    if skipped:
        report("skipped: " + "; ".join(skipped))
    report(f"end: {machine_info()}; {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
