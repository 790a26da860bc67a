"""The Pallas GPU (Triton) `mq_flash_attention`: flash attention (Dao et al. 2022; the loop
order of FlashAttention-2, Dao 2023), forward and backward, lowered through Triton.

Same math and residuals as tpu.py, the design model: heads are folded into the query rows,
q [B, T, H, K] viewed as [B, T*H, K], row r = t*H + h; one K/V tile serves all H heads of a
query tile, and K/V are never repeated H times. Causal masking is top-left aligned: row r sees
key column s iff r >= s*H. The forward saves the logsumexp; the backward is a dk/dv kernel and
a dq kernel using q, k, v, o, lse and delta = rowsum(do * o) (f32, one fused XLA pass).

Triton has no scratch memory that outlives a program, so where the TPU kernels walk the
reduction along the innermost grid axis with VMEM accumulators, here each program owns one
output tile and walks the reduction itself in a `lax.fori_loop` whose carry (the f32
accumulators and softmax statistics) stays in registers; the operand it walks is passed with a
block spanning its whole (padded) length and sliced with `pl.ds`.

  * forward, grid (T*H/block_q, B): a program loads its q tile [block_q, K] once (kept in
    registers/shared memory), then loops over key tiles k, v [block_k, K]; carry: acc
    [block_q, K] f32, running max m and sum l [block_q] f32 (online softmax; alpha rescales
    what was summed under the old max). Writes o [block_q, K] and lse = m + log(l) [block_q].
  * dk/dv, grid (S/block_k_dkv, B, splits): a program loads its k, v tiles [block_k_dkv, K]
    once and loops over the query-row tiles q, do [block_q_dkv, K], lse, delta [block_q_dkv]
    of its split of the rows; scores are built transposed, s^T = k q^T [block_k, block_q], so
    lse and delta broadcast as rows; carry: dk, dv [block_k_dkv, K] f32, summed over every
    head and query tile of the split. One program per key tile would be only 32 programs at
    PaLM-8B (B = 1) for an H100's 132 SMs, so the rows are split until there are as many
    programs as SMs (`dkv_splits`; 5 at PaLM-8B) and the f32 partials summed in XLA.
  * dq, grid (T*H/block_q_dq, B): a program loads q, do [block_q_dq, K] and lse, delta once
    and loops over key tiles k, v [block_k_dq, K]; carry: dq [block_q_dq, K] f32.

Causal: the loop bounds come from the program id, so invisible tiles are never loaded: query
tile i walks key tiles [0, last visible], key tile j walks query tiles [first that sees j, end).
Each walk is two loops, an unmasked range and a masked one (tiles crossing the diagonal, and
in the forward and dq kernels the tile holding the last real key when S is not a multiple of
the key tile), so the iota/compare/select is built only where needed. Causal programs do
unequal work; the forward and dq kernels start the longest query tiles first (the grid is
walked in reverse), so the short ones fill the tail; dk/dv's longest tiles (j = 0) already
come first.

Shapes. Any B, H, T, S >= 1 and K. Triton needs every array a program computes, and every
block, to have a power-of-two size (kernels/_gpu.py), so the wrapper pads K to a power of two
>= 16 (the smallest dot Triton emits) with zeros, which change neither logits nor outputs, and
pads rows T*H and keys S with zeros to a multiple of the tiles. The blocks spanning a whole
walked axis are rounded up to a power of two beyond the array: Triton masks nothing there,
but the loops' bounds come from the real tile counts, so they never load past the operand
(the interpreter pads the block; `_pallas_call` passes masked_edges=True for these and checks
every tile block whole). No copy is made for that, also at PaLM-540B where T*H = 2048*48 is
not a power of two. Padded keys are masked out
of the forward's softmax and of dq; in dk/dv they only touch their own (sliced-off) rows.
Padded query rows (q = 0, finite lse, zero cotangent) add nothing to dk/dv. At PaLM shapes
nothing is padded (T*H and S divide the tiles, K = 256).

FLOPs per call (B = 1, T = S = 2048, H = 16, K = 256, causal, so about half the tiles):
forward 4*T*H*S*K/2 = 34 GFLOP, dk/dv 8*T*H*S*K/2 = 69 GFLOP, dq 6*T*H*S*K/2 = 52 GFLOP.
HBM bytes (bf16): forward reads q (16 MiB) and writes o (16 MiB) and lse (0.125 MiB); the
K/V tiles are re-read by every query tile (256 tiles of 128 rows x on average half of the
2 MiB of K/V = 256 MiB), but K/V (2 MiB) stays in the 50 MiB L2, so HBM sees about 34 MiB.
dk/dv reads q and do once per key tile (32 tiles of 64 keys x on average half of 32 MiB =
512 MiB, mostly from L2 only if the tiles running together share rows, so budget it as HBM)
plus k, v (2 MiB) and writes and re-reads the f32 split partials (40 MiB); dq reads q, do, writes dq (48 MiB) and re-reads K/V from L2;
delta reads do and o (32 MiB). Arithmetic intensity against HBM is then ~1000 FLOP/byte
forward and ~130 for dk/dv, both above an H100's ridge (~990 TFLOP/s bf16 / 3.35 TB/s = 300)
only for the forward; dk/dv leans on L2 hits for q and do (a key tile of 128 would halve
those re-reads but needs twice the shared memory for k and v, over budget at K = 256).

Default tiles for H100/H200 (`BlockSizes.get_default`), bf16, K = 256:
  forward block_q=128, block_k=64; dk/dv 64 x 64; dq 64 x 64; num_warps=8, num_stages=2.
Shared memory per program (`shared_memory_bytes`): the tile loaded once (q, or k and v, or q
and do) plus `num_stages` copies of what each loop iteration loads (Triton's software
pipeline), <= 227 KiB (kernels/_gpu.py `SHARED_MEMORY_BYTES`):
  forward 128x256x2 + 2 x (2 x 64x256x2) = 192 KiB; dk/dv 64 KiB + 2 x 64.5 KiB = 193 KiB;
  dq 64 KiB + 2 x 64 KiB = 192 KiB.
Three stages would not fit at K = 256; at K <= 128 the same tiles take three stages (128 KiB
for the forward). Registers: the f32 accumulator [128, 256] of the forward is 128 KiB, 128
registers per thread over 8 warps (256 threads), leaving room under the 255 limit for the
[128, 64] scores; a block_q of 256 would spill. f32 inputs, or K > 256, halve the largest tile
of the kernel over budget until it fits. These tiles are the usual FlashAttention-2 Triton
choices for this head dim, not measurements.

What CPU checks cover: the math, tiling, masking and loop bounds (interpret mode, against the
reference, tests/test_mq_flash_attention.py) and the whole Pallas-to-Triton lowering at PaLM
shapes (export for CUDA, tests/gpu_export.py), which rejects non power-of-two arrays and
unsupported operations. What they cannot: Triton's compile to PTX (register allocation and
spills, shared-memory allocation against the estimate above), and speed; those need a GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels._common import NT_DIMS
from kernels._gpu import (
    MIN_BLOCK,
    SHARED_MEMORY_BYTES,
    SM_COUNT,
    check_block_sizes,
    check_shared_memory,
    check_whole_blocks,
    gpu_interpret,
    next_power_of_two,
)
from kernels._gpu import pallas_call as gpu_pallas_call
from kernels.mq_flash_attention.pallas import (
    MASK_VALUE,
    TILES,
    Settings,
    fit_tiles,
    mq_flash_attention_pallas,
)

IMPL = "pallas_gpu"


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles and launch settings of the three Triton kernels. `*_q` count rows of the folded
    query matrix [T*H, K] (row t*H + h); `*_k` count key positions. Tiles are powers of two
    >= 16 (Triton's arrays and dots); tiles larger than the problem are shrunk per call.

    Attributes:
      block_q, block_k: forward tiles (a program owns a query tile and walks key tiles).
      block_q_dkv, block_k_dkv: the dk/dv kernel's (owns a key tile, walks query tiles).
      block_q_dq, block_k_dq: the dq kernel's (owns a query tile, walks key tiles).
      num_warps: warps per program, all three kernels (a power of two).
      num_stages: Triton's software-pipeline depth for the loops' loads (>= 1).
      dkv_splits: how many programs share one key tile's walk over the query rows, each
        summing its part into f32 partials (`dkv_splits`); None: enough to fill the SMs.
    """

    block_q: int = 128
    block_k: int = 64
    block_q_dkv: int = 64
    block_k_dkv: int = 64
    block_q_dq: int = 64
    block_k_dq: int = 64
    num_warps: int = 8
    num_stages: int = 2
    dkv_splits: int | None = None

    def __post_init__(self):
        check_block_sizes(self, tiles=TILES, warps=("num_warps",), stages=("num_stages",))
        if self.dkv_splits is not None and not (isinstance(self.dkv_splits, int)
                                                and self.dkv_splits >= 1):
            raise ValueError(f"{type(self).__name__}: dkv_splits={self.dkv_splits!r} must be "
                             "None or a positive int")

    @classmethod
    def get_default(cls, *, q_len: int, kv_len: int, num_heads: int, head_dim: int,
                    dtype: Any) -> BlockSizes:
        """Tiles for one shape on an H100/H200: the defaults above (bf16, K = 256; see the
        module docstring), with three pipeline stages and 4 warps where K <= 64 (smaller tiles,
        fewer registers), shrunk to the problem, then the largest tile of a kernel over the
        shared-memory budget halved until it fits (f32 inputs, K > 256)."""
        kp = padded_head_dim(head_dim)
        blocks = cls(num_warps=8 if kp >= 128 else 4, num_stages=2 if kp >= 256 else 3)
        return blocks.fit(q_len * num_heads, kv_len).within_shared_memory(head_dim, dtype)

    def within_shared_memory(self, head_dim: int, dtype: Any) -> BlockSizes:
        """These tiles with the largest tile of each kernel over the shared-memory budget
        halved (then, at the smallest tile, one pipeline stage fewer) until all fit."""
        pairs = {"forward": ("block_q", "block_k"), "dkv": ("block_q_dkv", "block_k_dkv"),
                 "dq": ("block_q_dq", "block_k_dq")}
        blocks = self
        while True:
            over = [kernel for kernel, size in shared_memory_bytes(blocks, head_dim, dtype).items()
                    if size > SHARED_MEMORY_BYTES]
            if not over:
                return blocks
            name = max(pairs[over[0]], key=lambda n: getattr(blocks, n))
            if getattr(blocks, name) == MIN_BLOCK:
                if blocks.num_stages == 1:
                    return blocks  # K too wide for any tile: the call will say so
                blocks = dataclasses.replace(blocks, num_stages=blocks.num_stages - 1)
                continue
            blocks = dataclasses.replace(blocks, **{name: getattr(blocks, name) // 2})

    def fit(self, rows: int, kv_len: int) -> BlockSizes:
        """These tiles shrunk for `rows` folded query rows and `kv_len` keys."""
        return fit_tiles(self, rows, kv_len, MIN_BLOCK)


def padded_head_dim(head_dim: int) -> int:
    """K as the kernels see it: a power of two >= 16, zero-padded."""
    return max(MIN_BLOCK, next_power_of_two(head_dim))


def check_tiles(blocks: BlockSizes, head_dim: int, dtype: Any) -> None:
    """Refuses fitted tiles whose `shared_memory_bytes` exceed one thread block's budget."""
    for kernel, size in shared_memory_bytes(blocks, head_dim, dtype).items():
        check_shared_memory(size, f"palm_mq_flash_attention {kernel} ({blocks}, K={head_dim}, "
                                  f"{jnp.dtype(dtype).name})")


def shared_memory_bytes(blocks: BlockSizes, head_dim: int, dtype: Any) -> dict[str, int]:
    """Shared memory each kernel's program needs: the tiles it loads once, plus `num_stages`
    copies of the tiles each loop iteration loads (Triton's software pipeline)."""
    kp = padded_head_dim(head_dim)
    item = jnp.dtype(dtype).itemsize
    stages = blocks.num_stages
    forward = item * (blocks.block_q * kp + stages * 2 * blocks.block_k * kp)
    dkv = (item * 2 * blocks.block_k_dkv * kp
           + stages * (item * 2 * blocks.block_q_dkv * kp + 2 * 4 * blocks.block_q_dkv))
    dq = (item * 2 * blocks.block_q_dq * kp + 2 * 4 * blocks.block_q_dq
          + stages * item * 2 * blocks.block_k_dq * kp)
    return {"forward": forward, "dkv": dkv, "dq": dq}


def _visible(settings: Settings, row0, col0, rows: int, cols: int, transposed: bool):
    """Boolean mask of the visible (row, key) pairs of a tile: [rows, cols] (or [cols, rows]
    transposed), causal and, unless transposed (the dk/dv kernel), key < S."""
    shape = (cols, rows) if transposed else (rows, cols)
    row_axis, col_axis = (1, 0) if transposed else (0, 1)
    r = row0 + lax.broadcasted_iota(jnp.int32, shape, row_axis)
    c = col0 + lax.broadcasted_iota(jnp.int32, shape, col_axis)
    ok = None
    if settings.causal:
        ok = r >= c * settings.num_heads
    if not transposed and settings.kv_len % cols:
        in_range = c < settings.kv_len
        ok = in_range if ok is None else jnp.logical_and(ok, in_range)
    return ok


def key_ranges(settings: Settings, row0, bq: int, bk: int):
    """(n_full, n_visible, any_masked) for a query tile starting at row0 walking key tiles of
    bk: tiles [0, n_full) need no mask, [n_full, n_visible) do, later ones are invisible.

    Tile j needs no mask when its last key is real ((j+1)*bk <= S) and, causal, the tile's
    first row sees its last key: row0 >= (j*bk + bk - 1)*H, i.e. j < (row0 + H) // (bk*H).
    The last visible tile holds key (row0 + bq - 1) // H. Scalars are non-negative, so lax.div
    (truncation) is floor division.
    """
    heads = settings.num_heads
    n_k = pl.cdiv(settings.kv_len, bk)
    full_keys = settings.kv_len // bk
    if not settings.causal:
        return full_keys, n_k, full_keys < n_k
    n_vis = jnp.minimum(n_k, lax.div(row0 + (bq - 1), heads * bk) + 1)
    n_full = jnp.minimum(jnp.minimum(lax.div(row0 + heads, heads * bk), full_keys), n_vis)
    return n_full, n_vis, True


def query_ranges(settings: Settings, col0, bq: int, bk: int, n_q: int):
    """(first, first_full) for a key tile starting at col0 walking query tiles of bq: tiles
    [first, first_full) cross the diagonal (masked), [first_full, n_q) see every key of it.

    The first row to see key col0 is col0*H; the first to see the tile's last key, and every
    later row too, is (col0 + bk - 1)*H.
    """
    if not settings.causal:
        return 0, 0
    heads = settings.num_heads
    first = jnp.minimum(lax.div(col0 * heads, bq), n_q)
    first_full = jnp.minimum(lax.div((col0 + bk - 1) * heads + bq - 1, bq), n_q)
    return first, first_full


def _tile_index(settings: Settings, n_tiles: int):
    """This program's query tile: causal grids run in reverse, longest tiles first."""
    g = pl.program_id(0)
    return n_tiles - 1 - g if settings.causal else g


# ---- forward ---------------------------------------------------------------------------------

def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, settings: Settings, n_tiles: int):
    """One (query tile, batch) program: the online softmax over its visible key tiles.

    q_ref/o_ref [bq, Kp], k_ref/v_ref [Sp2, Kp] (the whole padded key axis), lse_ref [bq].
    """
    bq, bk = settings.blocks.block_q, settings.blocks.block_k
    row0 = _tile_index(settings, n_tiles) * bq
    q = q_ref[...]
    kp = q.shape[-1]

    def step(masked: bool):
        def body(j, carry):
            acc, m_prev, l_prev = carry
            k = k_ref[pl.ds(j * bk, bk), :]
            v = v_ref[pl.ds(j * bk, bk), :]
            s = lax.dot_general(q, k, NT_DIMS,
                                preferred_element_type=jnp.float32) * settings.sm_scale
            if masked:
                s = jnp.where(_visible(settings, row0, j * bk, bq, bk, False), s, MASK_VALUE)
            # Key tile 0 holds column 0, which every row sees, so after the first tile m is
            # finite and a fully masked row of a later tile gets exp(MASK - m) = 0.
            m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
            alpha = jnp.exp(m_prev - m_next)  # rescales what was summed under the old max
            p = jnp.exp(s - m_next[:, None])  # m_next, not m_curr: l needs no second correction
            l_next = alpha * l_prev + jnp.sum(p, axis=1)
            pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
            return acc * alpha[:, None] + pv, m_next, l_next
        return body

    carry = (jnp.zeros((bq, kp), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
             jnp.zeros((bq,), jnp.float32))
    n_full, n_vis, any_masked = key_ranges(settings, row0, bq, bk)
    carry = lax.fori_loop(0, n_full, step(False), carry)
    if any_masked:
        carry = lax.fori_loop(n_full, n_vis, step(True), carry)
    acc, m, l = carry
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def _whole(n: int) -> int:
    """A block spanning an axis of n: the next power of two (the interpreter pads past n;
    the loops never read there)."""
    return next_power_of_two(n)


def _pallas_call(kernel, *, name: str, out_shape, grid, in_specs, out_specs,
                 settings: Settings, walked: tuple[int, ...]):
    """kernels/_gpu.py's pallas_call for blocks that span a walked axis (`walked`: indices
    into in_specs) rounded up to a power of two beyond the operand's end. Such a block is
    partial, but only the rows a loop slices with pl.ds are ever loaded, and the loop bounds
    come from the real tile counts, so nothing past the operand is touched: every access is
    bounded, hence masked_edges=True. Every other block (the tiles) is checked whole here."""
    blocks = settings.blocks

    def call(*args):
        tiled = [(f"{name} input {i}", spec, a) for i, (spec, a) in
                 enumerate(zip(in_specs, args)) if i not in walked]
        tiled += [(f"{name} output {i}", spec, a) for i, (spec, a) in
                  enumerate(zip(jax.tree.leaves(out_specs), jax.tree.leaves(out_shape)))]
        for what, spec, a in tiled:
            check_whole_blocks(spec.block_shape, a.shape, what)
        return gpu_pallas_call(
            kernel, name=name, out_shape=out_shape, grid=grid, in_specs=in_specs,
            out_specs=out_specs, interpret=settings.interpret, num_warps=blocks.num_warps,
            num_stages=blocks.num_stages, masked_edges=True)(*args)

    return call


def forward(q, k, v, settings: Settings):
    """q [B, R, Kp] (folded, padded), k/v [B, Sp, Kp] -> o [B, R, Kp], lse f32 [B, R]."""
    batch, rows, kp = q.shape
    blocks = settings.blocks
    bq, bk = blocks.block_q, blocks.block_k
    n_q = rows // bq
    kv_block = (None, _whole(k.shape[1]), kp)
    q_spec = pl.BlockSpec((None, bq, kp), lambda i, b: (b, _rev(settings, n_q, i), 0))
    with jax.named_scope(f"palm_mq_flash_attention_fwd bq={bq} bk={bk} H={settings.num_heads} "
                         f"causal={settings.causal}"):
        return _pallas_call(
            functools.partial(_fwd_kernel, settings=settings, n_tiles=n_q),
            name="palm_mq_flash_attention_fwd",
            out_shape=(jax.ShapeDtypeStruct(q.shape, q.dtype),
                       jax.ShapeDtypeStruct((batch, rows), jnp.float32)),
            grid=(n_q, batch),
            in_specs=[q_spec,
                      pl.BlockSpec(kv_block, lambda i, b: (b, 0, 0)),
                      pl.BlockSpec(kv_block, lambda i, b: (b, 0, 0))],
            out_specs=(q_spec, pl.BlockSpec((None, bq), lambda i, b: (b, _rev(settings, n_q, i)))),
            settings=settings, walked=(1, 2),  # k, v
        )(q, k, v)


def _rev(settings: Settings, n: int, g):
    """Index map twin of `_tile_index`."""
    return n - 1 - g if settings.causal else g


# ---- backward: dk and dv ---------------------------------------------------------------------

def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                settings: Settings, n_q: int, per_split: int):
    """One (key tile, batch, row split) program: dk, dv of its keys summed over the query-row
    tiles of its split, [c*per_split, (c+1)*per_split).

    q_ref/do_ref [Rp2, Kp] (the whole padded row axis), lse_ref/delta_ref [Rp2],
    k_ref/v_ref/dk_ref/dv_ref [bk, Kp]. Scores are transposed, [bk, bq].
    """
    bq, bk = settings.blocks.block_q_dkv, settings.blocks.block_k_dkv
    col0 = pl.program_id(0) * bk
    lo = pl.program_id(2) * per_split
    hi = jnp.minimum(lo + per_split, n_q)
    k, v = k_ref[...], v_ref[...]
    kp = k.shape[-1]

    def step(masked: bool):
        def body(i, carry):
            dk, dv = carry
            rows = pl.ds(i * bq, bq)
            q, do = q_ref[rows, :], do_ref[rows, :]
            lse, delta = lse_ref[rows], delta_ref[rows]
            s_t = lax.dot_general(k, q, NT_DIMS,
                                  preferred_element_type=jnp.float32) * settings.sm_scale
            p_t = jnp.exp(s_t - lse[None, :])  # [bk, bq], normalised by the saved logsumexp
            if masked:
                p_t = jnp.where(_visible(settings, i * bq, col0, bq, bk, True), p_t, 0.0)
            dv = dv + jnp.dot(p_t.astype(do.dtype), do, preferred_element_type=jnp.float32)
            dp_t = lax.dot_general(v, do, NT_DIMS, preferred_element_type=jnp.float32)
            ds_t = p_t * (dp_t - delta[None, :])
            dk = dk + jnp.dot(ds_t.astype(q.dtype), q, preferred_element_type=jnp.float32)
            return dk, dv
        return body

    carry = (jnp.zeros((bk, kp), jnp.float32), jnp.zeros((bk, kp), jnp.float32))
    if settings.causal:  # an empty range where lower >= upper: fori_loop runs while i < upper
        first, first_full = query_ranges(settings, col0, bq, bk, n_q)
        carry = lax.fori_loop(jnp.maximum(first, lo), jnp.minimum(first_full, hi), step(True),
                              carry)
        lo = jnp.maximum(first_full, lo)
    dk, dv = lax.fori_loop(lo, hi, step(False), carry)
    dk_ref[...] = (dk * settings.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def dkv_splits(n_q: int, programs: int, requested: int | None) -> tuple[int, int]:
    """(row tiles per split, splits) of a dk/dv grid walking n_q query-row tiles, none left
    empty: `requested` splits (`BlockSizes.dkv_splits`, at most n_q), or by default as many as
    make at least one program per SM. One key tile per program gives only `programs` =
    S/block_k x B programs (32 at PaLM-8B, B = 1, for 132 SMs), so the query-row walk is cut
    into splits run by separate programs, each still walking several query tiles; their
    partial dk, dv are summed by `summed_partials`."""
    splits = requested or pl.cdiv(SM_COUNT, programs)
    per_split = pl.cdiv(n_q, max(1, min(n_q, splits)))
    return per_split, pl.cdiv(n_q, per_split)


def dkv_partials(k, n_split: int) -> jax.ShapeDtypeStruct:
    """dk's (and dv's) per-split partial sums, [B, splits, Sp, Kp]: f32, or k's dtype when
    there is one split."""
    return jax.ShapeDtypeStruct((k.shape[0], n_split, *k.shape[1:]),
                                k.dtype if n_split == 1 else jnp.float32)


def summed_partials(partials, dtype) -> tuple[jax.Array, ...]:
    """Each of `partials` [B, splits, Sp, Kp] summed over its splits, in `dtype`. One split:
    a reshape. Several: one fused XLA pass over the f32 partials, splits x 2 x S x K x 4
    bytes (20 MiB at PaLM-8B's 5 splits) written and read, against the 512 MiB of q and do
    the kernel reads."""
    return tuple(jnp.sum(x, axis=1).astype(dtype) for x in partials)


def backward_dkv(q, k, v, do, lse, delta, settings: Settings):
    batch, rows, kp = q.shape
    blocks = settings.blocks
    bq, bk = blocks.block_q_dkv, blocks.block_k_dkv
    n_q, n_k = rows // bq, pl.cdiv(settings.kv_len, bk)  # key tiles of padding only: sliced off
    per_split, n_split = dkv_splits(n_q, n_k * batch, blocks.dkv_splits)
    whole = _whole(rows)
    q_spec = pl.BlockSpec((None, whole, kp), lambda j, b, c: (b, 0, 0))
    row_spec = pl.BlockSpec((None, whole), lambda j, b, c: (b, 0))
    kv_spec = pl.BlockSpec((None, bk, kp), lambda j, b, c: (b, j, 0))
    out = dkv_partials(k, n_split)
    out_spec = pl.BlockSpec((None, None, bk, kp), lambda j, b, c: (b, c, j, 0))
    with jax.named_scope(f"palm_mq_flash_attention_bwd_dkv bq={bq} bk={bk} splits={n_split} "
                         f"H={settings.num_heads} causal={settings.causal}"):
        dk, dv = _pallas_call(
            functools.partial(_dkv_kernel, settings=settings, n_q=n_q, per_split=per_split),
            name="palm_mq_flash_attention_bwd_dkv",
            out_shape=(out, out),
            grid=(n_k, batch, n_split),
            in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec],
            out_specs=(out_spec, out_spec),
            settings=settings, walked=(0, 3, 4, 5),  # q, do, lse, delta
        )(q, k, v, do, lse, delta)
        return summed_partials((dk, dv), k.dtype)


# ---- backward: dq ----------------------------------------------------------------------------

def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, settings: Settings,
               n_tiles: int):
    """One (query tile, batch) program: dq of its rows summed over the visible key tiles.

    q_ref/do_ref/dq_ref [bq, Kp], k_ref/v_ref [Sp2, Kp] (the whole padded key axis),
    lse_ref/delta_ref [bq].
    """
    bq, bk = settings.blocks.block_q_dq, settings.blocks.block_k_dq
    row0 = _tile_index(settings, n_tiles) * bq
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    kp = q.shape[-1]

    def step(masked: bool):
        def body(j, dq):
            k = k_ref[pl.ds(j * bk, bk), :]
            v = v_ref[pl.ds(j * bk, bk), :]
            s = lax.dot_general(q, k, NT_DIMS,
                                preferred_element_type=jnp.float32) * settings.sm_scale
            p = jnp.exp(s - lse[:, None])  # [bq, bk]
            if masked:
                p = jnp.where(_visible(settings, row0, j * bk, bq, bk, False), p, 0.0)
            dp = lax.dot_general(do, v, NT_DIMS, preferred_element_type=jnp.float32)
            ds = p * (dp - delta[:, None])
            return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)
        return body

    dq = jnp.zeros((bq, kp), jnp.float32)
    n_full, n_vis, any_masked = key_ranges(settings, row0, bq, bk)
    dq = lax.fori_loop(0, n_full, step(False), dq)
    if any_masked:
        dq = lax.fori_loop(n_full, n_vis, step(True), dq)
    dq_ref[...] = (dq * settings.sm_scale).astype(dq_ref.dtype)


def backward_dq(q, k, v, do, lse, delta, settings: Settings):
    batch, rows, kp = q.shape
    blocks = settings.blocks
    bq = blocks.block_q_dq
    n_q = rows // bq
    q_spec = pl.BlockSpec((None, bq, kp), lambda i, b: (b, _rev(settings, n_q, i), 0))
    row_spec = pl.BlockSpec((None, bq), lambda i, b: (b, _rev(settings, n_q, i)))
    kv_spec = pl.BlockSpec((None, _whole(k.shape[1]), kp), lambda i, b: (b, 0, 0))
    with jax.named_scope(f"palm_mq_flash_attention_bwd_dq bq={bq} bk={blocks.block_k_dq} "
                         f"H={settings.num_heads} causal={settings.causal}"):
        return _pallas_call(
            functools.partial(_dq_kernel, settings=settings, n_tiles=n_q),
            name="palm_mq_flash_attention_bwd_dq",
            out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
            grid=(n_q, batch),
            in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec],
            out_specs=q_spec,
            settings=settings, walked=(1, 2),  # k, v
        )(q, k, v, do, lse, delta)


def mq_flash_attention_pallas_gpu(q, k, v, *, causal=True, sm_scale=None, interpret=None,
                                  block_sizes: BlockSizes | None = None) -> jax.Array:
    """The Pallas GPU (Triton) flash attention (module docstring), differentiable: the front
    door's arrays and settings, block_sizes a gpu `BlockSizes` with its warps and stages (None:
    sized for an H100/H200's shared memory) and interpret None or a bool (True: the generic
    Pallas interpreter, which runs these kernels on CPU)."""
    return mq_flash_attention_pallas(sys.modules[__name__], q, k, v, causal=causal,
                                     sm_scale=sm_scale, interpret=gpu_interpret(interpret),
                                     block_sizes=block_sizes)
