"""Memory of one adder layer, forward and forward+backward, against ``lax.conv_general_dilated``.

For ResNet-20 layers at batch 256 (by default the first, 16->16 at 32x32, and the last,
64->64 at 8x8, 3x3 layer), each function is jit-compiled, never run, and XLA's buffer
assignment is read from ``compiled.memory_analysis()``: arguments, outputs and temp (the
scratch arena XLA allocates for the intermediates, already shrunk by reusing the space of dead
buffers), whose sum bounds the peak. "fwd+bwd" is ``value_and_grad`` of ``sum(output *
cotangent)`` with respect to input and kernel, as in ``adder_conv.py``. Scratch memory a custom
call allocates for itself (the native kernels' per-thread partial sums) is invisible here.

Why: an adder layer must not build the ``N*Ho*Wo x k*k*cin x cout`` tensor of the naive unfold
formulation, whose float32 size is printed next to each case; ``--impl naive`` compiles the
plain ``adder_conv2d_reference`` (gradient by plain ``jax.grad``) to show what building it
costs. The target is the adder within 2x of lax.conv's total.

    python bench/adder_memory.py --batch 256 --impl xla,native,naive
    python bench/adder_memory.py --batch 256 --impl pallas --layers 0,1,2,3,4,5,6   # on a GPU
    python bench/adder_memory.py --shapes detection --batch 1 --impl native,xla --layers ""

``--shapes detection``: the layers of the ResNet-18 + FPN detector at the VOC input size
(``adder_conv.DETECTION_LAYERS``), where the naive broadcast would take hundreds of GB.
"""

from __future__ import annotations

import argparse
import datetime

import jax

from adder_conv import (add_shape_arguments, conv_fn, fwd_bwd, machine_info, make_inputs,
                        parse_impl, parse_layers)

MB = 2 ** 20


def memory_mb(fn, args):
    """(argument, output, temp, total) MB of the compiled ``jax.jit(fn)(*args)``."""
    stats = jax.jit(fn).lower(*args).compile().memory_analysis()
    sizes = (stats.argument_size_in_bytes, stats.output_size_in_bytes,
             stats.temp_size_in_bytes)
    return *(s / MB for s in sizes), (sum(sizes) - stats.alias_size_in_bytes) / MB


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--impl", default="auto,naive",
                        help="comma-separated implementations, as in adder_conv.py --impl")
    add_shape_arguments(parser, default_layers="0,4")
    args = parser.parse_args()
    impls = [parse_impl(spec) for spec in args.impl.split(",") if spec.strip()]
    layers = parse_layers(parser, args.layers, args.shapes)

    print(f"date: {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"machine: {machine_info()}")
    print(f"command: python bench/adder_memory.py --batch {args.batch} --impl {args.impl} "
          f"--shapes {args.shapes} --layers {args.layers}\n")
    print("| layer | N | naive broadcast | pass | op | arguments | outputs | temp | total "
          "| total / conv |")
    print("|---|---:|---:|---|---|---:|---:|---:|---:|---:|")
    for layer in layers:
        inputs = make_inputs(layer, args.batch)
        broadcast = f"{layer.broadcast_bytes(args.batch) / MB:,.0f} MB"
        ops = {"conv": conv_fn(layer.stride, layer.padding),
               **{impl.label: impl.make(layer.stride, layer.padding) for impl in impls}}
        for pass_name, wrap, pass_args in (("fwd", lambda f: f, inputs[:2]),
                                           ("fwd+bwd", fwd_bwd, inputs)):
            rows = {op: memory_mb(wrap(fn), pass_args) for op, fn in ops.items()}
            for op, (arg, out, temp, total) in rows.items():
                print(f"| {layer.name()} | {args.batch} | {broadcast} | {pass_name} | {op} "
                      f"| {arg:,.1f} | {out:,.1f} | {temp:,.1f} | {total:,.1f} "
                      f"| {total / rows['conv'][3]:.1f}x |", flush=True)
    print("\nMB = 2**20 bytes; total = arguments + outputs + temp - aliased; "
          "naive = adder_conv2d_reference, compiled only; conv = lax.conv.")


if __name__ == "__main__":
    main()
