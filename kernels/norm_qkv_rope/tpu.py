"""The Pallas TPU `norm_qkv_rope`.

`norm_qkv_rope_pallas_tpu` (impl "pallas_tpu") is three Mosaic kernels and a little XLA:
  forward   palm_norm_qkv_rope_fwd     LN prologue, LN(x)·[wq | wk | wv], RoPE epilogue on q, k
  backward  palm_norm_qkv_rope_bwd_dx  inverse-RoPE prologue, dh = g·[wq | wk | wv]^T
            palm_norm_qkv_rope_bwd_dw  LN-recompute prologue, dW = LN(x)^T·g
  XLA       the LayerNorm row statistics (mean, rstd: 8 bytes per row) before the forward, and
            the LayerNorm backward (row/column reductions of dh) after bwd_dx.
The custom_vjp (pallas.py, shared with gpu.py) is built on three public pieces, which
`kernels.block_in` also calls to share one LayerNorm between this op and `norm_swiglu`:
`prepare` (checks, default tiles: `Settings`), `forward_with_stats` (the forward from row
statistics the caller computed with `kernels._common.row_stats`) and `backward_to_dh` (both
backward kernels; the caller finishes with `kernels._common.layer_norm_bwd`); the latter two are
pallas.py's over this module's `forward_rows` and `backward_rows` (pallas.py describes them).
Design notes sit above the kernels; in short: the LayerNorm statistics come from a first pass
(XLA), each x tile is normalised in the kernel prologue, so the contraction over D may be tiled
(`block_d` < D: VMEM-bound generations, PaLM-540B) or D-resident (`block_d` = D); column tiles
hold whole heads so RoPE's rotate-half partner is always in the tile.

HBM traffic (`hbm_bytes`: each operand block fetched whenever its block index changes between
grid steps, results written once), bf16, B=1, T=2048 (M=2048 rows), in MiB; "before" are the
D-tiled default tiles this module had (512 rows or fewer, 512 of D, 1024/512 query lanes),
"after" the default tiles now (`BlockSizes.get_default`, the fewest bytes that fit the
generation's `vmem_budget`), forward | bwd_dx + bwd_dw:
  PaLM-8B (D=4096, H=16, K=256)   before            after
    v4 (12 MiB budget)          674 | 451 + 325   342 | 379 + 325
    v5p (48 MiB)                242 | 307 + 325   166 | 211 + 152
    v5e, v6e (96 MiB)           242 | 307 + 325   102 | 151 + 134
  PaLM-540B (D=18432, H=48, K=256)
    v4                         8186 | 5451 + 4064  4100 | 4551 + 4064
    v5p                        2786 | 3651 + 4064  1886 | 2355 + 1838
    v5e, v6e                   2786 | 3651 + 4064  1454 | 1455 + 1838
Where x's block covers D (block_d = D) its index stays put along the column axis, so the forward
reads each row tile of x once instead of once per column tile, and bwd_dx reads each dq tile
once instead of once per D tile; the rest of the saving is larger row tiles, each reading the
weights once. PaLM-8B on v5e/v6e forward: x 16, wq 2 x 32 (two row tiles of 1024), wk and wv 4
(read once: their block index never moves), q|k|v 18; its tiles (rows, heads, D tile): forward
(1024, 4, 4096), backward (688, 4, 4096); on v5p (512, 2, 4096) and (512, 4, 2048); on v4
D-tiled. Not in these figures: the LayerNorm statistics pass (x read twice by XLA: 32 MiB at
PaLM-8B, 144 at 540B) and the LayerNorm backward in XLA (~110 MiB at PaLM-8B: dh and x read, dx
written, their reductions); `kernels.block_in` runs each once per layer for this op and
`norm_swiglu` together (the op alone, `norm_qkv_rope_pallas_tpu`, pays both itself).
At 540B the weights (450 MiB) dominate: no D-resident row tile of more than 208 rows fits
96 MiB beside one head's weight blocks (x 72 KiB per row double-buffered, its float32 LN 72 KiB),
so D-tiled tiles with 1024 rows (the weights read twice) move fewer bytes.

XLA running the reference at PaLM-8B, counting each operand once (its matmuls' own tile
re-reads left out): forward ~238 (LN 64: x read 3x, h written; three matmuls 120: h read 3x,
weights, f32 q|k|v written; RoPE and casts 54); backward ~470 (f32 rotated cotangents 54, three
dh partials 120 and their sum 64, dW with h read 3x 120, LayerNorm backward ~110). Ours with the
statistics pass on v5e/v6e: forward 134, backward ~395 with the LayerNorm backward (v5p: 198,
~473). h, the f32 projections and the f32 rotated cotangents never reach HBM. The forward does
77.3 GFLOP, ~720 flop per kernel byte on v5e/v6e, above both ridge points (~240, ~560).

bwd_dw still reads x once per column tile (5x at PaLM-8B, 64 MiB of its 134): its grid walks
the rows innermost (the contraction), so x's block index changes at every step. Reading x once
needs one row tile (the index then stays put along the column axis), i.e. [B*T, block_d] x and
float32 LN blocks: at D-resident tiles that is 152 MiB of VMEM at PaLM-8B, over every budget;
with its own D tile of 2048 it would fit v5e/v6e (84 MiB) and move 86 MiB instead of 134, but
bwd_dw shares its tiles with bwd_dx, whose best D tile there is D (BlockSizes would need a
third set of fields).
Layout caveat: wq [D,H,K] -> [D,H*K] and q [M,H*K] -> [B,T,H,K] are free reshapes logically,
but TPU HBM tiles the two minor dims, so XLA may copy at each (~32 MiB read + write for wq,
the same for q, per call at PaLM-8B). Storing wq as [D, H*K] in the model would avoid the first.

VMEM (`vmem_bytes`: double-buffered blocks, [rows, 1] blocks padded to 128 lanes, scratch and
in-kernel temporaries such as the float32 LN of an x block) of the defaults above is within
each generation's `vmem_budget` (capacity less a quarter: 12, 48, 96 MiB); each pallas_call
asks for its estimate plus headroom with vmem_limit_bytes. float32 inputs get smaller tiles.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels._common import tpu_interpret
from kernels._tpu import pallas_call as tpu_pallas_call
from kernels._tpu import compiler_params, round_up, sublane, tile_bytes, vmem_budget
from kernels.norm_qkv_rope import pallas
from kernels.norm_qkv_rope.pallas import Settings
from kernels.rope.tpu import frequency_row, rotate_half, write_cos_sin


# ----------------------------------------------------------------------------------------------
# Shape of the work. Rows are the M = B*T positions; columns are the (H + 2) * K outputs of one
# matmul LN(x) · [wq | wk | wv] ([D, (H+2)*K]). The weights stay three arrays (no per-call
# concatenation): the column grid axis j runs over nq = ceil(H / block_heads) tiles of query
# heads, then one tile holding k and v together. While one weight is in use the others' index
# maps stay on a fixed block (wq on the block it used last, wk/wv on their first), so the
# pipeline, which skips a copy whose block index did not change, fetches nothing for them.
#
# LayerNorm. The per-row mean and rstd come from a cheap first pass in the wrapper (XLA
# reductions over x, 8 bytes per row written; `kernels.block_in` shares it with norm_swiglu);
# each [rows, block_d] tile of x is normalised on the fly in the kernel prologue, exactly as
# `layer_norm_f32` does it, and rounded to x's dtype before the MXU, as the reference rounds h.
# So the contraction over D may be tiled (block_d < D, where a whole-D row tile does not fit
# VMEM: v4, and PaLM-540B everywhere) or not (block_d = D: x fetched once per row tile). The
# normalisation is repeated for each column tile: ~4 VPU operations per x element against
# 2 * block_heads * K MXU flops. Normalising once per row tile into a VMEM scratch would not
# buy a larger row tile at PaLM-8B (x's double-buffered block and an x-sized scratch cost about
# what the float32 temporary does) and would need the column axis to stay sequential per core.
#
# RoPE. A column tile holds whole heads, so the rotate-half partner of every lane is in the
# tile: the epilogue rotates each head's [rows, K] slice of the float32 accumulator
# (`kernels.rope.tpu.rotate_half`) and rounds once. cos/sin depend on the rows only: computed
# at the first step of each row tile into VMEM scratch (the column and D axes are "arbitrary",
# so one core walks them in order) and reused by every head and by k.
#
# Edges. Rows and heads that overhang the arrays only produce overhanging outputs, which are
# dropped on write; a D that overhangs block_d would add garbage to the sums, so the last D tile
# is masked (a static flag: no masking code at all where block_d divides D, as at PaLM shapes).
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles for `norm_qkv_rope`: forward, and backward (both backward kernels).

    block_rows: rows (B*T positions) per tile; a multiple of 8 (16 suits bf16).
    block_heads: query heads per column tile (k and v form one extra tile); natively
      block_heads * K must be a multiple of 128 unless it covers all H heads.
    block_d: tile of the model width D: the forward's contraction, the output's D axis in
      both backward kernels; natively a multiple of 128 unless it covers all of D.
    """

    block_rows: int
    block_heads: int
    block_d: int
    block_rows_bwd: int
    block_heads_bwd: int
    block_d_bwd: int

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"norm_qkv_rope.BlockSizes.{field.name} must be a positive int, "
                                 f"got {value!r}")
        for name in ("block_rows", "block_rows_bwd"):
            if getattr(self, name) % 8:
                raise ValueError(f"norm_qkv_rope.BlockSizes.{name} must be a multiple of 8 "
                                 f"(TPU sublanes), got {getattr(self, name)}")

    @classmethod
    def get_default(cls, x_shape: tuple[int, ...], wq_shape: tuple[int, ...],
                    dtype, generation: str | None = None) -> "BlockSizes":
        """The tiles that move the fewest HBM bytes (`hbm_bytes`) among those whose VMEM
        (`vmem_bytes`) fits `vmem_budget(generation)` (default: the target generation), chosen
        for the forward and for the two backward kernels together.

        Candidates: block_d = D (D-resident: x and dq read once), 2048 or 1024 where they
        divide D, or 512 (else a smaller divisor of D); about 256 to 2048 query lanes per
        column tile (`_pick_heads`); for each pair the largest row tile that fits, the B*T rows
        split into n = 2, 3, ..., 16, 32, 64, ... equal tiles rounded up to `sublane(dtype)`
        (two at least, so a megacore chip's two TensorCores share the parallel row axis). Ties
        go to the fewer grid steps. PaLM-8B and 540B on each generation: the module docstring.
        """
        b, t, d = x_shape
        _, h, k = wq_shape
        m, sub = b * t, sublane(dtype)
        budget = vmem_budget(generation)
        tiled_d = d if d <= 512 else next((c for c in (512, 384, 256, 128) if d % c == 0), 512)
        depths = [d, *(c for c in (2048, 1024) if c < d and d % c == 0), tiled_d]
        heads = sorted({_pick_heads(h, k, lanes) for lanes in (256, 512, 1024, 2048)})
        splits = [*range(2, 17), *(2**p for p in range(5, max(5, m.bit_length())))]
        row_tiles = sorted({round_up(pl.cdiv(m, n), sub) for n in splits}, reverse=True)
        # The forward's candidates carry these backward fields, which its estimates ignore.
        smallest = cls(row_tiles[-1], heads[0], tiled_d, row_tiles[-1], heads[0], tiled_d)

        def best(make, names):
            """make(rows, heads, block_d) -> BlockSizes; the cheapest that fits, else the
            smallest tiles."""
            found = []
            for hb in heads:
                for td in dict.fromkeys(depths):
                    for rows in row_tiles:
                        blocks = make(rows, hb, td)
                        if max(vmem_bytes(x_shape, wq_shape, dtype, blocks)[n]
                               for n in names) <= budget:
                            moved = hbm_bytes(x_shape, wq_shape, dtype, blocks)
                            steps = pl.cdiv(m, rows) * pl.cdiv(h, hb) * pl.cdiv(d, td)
                            found.append((sum(moved[n] for n in names), steps, blocks))
                            break
            if not found:
                return make(smallest.block_rows, smallest.block_heads, smallest.block_d)
            return min(found, key=lambda f: f[:2])[2]

        fwd = best(lambda r, hb, td: dataclasses.replace(smallest, block_rows=r,
                                                         block_heads=hb, block_d=td),
                   ("forward",))
        return best(lambda r, hb, td: dataclasses.replace(fwd, block_rows_bwd=r,
                                                          block_heads_bwd=hb, block_d_bwd=td),
                    ("bwd_dx", "bwd_dw"))


def _pick_heads(h: int, k: int, lanes: int) -> int:
    """Query heads per column tile: about `lanes` lanes, a divisor of H with a 128-multiple
    width if there is one, else all heads when they are few, else a lane-aligned count."""
    want = max(1, lanes // k)
    if want >= h:
        return h
    for c in range(want, 0, -1):
        if h % c == 0 and (c * k) % 128 == 0:
            return c
    aligned = 128 // math.gcd(k, 128)  # fewest heads spanning whole 128-lane tiles
    return h if h * k <= 2048 else max(aligned, want // aligned * aligned)


def _grid(m: int, d: int, h: int, blocks: BlockSizes, *, backward: bool):
    """(rows bm, heads hb, D tile td, row tiles nm, head tiles nq, D tiles nd) of the forward or
    backward tiles clipped to the problem."""
    rows, heads, depth = ((blocks.block_rows_bwd, blocks.block_heads_bwd, blocks.block_d_bwd)
                          if backward else (blocks.block_rows, blocks.block_heads, blocks.block_d))
    bm, hb, td = min(rows, m), min(heads, h), min(depth, d)
    return bm, hb, td, pl.cdiv(m, bm), pl.cdiv(h, hb), pl.cdiv(d, td)


def hbm_bytes(x_shape: tuple[int, ...], wq_shape: tuple[int, ...], dtype,
              blocks: BlockSizes) -> dict[str, int]:
    """HBM bytes each kernel moves at these blocks: an input block is fetched whenever its
    block index differs from the previous grid step's (the Pallas pipeline skips the copy
    otherwise), each result written once; the [rows, 1] positions and statistics count 4
    bytes per row per fetch, norm_scale and the frequencies are left out (under 80 KiB).

    x is read once where its block index stays put along the column axes (the forward and
    bwd_dw with one D tile, bwd_dw with one row tile), else once per column tile; a weight
    [D, ·] once per row tile unless it has a single block; dq once per D tile in bwd_dx
    unless the heads fit one column tile.
    """
    b, t, d = x_shape
    _, h, k = wq_shape
    m, isz = b * t, jnp.dtype(dtype).itemsize
    x, dh = m * d * isz, m * d * isz
    wq, wkv = d * h * k * isz, 2 * d * k * isz  # wk and wv together
    q, kv = m * h * k * isz, 2 * m * k * isz  # q (or dq); k and v (or dk and dv)

    bm, hb, td, nm, nq, nd = _grid(m, d, h, blocks, backward=False)
    forward = (x * (1 if nd == 1 else nq + 1)
               + wq * (1 if nq == nd == 1 else nm)
               + wkv * (1 if nd == 1 else nm)
               + q + kv + 12 * m)

    bm, hb, td, nm, nq, nd = _grid(m, d, h, blocks, backward=True)
    bwd_dx = (q * (1 if nq == 1 else nd) + kv
              + wq * (1 if nq == nd == 1 else nm) + wkv * (1 if nd == 1 else nm)
              + dh + q + kv // 2 + 4 * m)  # dh, rotated dq and dk written
    bwd_dw = (x * (1 if nm == 1 else nq + 1)
              + 8 * m * (1 if nm == 1 else nd * (nq + 1))  # mean, rstd
              + q * (1 if nq == nm == 1 else nd)
              + kv * (1 if nm == 1 else nd)
              + wq + wkv)  # dW written
    return {"forward": forward, "bwd_dx": bwd_dx, "bwd_dw": bwd_dw}


def vmem_bytes(x_shape: tuple[int, ...], wq_shape: tuple[int, ...], dtype,
               blocks: BlockSizes) -> dict[str, int]:
    """VMEM each kernel needs at these blocks (double-buffered blocks, scratch and in-kernel
    temporaries: the float32 LN(x) tile and its cast, the float32 dot result, and three float32
    values the size of the rotated columns for RoPE's products and roll; all padded to whole
    (sublane, 128-lane) tiles); `vmem_bytes(...)["max"]` is the largest."""
    b, t, d = x_shape
    _, h, k = wq_shape
    m = b * t
    isz = jnp.dtype(dtype).itemsize
    sub = sublane(dtype)

    def tile(rows, cols, itemsize=isz):
        return tile_bytes(rows, cols, itemsize)

    def clip(bm, hb, td):
        return min(bm, round_up(m, sub)), min(hb, h), min(td, d)

    column = 2 * tile(8, 1, 4) // 8  # per row: a double-buffered [rows, 1] f32/int32 block
    freq = 2 * tile(1, k, 4)

    bm, hb, td = clip(blocks.block_rows, blocks.block_heads, blocks.block_d)
    bn = hb * k
    forward = (3 * column * bm + freq
               + 2 * (tile(bm, td) + tile(1, td) + tile(td, bn) + 2 * tile(td, k))  # inputs
               + 2 * (tile(bm, bn) + 2 * tile(bm, k))  # q, k, v blocks
               + tile(bm, max(bn, 2 * k), 4) + 2 * tile(bm, k, 4)  # accumulator, cos/sin
               + tile(bm, td, 4) + tile(bm, td) + 4 * tile(bm, max(bn, 2 * k), 4))  # temporaries

    bm, hb, td = clip(blocks.block_rows_bwd, blocks.block_heads_bwd, blocks.block_d_bwd)
    bn = hb * k
    bwd_dx = (column * bm + freq
              + 2 * (tile(bm, bn) + 2 * tile(bm, k) + tile(td, bn) + 2 * tile(td, k))  # inputs
              + 2 * (tile(bm, td) + tile(bm, bn) + tile(bm, k))  # dh, rotated dq and dk
              + tile(bm, td, 4) + tile(bm, bn) + 2 * tile(bm, k, 4)  # acc, dq tile, cos/sin
              + 2 * tile(bm, td, 4) + tile(bm, td)  # a product, the sum, dh's cast
              + 3 * tile(bm, max(bn, 2 * k), 4))  # rotation temporaries
    bwd_dw = (2 * column * bm
              + 2 * (tile(1, td) + tile(bm, td) + tile(bm, bn) + 2 * tile(bm, k))  # inputs
              + 2 * (tile(td, bn) + 2 * tile(td, k))  # dwq, dwk, dwv blocks
              + tile(td, max(bn, 2 * k), 4)  # accumulator
              + tile(bm, td, 4) + tile(bm, td) + tile(td, max(bn, 2 * k), 4))  # temporaries
    return {"forward": forward, "bwd_dx": bwd_dx, "bwd_dw": bwd_dw,
            "max": max(forward, bwd_dx, bwd_dw)}


def _normalise(x_ref, mean_ref, rstd_ref, scale_ref, dtype):
    """The prologue: LN of an x tile with precomputed row statistics, rounded to x's dtype;
    `layer_norm_rows` in the order that loads each operand where it is first needed."""
    x = x_ref[...].astype(jnp.float32)
    return ((x - mean_ref[...]) * rstd_ref[...] * scale_ref[...].astype(jnp.float32)).astype(dtype)


def _mask_tail(a: jax.Array, axis: int, valid) -> jax.Array:
    """Zeroes a tile's entries at index >= valid along axis (garbage past an array's edge)."""
    idx = jax.lax.broadcasted_iota(jnp.int32, a.shape, axis)
    return jnp.where(idx < valid, a, jnp.zeros_like(a))


def _dot(a, b, contract_a: int, contract_b: int) -> jax.Array:
    """a·b contracting the given axes, accumulated in float32 on the MXU."""
    return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                               preferred_element_type=jnp.float32)


def _accumulate_columns(acc_ref, x_ref, mean_ref, rstd_ref, scale_ref, q_ref, k_ref, v_ref, *,
                        j, nq: int, c, n_steps: int, tail: int, contract: int):
    """One contraction step c (of n_steps) of h = LN(x) against column tile j of the operand
    split [query heads | k | v], into the f32 accumulator: the forward's h·W (contract=1: h's
    D axis) and bwd_dw's hᵀ·g (contract=0: h's rows). Tiles j < nq hold query heads (q_ref
    [·, hb*K] into acc[:, :hb*K]), tile nq holds k and v side by side (acc[:, :2K]). Where the
    contracted axis overhangs its array by the last step (`tail` entries remain), the entries
    past it are zeroed on both sides: they hold garbage, and 0 * NaN = NaN."""

    @pl.when(c == 0)
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    h = _normalise(x_ref, mean_ref, rstd_ref, scale_ref, x_ref.dtype)  # [bm, td]
    if tail:
        valid = jnp.where(c == n_steps - 1, tail, h.shape[contract])
        h = _mask_tail(h, contract, valid)

    def load(ref):  # read inside the branch that uses it
        return _mask_tail(ref[...], 0, valid) if tail else ref[...]

    bn, k = q_ref.shape[1], k_ref.shape[1]

    @pl.when(j < nq)
    def _q_heads():
        acc_ref[:, :bn] += _dot(h, load(q_ref), contract, 0)

    @pl.when(j == nq)
    def _kv():
        acc_ref[:, :k] += _dot(h, load(k_ref), contract, 0)
        acc_ref[:, k:2 * k] += _dot(h, load(v_ref), contract, 0)


def _fwd_kernel(pos_ref, mean_ref, rstd_ref, scale_ref, freq_ref, x_ref, wq_ref, wk_ref, wv_ref,
                q_ref, k_ref, v_ref, acc_ref, cos_ref, sin_ref,
                *, nq: int, nd: int, d_tail: int, block_heads: int, head_dim: int):
    # Grid (row tile i, column tile j in [0, nq], D tile dd). Refs: pos/mean/rstd [bm, 1];
    # scale [1, td]; freq [1, K]; x [bm, td]; wq [td, hb*K]; wk, wv [td, K];
    # q [bm, hb*K]; k, v [bm, K]. Scratch: the f32 accumulator [bm, max(hb*K, 2K)] (query
    # heads, or k then v) and cos/sin [bm, K].
    j, dd = pl.program_id(1), pl.program_id(2)

    @pl.when((j == 0) & (dd == 0))
    def _angles():
        write_cos_sin(pos_ref, freq_ref, cos_ref, sin_ref)  # [bm, K]

    _accumulate_columns(acc_ref, x_ref, mean_ref, rstd_ref, scale_ref, wq_ref, wk_ref, wv_ref,
                        j=j, nq=nq, c=dd, n_steps=nd, tail=d_tail, contract=1)  # h·W
    k = head_dim
    last = dd == nd - 1

    @pl.when(last & (j < nq))
    def _rope_q():
        cos, sin = cos_ref[...], sin_ref[...]
        for head in range(block_heads):
            cols = slice(head * head_dim, (head + 1) * head_dim)
            q_ref[:, cols] = rotate_half(acc_ref[:, cols], cos, sin).astype(q_ref.dtype)

    @pl.when(last & (j == nq))
    def _rope_k():
        k_ref[...] = rotate_half(acc_ref[:, :k], cos_ref[...], sin_ref[...]).astype(k_ref.dtype)
        v_ref[...] = acc_ref[:, k:2 * k].astype(v_ref.dtype)


def _check_native_blocks(d: int, h: int, k: int, hb: int, td: int) -> None:
    """The (sublane, 128-lane) rule Mosaic imposes on the minor two block dims, and whole
    128-lane heads: RoPE rolls each head's K lanes by K/2 (`pltpu.roll`) and the epilogue slices
    the accumulator at head boundaries (K lanes apart), layouts Mosaic has only for whole
    vregs. Padding K here would mean padding every weight per head (a copy of wq per call), so
    smaller heads (the demo and tiny presets) are refused natively and run interpreted."""
    if k % 128:
        raise ValueError(f"norm_qkv_rope: head dim K={k} must be a multiple of 128 lanes to "
                         "compile natively (RoPE's roll over K lanes and per-head lane slices "
                         "are not legal Mosaic layouts below 128); use interpret=True or "
                         "impl='xla' for smaller heads")
    if td % 128 and td < d:
        raise ValueError(f"norm_qkv_rope: block_d={td} must be a multiple of 128 or cover "
                         f"D={d} (TPU lane tiling)")
    if (hb * k) % 128 and hb < h:
        raise ValueError(f"norm_qkv_rope: block_heads={hb} x K={k} must be a multiple of 128 "
                         f"lanes or cover all H={h} heads (TPU lane tiling)")


def _tiles(settings: Settings, m: int, d: int, h: int, k: int, *, backward: bool):
    """The forward or backward tiles clipped to the problem, and the grid they make:
    (rows bm, heads hb, D tile td, q columns bn = hb*K, row tiles, head tiles, D tiles)."""
    bm, hb, td, nm, nq, nd = _grid(m, d, h, settings.block_sizes, backward=backward)
    if settings.interpret is False:
        _check_native_blocks(d, h, k, hb, td)
    return bm, hb, td, hb * k, nm, nq, nd


def _vmem(settings: Settings, m: int, d: int, h: int, k: int, dtype, kernel: str) -> int:
    """`vmem_bytes` of one kernel on the flattened [M, D] rows."""
    return vmem_bytes((1, m, d), (d, h, k), dtype, settings.block_sizes)[kernel]


def _hbm(settings: Settings, m: int, d: int, h: int, k: int, dtype, kernel: str) -> int:
    """`hbm_bytes` of one kernel on the flattened [M, D] rows (its CostEstimate)."""
    return hbm_bytes((1, m, d), (d, h, k), dtype, settings.block_sizes)[kernel]


def _parked_maps(nq: int, n_contract: int):
    """Index maps for the forward's weights and bwd_dw's cotangents: operands split into query
    heads ([·, H*K], column tiles j < nq) and k/v ([·, K], the tile j == nq), on a grid
    (·, j, c) that contracts over c. An operand not in use stays parked on one block (the
    query heads on their last, k/v on their first), so the pipeline fetches nothing for it."""
    last = n_contract - 1

    def q_map(_, j, c):
        return jnp.where(j < nq, c, last), jnp.minimum(j, nq - 1)

    def kv_map(_, j, c):
        return jnp.where(j == nq, c, 0), 0

    return q_map, kv_map


def _forward_call(settings: Settings, x2, scale, wq2, wk, wv, pos2, mean, rstd, h: int):
    """The forward pallas_call on x2 [M, D]; returns q2 [M, H*K], k, v [M, K]."""
    m, d = x2.shape
    k = wk.shape[1]
    bm, hb, td, bn, nm, nq, nd = _tiles(settings, m, d, h, k, backward=False)
    wq_map, kv_map = _parked_maps(nq, nd)
    row = lambda i, j, dd: (i, 0)  # noqa: E731
    cost = pl.CostEstimate(
        flops=2 * m * d * (h + 2) * k + 4 * m * d * (nq + 1) + 3 * m * (h + 1) * k,
        transcendentals=2 * m * k,
        bytes_accessed=_hbm(settings, m, d, h, k, x2.dtype, "forward"),
    )
    kernel = functools.partial(_fwd_kernel, nq=nq, nd=nd, d_tail=d % td, block_heads=hb,
                               head_dim=k)
    with jax.named_scope(f"palm_norm_qkv_rope_fwd bm={bm} bh={hb} bd={td}"):
        return tpu_pallas_call(
            kernel,
            grid=(nm, nq + 1, nd),
            in_specs=[
                pl.BlockSpec((bm, 1), row),  # positions
                pl.BlockSpec((bm, 1), row),  # mean
                pl.BlockSpec((bm, 1), row),  # rstd
                pl.BlockSpec((1, td), lambda i, j, dd: (0, dd)),  # norm_scale
                pl.BlockSpec((1, k), lambda i, j, dd: (0, 0)),  # frequencies
                pl.BlockSpec((bm, td), lambda i, j, dd: (i, dd)),  # x
                pl.BlockSpec((td, bn), wq_map),
                pl.BlockSpec((td, k), kv_map),
                pl.BlockSpec((td, k), kv_map),
            ],
            out_specs=[
                pl.BlockSpec((bm, bn), lambda i, j, dd: (i, jnp.minimum(j, nq - 1))),
                pl.BlockSpec((bm, k), row),
                pl.BlockSpec((bm, k), row),
            ],
            out_shape=[
                jax.ShapeDtypeStruct((m, h * k), x2.dtype),
                jax.ShapeDtypeStruct((m, k), x2.dtype),
                jax.ShapeDtypeStruct((m, k), x2.dtype),
            ],
            scratch_shapes=[
                pltpu.VMEM((bm, max(bn, 2 * k)), jnp.float32),
                pltpu.VMEM((bm, k), jnp.float32),
                pltpu.VMEM((bm, k), jnp.float32),
            ],
            compiler_params=compiler_params(
                "parallel", "arbitrary", "arbitrary",
                vmem_bytes=_vmem(settings, m, d, h, k, x2.dtype, "forward")),
            cost_estimate=cost,
            interpret=settings.interpret,
            name="palm_norm_qkv_rope_fwd",
        )(pos2, mean, rstd, scale.reshape(1, d), frequency_row(k, settings.base, -1.0, 1.0),
          x2, wq2, wk, wv)


def forward_rows(settings: Settings, x2, norm_scale, wq, wk, wv, pos, mean, rstd):
    """The forward on rows (pallas.py's backend interface): q [M, H, K], k, v [M, K]."""
    d = x2.shape[1]
    _, h, k = wq.shape
    q2, k2, v2 = _forward_call(settings, x2, norm_scale, wq.reshape(d, h * k), wk, wv,
                               pos.reshape(-1, 1), mean, rstd, h)
    return q2.reshape(-1, h, k), k2, v2


# ----------------------------------------------------------------------------------------------
# Backward. With g = [R^-1 dq | R^-1 dk | dv] (R^-1: RoPE by -angle, the transpose of R):
#   dh = g · [wq | wk | wv]^T        [M, D]    kernel palm_norm_qkv_rope_bwd_dx
#   dW = h^T · g                     [D, (H+2)K] kernel palm_norm_qkv_rope_bwd_dw
#   dx, dscale = LayerNorm backward of dh           jnp (XLA)
#
# bwd_dx applies R^-1 to each dq/dk tile in its prologue (cos/sin once per row tile, cached as
# in the forward) and, on its first pass over D, also writes the rotated tiles out. bwd_dw
# reads those instead of rotating again: its grid walks the rows innermost, so it would need
# cos/sin for a new row tile at every step (sin and cos are VPU polynomials, tens of operations
# per lane: more vector work per step than the MXU's), while writing the rotated cotangents
# costs one extra M x (H+1)K write (17 MiB at PaLM-8B). bwd_dw recomputes h = LN(x) from x and
# the saved row statistics, so h never reaches HBM in either direction.
#
# The rotated cotangents are rounded to x's dtype: they feed the MXU in that dtype, as bf16 x
# bf16 products; dh is rounded to x's dtype once (the reference, whose h is in x's dtype, gets
# its cotangent in that dtype too, rounded per projection).
#
# The LayerNorm backward stays in jnp: it needs full-row reductions over D (mean of dxhat and of
# dxhat * xhat) that a D-tiled kernel cannot finish in its epilogue, plus a column reduction
# for dscale; it is memory-bound elementwise work that XLA fuses into a couple of passes over
# dh and x (~4 x 16 MiB at PaLM-8B), small next to the two matmul kernels.
# ----------------------------------------------------------------------------------------------


def _bwd_dx_kernel(pos_ref, freq_ref, dq_ref, dk_ref, dv_ref, wq_ref, wk_ref, wv_ref,
                   dh_ref, dqr_ref, dkr_ref, acc_ref, gq_ref, cos_ref, sin_ref,
                   *, nq: int, h_tail: int, block_heads: int, head_dim: int):
    # Grid (row tile i, D tile e, column tile j in [0, nq]: the contraction). Refs:
    # pos [bm, 1]; freq [1, K] (inverse); dq [bm, hb*K]; dk, dv [bm, K]; wq [td, hb*K];
    # wk, wv [td, K]; dh [bm, td]; dqr [bm, hb*K] and dkr [bm, K], the rotated cotangents.
    # Scratch: acc [bm, td] f32, gq [bm, hb*K] (rotated dq tile), cos/sin [bm, K] f32.
    e, j = pl.program_id(1), pl.program_id(2)

    @pl.when((e == 0) & (j == 0))
    def _angles():
        write_cos_sin(pos_ref, freq_ref, cos_ref, sin_ref)

    @pl.when(j == 0)
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(j < nq)
    def _q_heads():
        cos, sin = cos_ref[...], sin_ref[...]
        for head in range(block_heads):
            cols = slice(head * head_dim, (head + 1) * head_dim)
            g = rotate_half(dq_ref[:, cols].astype(jnp.float32), cos, sin)
            gq_ref[:, cols] = g.astype(gq_ref.dtype)
        gq, wq = gq_ref[...], wq_ref[...]
        if h_tail:  # heads past H in the last tile: garbage on both sides of the contraction
            valid = jnp.where(j == nq - 1, h_tail * head_dim, gq.shape[1])
            gq, wq = _mask_tail(gq, 1, valid), _mask_tail(wq, 1, valid)
        acc_ref[...] += _dot(gq, wq, 1, 1)

        @pl.when(e == 0)
        def _emit():
            dqr_ref[...] = gq_ref[...]

    @pl.when(j == nq)
    def _kv():
        gk = rotate_half(dk_ref[...].astype(jnp.float32), cos_ref[...], sin_ref[...])
        gk = gk.astype(dk_ref.dtype)
        acc_ref[...] += _dot(gk, wk_ref[...], 1, 1)  # in place: one [bm, td] f32 product live
        acc_ref[...] += _dot(dv_ref[...], wv_ref[...], 1, 1)
        dh_ref[...] = acc_ref[...].astype(dh_ref.dtype)

        @pl.when(e == 0)
        def _emit():
            dkr_ref[...] = gk


def _bwd_dw_kernel(mean_ref, rstd_ref, scale_ref, x_ref, gq_ref, gk_ref, gv_ref,
                   dwq_ref, dwk_ref, dwv_ref, acc_ref, *, nq: int, nm: int, m_tail: int):
    # Grid (D tile e, column tile j in [0, nq], row tile r: the contraction). Refs:
    # mean/rstd [bm, 1]; scale [1, td]; x [bm, td]; gq [bm, hb*K] and gk, gv [bm, K] (the
    # rotated cotangents and dv); dwq [td, hb*K]; dwk, dwv [td, K]. Scratch: the f32
    # accumulator [td, max(hb*K, 2K)] (query heads, or dwk then dwv).
    j, r = pl.program_id(1), pl.program_id(2)

    _accumulate_columns(acc_ref, x_ref, mean_ref, rstd_ref, scale_ref, gq_ref, gk_ref, gv_ref,
                        j=j, nq=nq, c=r, n_steps=nm, tail=m_tail, contract=0)  # h^T g
    bn, k = gq_ref.shape[1], gk_ref.shape[1]
    last = r == nm - 1

    @pl.when(last & (j < nq))
    def _write_q():
        dwq_ref[...] = acc_ref[:, :bn].astype(dwq_ref.dtype)

    @pl.when(last & (j == nq))
    def _write_kv():
        dwk_ref[...] = acc_ref[:, :k].astype(dwk_ref.dtype)
        dwv_ref[...] = acc_ref[:, k:2 * k].astype(dwv_ref.dtype)


def _bwd_dx_call(settings: Settings, dq2, dk2, dv2, wq2, wk, wv, pos2, h: int):
    """dh [M, D] = g · W^T, and the rotated cotangents R^-1 dq [M, H*K], R^-1 dk [M, K]."""
    m, k = dk2.shape
    d = wk.shape[0]
    bm, hb, td, bn, nm, nq, nd = _tiles(settings, m, d, h, k, backward=True)

    def q_cols(i, e, j):  # parked on its last block during the k/v step
        return i, jnp.minimum(j, nq - 1)

    def rotated_q(i, e, j):  # written on the first pass over D only, parked afterwards
        return i, jnp.where(e == 0, jnp.minimum(j, nq - 1), nq - 1)

    row = lambda i, e, j: (i, 0)  # noqa: E731
    cost = pl.CostEstimate(
        flops=2 * m * d * (h + 2) * k + 3 * m * (h + 1) * k * nd,
        transcendentals=2 * m * k,
        bytes_accessed=_hbm(settings, m, d, h, k, dq2.dtype, "bwd_dx"),
    )
    kernel = functools.partial(_bwd_dx_kernel, nq=nq, h_tail=h % hb, block_heads=hb,
                               head_dim=k)
    with jax.named_scope(f"palm_norm_qkv_rope_bwd_dx bm={bm} bh={hb} bd={td}"):
        return tpu_pallas_call(
            kernel,
            grid=(nm, nd, nq + 1),
            in_specs=[
                pl.BlockSpec((bm, 1), row),  # positions
                pl.BlockSpec((1, k), lambda i, e, j: (0, 0)),  # inverse frequencies
                pl.BlockSpec((bm, bn), q_cols),  # dq
                pl.BlockSpec((bm, k), row),  # dk
                pl.BlockSpec((bm, k), row),  # dv
                pl.BlockSpec((td, bn), lambda i, e, j: (e, jnp.minimum(j, nq - 1))),  # wq
                pl.BlockSpec((td, k), lambda i, e, j: (e, 0)),  # wk
                pl.BlockSpec((td, k), lambda i, e, j: (e, 0)),  # wv
            ],
            out_specs=[
                pl.BlockSpec((bm, td), lambda i, e, j: (i, e)),  # dh
                pl.BlockSpec((bm, bn), rotated_q),
                pl.BlockSpec((bm, k), row),  # rotated dk
            ],
            out_shape=[
                jax.ShapeDtypeStruct((m, d), dq2.dtype),
                jax.ShapeDtypeStruct((m, h * k), dq2.dtype),
                jax.ShapeDtypeStruct((m, k), dq2.dtype),
            ],
            scratch_shapes=[
                pltpu.VMEM((bm, td), jnp.float32),
                pltpu.VMEM((bm, bn), dq2.dtype),
                pltpu.VMEM((bm, k), jnp.float32),
                pltpu.VMEM((bm, k), jnp.float32),
            ],
            compiler_params=compiler_params(
                "parallel", "arbitrary", "arbitrary",
                vmem_bytes=_vmem(settings, m, d, h, k, dq2.dtype, "bwd_dx")),
            cost_estimate=cost,
            interpret=settings.interpret,
            name="palm_norm_qkv_rope_bwd_dx",
        )(pos2, frequency_row(k, settings.base, 1.0, -1.0), dq2, dk2, dv2, wq2, wk, wv)


def _bwd_dw_call(settings: Settings, x2, scale, mean, rstd, gq, gk, gv, h: int, w_dtype):
    """dwq [D, H*K], dwk, dwv [D, K] = LN(x)^T · (rotated) cotangents."""
    m, d = x2.shape
    k = gk.shape[1]
    bm, hb, td, bn, nm, nq, nd = _tiles(settings, m, d, h, k, backward=True)
    q_map, kv_map = _parked_maps(nq, nm)
    row = lambda e, j, r: (r, 0)  # noqa: E731
    cost = pl.CostEstimate(
        flops=2 * m * d * (h + 2) * k + 4 * m * d * (nq + 1),
        transcendentals=0,
        bytes_accessed=_hbm(settings, m, d, h, k, x2.dtype, "bwd_dw"),
    )
    kernel = functools.partial(_bwd_dw_kernel, nq=nq, nm=nm, m_tail=m % bm)
    with jax.named_scope(f"palm_norm_qkv_rope_bwd_dw bm={bm} bh={hb} bd={td}"):
        return tpu_pallas_call(
            kernel,
            grid=(nd, nq + 1, nm),
            in_specs=[
                pl.BlockSpec((bm, 1), row),  # mean
                pl.BlockSpec((bm, 1), row),  # rstd
                pl.BlockSpec((1, td), lambda e, j, r: (0, e)),  # norm_scale
                pl.BlockSpec((bm, td), lambda e, j, r: (r, e)),  # x
                pl.BlockSpec((bm, bn), q_map),  # rotated dq
                pl.BlockSpec((bm, k), kv_map),  # rotated dk
                pl.BlockSpec((bm, k), kv_map),  # dv
            ],
            out_specs=[
                pl.BlockSpec((td, bn), lambda e, j, r: (e, jnp.minimum(j, nq - 1))),
                pl.BlockSpec((td, k), lambda e, j, r: (e, 0)),
                pl.BlockSpec((td, k), lambda e, j, r: (e, 0)),
            ],
            out_shape=[
                jax.ShapeDtypeStruct((d, h * k), w_dtype),
                jax.ShapeDtypeStruct((d, k), w_dtype),
                jax.ShapeDtypeStruct((d, k), w_dtype),
            ],
            scratch_shapes=[pltpu.VMEM((td, max(bn, 2 * k)), jnp.float32)],
            compiler_params=compiler_params(
                "parallel", "arbitrary", "arbitrary",
                vmem_bytes=_vmem(settings, m, d, h, k, x2.dtype, "bwd_dw")),
            cost_estimate=cost,
            interpret=settings.interpret,
            name="palm_norm_qkv_rope_bwd_dw",
        )(mean, rstd, scale.reshape(1, d), x2, gq, gk, gv)


def backward_rows(settings: Settings, x2, norm_scale, wq, wk, wv, pos, mean, rstd, dq, dk, dv):
    """The backward on rows up to the LayerNorm (pallas.py's backend interface)."""
    m, d = x2.shape
    _, h, k = wq.shape
    dh2, gq, gk = _bwd_dx_call(settings, dq.reshape(m, h * k), dk, dv, wq.reshape(d, h * k), wk,
                               wv, pos.reshape(m, 1), h)
    dwq2, dwk, dwv = _bwd_dw_call(settings, x2, norm_scale, mean, rstd, gq, gk, dv, h, wq.dtype)
    return dh2, (dwq2.reshape(d, h, k), dwk, dwv)


def prepare(x, norm_scale, wq, wk, wv, positions, *, eps: float, base: float = 10000.0,
            interpret: Any = None, block_sizes: BlockSizes | None = None) -> Settings:
    """The call's `Settings` (pallas.py); default tiles for the target generation."""
    block_sizes = pallas.check_pallas_args(sys.modules[__name__], x, norm_scale, wq, wk, wv,
                                           positions, block_sizes)
    return Settings(eps=float(eps), base=float(base), interpret=tpu_interpret(interpret),
                    block_sizes=block_sizes)


# The Pallas TPU `norm_qkv_rope` (the front door's arguments but impl), and pallas.py's interface
# functions, on this module's kernels (`kernels.block_in` calls the latter).
norm_qkv_rope_pallas_tpu = functools.partial(pallas.norm_qkv_rope_pallas, sys.modules[__name__])
forward_with_stats = functools.partial(pallas.forward_with_stats, sys.modules[__name__])
backward_to_dh = functools.partial(pallas.backward_to_dh, sys.modules[__name__])
