"""The adder op's kernels as Pallas kernels: ``implementation="pallas"`` of
:func:`awn_jax.ops.adder.adder_conv2d`, the GPU path (Triton lowering), also run on CPU in
interpret mode so it is tested there.

The three kernels of :mod:`awn_jax.ops.adder_vjp`: the forward of Eq. 1, ``Y = -sum |P - W|``,
AdderNet's HardTanh input gradient and the full-precision weight gradient (its adaptive
scaling is the shared op's). Two Pallas kernels, both direct (no patch matrix in memory):

* forward: a program owns a tile of output pixels x output channels. For each kernel tap
  it gathers the input rows that tap reads (zeroed where the tap falls in the padding, so
  the padded input never exists in memory) and walks ``cin`` in chunks, adding
  ``|x - w|`` into a ``(pixels, cin chunk, cout)`` register accumulator that is reduced
  over its middle axis once, at the end: the loop body is a subtract, an absolute value
  and an add per element, no cross-lane reduction.
* input gradient: a program owns a tile of input pixels x input channels. An input pixel
  is the patch value ``P`` of every (tap, output pixel) pair that reads it, so
  ``dx = sum_taps sum_cout g * clip(W - x, -1, 1)`` over the output pixels that read it:
  the fold back onto x becomes a gather of ``g`` rows (zeroed where the tap reads no
  output pixel), not a scatter, and needs no atomics. Same accumulator scheme, over cout.
  With stride ``s`` a pixel at padded row ``r`` is read only through the kernel rows
  ``t`` with ``t = r (mod s)`` (columns likewise), so the input pixels are split into the
  ``s * s`` phase classes ``(ih % s, iw % s)``, one ``pallas_call`` each over only that
  class's pixels and only the taps that can read them (a class no tap reads launches
  nothing and is zero); the classes' results are interleaved into ``dx``. Stride 1 is
  one class: one call over all pixels and taps, its output reshaped into ``dx``.

The weight gradient, linear in the patches, is left to XLA as the kernel gradient of a
multiplying convolution (:func:`weight_grad`, ``adder_xla.weight_grad_by_conv``: one cuDNN
call, in float32).

Tile sizes are :class:`Tiles`, powers of two as Triton requires. Output rows (in the input
gradient, each phase class's) are padded to a multiple of the pixel tile (the extra rows are
sliced off) and channel counts that are not powers of two are zero-padded in XLA (zeros add
``|0 - 0| = 0``); ResNet shapes need neither, so no input is copied.

``interpret``: ``None`` (default) runs interpreted unless JAX's default backend is a GPU;
the environment variable ``AWN_PALLAS_INTERPRET=1`` (or ``0``) overrides that default.
Interpret mode is slow; it exists to test the kernels on CPU.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from awn_jax.ops.adder_vjp import accumulation_dtype, output_size
from awn_jax.ops.adder_xla import weight_grad_by_conv


class Tiles(NamedTuple):
    """Tile sizes (powers of two). ``pixels`` x ``channels`` is a program's output tile
    (output pixels x cout in the forward, input pixels x cin in the input gradient); the
    reduced channel dimension is walked in chunks sized so that the register accumulator
    (pixels x chunk x channels) holds ``accumulator`` values, over ``warps`` * 32 threads
    (64 values per thread at the defaults)."""
    pixels: int = 64
    channels: int = 32
    accumulator: int = 8192
    warps: int = 4


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _ceil_div(n: int, d: int) -> int:
    return -(-n // d)


def _round_up(n: int, multiple: int) -> int:
    return _ceil_div(n, multiple) * multiple


def resolve_interpret(interpret: bool | None) -> bool:
    """``interpret=None``: $AWN_PALLAS_INTERPRET if set, else interpret off a GPU."""
    if interpret is not None:
        return bool(interpret)
    env = os.environ.get("AWN_PALLAS_INTERPRET")
    if env is not None and env.strip() != "":
        return env.strip().lower() not in ("0", "false", "no")
    return jax.default_backend() != "gpu"


def _geometry(x_shape, k_shape, stride, padding):
    """Static shape facts the kernels need."""
    n, h, w, cin = x_shape
    kh, kw, _, cout = k_shape
    ho, wo = output_size(h, kh, stride, padding), output_size(w, kw, stride, padding)
    return dict(n=n, h=h, w=w, cin=cin, kh=kh, kw=kw, cout=cout, ho=ho, wo=wo,
                stride=stride, padding=padding)


class _Phase(NamedTuple):
    """One phase class along one spatial axis: the input positions ``start + s * a``
    (``a < count``), read only through the kernel offsets ``first_tap + s * i``
    (``i < taps``), the ``i``-th by output position ``a + shift - i`` where that exists."""
    start: int
    count: int
    first_tap: int
    taps: int
    shift: int


def _phases(size: int, k: int, s: int, p: int) -> list[_Phase]:
    """The ``s`` phase classes of an axis of ``size`` inputs, kernel size ``k``, stride
    ``s``, padding ``p``. Output ``o`` reads padded position ``o * s + t`` through offset
    ``t``; input position ``start + s * a`` is padded position
    ``s * (a + shift) + first_tap`` with ``(shift, first_tap) = divmod(start + p, s)``, so
    only the offsets ``t = first_tap + s * i`` read it, from ``o = a + shift - i``. A count
    is 0 for a class past the input's end or one that no offset of the kernel reads."""
    phases = []
    for start in range(s):
        shift, first_tap = divmod(start + p, s)
        phases.append(_Phase(start, _ceil_div(size - start, s), first_tap,
                             _ceil_div(k - first_tap, s), shift))
    return phases


def _channels_padded(a2d, channels):
    """``(rows, c)`` -> ``(rows, channels)`` with zero channels; no copy when c fits."""
    if a2d.shape[1] == channels:
        return a2d
    return jnp.pad(a2d, ((0, 0), (0, channels - a2d.shape[1])))


def _iota(size):
    return lax.broadcasted_iota(jnp.int32, (size,), 0)


def _div(a, b: int):
    """Integer division of non-negative int32 indices (lax.div: no floor fix-ups, and an
    int32 divisor even under x64)."""
    return lax.div(a, jnp.int32(b))


def _rem(a, b: int):
    return lax.rem(a, jnp.int32(b))


def _loop(count: int, body, init):
    """``fori_loop`` over an int32 index (under x64 a Python-int bound would give int64)."""
    return lax.fori_loop(jnp.int32(0), jnp.int32(count), body, init)


def _forward_kernel(x_ref, w_ref, o_ref, *, geo, block_cin, acc_dtype):
    """One (pixels x cout) tile of ``-sum |P - W|``."""
    bm, bn = o_ref.shape
    h, w, ho, wo = geo["h"], geo["w"], geo["ho"], geo["wo"]
    s, p, kw = geo["stride"], geo["padding"], geo["kw"]
    last = geo["n"] * ho * wo - 1
    m = jnp.minimum(pl.program_id(0) * bm + _iota(bm), last)   # tail tiles repeat the last
    image, rest = _div(m, ho * wo), _rem(m, ho * wo)
    top = _div(rest, wo) * s - p
    left = _rem(rest, wo) * s - p
    chunks = w_ref.shape[1] // block_cin

    def add_tap(tap, acc):
        hi, wi = top + _div(tap, kw), left + _rem(tap, kw)
        inside = (hi >= 0) & (hi < h) & (wi >= 0) & (wi < w)
        rows = jnp.where(inside, (image * h + hi) * w + wi, 0)   # 0: any valid row

        def add_chunk(c, acc):
            cols = pl.ds(pl.multiple_of(c * block_cin, block_cin), block_cin)
            xs = x_ref[rows, cols].astype(acc_dtype)                  # (bm, block_cin)
            xs = jnp.where(inside[:, None], xs, 0.0)                 # zero padding
            ws = w_ref[tap, cols, :].astype(acc_dtype)                # (block_cin, bn)
            return acc + jnp.abs(xs[:, :, None] - ws[None, :, :])

        return _loop(chunks, add_chunk, acc)

    acc = _loop(geo["kh"] * kw, add_tap, jnp.zeros((bm, block_cin, bn), acc_dtype))
    o_ref[...] = (-jnp.sum(acc, axis=1)).astype(o_ref.dtype)


def _input_grad_kernel(x_ref, w_ref, g_ref, o_ref, *, geo, rows_phase, cols_phase,
                       block_cout, acc_dtype):
    """One (input pixels x cin) tile of ``sum_taps sum_cout g * clip(W - x, -1, 1)``, over
    the pixels of one phase class (:class:`_Phase` along rows and columns) and only the
    taps that read them."""
    bm, bc = o_ref.shape
    h, w, ho, wo = geo["h"], geo["w"], geo["ho"], geo["wo"]
    s, kw = geo["stride"], geo["kw"]
    hc, wc = rows_phase.count, cols_phase.count
    pixel = jnp.minimum(pl.program_id(0) * bm + _iota(bm), geo["n"] * hc * wc - 1)
    image, rest = _div(pixel, hc * wc), _rem(pixel, hc * wc)
    a, b = _div(rest, wc), _rem(rest, wc)         # the pixel's row and column in its class
    x_rows = (image * h + rows_phase.start + s * a) * w + cols_phase.start + s * b
    cols_in = pl.ds(pl.multiple_of(pl.program_id(1) * bc, bc), bc)
    xs = x_ref[x_rows, cols_in].astype(acc_dtype)                          # (bm, bc)
    chunks = g_ref.shape[1] // block_cout

    def add_tap(t, acc):
        ti, tj = _div(t, cols_phase.taps), _rem(t, cols_phase.taps)  # the class's taps
        oh, ow = a + (rows_phase.shift - ti), b + (cols_phase.shift - tj)
        reads = (oh >= 0) & (oh < ho) & (ow >= 0) & (ow < wo)
        rows = jnp.where(reads, (image * ho + oh) * wo + ow, 0)   # 0: any valid row
        tap = (rows_phase.first_tap + s * ti) * kw + cols_phase.first_tap + s * tj

        def add_chunk(c, acc):
            cols = pl.ds(pl.multiple_of(c * block_cout, block_cout), block_cout)
            gs = g_ref[rows, cols].astype(acc_dtype)                   # (bm, block_cout)
            gs = jnp.where(reads[:, None], gs, 0.0)       # no output pixel reads x here
            ws = w_ref[tap, :, cols].astype(acc_dtype)                 # (bc, block_cout)
            clipped = jnp.minimum(jnp.maximum(ws[None, :, :] - xs[:, :, None], -1.0), 1.0)
            return acc + clipped * gs[:, None, :]

        return _loop(chunks, add_chunk, acc)

    acc = _loop(rows_phase.taps * cols_phase.taps, add_tap,
                jnp.zeros((bm, bc, block_cout), acc_dtype))
    o_ref[...] = jnp.sum(acc, axis=2).astype(o_ref.dtype)


def _compiler_params(tiles):
    """Triton, explicitly: the default GPU lowering may be Mosaic GPU in newer JAX."""
    return plt.CompilerParams(num_warps=tiles.warps)


def _blocks(owned: int, reduced: int, tiles: Tiles):
    """(owned padded, block of owned channels, reduced padded, chunk of reduced channels)."""
    owned_p, reduced_p = _pow2_at_least(owned), _pow2_at_least(reduced)
    block = min(tiles.channels, owned_p)
    chunk = max(1, min(reduced_p, tiles.accumulator // (tiles.pixels * block)))
    return owned_p, block, reduced_p, chunk


def _padded_taps(kernel, cin_p, cout_p):
    """HWIO kernel -> (kh*kw, cin_p, cout_p), zero-padded channels."""
    kh, kw, cin, cout = kernel.shape
    return jnp.pad(kernel.reshape(kh * kw, cin, cout),
                   ((0, 0), (0, cin_p - cin), (0, cout_p - cout)))


def forward(x, kernel, stride, padding, *, tiles: Tiles = Tiles(),
            interpret: bool | None = None):
    """Eq. 1, ``Y = -sum_j |P_j - W_jc|``: one Pallas kernel over (pixels x cout) tiles
    (module docstring; ``interpret`` as there)."""
    geo = _geometry(x.shape, kernel.shape, stride, padding)
    interpret = resolve_interpret(interpret)
    acc = accumulation_dtype(jnp.result_type(x, kernel))
    cout_p, block_cout, cin_p, block_cin = _blocks(geo["cout"], geo["cin"], tiles)
    pixels = geo["n"] * geo["ho"] * geo["wo"]
    pixels_p = _round_up(pixels, tiles.pixels)
    x_rows = _channels_padded(x.reshape(-1, geo["cin"]), cin_p)
    w = _padded_taps(kernel, cin_p, cout_p)
    out = pl.pallas_call(
        functools.partial(_forward_kernel, geo=geo, block_cin=block_cin, acc_dtype=acc),
        out_shape=jax.ShapeDtypeStruct((pixels_p, cout_p), jnp.result_type(x, kernel)),
        grid=(pixels_p // tiles.pixels, cout_p // block_cout),
        in_specs=[pl.BlockSpec(x_rows.shape, lambda i, j: (0, 0)),
                  pl.BlockSpec((w.shape[0], cin_p, block_cout), lambda i, j: (0, 0, j))],
        out_specs=pl.BlockSpec((tiles.pixels, block_cout), lambda i, j: (i, j)),
        compiler_params=_compiler_params(tiles),
        interpret=interpret,
        name="adder_forward",
    )(x_rows, w)
    return out[:pixels, :geo["cout"]].reshape(geo["n"], geo["ho"], geo["wo"], geo["cout"])


def _interleave(classes, h, w):
    """``dx`` from its phase classes, ``classes[i][j]`` holding the pixels
    ``(i + s * a, j + s * b)``: each zero-padded to ``ceil(h / s) x ceil(w / s)``, stacked
    as ``(s, s, n, h', w', c)``, its phase axes moved behind the spatial ones and merged
    with them, which interleaves the rows and columns; the rows and columns past ``h`` and
    ``w`` (padding) are sliced off. For stride 1 XLA elides every step: dx is the kernel's
    output, reshaped."""
    s = len(classes)
    n, _, _, c = classes[0][0].shape
    hs, ws = _ceil_div(h, s), _ceil_div(w, s)
    stacked = jnp.stack([jnp.stack([
        jnp.pad(part, ((0, 0), (0, hs - part.shape[1]), (0, ws - part.shape[2]), (0, 0)))
        for part in row]) for row in classes])
    return stacked.transpose(2, 3, 0, 4, 1, 5).reshape(n, hs * s, ws * s, c)[:, :h, :w]


def input_grad(x, kernel, g, stride, padding, *, tiles: Tiles = Tiles(),
               interpret: bool | None = None):
    """The HardTanh rule, ``dP_j = sum_c g_c clip(W_jc - P_j, -1, 1)`` folded back onto x:
    one kernel launch per phase class (:func:`_phases`) that some tap reads; x and g are
    gathered from in place, only the classes' outputs are new."""
    geo = _geometry(x.shape, kernel.shape, stride, padding)
    interpret = resolve_interpret(interpret)
    acc = accumulation_dtype(jnp.result_type(x, kernel))
    cin_p, block_cin, cout_p, block_cout = _blocks(geo["cin"], geo["cout"], tiles)
    x_rows = _channels_padded(x.reshape(-1, geo["cin"]), cin_p)
    g_rows = _channels_padded(g.reshape(-1, geo["cout"]), cout_p)
    w = _padded_taps(kernel, cin_p, cout_p)

    def phase_class(rows_phase, cols_phase):
        shape = (geo["n"], rows_phase.count, cols_phase.count, geo["cin"])
        pixels = geo["n"] * rows_phase.count * cols_phase.count
        if pixels == 0 or rows_phase.taps * cols_phase.taps == 0:
            return jnp.zeros(shape, acc)             # no pixels, or no tap reads them
        pixels_p = _round_up(pixels, tiles.pixels)
        dx = pl.pallas_call(
            functools.partial(_input_grad_kernel, geo=geo, rows_phase=rows_phase,
                              cols_phase=cols_phase, block_cout=block_cout, acc_dtype=acc),
            out_shape=jax.ShapeDtypeStruct((pixels_p, cin_p), acc),
            grid=(pixels_p // tiles.pixels, cin_p // block_cin),
            in_specs=[pl.BlockSpec(x_rows.shape, lambda i, j: (0, 0)),
                      pl.BlockSpec((w.shape[0], block_cin, cout_p), lambda i, j: (0, j, 0)),
                      pl.BlockSpec(g_rows.shape, lambda i, j: (0, 0))],
            out_specs=pl.BlockSpec((tiles.pixels, block_cin), lambda i, j: (i, j)),
            compiler_params=_compiler_params(tiles),
            interpret=interpret,
            name="adder_input_grad",
        )(x_rows, w, g_rows)
        return dx[:pixels, :geo["cin"]].reshape(shape)

    s, p = geo["stride"], geo["padding"]
    return _interleave([[phase_class(rows_phase, cols_phase)
                         for cols_phase in _phases(geo["w"], geo["kw"], s, p)]
                        for rows_phase in _phases(geo["h"], geo["kh"], s, p)],
                       geo["h"], geo["w"])


# The full-precision weight gradient (unscaled): linear in the patches, left to XLA as a
# multiplying convolution's kernel gradient (module docstring).
weight_grad = weight_grad_by_conv


def check_tiles(tiles: Tiles, argument: str):
    """A clear error unless every size of ``tiles`` is a power of two (Triton's rule)."""
    for name, value in tiles._asdict().items():
        if value < 1 or value & (value - 1):
            raise ValueError(f"adder_pallas: {argument}.{name} must be a power of two, "
                             f"got {value}")
