"""The Pallas GPU (Triton) `norm_qkv_rope`.

`norm_qkv_rope_pallas_gpu` (impl "pallas_gpu") is three Triton kernels and a little XLA, the
decomposition of tpu.py:
  forward   palm_norm_qkv_rope_fwd     LN prologue, LN(x)·[wq | wk | wv], RoPE epilogue on q, k
  backward  palm_norm_qkv_rope_bwd_dx  inverse-RoPE prologue, dh = g·[wq | wk | wv]^T
            palm_norm_qkv_rope_bwd_dw  LN-recompute prologue, dW = LN(x)^T·g
  XLA       the LayerNorm row statistics before the forward (`kernels._common.row_stats`) and
            the LayerNorm backward after bwd_dx (`kernels._common.layer_norm_bwd`).
The custom_vjp, `forward_with_stats` and `backward_to_dh` are pallas.py's, shared with tpu.py,
over this module's `prepare`, `forward_rows` and `backward_rows` (pallas.py's backend interface),
so `kernels.block_in` can compose this module with norm_swiglu's by swapping the module.

Design (M = B*T rows; "head" below means one of the H query heads, the key head or the value
head, H + 2 in all; Kh = max(16, next_power_of_two(K/2)) lanes hold half a head):
  forward: grid (row tiles of block_rows, H + 2 heads). A program owns one [block_rows, K]
    output tile of one head and loops over D in slices of block_d: it loads the x slice, its
    mean/rstd rows and norm_scale slice, normalises in registers (rounded to x's dtype, as the
    reference rounds h), and multiplies it against the two halves of the head's weight slice,
    accumulating the two [block_rows, Kh] float32 halves of the projection in two loop carries
    (registers). The epilogue rotates them (out1 = a1 cos - a2 sin, out2 = a2 cos + a1 sin; cos
    and sin of the tile's rows computed in registers) and stores each half: RoPE's partner of
    every lane is in the other accumulator, so no value is ever sliced (Triton cannot) and no
    weight is permuted. The value head skips the rotation.
  bwd_dx: grid (row tiles of block_rows_bwd, D tiles of block_d_bwd). A program owns one
    [rows, block_d_bwd] tile of dh and loops over the H query heads: it loads the halves of
    dq's head, rotates them back (R^-1) in registers, rounds to x's dtype and accumulates
    g1·wq1^T + g2·wq2^T into one [rows, block_d_bwd] float32 carry; then the key head (rotated)
    and the value head. The programs of the first D tile also store the rotated cotangents,
    which bwd_dw reads (tpu.py's trade: one extra [M, (H+1)K] write instead of recomputing
    cos/sin per row slice there).
  bwd_dw: grid (D tiles of block_d_bwd, H + 2 heads). A program owns one [block_d_bwd, K] tile
    of one head's weight gradient and loops over the M rows in slices of block_rows_bwd: it
    recomputes the h slice from x and the statistics and accumulates h^T·g1 and h^T·g2 in two
    [block_d_bwd, Kh] float32 carries.
  Each operand a loop slices (x, the weights, the cotangents) has a block spanning the
  contraction axis (its size rounded up to a power of two), read with `pl.ds` windows.
Edges: Triton arrays and blocks are powers of two, and the lowering does not mask a boundary
block by itself, so every load and store is masked (rows past M, D past its end, lanes past K/2
of each half, heads past H): loads there give 0, so h, g and the weights are zero past the
arrays and add nothing to any sum. Nothing is padded or copied in the wrapper, whatever M, D, H
or K (any even K; K/2 under 16 is widened to 16 lanes because Triton's dots need 16).

FLOPs, per call at PaLM-8B (M=2048, D=4096, H=16, K=256, bf16): forward 2·M·D·(H+2)·K = 77.3
GFLOP, bwd_dx and bwd_dw 77.3 each (plus the LN and RoPE element work, under 1%). Bytes, each
program reading its operands once (what L2 serves), MiB: forward: x once per head (18 x 16 =
288), the weights once per row tile (16 tiles of 128 rows x 36 = 576), q|k|v written 18;
bwd_dx: the cotangents once per D tile (64 tiles of 64 x 18 = 1152), the weights once per row
tile (32 x 36 = 1152), dh 16 and the rotated cotangents 17 written; bwd_dw: x and the rotated
cotangents once per (D tile, head) (x 18 x 16 = 288, cotangents 64 x 18 = 1152), dW 36 written.
Unique HBM bytes are far fewer (forward 70: x 16, weights 36, outputs 18): with the grid's first
axis (row or D tiles) varying fastest, consecutive programs share one head's weights or
cotangents, which stay in the H100's 50 MB L2. At ~990 TFLOP/s (H100 SXM bf16 dense) each kernel
is ~80 us of math; the tiles are a standard Triton matmul's (128 x 256 x 64 forward: ~85 flop per
byte loaded), compute-bound on L2.

Default tiles for H100 (`BlockSizes.get_default`), from the shared-memory budget (227 KiB per
thread block; Triton keeps `num_stages` copies of every slice a loop loads, checked with
`kernels._gpu.check_shared_memory` through `shared_memory_bytes`):
  forward 128 rows x one head (256 lanes) x 64 of D, 8 warps, 3 stages: 3 x (16 KiB x slice
    + 32 KiB weight slice) = 144 KiB; the two accumulators 128 KiB of registers (128 per thread).
  bwd_dx 64 rows x 64 of D per program, 8 warps, 3 stages: 3 x (32 KiB dq head + 32 KiB weight
    head) = 192 KiB; bwd_dw (the same tiles) 64 of D x one head, 64-row slices: 3 x (8 + 32) =
    120 KiB.
float32 inputs halve the stages or slices until the estimate fits (`get_default`); shapes
smaller than the tiles shrink them to the next power of two (16 at least). Loaded bytes per
flop per loop step: forward 85 flop/byte (128 x 64 x, 64 x 256 weights), bwd_dw 52, bwd_dx only
32 (each step loads a whole head of dq and of the weights for a 64 x 64 output tile): bwd_dx is
the first to tune on a GPU, e.g. 128 rows x 64 of D at 2 stages (192 KiB, 43 flop/byte, the
weights re-read half as often).

What the CPU cannot check: the tests run these kernels interpreted (`interpret=True`, the
generic Pallas interpreter) against the reference, and export them for CUDA
(tests/gpu_export.py), which runs the whole Pallas-to-Triton lowering (power-of-two arrays,
supported operations, the dot shapes). The compile of that Triton IR to PTX (register
allocation, spills, the real shared-memory use of the pipeline) and all timings need a GPU, as
do float32 dots at TF32 (kernels/_gpu.py `dot`: jax's matmul precision, as XLA's dots).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels import _gpu
from kernels._common import current_backend
from kernels.norm_qkv_rope import pallas
from kernels.norm_qkv_rope.pallas import Settings
from kernels.rope.reference import inv_frequencies


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles for the GPU `norm_qkv_rope`: forward, and backward (both backward kernels).

    All tiles are powers of two of at least 16 (Triton's arrays and dots).
    block_rows: rows (B*T positions) per forward program.
    block_d: the forward's slice of D per loop step (the contraction).
    block_rows_bwd: rows per bwd_dx program, and bwd_dw's row slice per loop step.
    block_d_bwd: the D tile of a bwd_dx and of a bwd_dw program.
    num_warps, num_stages: Triton's launch parameters for the forward; *_bwd for both backward
      kernels.
    A program always owns whole heads (one), so RoPE's partner lanes are in the tile.
    """

    block_rows: int = 128
    block_d: int = 64
    block_rows_bwd: int = 64
    block_d_bwd: int = 64
    num_warps: int = 8
    num_stages: int = 3
    num_warps_bwd: int = 8
    num_stages_bwd: int = 3

    def __post_init__(self):
        _gpu.check_block_sizes(self, tiles=("block_rows", "block_d", "block_rows_bwd",
                                            "block_d_bwd"),
                               warps=("num_warps", "num_warps_bwd"),
                               stages=("num_stages", "num_stages_bwd"))

    @classmethod
    def get_default(cls, x_shape: tuple[int, ...], wq_shape: tuple[int, ...],
                    dtype) -> "BlockSizes":
        """The H100 tiles of the module docstring, shrunk to the shape (next power of two, 16
        at least), then stages and slices halved while `shared_memory_bytes` exceeds 227 KiB."""
        m = x_shape[0] * x_shape[1]
        d = x_shape[2]

        def fit(tile, n):
            return max(_gpu.MIN_BLOCK, min(tile, _gpu.next_power_of_two(n)))

        blocks = cls(block_rows=fit(128, m), block_d=fit(64, d), block_rows_bwd=fit(64, m),
                     block_d_bwd=fit(64, d))
        while True:
            sizes = shared_memory_bytes(x_shape, wq_shape, dtype, blocks)
            if sizes["forward"] > _gpu.SHARED_MEMORY_BYTES:
                if blocks.num_stages > 2:
                    blocks = dataclasses.replace(blocks, num_stages=blocks.num_stages - 1)
                elif blocks.block_d > _gpu.MIN_BLOCK:
                    blocks = dataclasses.replace(blocks, block_d=blocks.block_d // 2)
                else:
                    return blocks
            elif sizes["max"] > _gpu.SHARED_MEMORY_BYTES:
                if blocks.num_stages_bwd > 2:
                    blocks = dataclasses.replace(blocks, num_stages_bwd=blocks.num_stages_bwd - 1)
                elif blocks.block_d_bwd > _gpu.MIN_BLOCK:
                    blocks = dataclasses.replace(blocks, block_d_bwd=blocks.block_d_bwd // 2)
                else:
                    return blocks
            else:
                return blocks


def _half_lanes(k: int) -> int:
    """Kh: the lanes that hold half a head (a power of two, at least Triton's dot minimum)."""
    return max(_gpu.MIN_BLOCK, _gpu.next_power_of_two(k // 2))


def shared_memory_bytes(x_shape: tuple[int, ...], wq_shape: tuple[int, ...], dtype,
                        block_sizes: BlockSizes) -> dict[str, int]:
    """Shared memory per program of each kernel (and "max"): `num_stages` copies of the slices
    its loop loads (Triton's software pipeline), float32 statistics and scale included."""
    del x_shape
    itemsize = jnp.dtype(dtype).itemsize
    lanes = 2 * _half_lanes(wq_shape[2])
    bs = block_sizes
    forward = bs.num_stages * ((bs.block_rows * bs.block_d + bs.block_d * lanes) * itemsize
                               + bs.block_d * 4)
    bwd_dx = bs.num_stages_bwd * (bs.block_rows_bwd + bs.block_d_bwd) * lanes * itemsize
    bwd_dw = bs.num_stages_bwd * ((bs.block_rows_bwd * bs.block_d_bwd
                                   + bs.block_rows_bwd * lanes) * itemsize
                                  + 2 * bs.block_rows_bwd * 4)
    return {"forward": forward, "bwd_dx": bwd_dx, "bwd_dw": bwd_dw,
            "max": max(forward, bwd_dx, bwd_dw)}


# ----------------------------------------------------------------------------------------------
# In-kernel helpers. Every array is a power of two; every load and store is masked.
# ----------------------------------------------------------------------------------------------


def _span(start, size: int) -> jax.Array:
    """int32 [size]: start, start + 1, ... (the global indices of a tile's entries)."""
    return start + jnp.arange(size, dtype=jnp.int32)


def _cos_sin(pos_ref, freq_ref, rows, row_ok):
    """cos and sin [bm, Kh] of the angles of a row tile (positions [bm] loaded masked)."""
    pos = plgpu.load(pos_ref, mask=row_ok, other=0)
    angles = pos.astype(jnp.float32)[:, None] * freq_ref[...][None, :]
    return jnp.cos(angles), jnp.sin(angles)


def _load_halves(view, mask, other=0):
    """The two halves of a head, [·, Kh] each: view(start) is the ref window at lane start."""
    return plgpu.load(view(0), mask=mask, other=other), plgpu.load(view(1), mask=mask,
                                                                      other=other)


def _store_halves(view, a1, a2, mask, dtype):
    plgpu.store(view(0), a1.astype(dtype), mask=mask)
    plgpu.store(view(1), a2.astype(dtype), mask=mask)


def _normalise(x, mean, rstd, scale, dtype):
    """LN of an x slice [rows, cols] from row statistics [rows] and scale [cols], rounded to x's
    dtype before the dot, as the reference rounds h (`layer_norm_rows`)."""
    return ((x.astype(jnp.float32) - mean[:, None]) * rstd[:, None]
            * scale.astype(jnp.float32)[None, :]).astype(dtype)


def _ln_dot_halves(operands, n_steps: int, contract: int, shape, widen: bool):
    """The two float32 halves [shape] of LN(x)·w (contract=1: the forward, over D slices) or
    LN(x)^T·g (contract=0: bwd_dw, over row slices), summed over n_steps loop steps (registers).
    operands(c) loads step c's x slice, its statistics and scale, and the halves of the other
    factor, all masked: LN(x) and the halves are 0 past the edges and add nothing."""
    def step(c, accs):
        x, mean, rstd, scale, (o1, o2) = operands(c)
        hx = _normalise(x, mean, rstd, scale, x.dtype)
        return (accs[0] + _gpu.dot(hx, o1, contract, 0, widen=widen),
                accs[1] + _gpu.dot(hx, o2, contract, 0, widen=widen))

    zeros = jnp.zeros(shape, jnp.float32)
    return jax.lax.fori_loop(0, n_steps, step, (zeros, zeros))


def _fwd_kernel(pos_ref, mean_ref, rstd_ref, scale_ref, freq_ref, x_ref, wq_ref, wk_ref, wv_ref,
                q_ref, k_ref, v_ref, *, m: int, d: int, h: int, half: int, block_d: int,
                widen: bool):
    # Grid (row tile i, head j in [0, H + 2)). Refs: pos/mean/rstd [bm]; scale [Dspan];
    # freq [Kh]; x [bm, Dspan]; wq [Dspan, 2Kh] (head j's), wk, wv [Dspan, 2Kh];
    # q [bm, 2Kh] (head j's), k, v [bm, 2Kh]. Lanes [0, K/2) sit at 0, [K/2, K) at `half`.
    bm = x_ref.shape[0]
    kh = freq_ref.shape[0]
    i, j = pl.program_id(0), pl.program_id(1)
    rows = _span(i * bm, bm)
    row_ok = rows < m
    lane_ok = jnp.arange(kh, dtype=jnp.int32) < half
    starts = (0, half)

    def project(w_ref):
        mean = plgpu.load(mean_ref, mask=row_ok, other=0.0)
        rstd = plgpu.load(rstd_ref, mask=row_ok, other=0.0)

        def operands(c):  # D slice c: x [bm, bd], w's halves [bd, Kh]
            cols, col_ok = pl.ds(c * block_d, block_d), _span(c * block_d, block_d) < d
            x = plgpu.load(x_ref.at[:, cols], mask=row_ok[:, None] & col_ok[None, :], other=0)
            scale = plgpu.load(scale_ref.at[cols], mask=col_ok, other=0)
            w = _load_halves(lambda s: w_ref.at[cols, pl.ds(starts[s], kh)],
                             col_ok[:, None] & lane_ok[None, :])
            return x, mean, rstd, scale, w

        return _ln_dot_halves(operands, pl.cdiv(d, block_d), 1, (bm, kh), widen)

    out_mask = row_ok[:, None] & lane_ok[None, :]

    def rope_out(o_view, accs):
        cos, sin = _cos_sin(pos_ref, freq_ref, rows, row_ok)
        a1, a2 = accs
        _store_halves(o_view, a1 * cos - a2 * sin, a2 * cos + a1 * sin, out_mask, q_ref.dtype)

    @pl.when(j < h)
    def _query_head():
        rope_out(lambda s: q_ref.at[:, pl.ds(starts[s], kh)], project(wq_ref))

    @pl.when(j == h)
    def _key_head():
        rope_out(lambda s: k_ref.at[:, pl.ds(starts[s], kh)], project(wk_ref))

    @pl.when(j == h + 1)
    def _value_head():
        a1, a2 = project(wv_ref)
        _store_halves(lambda s: v_ref.at[:, pl.ds(starts[s], kh)], a1, a2, out_mask, v_ref.dtype)


def _bwd_dx_kernel(pos_ref, freq_ref, dq_ref, dk_ref, dv_ref, wq_ref, wk_ref, wv_ref,
                   dh_ref, gq_ref, gk_ref, *, m: int, d: int, h: int, half: int, widen: bool):
    # Grid (row tile i, D tile e). Refs: pos [bm]; freq [Kh]; dq [bm, Hspan, 2Kh];
    # dk, dv [bm, 2Kh]; wq [bd, Hspan, 2Kh]; wk, wv [bd, 2Kh]; dh [bm, bd];
    # gq [bm, Hspan, 2Kh], gk [bm, 2Kh]: the rotated cotangents (written where e == 0).
    bm, bd = dh_ref.shape
    kh = freq_ref.shape[0]
    i, e = pl.program_id(0), pl.program_id(1)
    rows = _span(i * bm, bm)
    row_ok = rows < m
    d_ok = _span(e * bd, bd) < d
    lane_ok = jnp.arange(kh, dtype=jnp.int32) < half
    g_mask = row_ok[:, None] & lane_ok[None, :]
    w_mask = d_ok[:, None] & lane_ok[None, :]
    starts = (0, half)
    cos, sin = _cos_sin(pos_ref, freq_ref, rows, row_ok)
    dtype = dh_ref.dtype

    def rotated_back(view):  # R^-1 of a cotangent head, rounded to x's dtype for the dot
        c1, c2 = _load_halves(view, g_mask)
        c1, c2 = c1.astype(jnp.float32), c2.astype(jnp.float32)
        return (c1 * cos + c2 * sin).astype(dtype), (c2 * cos - c1 * sin).astype(dtype)

    def contract(acc, g1, g2, w_view):  # acc + g·w^T over the head's lanes
        w1, w2 = _load_halves(w_view, w_mask)
        return acc + _gpu.dot(g1, w1, 1, 1, widen=widen) + _gpu.dot(g2, w2, 1, 1, widen=widen)

    def query_head(j, acc):
        g1, g2 = rotated_back(lambda s: dq_ref.at[:, j, pl.ds(starts[s], kh)])

        @pl.when(e == 0)
        def _emit():
            _store_halves(lambda s: gq_ref.at[:, j, pl.ds(starts[s], kh)], g1, g2, g_mask, dtype)

        return contract(acc, g1, g2, lambda s: wq_ref.at[:, j, pl.ds(starts[s], kh)])

    acc = jax.lax.fori_loop(0, h, query_head, jnp.zeros((bm, bd), jnp.float32))
    g1, g2 = rotated_back(lambda s: dk_ref.at[:, pl.ds(starts[s], kh)])

    @pl.when(e == 0)
    def _emit_key():
        _store_halves(lambda s: gk_ref.at[:, pl.ds(starts[s], kh)], g1, g2, g_mask, dtype)

    acc = contract(acc, g1, g2, lambda s: wk_ref.at[:, pl.ds(starts[s], kh)])
    v1, v2 = _load_halves(lambda s: dv_ref.at[:, pl.ds(starts[s], kh)], g_mask)
    acc = contract(acc, v1, v2, lambda s: wv_ref.at[:, pl.ds(starts[s], kh)])
    plgpu.store(dh_ref, acc.astype(dtype), mask=row_ok[:, None] & d_ok[None, :])


def _bwd_dw_kernel(mean_ref, rstd_ref, scale_ref, x_ref, gq_ref, gk_ref, gv_ref,
                   dwq_ref, dwk_ref, dwv_ref, *, m: int, d: int, h: int, half: int,
                   block_rows: int, widen: bool):
    # Grid (D tile e, head j in [0, H + 2)). Refs: mean/rstd [Mspan]; scale [bd];
    # x [Mspan, bd]; gq [Mspan, 2Kh] (head j's rotated cotangent), gk (rotated), gv (dv)
    # [Mspan, 2Kh]; dwq [bd, 2Kh] (head j's), dwk, dwv [bd, 2Kh].
    bd = scale_ref.shape[0]
    kh = dwk_ref.shape[1] // 2
    e, j = pl.program_id(0), pl.program_id(1)
    d_ok = _span(e * bd, bd) < d
    lane_ok = jnp.arange(kh, dtype=jnp.int32) < half
    starts = (0, half)
    br = block_rows

    def accumulate(g_ref):
        scale = plgpu.load(scale_ref, mask=d_ok, other=0)

        def operands(r):  # row slice r: x [br, bd], g's halves [br, Kh]
            rows, row_ok = pl.ds(r * br, br), _span(r * br, br) < m
            x = plgpu.load(x_ref.at[rows, :], mask=row_ok[:, None] & d_ok[None, :], other=0)
            mean = plgpu.load(mean_ref.at[rows], mask=row_ok, other=0.0)
            rstd = plgpu.load(rstd_ref.at[rows], mask=row_ok, other=0.0)
            g = _load_halves(lambda s: g_ref.at[rows, pl.ds(starts[s], kh)],
                             row_ok[:, None] & lane_ok[None, :])
            return x, mean, rstd, scale, g

        return _ln_dot_halves(operands, pl.cdiv(m, br), 0, (bd, kh), widen)

    out_mask = d_ok[:, None] & lane_ok[None, :]
    for head, g_ref, o_ref in ((j < h, gq_ref, dwq_ref), (j == h, gk_ref, dwk_ref),
                               (j == h + 1, gv_ref, dwv_ref)):
        @pl.when(head)
        def _write(g_ref=g_ref, o_ref=o_ref):
            a1, a2 = accumulate(g_ref)
            _store_halves(lambda s: o_ref.at[:, pl.ds(starts[s], kh)], a1, a2, out_mask,
                          o_ref.dtype)


# ----------------------------------------------------------------------------------------------
# The calls.
# ----------------------------------------------------------------------------------------------


def _widen(settings: Settings) -> bool:
    return settings.interpret and current_backend() == "cpu"


def _frequencies(k: int, base: float) -> jax.Array:
    """float32 [Kh]: the reference's inverse frequencies, zero past K/2."""
    return jnp.zeros((_half_lanes(k),), jnp.float32).at[:k // 2].set(inv_frequencies(k, base))


def _tiles(settings: Settings, kernel: str, m: int, d: int, wq_shape, dtype):
    """(rows, D tile, Kh) of `kernel` ("forward", "bwd_dx", "bwd_dw") clipped to M and D, once
    its shared memory is checked against a thread block's."""
    bs = settings.block_sizes
    _gpu.check_shared_memory(shared_memory_bytes((1, m, d), wq_shape, dtype, bs)[kernel],
                             f"norm_qkv_rope {'fwd' if kernel == 'forward' else kernel}")
    rows, depth = ((bs.block_rows, bs.block_d) if kernel == "forward"
                   else (bs.block_rows_bwd, bs.block_d_bwd))
    return _gpu.fit_tile(m, rows), _gpu.fit_tile(d, depth), _half_lanes(wq_shape[2])


def _forward_call(settings: Settings, x2, scale, wq, wk, wv, pos, mean, rstd):
    """The forward pallas_call on x2 [M, D]; returns q [M, H, K], k, v [M, K]."""
    m, d = x2.shape
    _, h, k = wq.shape
    bs = settings.block_sizes
    bm, bd, kh = _tiles(settings, "forward", m, d, wq.shape, x2.dtype)
    d_span = max(_gpu.next_power_of_two(d), bd)
    kernel = functools.partial(_fwd_kernel, m=m, d=d, h=h, half=k // 2, block_d=bd,
                               widen=_widen(settings))
    row = lambda i, j: (i,)  # noqa: E731
    head = lambda i, j: (0, jnp.minimum(j, h - 1), 0)  # noqa: E731
    with jax.named_scope(f"palm_norm_qkv_rope_fwd bm={bm} bd={bd}"):
        return _gpu.pallas_call(
            kernel,
            name="palm_norm_qkv_rope_fwd",
            grid=(pl.cdiv(m, bm), h + 2),
            in_specs=[
                pl.BlockSpec((bm,), row),  # positions
                pl.BlockSpec((bm,), row),  # mean
                pl.BlockSpec((bm,), row),  # rstd
                pl.BlockSpec((d_span,), lambda i, j: (0,)),  # norm_scale
                pl.BlockSpec((kh,), lambda i, j: (0,)),  # frequencies
                pl.BlockSpec((bm, d_span), lambda i, j: (i, 0)),  # x
                pl.BlockSpec((d_span, None, 2 * kh), head),  # wq, head j
                pl.BlockSpec((d_span, 2 * kh), lambda i, j: (0, 0)),  # wk
                pl.BlockSpec((d_span, 2 * kh), lambda i, j: (0, 0)),  # wv
            ],
            out_specs=[
                pl.BlockSpec((bm, None, 2 * kh), lambda i, j: (i, jnp.minimum(j, h - 1), 0)),
                pl.BlockSpec((bm, 2 * kh), lambda i, j: (i, 0)),
                pl.BlockSpec((bm, 2 * kh), lambda i, j: (i, 0)),
            ],
            out_shape=[
                jax.ShapeDtypeStruct((m, h, k), x2.dtype),
                jax.ShapeDtypeStruct((m, k), x2.dtype),
                jax.ShapeDtypeStruct((m, k), x2.dtype),
            ],
            interpret=settings.interpret,
            num_warps=bs.num_warps,
            num_stages=bs.num_stages,
            masked_edges=True,  # every load and store is masked
        )(pos, mean, rstd, scale, _frequencies(k, settings.base), x2, wq, wk, wv)


def forward_rows(settings: Settings, x2, norm_scale, wq, wk, wv, pos, mean, rstd):
    """The forward on rows (pallas.py's backend interface): q [M, H, K], k, v [M, K]."""
    m = x2.shape[0]
    return _forward_call(settings, x2, norm_scale, wq, wk, wv, pos, mean.reshape(m),
                         rstd.reshape(m))


def _bwd_dx_call(settings: Settings, dq, dk, dv, wq, wk, wv, pos):
    """dh [M, D] = g·W^T, and the rotated cotangents R^-1 dq [M, H, K], R^-1 dk [M, K]."""
    m, h, k = dq.shape
    d = wk.shape[0]
    bs = settings.block_sizes
    bm, bd, kh = _tiles(settings, "bwd_dx", m, d, wq.shape, dq.dtype)
    h_span = _gpu.next_power_of_two(h)
    kernel = functools.partial(_bwd_dx_kernel, m=m, d=d, h=h, half=k // 2,
                               widen=_widen(settings))
    rows = lambda i, e: (i, 0)  # noqa: E731
    rows3 = lambda i, e: (i, 0, 0)  # noqa: E731
    d_rows = lambda i, e: (e, 0)  # noqa: E731
    with jax.named_scope(f"palm_norm_qkv_rope_bwd_dx bm={bm} bd={bd}"):
        return _gpu.pallas_call(
            kernel,
            name="palm_norm_qkv_rope_bwd_dx",
            grid=(pl.cdiv(m, bm), pl.cdiv(d, bd)),
            in_specs=[
                pl.BlockSpec((bm,), lambda i, e: (i,)),  # positions
                pl.BlockSpec((kh,), lambda i, e: (0,)),  # frequencies
                pl.BlockSpec((bm, h_span, 2 * kh), rows3),  # dq
                pl.BlockSpec((bm, 2 * kh), rows),  # dk
                pl.BlockSpec((bm, 2 * kh), rows),  # dv
                pl.BlockSpec((bd, h_span, 2 * kh), lambda i, e: (e, 0, 0)),  # wq
                pl.BlockSpec((bd, 2 * kh), d_rows),  # wk
                pl.BlockSpec((bd, 2 * kh), d_rows),  # wv
            ],
            out_specs=[
                pl.BlockSpec((bm, bd), lambda i, e: (i, e)),  # dh
                pl.BlockSpec((bm, h_span, 2 * kh), rows3),  # rotated dq
                pl.BlockSpec((bm, 2 * kh), rows),  # rotated dk
            ],
            out_shape=[
                jax.ShapeDtypeStruct((m, d), dq.dtype),
                jax.ShapeDtypeStruct((m, h, k), dq.dtype),
                jax.ShapeDtypeStruct((m, k), dq.dtype),
            ],
            interpret=settings.interpret,
            num_warps=bs.num_warps_bwd,
            num_stages=bs.num_stages_bwd,
            masked_edges=True,  # every load and store is masked
        )(pos, _frequencies(k, settings.base), dq, dk, dv, wq, wk, wv)


def _bwd_dw_call(settings: Settings, x2, scale, mean, rstd, gq, gk, gv, w_dtype):
    """dwq [D, H, K], dwk, dwv [D, K] = LN(x)^T · (rotated) cotangents."""
    m, d = x2.shape
    _, h, k = gq.shape
    bs = settings.block_sizes
    br, bd, kh = _tiles(settings, "bwd_dw", m, d, (d, h, k), x2.dtype)
    m_span = max(_gpu.next_power_of_two(m), br)
    kernel = functools.partial(_bwd_dw_kernel, m=m, d=d, h=h, half=k // 2, block_rows=br,
                               widen=_widen(settings))
    whole = lambda e, j: (0,)  # noqa: E731
    with jax.named_scope(f"palm_norm_qkv_rope_bwd_dw br={br} bd={bd}"):
        return _gpu.pallas_call(
            kernel,
            name="palm_norm_qkv_rope_bwd_dw",
            grid=(pl.cdiv(d, bd), h + 2),
            in_specs=[
                pl.BlockSpec((m_span,), whole),  # mean
                pl.BlockSpec((m_span,), whole),  # rstd
                pl.BlockSpec((bd,), lambda e, j: (e,)),  # norm_scale
                pl.BlockSpec((m_span, bd), lambda e, j: (0, e)),  # x
                pl.BlockSpec((m_span, None, 2 * kh), lambda e, j: (0, jnp.minimum(j, h - 1), 0)),
                pl.BlockSpec((m_span, 2 * kh), lambda e, j: (0, 0)),  # rotated dk
                pl.BlockSpec((m_span, 2 * kh), lambda e, j: (0, 0)),  # dv
            ],
            out_specs=[
                pl.BlockSpec((bd, None, 2 * kh), lambda e, j: (e, jnp.minimum(j, h - 1), 0)),
                pl.BlockSpec((bd, 2 * kh), lambda e, j: (e, 0)),
                pl.BlockSpec((bd, 2 * kh), lambda e, j: (e, 0)),
            ],
            out_shape=[
                jax.ShapeDtypeStruct((d, h, k), w_dtype),
                jax.ShapeDtypeStruct((d, k), w_dtype),
                jax.ShapeDtypeStruct((d, k), w_dtype),
            ],
            interpret=settings.interpret,
            num_warps=bs.num_warps_bwd,
            num_stages=bs.num_stages_bwd,
            masked_edges=True,  # every load and store is masked
        )(mean, rstd, scale, x2, gq, gk, gv)


def backward_rows(settings: Settings, x2, norm_scale, wq, wk, wv, pos, mean, rstd, dq, dk, dv):
    """The backward on rows up to the LayerNorm (pallas.py's backend interface)."""
    m = x2.shape[0]
    dh2, gq, gk = _bwd_dx_call(settings, dq, dk, dv, wq, wk, wv, pos)
    dwq, dwk, dwv = _bwd_dw_call(settings, x2, norm_scale, mean.reshape(m), rstd.reshape(m), gq,
                                 gk, dv, wq.dtype)
    return dh2, (dwq, dwk, dwv)


def prepare(x, norm_scale, wq, wk, wv, positions, *, eps: float, base: float = 10000.0,
            interpret: Any = None, block_sizes: BlockSizes | None = None) -> Settings:
    """The call's `Settings` (pallas.py); default GPU tiles for the shape."""
    block_sizes = pallas.check_pallas_args(sys.modules[__name__], x, norm_scale, wq, wk, wv,
                                           positions, block_sizes)
    return Settings(eps=float(eps), base=float(base), interpret=_gpu.gpu_interpret(interpret),
                    block_sizes=block_sizes)


# The Pallas GPU (Triton) `norm_qkv_rope` (the front door's arguments but impl; block_sizes a
# `kernels.norm_qkv_rope.gpu.BlockSizes`), and pallas.py's interface functions, on this module's
# kernels (`kernels.block_in` calls the latter).
norm_qkv_rope_pallas_gpu = functools.partial(pallas.norm_qkv_rope_pallas, sys.modules[__name__])
forward_with_stats = functools.partial(pallas.forward_with_stats, sys.modules[__name__])
backward_to_dh = functools.partial(pallas.backward_to_dh, sys.modules[__name__])
