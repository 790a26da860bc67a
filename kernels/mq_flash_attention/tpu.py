"""The Pallas TPU `mq_flash_attention`: flash attention (Dao et al. 2022), forward and backward.

Heads are folded into the query rows: q [B, T, H, K] is viewed as [B, T*H, K], row r = t*H + h
holding head h of position t. With one shared key/value head every row attends to the same
keys, so a tile of `block_q` rows (block_q/H positions x H heads; it need not start or end on a
position) is one [block_q, K] matrix against each [block_k, K] key tile: each K/V tile is read
once per query tile and used by all H heads, and K/V are never repeated H times in memory. The
causal test for row r and column s is `r >= s*H` (i.e. r // H >= s), so no division is needed.

Layout. The fold is a reshape, not a transpose: q [B, T, H, K] -> [B, T*H, K] and back for the
output. On TPU the HBM tiles of the two minor dims are (16, 128) for bf16 (8 for f32), so the
reshape is a bitcast when H is a multiple of 16 (PaLM: H = 16, 32, 48) and one relayout copy
otherwise. Transposing to [B, H, T, K] instead would cost a read and a write of q, and of o
and the gradients, per call: 4 x 16 MiB at PaLM-8B per layer forward, for nothing.

Tiling. Forward grid (T*H/block_q, B, S/block_k), keys innermost; online softmax in float32
(running max m and sum l in lane-replicated [block_q, 128] scratch, accumulator [block_q, K]
f32), one division and one store per query tile. With `causal`, key tiles entirely above the
diagonal are skipped: no compute (pl.when), and no DMA either because the key index_map clamps
to the query tile's last visible key tile, so the pipeline sees an unchanged block index and
does not refetch. The mask is only built for tiles that cross the diagonal or hold padded keys.
The forward also writes the logsumexp lse = m + log(l), f32, lane-dense as [B, 1, T*H] (one
transpose of a [block_q, 128] tile per query tile; 4 bytes per row, where a lane-replicated
[.., 128] layout would cost 512).

Backward, two kernels, using the residuals q, k, v, o, lse and delta = rowsum(do * o) (f32,
one fused XLA pass over do and o; a kernel of its own would save nothing):
  * dk/dv: grid (S/block_k_dkv, B, T*H/block_q_dkv), query tiles innermost, f32 accumulators
    [block_k_dkv, K] summing over all heads and all query tiles. Scores are built transposed,
    s^T = k q^T [block_k, block_q], so lse and delta broadcast as rows; all four matmuls are
    plain or rhs-transposed (dv += p^T do, dp^T = v do^T, dk += ds^T q). Query tiles entirely
    before the key tile's diagonal are skipped the same way (clamped index_map + pl.when).
  * dq: grid (T*H/block_q_dq, B, S/block_k_dq), key tiles innermost, f32 accumulator
    [block_q, K]; lse and delta are turned into columns once per query tile (one transpose).
    Same causal skipping as the forward.

Causal tiles do unequal work; the parallel tile axis is walked 0, n-1, 1, n-2, ... so that the
two TensorCores of a v4/v5p megacore, which take contiguous halves of a parallel axis, get
equal work (`_balanced`). The tile axis comes first, before the batch: at B = 1 per chip it is
the only parallel axis with work to share, whichever one Mosaic divides.

Shapes. Any B, H >= 1, T, S >= 1 (T != S allowed), any K. The wrapper pads the folded rows
T*H, the key length S and the head dim K to the tiles (K to a multiple of 128, the lane
width: K = 64, 128, 256 and small test sizes 8..32 all work). Padded keys are masked out of
the softmax, padded head-dim entries are zero, so they contribute nothing; padded query rows
are computed (q = 0, finite lse) and sliced off, and their zero cotangent adds nothing to
dk/dv. At PaLM shapes nothing is padded (T*H and S divide the tiles, K = 256).

HBM traffic at PaLM-8B (B=1 per chip, T = S = 2048, H = 16, K = 256, bf16, causal), per layer:
  unfused XLA (the reference): the scores [B, H, T, S] f32 (256 MiB) are written, read by the
    max and the sum of the softmax and by its normalisation (3 x 256 MiB), and the bf16
    probabilities are written and read by the PV matmul (2 x 128 MiB): ~1.25 GiB forward. Its
    backward reads p and writes and reads dp and ds of the same [B, H, T, S] size: ~1.5 GiB.
  this kernel, forward: q 16 MiB + o 16 MiB + lse 0.125 MiB + K/V tiles re-read once per
    query tile: 32 query tiles (block_q = 1024 rows = 64 positions) x on average 2.5 of the
    4 key tiles x 2 x 256 KiB = 40 MiB; ~72 MiB in all, about 17x less.
  backward: the dk/dv kernel reads q and do once per visited key tile (on average 2.5 of 4:
    2.5 x 32 MiB = 80 MiB) plus k, v, dk, dv (4 MiB); the dq kernel reads q, do and writes dq
    (48 MiB) and re-reads K/V per query tile (32 tiles x on average 4.5 of 8 key tiles x
    2 x 128 KiB = 36 MiB); delta reads do and o (32 MiB): ~200 MiB, about 7x less.
Every pallas_call passes a pl.CostEstimate with these counts (visited tiles counted exactly).

VMEM (`vmem_bytes`; double-buffered in/out blocks + scratch + an allowance for the f32
[block_q, block_k] temporaries the compiler keeps in VMEM), default tiles, bf16, K = 256:
  forward  block_q=1024, block_k=512:        ~11.1 MiB
  dk/dv    block_q_dkv=512, block_k_dkv=512:  ~8.1 MiB
  dq       block_q_dq=1024, block_k_dq=256:   ~9.6 MiB
The tiles are rows of the folded matrix, so these numbers are the same for PaLM-8B (H=16)
and PaLM-540B (H=48). `BlockSizes.get_default` halves tiles until every kernel fits the
target generation's `vmem_budget` (12 MiB on v4; f32 inputs or K > 256 need it), and each
pallas_call sets `vmem_limit_bytes` from its estimate. Arithmetic intensity against the
re-read operand is block_q flops/byte forward (1024), 2*block_k_dkv for dk/dv (1024) and
1.5*block_q_dq for dq (1536): above the compute/bandwidth ridge of v4 (~230), v5e (~250),
v5p (~165) and v6e (~575).
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
from jax.experimental.pallas import tpu as pltpu

from kernels._common import tpu_interpret
from kernels._tpu import pallas_call as tpu_pallas_call
from kernels._tpu import (
    LANE,
    NT_DIMS,
    check_multiple,
    compiler_params,
    round_up,
    tile_bytes,
    vmem_budget,
)
from kernels.mq_flash_attention.pallas import (
    MASK_VALUE,
    Settings,
    fit_tiles,
    mq_flash_attention_pallas,
)

IMPL = "pallas_tpu"


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles of the three kernels. `*_q` count rows of the folded query matrix [T*H, K]
    (row t*H + h, so block_q rows are block_q/H positions x H heads); `*_k` count key
    positions. All must be multiples of 128 (lanes: the logsumexp row and the transposed
    scores put the query tile on lanes). Tiles larger than the problem are shrunk per call.

    Attributes:
      block_q, block_k: forward tiles.
      block_q_dkv, block_k_dkv: the dk/dv kernel's tiles (key tile fixed, query tiles swept).
      block_q_dq, block_k_dq: the dq kernel's tiles (query tile fixed, key tiles swept).
    """

    block_q: int = 1024
    block_k: int = 512
    block_q_dkv: int = 512
    block_k_dkv: int = 512
    block_q_dq: int = 1024
    block_k_dq: int = 256

    def __post_init__(self):
        for field in dataclasses.fields(self):
            check_multiple("BlockSizes", field.name, getattr(self, field.name), LANE)

    @classmethod
    def get_default(
        cls, *, q_len: int, kv_len: int, num_heads: int, head_dim: int, dtype: Any,
        generation: str | None = None,
    ) -> BlockSizes:
        """Tiles for one shape: the defaults above (sized for PaLM, bf16, K = 256), shrunk to
        the problem, then halved (largest tile first) while a kernel's `vmem_bytes`
        exceeds `vmem_budget(generation)` (default: the target generation; 12 MiB on v4), as
        for f32 inputs or K > 256."""
        budget = vmem_budget(generation)
        blocks = cls().fit(q_len * num_heads, kv_len)
        while True:
            over = [name for name, size in vmem_bytes(blocks, head_dim, dtype).items()
                    if size > budget]
            if not over:
                return blocks
            names = {"forward": ("block_q", "block_k"), "dkv": ("block_q_dkv", "block_k_dkv"),
                     "dq": ("block_q_dq", "block_k_dq")}[over[0]]
            name = max(names, key=lambda n: getattr(blocks, n))
            if getattr(blocks, name) == LANE:
                return blocks  # as small as tiles go; the kernel still runs, with less headroom
            blocks = dataclasses.replace(blocks, **{name: getattr(blocks, name) // 2})

    def fit(self, rows: int, kv_len: int) -> BlockSizes:
        """These tiles shrunk for `rows` folded query rows and `kv_len` keys."""
        return fit_tiles(self, rows, kv_len, LANE)


def padded_head_dim(head_dim: int) -> int:
    """K as the kernels see it: zero-padded to a multiple of 128 (lanes)."""
    return round_up(head_dim, LANE)


def check_tiles(blocks: BlockSizes, head_dim: int, dtype: Any) -> None:
    """Nothing beyond `BlockSizes`' own checks: any tiles run, each pallas_call asks for the
    VMEM its `vmem_bytes` estimate needs (`get_default` keeps that within the budget)."""


def vmem_bytes(blocks: BlockSizes, head_dim: int, dtype: Any) -> dict[str, int]:
    """Bytes of VMEM each kernel needs with these tiles: double-buffered input and output
    blocks, scratch, and the f32 [block_q, block_k] temporaries (3 forward: logits, p and its
    cast; 4 backward: s, p, dp, ds), which Mosaic also keeps in VMEM."""
    kp = padded_head_dim(head_dim)
    item = jnp.dtype(dtype).itemsize
    f32 = 4
    tile = tile_bytes  # [rows, cols] in whole (sublane, 128-lane) tiles

    bq, bk = blocks.block_q, blocks.block_k
    forward = (2 * (tile(bq, kp, item) + 2 * tile(bk, kp, item))  # q, k, v in
               + 2 * (tile(bq, kp, item) + tile(1, bq, f32))  # o, lse out
               + tile(bq, kp, f32) + 2 * tile(bq, LANE, f32)  # acc, m, l
               + 3 * tile(bq, bk, f32))
    bq, bk = blocks.block_q_dkv, blocks.block_k_dkv
    dkv = (2 * (2 * tile(bq, kp, item) + 2 * tile(bk, kp, item) + 2 * tile(1, bq, f32))
           + 2 * 2 * tile(bk, kp, item)  # dk, dv out
           + 2 * tile(bk, kp, f32)  # dk, dv accumulators
           + 4 * tile(bk, bq, f32))
    bq, bk = blocks.block_q_dq, blocks.block_k_dq
    dq = (2 * (2 * tile(bq, kp, item) + 2 * tile(bk, kp, item) + 2 * tile(1, bq, f32))
          + 2 * tile(bq, kp, item)  # dq out
          + tile(bq, kp, f32) + 2 * tile(bq, LANE, f32)  # dq accumulator, lse/delta columns
          + 4 * tile(bq, bk, f32))
    return {"forward": forward, "dkv": dkv, "dq": dq}


def _last_kv_tile(i, block_q: int, block_k: int, num_heads: int):
    """Index of the last key tile a query tile i sees under the causal mask (may exceed the
    grid, callers clamp with min). Its last row is i*block_q + block_q - 1, at position
    row // H; integer division of non-negative scalars (lax.div truncates, = floor here)."""
    return lax.div(i * block_q + (block_q - 1), num_heads * block_k)


def _first_q_tile(j, block_q: int, block_k: int, num_heads: int):
    """Index of the first query tile that sees key tile j: its first key j*block_k is first
    seen by row j*block_k*H."""
    return lax.div(j * (block_k * num_heads), block_q)


def _tile_visible(i, j, block_q: int, block_k: int, num_heads: int):
    """Whether query tile i and key tile j share a visible pair under the causal mask: the
    tile's last row sees the key tile's first key. Equivalent to j <= _last_kv_tile(i) and to
    i >= _first_q_tile(j), with a multiplication instead of a division."""
    return i * block_q + (block_q - 1) >= j * (block_k * num_heads)


def _balanced(g, n, causal: bool):
    """Grid index -> tile index along the parallel tile axis.

    Causal tiles do unequal work (query tile i sees about i+1 key tiles, key tile j is seen by
    about n-j query tiles), and a chip with two TensorCores (v4, v5p megacore) splits a
    parallel grid axis into contiguous halves. Ordering the tiles 0, n-1, 1, n-2, ... gives
    each half an equal mix of long and short tiles. A permutation for any n.
    """
    if not causal:
        return g
    half = lax.div(g, 2)
    return jnp.where(lax.rem(g, 2) == 0, half, n - 1 - half)


def _needs_mask(settings: Settings, row0, col0, rows: int, cols: int):
    """Whether the [rows, cols] tile at (row0, col0) crosses the diagonal or holds padded keys.

    Traced booleans; None when no tile ever needs a mask (not causal, no padded keys)."""
    cond = None
    if settings.causal:  # some row r < some column c * H: the smallest row against the largest key
        cond = row0 < (col0 + cols - 1) * settings.num_heads
    padded = col0 + cols > settings.kv_len
    if settings.kv_len % cols:
        cond = padded if cond is None else jnp.logical_or(cond, padded)
    return cond


def _visible(settings: Settings, row0, col0, shape, transposed: bool):
    """Boolean mask of the visible (row, key) pairs of a tile; [rows, cols] or transposed."""
    row_axis, col_axis = (1, 0) if transposed else (0, 1)
    rows = row0 + lax.broadcasted_iota(jnp.int32, shape, row_axis)
    cols = col0 + lax.broadcasted_iota(jnp.int32, shape, col_axis)
    ok = cols < settings.kv_len
    if settings.causal:
        ok = jnp.logical_and(ok, rows >= cols * settings.num_heads)
    return ok


def _masked_or_not(settings: Settings, needed, mask_cond, body):
    """Runs body(masked) under pl.when: the masked variant only on tiles that need it."""
    if mask_cond is None:
        if needed is None:
            body(False)
        else:
            pl.when(needed)(lambda: body(False))
        return
    with_mask = mask_cond if needed is None else jnp.logical_and(needed, mask_cond)
    without = jnp.logical_not(mask_cond)
    without = without if needed is None else jnp.logical_and(needed, without)
    pl.when(with_mask)(lambda: body(True))
    pl.when(without)(lambda: body(False))


def _visited_tiles(settings: Settings, n_q: int, n_k: int, block_q: int, block_k: int) -> int:
    """How many (query tile, key tile) pairs a causal kernel computes (for CostEstimate)."""
    if not settings.causal:
        return n_q * n_k
    return sum(min(n_k, (i * block_q + block_q - 1) // (settings.num_heads * block_k) + 1)
               for i in range(n_q))


# ---- forward ---------------------------------------------------------------------------------

def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr, *, settings: Settings,
                n_tiles: int, n_steps: int):
    """One (batch, query tile, key tile) step of the online softmax.

    q_ref [bq, K], k_ref/v_ref [bk, K], o_ref [bq, K], lse_ref [1, bq];
    m_scr/l_scr [bq, 128] (lane-replicated running max and sum), acc_scr [bq, K] f32.
    """
    bq, bk = settings.blocks.block_q, settings.blocks.block_k
    i = _balanced(pl.program_id(0), n_tiles, settings.causal)
    j = pl.program_id(2)

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    def step(masked: bool):
        v = v_ref[...]
        s = lax.dot_general(q_ref[...], k_ref[...], NT_DIMS,
                            preferred_element_type=jnp.float32) * settings.sm_scale  # [bq, bk]
        if masked:
            visible = _visible(settings, i * bq, j * bk, s.shape, transposed=False)
            s = jnp.where(visible, s, MASK_VALUE)
        m_prev = m_scr[...]
        # Key tile 0 holds column 0, which every row sees, so after the first step m is finite
        # and a fully masked row of a later tile gets exp(MASK - m) = 0.
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # [bq, 128]
        alpha = jnp.exp(m_prev - m_next)  # rescales what was summed under the old max
        p = jnp.exp(s - m_next[:, :1])  # [bq, bk]
        l_scr[...] = alpha * l_scr[...] + jnp.sum(p, axis=1, keepdims=True)
        m_scr[...] = m_next
        pv = lax.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)  # [bq, K]
        acc_scr[...] = acc_scr[...] * alpha[:, :1] + pv

    needed = _tile_visible(i, j, bq, bk, settings.num_heads) if settings.causal else None
    _masked_or_not(settings, needed, _needs_mask(settings, i * bq, j * bk, bq, bk), step)

    @pl.when(j == n_steps - 1)
    def _finish():
        l = l_scr[...]
        o_ref[...] = (acc_scr[...] / l[:, :1]).astype(o_ref.dtype)
        lse = m_scr[...] + jnp.log(l)  # [bq, 128], equal lanes
        lse_ref[...] = jnp.transpose(lse)[:1, :]  # [1, bq]: rows onto lanes


def _query_tile_maps(settings: Settings, n_q: int, bq: int, bk: int):
    """Index maps on a grid (query tile g, batch, key tile j), keys innermost, as the forward
    and the dq kernel walk it: the query tile (in `_balanced` order), the key tile (under the
    causal mask clamped to the query tile's last visible one: past the diagonal the block
    index repeats and nothing is fetched) and the query tile's [1, bq] row of lse or delta."""

    def q_map(g, b, j):
        return b, _balanced(g, n_q, settings.causal), 0

    def kv_map(g, b, j):
        if settings.causal:
            j = jnp.minimum(j, _last_kv_tile(_balanced(g, n_q, True), bq, bk, settings.num_heads))
        return b, j, 0

    def row_map(g, b, j):
        return b, 0, _balanced(g, n_q, settings.causal)

    return q_map, kv_map, row_map


def forward(q, k, v, settings: Settings):
    """q [B, R, Kp] (folded, padded), k/v [B, Sp, Kp] -> o [B, R, Kp], lse f32 [B, 1, R]."""
    batch, rows, kp = q.shape
    bq, bk = settings.blocks.block_q, settings.blocks.block_k
    n_q, n_k = rows // bq, pl.cdiv(settings.kv_len, bk)  # key tiles of padding only: never visited
    heads = settings.num_heads
    q_map, kv_map, lse_map = _query_tile_maps(settings, n_q, bq, bk)
    visited = _visited_tiles(settings, n_q, n_k, bq, bk)
    item = q.dtype.itemsize
    cost = pl.CostEstimate(
        flops=int(batch * visited * 4 * bq * bk * kp),
        transcendentals=int(batch * visited * bq * bk),
        bytes_accessed=int(batch * (2 * rows * kp * item + rows * 4
                                    + visited * 2 * bk * kp * item)))
    with jax.named_scope(f"palm_mq_flash_attention_fwd bq={bq} bk={bk} H={heads} "
                         f"causal={settings.causal}"):
        return tpu_pallas_call(
            functools.partial(_fwd_kernel, settings=settings, n_tiles=n_q, n_steps=n_k),
            out_shape=(jax.ShapeDtypeStruct(q.shape, q.dtype),
                       jax.ShapeDtypeStruct((batch, 1, rows), jnp.float32)),
            grid=(n_q, batch, n_k),
            in_specs=[pl.BlockSpec((pl.Squeezed(), bq, kp), q_map),
                      pl.BlockSpec((pl.Squeezed(), bk, kp), kv_map),
                      pl.BlockSpec((pl.Squeezed(), bk, kp), kv_map)],
            out_specs=(pl.BlockSpec((pl.Squeezed(), bq, kp), q_map),
                       pl.BlockSpec((pl.Squeezed(), 1, bq), lse_map)),
            scratch_shapes=[pltpu.VMEM((bq, LANE), jnp.float32),
                            pltpu.VMEM((bq, LANE), jnp.float32),
                            pltpu.VMEM((bq, kp), jnp.float32)],
            compiler_params=compiler_params(
                "parallel", "parallel", "arbitrary",
                vmem_bytes=vmem_bytes(settings.blocks, kp, q.dtype)["forward"]),
            cost_estimate=cost,
            interpret=settings.interpret,
            name="palm_mq_flash_attention_fwd",
        )(q, k, v)


# ---- backward: dk and dv ---------------------------------------------------------------------

def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_scr, dv_scr,
                *, settings: Settings, n_tiles: int, n_steps: int):
    """One (batch, key tile, query tile) step: dk, dv of one key tile summed over query tiles.

    q_ref/do_ref [bq, K], k_ref/v_ref [bk, K], lse_ref/delta_ref [1, bq] (rows on lanes),
    dk_ref/dv_ref [bk, K], dk_scr/dv_scr [bk, K] f32. Scores are transposed, [bk, bq].
    """
    bq, bk = settings.blocks.block_q_dkv, settings.blocks.block_k_dkv
    j = _balanced(pl.program_id(0), n_tiles, settings.causal)
    i = pl.program_id(2)

    @pl.when(i == 0)
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    def step(masked: bool):
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        s_t = lax.dot_general(k, q, NT_DIMS, preferred_element_type=jnp.float32) * settings.sm_scale
        p_t = jnp.exp(s_t - lse_ref[...])  # [bk, bq], normalised by the saved logsumexp
        if masked:
            visible = _visible(settings, i * bq, j * bk, p_t.shape, transposed=True)
            p_t = jnp.where(visible, p_t, 0.0)
        dv_scr[...] += lax.dot(p_t.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dp_t = lax.dot_general(v, do, NT_DIMS, preferred_element_type=jnp.float32)  # [bk, bq]
        ds_t = p_t * (dp_t - delta_ref[...])
        dk_scr[...] += lax.dot(ds_t.astype(q.dtype), q, preferred_element_type=jnp.float32)

    needed = j * bk < settings.kv_len  # key tiles of padding only: their dk, dv are sliced off
    if settings.causal:
        needed = jnp.logical_and(needed, _tile_visible(i, j, bq, bk, settings.num_heads))
    _masked_or_not(settings, needed, _needs_mask(settings, i * bq, j * bk, bq, bk), step)

    @pl.when(i == n_steps - 1)
    def _finish():
        dk_ref[...] = (dk_scr[...] * settings.sm_scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def backward_dkv(q, k, v, do, lse, delta, settings: Settings):
    batch, rows, kp = q.shape
    bq, bk = settings.blocks.block_q_dkv, settings.blocks.block_k_dkv
    n_q, n_k = rows // bq, k.shape[1] // bk
    heads = settings.num_heads

    def q_index(g, i):
        if settings.causal:  # before the diagonal stay on the first query tile that sees key tile j
            first = _first_q_tile(_balanced(g, n_k, True), bq, bk, heads)
            i = jnp.maximum(i, jnp.minimum(first, n_q - 1))
        return i

    q_spec = pl.BlockSpec((pl.Squeezed(), bq, kp), lambda g, b, i: (b, q_index(g, i), 0))
    row_spec = pl.BlockSpec((pl.Squeezed(), 1, bq), lambda g, b, i: (b, 0, q_index(g, i)))
    kv_spec = pl.BlockSpec((pl.Squeezed(), bk, kp),
                           lambda g, b, i: (b, _balanced(g, n_k, settings.causal), 0))
    visited = _visited_tiles(settings, n_q, n_k, bq, bk)
    item = q.dtype.itemsize
    cost = pl.CostEstimate(
        flops=int(batch * visited * 8 * bq * bk * kp),
        transcendentals=int(batch * visited * bq * bk),
        bytes_accessed=int(batch * (4 * k.shape[1] * kp * item
                                    + visited * (2 * bq * kp * item + 2 * bq * 4))))
    with jax.named_scope(f"palm_mq_flash_attention_bwd_dkv bq={bq} bk={bk} H={heads} "
                         f"causal={settings.causal}"):
        return tpu_pallas_call(
            functools.partial(_dkv_kernel, settings=settings, n_tiles=n_k, n_steps=n_q),
            out_shape=(jax.ShapeDtypeStruct(k.shape, k.dtype),
                       jax.ShapeDtypeStruct(v.shape, v.dtype)),
            grid=(n_k, batch, n_q),
            in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec],
            out_specs=(kv_spec, kv_spec),
            scratch_shapes=[pltpu.VMEM((bk, kp), jnp.float32),
                            pltpu.VMEM((bk, kp), jnp.float32)],
            compiler_params=compiler_params(
                "parallel", "parallel", "arbitrary",
                vmem_bytes=vmem_bytes(settings.blocks, kp, q.dtype)["dkv"]),
            cost_estimate=cost,
            interpret=settings.interpret,
            name="palm_mq_flash_attention_bwd_dkv",
        )(q, k, v, do, lse, delta)


# ---- backward: dq ----------------------------------------------------------------------------

def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_scr, lse_scr,
               delta_scr, *, settings: Settings, n_tiles: int, n_steps: int):
    """One (batch, query tile, key tile) step: dq of one query tile summed over key tiles.

    q_ref/do_ref/dq_ref [bq, K], k_ref/v_ref [bk, K], lse_ref/delta_ref [1, bq];
    dq_scr [bq, K] f32, lse_scr/delta_scr [bq, 128] (the rows turned into columns once).
    """
    bq, bk = settings.blocks.block_q_dq, settings.blocks.block_k_dq
    i = _balanced(pl.program_id(0), n_tiles, settings.causal)
    j = pl.program_id(2)

    @pl.when(j == 0)
    def _init():
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)
        lse_scr[...] = jnp.transpose(jnp.broadcast_to(lse_ref[...], (LANE, bq)))
        delta_scr[...] = jnp.transpose(jnp.broadcast_to(delta_ref[...], (LANE, bq)))

    def step(masked: bool):
        k, do = k_ref[...], do_ref[...]
        s = lax.dot_general(q_ref[...], k, NT_DIMS,
                            preferred_element_type=jnp.float32) * settings.sm_scale  # [bq, bk]
        p = jnp.exp(s - lse_scr[...][:, :1])
        if masked:
            p = jnp.where(_visible(settings, i * bq, j * bk, p.shape, transposed=False), p, 0.0)
        dp = lax.dot_general(do, v_ref[...], NT_DIMS, preferred_element_type=jnp.float32)
        ds = p * (dp - delta_scr[...][:, :1])
        dq_scr[...] += lax.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    needed = _tile_visible(i, j, bq, bk, settings.num_heads) if settings.causal else None
    _masked_or_not(settings, needed, _needs_mask(settings, i * bq, j * bk, bq, bk), step)

    @pl.when(j == n_steps - 1)
    def _finish():
        dq_ref[...] = (dq_scr[...] * settings.sm_scale).astype(dq_ref.dtype)


def backward_dq(q, k, v, do, lse, delta, settings: Settings):
    batch, rows, kp = q.shape
    bq, bk = settings.blocks.block_q_dq, settings.blocks.block_k_dq
    n_q, n_k = rows // bq, pl.cdiv(settings.kv_len, bk)
    heads = settings.num_heads
    q_map, kv_map, row_map = _query_tile_maps(settings, n_q, bq, bk)
    q_spec = pl.BlockSpec((pl.Squeezed(), bq, kp), q_map)
    row_spec = pl.BlockSpec((pl.Squeezed(), 1, bq), row_map)
    kv_spec = pl.BlockSpec((pl.Squeezed(), bk, kp), kv_map)
    visited = _visited_tiles(settings, n_q, n_k, bq, bk)
    item = q.dtype.itemsize
    cost = pl.CostEstimate(
        flops=int(batch * visited * 6 * bq * bk * kp),
        transcendentals=int(batch * visited * bq * bk),
        bytes_accessed=int(batch * (3 * rows * kp * item + 2 * rows * 4
                                    + visited * 2 * bk * kp * item)))
    with jax.named_scope(f"palm_mq_flash_attention_bwd_dq bq={bq} bk={bk} H={heads} "
                         f"causal={settings.causal}"):
        return tpu_pallas_call(
            functools.partial(_dq_kernel, settings=settings, n_tiles=n_q, n_steps=n_k),
            out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
            grid=(n_q, batch, n_k),
            in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec],
            out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((bq, kp), jnp.float32),
                            pltpu.VMEM((bq, LANE), jnp.float32),
                            pltpu.VMEM((bq, LANE), jnp.float32)],
            compiler_params=compiler_params(
                "parallel", "parallel", "arbitrary",
                vmem_bytes=vmem_bytes(settings.blocks, kp, q.dtype)["dq"]),
            cost_estimate=cost,
            interpret=settings.interpret,
            name="palm_mq_flash_attention_bwd_dq",
        )(q, k, v, do, lse, delta)


def mq_flash_attention_pallas_tpu(q, k, v, *, causal=True, sm_scale=None, interpret=None,
                                  block_sizes: BlockSizes | None = None) -> jax.Array:
    """The Pallas TPU flash attention (module docstring), differentiable; `mq_flash_attention`'s
    arguments, with block_sizes a `BlockSizes` (None: `BlockSizes.get_default`, within the
    target generation's VMEM budget) and interpret None, a bool or a `pltpu.InterpretParams`
    (e.g. detect_races=True)."""
    return mq_flash_attention_pallas(sys.modules[__name__], q, k, v, causal=causal,
                                     sm_scale=sm_scale, interpret=tpu_interpret(interpret),
                                     block_sizes=block_sizes)
