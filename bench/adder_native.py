"""Native CPU adder kernels against the XLA adder and ``lax.conv`` on ResNet-20's layers.

For every distinct adder-layer shape of the CIFAR ResNet-20 (``adder_conv.RESNET20_LAYERS``),
float32, in one run and interleaved per layer so that all three see the same machine load:

* fwd: the forward of ``adder_conv2d(implementation="native")``, of the pure-XLA one
  (``implementation="xla"``) and of ``lax.conv_general_dilated``;
* f+b: ``value_and_grad`` of ``sum(output * cotangent)`` with respect to input and kernel
  (adders: the official backward, ``eta=0.2``).

``--ceiling`` first measures what one core's vector units allow for the adder's inner loops
(a small C program, compiled with the same compiler): the clock, from a chain of dependent
``vaddps`` (3 cycles each on AMD Zen 2/3 and Intel since Skylake: an assumption, printed), and
the throughput of each kernel's instruction mix with every operand in registers. The
ceiling of a kernel is that throughput x vector lanes x clock x cores.

Times are medians of ``--repeats`` samples (``adder_conv.time_ms``); the machine's load
average is printed at start and end.

    python bench/adder_native.py --batch 256 32 --ceiling
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import subprocess
import sys
import statistics
import tempfile
import time

import jax
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from adder_conv import (RESNET20_LAYERS, fwd_bwd, machine_info, make_inputs,  # noqa: E402
                        time_ms)

from awn_jax.ops import adder, adder_native  # noqa: E402

ETA = 0.2

# Each loop body updates 12 independent accumulators (so latency does not bind) with one
# kernel's per-vector instruction mix, all operands in registers.
_CEILING_C = r"""
#include <immintrin.h>
#include <stdio.h>
#include <time.h>
static double now(void) {
  struct timespec t; clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t); return t.tv_sec + 1e-9 * t.tv_nsec;
}
#define N 60000000L
#define ACCS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
#define DECL(j) __m256 a##j = _mm256_set1_ps(j * s);
#define KEEP(j) __asm__ volatile("" : "+x"(a##j));
#define SUM(j) total = _mm256_add_ps(total, a##j);
#define RUN(NAME, BODY) { ACCS(DECL) double t = now(); \
  for (long i = 0; i < N / 12; i++) { ACCS(BODY) ACCS(KEEP) } \
  printf("%s %.4f\n", NAME, (now() - t) / N * 1e9); ACCS(SUM) }
int main(void) {
  volatile float seed = 1.0f; float s = seed;
  __m256 w = _mm256_set1_ps(0.5f * s), one = _mm256_set1_ps(s), minus_one = _mm256_set1_ps(-s);
  __m256 mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)), total = _mm256_setzero_ps();
  { __m256 a = w; double t = now();
    for (long i = 0; i < 4 * N; i++) { a = _mm256_add_ps(a, w); __asm__ volatile("" : "+x"(a)); }
    printf("dependent_add %.4f\n", (now() - t) / (4 * N) * 1e9); total = _mm256_add_ps(total, a); }
#define FWD(j) a##j = _mm256_add_ps(_mm256_and_ps(_mm256_fnmadd_ps(a##j, one, w), mask), one);
  RUN("forward_fnmadd_and_add", FWD)
#define FWD_SUB(j) a##j = _mm256_add_ps(_mm256_and_ps(_mm256_sub_ps(w, a##j), mask), one);
  RUN("forward_sub_and_add", FWD_SUB)
#define CLIP(j) a##j = _mm256_fmadd_ps(_mm256_max_ps(_mm256_min_ps( \
    _mm256_fnmadd_ps(a##j, one, w), one), minus_one), w, one);
  RUN("input_grad_fnmadd_min_max_fma", CLIP)
#define FMA(j) a##j = _mm256_fmadd_ps(a##j, one, w);
  RUN("weight_grad_fma", FMA)
  float out[8]; _mm256_storeu_ps(out, total); return out[0] == 12345.f;
}
"""


def measure_ceiling() -> dict[str, float] | None:
    """ns per vector of each instruction mix on one core (None without a compiler/AVX2)."""
    compiler = adder_native._compiler()
    if compiler is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        source, binary = os.path.join(tmp, "ceiling.c"), os.path.join(tmp, "ceiling")
        with open(source, "w") as f:
            f.write(_CEILING_C)
        build = subprocess.run([compiler, "-x", "c", "-O2", "-mavx2", "-mfma", source, "-o",
                                binary], capture_output=True, text=True)
        if build.returncode != 0:
            print(f"ceiling probe not built: {build.stderr[-500:]}")
            return None
        # Best of three runs: the cores are shared, interference only slows a run down.
        results: dict[str, float] = {}
        for _ in range(3):
            out = subprocess.run([binary], capture_output=True, text=True).stdout
            for name, value in re.findall(r"(\w+) ([\d.]+)", out):
                results[name] = min(results.get(name, float("inf")), float(value))
        return results


def print_ceiling(ns: dict[str, float], cores: int) -> dict[str, float]:
    """Print the ceiling table; return the one-core G elements/s ceilings of the kernels."""
    clock_ghz = 1.0 / (ns["dependent_add"] / 3)
    print(f"clock ~{clock_ghz:.2f} GHz (dependent vaddps chain {ns['dependent_add']:.3f} ns, "
          "assuming 3 cycles latency)")
    print("| instruction mix per 8-lane vector | ns/vector | vectors/cycle | G elements/s, "
          f"1 core | G elements/s, {cores} cores |")
    print("|---|---:|---:|---:|---:|")
    ceilings = {}
    for name, kernel in (("forward_fnmadd_and_add", "fwd"), ("forward_sub_and_add", None),
                         ("input_grad_fnmadd_min_max_fma", "dx"), ("weight_grad_fma", "dw")):
        per_core = 8 / ns[name]
        print(f"| {name} | {ns[name]:.3f} | {1 / (ns[name] * clock_ghz):.2f} "
              f"| {per_core:.1f} | {per_core * cores:.1f} |")
        if kernel:
            ceilings[kernel] = per_core
    print()
    return ceilings


def cpu_gps(fn, args, elements: float, repeats: int) -> float:
    """G elements per CPU-second of ``fn`` (median over samples of process CPU time, all
    threads): unlike wall time, it does not count the time other processes hold the cores,
    so it compares with the per-core ceiling even on a shared machine."""
    jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(repeats):
        start = time.process_time()
        jax.block_until_ready(fn(*args))
        samples.append(time.process_time() - start)
    return elements / statistics.median(samples) / 1e9


def native_parts(layer, stride, padding):
    """The three native kernels alone, jitted: forward, input gradient, weight gradient."""
    return {
        "fwd": jax.jit(lambda x, k, g: adder_native.forward(x, k, stride, padding)),
        "dx": jax.jit(lambda x, k, g: adder_native.input_grad(x, k, g, stride, padding)),
        "dw": jax.jit(lambda x, k, g: adder_native.weight_grad(x, k, g, stride, padding)),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[256, 32])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-sample-ms", type=float, default=20.0)
    parser.add_argument("--ceiling", action="store_true",
                        help="measure the vector-unit ceiling and each kernel's share of it")
    parser.add_argument("--skip-xla", action="store_true",
                        help="leave out the (slow) pure-XLA adder")
    args = parser.parse_args()

    if not adder_native.is_available():
        sys.exit(f"native kernels unavailable: {adder_native.unavailable_reason()}")
    print(f"date: {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"start: {machine_info()}")
    print(f"compiler: {adder_native._compiler()} ({shutil.which(adder_native._compiler())}), "
          f"flags {' '.join(adder_native.FLAGS)}\n")
    cores = len(os.sched_getaffinity(0))
    ceilings = None
    if args.ceiling:
        ns = measure_ceiling()
        ceilings = print_ceiling(ns, cores) if ns else None

    timed = lambda fn, inputs: time_ms(fn, inputs, args.repeats, args.min_sample_ms)  # noqa
    print("| layer | N | native fwd | xla fwd | conv fwd | native/conv | xla/conv "
          "| native f+b | xla f+b | conv f+b | native/conv | xla/conv | xla/native f+b |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    parts_rows = []
    for batch in args.batch:
        for layer in RESNET20_LAYERS:
            s, p = layer.stride, layer.padding
            x, kernel, ct = make_inputs(layer, batch)
            forwards = {
                "native": lambda x, k: adder.adder_conv2d(x, k, s, p, ETA,
                                                          implementation="native"),
                "xla": lambda x, k: adder.adder_conv2d(x, k, s, p, ETA, implementation="xla"),
                "conv": lambda x, k: lax.conv_general_dilated(
                    x, k, (s, s), [(p, p)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC")),
            }
            names = ["native", "conv"] + ([] if args.skip_xla else ["xla"])
            fwd = {n: timed(jax.jit(forwards[n]), (x, kernel)) for n in names}
            fb = {n: timed(jax.jit(fwd_bwd(forwards[n])), (x, kernel, ct)) for n in names}
            xla_f = f"{fwd['xla']:.2f}" if "xla" in fwd else "-"
            xla_b = f"{fb['xla']:.2f}" if "xla" in fb else "-"
            xla_rf = f"{fwd['xla'] / fwd['conv']:.1f}x" if "xla" in fwd else "-"
            xla_rb = f"{fb['xla'] / fb['conv']:.1f}x" if "xla" in fb else "-"
            speedup = f"{fb['xla'] / fb['native']:.0f}x" if "xla" in fb else "-"
            print(f"| {layer.name()} | {batch} | {fwd['native']:.2f} | {xla_f} "
                  f"| {fwd['conv']:.2f} | {fwd['native'] / fwd['conv']:.2f}x | {xla_rf} "
                  f"| {fb['native']:.2f} | {xla_b} | {fb['conv']:.2f} "
                  f"| {fb['native'] / fb['conv']:.2f}x | {xla_rb} | {speedup} |", flush=True)
            if ceilings:
                elements = layer.abs_diffs(batch)
                rates = {k: cpu_gps(f, (x, kernel, ct), elements, max(args.repeats, 5))
                         for k, f in native_parts(layer, s, p).items()}
                parts_rows.append((layer, batch, rates))

    print("\nTimes in ms (median of samples). native, xla = adder.adder_conv2d("
          "implementation='native' / 'xla'), conv = lax.conv_general_dilated; "
          "ratios against conv; f+b = value_and_grad wrt x and kernel, eta=0.2.")
    if parts_rows:
        print("\nEach native kernel alone: G elements per CPU-second "
              "(N*Ho*Wo*k*k*cin*cout / process CPU time, all threads) and its share of the "
              "one-core ceiling:\n")
        print("| layer | N | fwd G/cpu-s | fwd % | dx G/cpu-s | dx % | dw G/cpu-s | dw % |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for layer, batch, rates in parts_rows:
            cells = " | ".join(f"{rates[k]:.1f} | {100 * rates[k] / ceilings[k]:.0f}%"
                               for k in ("fwd", "dx", "dw"))
            print(f"| {layer.name()} | {batch} | {cells} |")
    print(f"\nend: {machine_info()}")


if __name__ == "__main__":
    main()
