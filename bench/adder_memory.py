"""Memory of one adder layer, forward and forward+backward, against ``lax.conv_general_dilated``.

For the first (16->16 at 32x32) and the last (64->64 at 8x8) 3x3 layer of ResNet-20 at batch
256, each function is jit-compiled, never run, and XLA's buffer assignment is read from
``compiled.memory_analysis()``: arguments, outputs and temp (the scratch arena XLA allocates for
the intermediates, already shrunk by reusing the space of dead buffers), whose sum bounds the
peak. "fwd+bwd" is ``value_and_grad`` of ``sum(output * cotangent)`` with respect to input and
kernel, as in ``adder_conv.py``.

Why: an adder layer must not build the ``N*Ho*Wo x k*k*cin x cout`` tensor of the naive unfold
formulation, whose float32 size is printed next to each case; the naive
``adder_conv2d_reference`` (gradient by plain ``jax.grad``) is compiled too, to show what
building it costs. The target is the adder within 2x of lax.conv's total.

    python bench/adder_memory.py --batch 256
"""

from __future__ import annotations

import argparse
import datetime

import jax

from adder_conv import RESNET20_LAYERS, forward_fns, fwd_bwd, machine_info, make_inputs

LAYERS = (RESNET20_LAYERS[0], RESNET20_LAYERS[4])
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
    args = parser.parse_args()

    print(f"date: {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"machine: {machine_info()}\n")
    print("| layer | N | naive broadcast | pass | op | arguments | outputs | temp | total "
          "| total / conv |")
    print("|---|---:|---:|---|---|---:|---:|---:|---:|---:|")
    for layer in LAYERS:
        inputs = make_inputs(layer, args.batch)
        broadcast = f"{layer.broadcast_bytes(args.batch) / MB:,.0f} MB"
        for pass_name, wrap, pass_args in (("fwd", lambda f: f, inputs[:2]),
                                           ("fwd+bwd", fwd_bwd, inputs)):
            rows = {op: memory_mb(wrap(fn), pass_args)
                    for op, fn in forward_fns(layer).items()}
            for op, (arg, out, temp, total) in rows.items():
                print(f"| {layer.name()} | {args.batch} | {broadcast} | {pass_name} | {op} "
                      f"| {arg:,.1f} | {out:,.1f} | {temp:,.1f} | {total:,.1f} "
                      f"| {total / rows['conv'][3]:.1f}x |", flush=True)
    print("\nMB = 2**20 bytes; total = arguments + outputs + temp - aliased; "
          "ref = naive adder_conv2d_reference, compiled only.")


if __name__ == "__main__":
    main()
