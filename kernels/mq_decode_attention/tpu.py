"""The Pallas TPU `mq_decode_attention`.

The Pallas TPU kernel (`mq_decode_attention_pallas_tpu`, kernel name `palm_mq_decode_fwd`)
is inference only: there is no gradient (decoding never differentiates through the cache) and
so no `custom_vjp`. `jax.grad` through it raises NotImplementedError (pallas_call has no JVP for
kernels with scalar-prefetch operands) rather than silently returning a wrong gradient.

How it works
  * Grid (B, P, J): sequence b, split p of the cache ("flash decoding": the cache positions of
    one sequence are cut into P partitions whose partial softmaxes are combined afterwards),
    step j inside the split. B and P are "parallel" (on megacore chips, v4 and v5p, the two
    TensorCores share the B x P points; with B = 1 only P > 1 gives the second core work), J is
    the sequential reduction.
  * Each step loads one cache tile k, v [bs, K] and computes the [H, K] x [K, bs] product for
    all H heads at once: MQA decoding is a real matrix product, not H matrix-vector products.
    Online softmax in float32 (running max m, sum l, accumulator [H, K]).
  * `lengths` is scalar-prefetched into SMEM. The splits share only the tiles that hold valid
    positions, cdiv(length, bs) of them, so the P partitions stay balanced whatever the
    length. Steps past a sequence's last valid tile do no work, and their index_map repeats
    the previous block index, so the pipeline issues no DMA for them: the cache beyond
    `length` is neither read nor computed on (up to bs - 1 masked rows in the last tile).
  * Any S: the last tile may run past S; those rows are at or beyond `length`, masked out of
    the softmax (logits -inf) and out of v (zeroed, since 0 * garbage could be NaN). The cache
    is never padded (padding would copy the whole cache, doubling the bytes of a step).
  * Combine: with P == 1 the kernel normalizes and writes o in q's dtype; nothing follows.
    With P > 1 it writes each split's normalized o (float32) and logsumexp, and a tiny jnp
    epilogue rescales them: o = sum_p exp(lse_p - max lse) o_p / sum_p exp(lse_p - max lse).
    It moves B*P*H*(K+1)*4 bytes, against 2*B*S*K*itemsize for the cache.

HBM bytes per decode step and layer at PaLM-8B shapes (B=8, S=2048, H=16, K=256, bf16)
  * Kernel, cache full: reads k and v once for all heads, 2*8*2048*256*2 = 16.0 MiB, plus q and
    o (64 KiB each). With lengths L_b it reads 2*K*2 * sum_b roundup(L_b, bs) bytes: half-full
    caches cost half.
  * XLA reference: the same 16.0 MiB of cache (its einsum also reads the cache once for all
    heads; MQA is what makes both cheap, 16x less than multi-head K/V), plus the logits and
    probabilities round trip ([8, 16, 2048] f32 written and read, bf16 p written and read:
    about 3 MiB if the mask and softmax fuse into one pass), and it always reads all S slots.
  * So at full length the kernel saves only the ~3 MiB of intermediates (~15%); the real win is
    length-proportional reading: with lengths averaging S/2 it moves ~8 MiB against ~19 MiB.
  * CostEstimate: statically the lengths are unknown, so bytes_accessed is the full-cache upper
    bound 2*B*S*K*itemsize (+ q and outputs), flops 4*B*H*S*K, transcendentals B*H*S.

VMEM per default configuration (`BlockSizes.get_default`; double-buffered inputs and outputs,
plus scratch and the [H, bs] float32 logits/probabilities)
  * block_s is chosen so one k + v tile is about 1 MiB (1024 rows at K=256 bf16), which keeps
    the per-grid-step overhead (~0.35 us) below the tile's DMA time on all generations.
  * PaLM-8B (H=16, K=256, bf16, bs=1024): k, v 2 x 2 x 512 KiB = 2 MiB; q, o 2 x 2 x 8 KiB;
    acc 16 KiB; m, l 2 x 8 KiB (lane-padded); logits, probabilities 2 x 64 KiB: ~2.2 MiB.
    (Estimates from `vmem_bytes`; Mosaic's own temporaries are not modelled.)
  * PaLM-540B (H=48, K=256, bf16, bs=1024): 2 MiB + q, o 2 x 2 x 24 KiB (o float32 when split:
    +48 KiB) + acc 48 KiB + m, l 2 x 24 KiB + logits, probabilities 2 x 192 KiB: ~2.6 MiB
    (2.7 MiB split).
  Both far inside the 16 MiB default scoped VMEM of v4/v5e; `vmem_bytes` computes it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels._common import tpu_interpret
from kernels._tpu import pallas_call as tpu_pallas_call
from kernels._tpu import LANE, compiler_params, pad_to, round_up, vmem_budget
from kernels.mq_decode_attention.pallas import check_pallas_args, combine_splits

IMPL = "pallas_tpu"


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of the Pallas TPU decode kernel (forward only: decoding needs no gradient).

    Attributes:
      block_s: cache positions per tile (a multiple of 8; 128-multiples keep the [H, bs]
        logits lane-dense on TPU). Clamped to S when S is smaller.
      num_splits: partitions P of each sequence's valid tiles, computed as separate parallel
        grid points and combined afterwards (clamped to the number of tiles).
    """

    block_s: int
    num_splits: int = 1

    def __post_init__(self):
        if not (isinstance(self.block_s, int) and self.block_s > 0 and self.block_s % 8 == 0):
            raise ValueError(f"BlockSizes: block_s must be a positive multiple of 8, got {self.block_s!r}")
        if not (isinstance(self.num_splits, int) and self.num_splits >= 1):
            raise ValueError(f"BlockSizes: num_splits must be an int >= 1, got {self.num_splits!r}")

    @classmethod
    def get_default(cls, seq_len: int, num_heads: int, head_dim: int, *, dtype=jnp.bfloat16,
                    batch: int | None = None, generation: str | None = None) -> BlockSizes:
        """Tiles for a cache of seq_len slots, num_heads query heads, head_dim K.

        block_s: about 1 MiB of k + v per tile (1024 rows at K=256 bf16), so each grid step's
        DMA outweighs its fixed cost, and at most ~256 KiB of [H, bs] float32 logits; a
        multiple of 128, never more than S rounded up to 8.
        num_splits: 2 when the batch is odd or unknown and the cache spans 2+ tiles, so that
        both TensorCores of a megacore chip get work (an even batch already shares evenly);
        1 otherwise, which also skips the combine epilogue.
        block_s is then halved (down to 128) while `vmem_bytes` exceeds
        `vmem_budget(generation)` (default: the target generation).
        """
        itemsize = jnp.dtype(dtype).itemsize
        rows = (1 << 20) // (2 * head_dim * itemsize)
        rows = min(rows, (256 << 10) // (4 * max(num_heads, 1)))
        rows = max(LANE, rows // LANE * LANE)
        block_s = min(rows, round_up(seq_len, 8))
        budget = vmem_budget(generation)
        while True:
            tiles = -(-seq_len // block_s)
            splits = 2 if tiles >= 2 and (batch is None or batch % 2) else 1
            blocks = cls(block_s=block_s, num_splits=splits)
            if block_s <= LANE or vmem_bytes(blocks, num_heads, head_dim, dtype) <= budget:
                return blocks
            block_s = max(LANE, block_s // 2 // LANE * LANE)


def vmem_bytes(block_sizes: BlockSizes, num_heads: int, head_dim: int, dtype=jnp.bfloat16) -> int:
    """VMEM the kernel needs: double-buffered q, k, v, o (+ lse), scratch, logits and probs."""
    itemsize = jnp.dtype(dtype).itemsize
    heads8 = round_up(num_heads, 8)  # sublane padding of [H, .] tiles
    bs, k = block_sizes.block_s, round_up(head_dim, LANE)
    split = block_sizes.num_splits > 1
    inputs = 2 * (heads8 * k * itemsize + 2 * bs * k * itemsize)
    outputs = 2 * (heads8 * k * (4 if split else itemsize) + (heads8 * LANE * 4 if split else 0))
    scratch = heads8 * k * 4 + 2 * heads8 * LANE * 4
    temporaries = 2 * heads8 * round_up(bs, LANE) * 4
    return inputs + outputs + scratch + temporaries


def _dot_f32(a: jax.Array, b: jax.Array, contract_b: int, interpreting: bool) -> jax.Array:
    """a [M, X] times b (contracting b's axis contract_b) in float32.

    In interpret mode the body runs on XLA:CPU, which has no bf16 x bf16 -> f32 dot, so the
    operands are widened there; products of bf16 numbers are exact in float32, so only the
    summation order differs from the MXU.
    """
    if interpreting and jnp.float32 not in (a.dtype, b.dtype):
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    dims = (((1,), (contract_b,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _schedule(p, j, valid_tiles, per_split):
    """What grid step (p, j) of a sequence does, given its valid_tiles and per_split counts.

    Split p owns tiles [p * per_split, (p + 1) * per_split) of the valid ones, so the splits
    share the work evenly whatever the length. Returns (tile, computes, fetched): the tile the
    step works on, whether it works at all, and the block its index_map asks for. A step that
    does not work asks for the block of the previous step (the split's last tile, or the last
    valid tile), so the pipeline sees an unchanged block index and issues no DMA.
    """
    tile = p * per_split + j
    computes = (j < per_split) & (tile < valid_tiles)
    fetched = jnp.minimum(p * per_split + jnp.minimum(j, per_split - 1), valid_tiles - 1)
    return tile, computes, fetched


def _decode_kernel(lengths_ref, valid_tiles_ref, per_split_ref,  # scalar prefetch (SMEM) [B]
                   q_ref, k_ref, v_ref,  # [H, K], [bs, K], [bs, K]
                   *refs, block_s: int, steps: int, scale: float, split: bool,
                   interpreting: bool):
    if split:
        o_ref, lse_ref, m_scratch, l_scratch, acc_scratch = refs  # [H, K], [H, 1]
    else:
        o_ref, m_scratch, l_scratch, acc_scratch = refs
    p, b, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    length = lengths_ref[b]
    tile, computes, _ = _schedule(p, j, valid_tiles_ref[b], per_split_ref[b])

    @pl.when(j == 0)
    def _init():
        m_scratch[...] = jnp.full(m_scratch.shape, -jnp.inf, jnp.float32)
        l_scratch[...] = jnp.zeros(l_scratch.shape, jnp.float32)
        acc_scratch[...] = jnp.zeros(acc_scratch.shape, jnp.float32)

    # Tiles past this split's share or past the last valid one: no work (and, via the index_map,
    # no DMA either).
    @pl.when(computes)
    def _step():
        start = tile * block_s
        s = _dot_f32(q_ref[...], k_ref[...], 1, interpreting) * scale  # [H, bs]
        cols = start + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
        s = jnp.where(cols < length, s, -jnp.inf)
        m_prev = m_scratch[...]  # [H, 1]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # finite: tile has a valid column
        alpha = jnp.exp(m_prev - m_next)  # 0 on the first tile (m_prev = -inf)
        probs = jnp.exp(s - m_next)  # [H, bs]
        l_scratch[...] = alpha * l_scratch[...] + jnp.sum(probs, axis=1, keepdims=True)
        v = v_ref[...]
        rows = start + jax.lax.broadcasted_iota(jnp.int32, v.shape, 0)
        v = jnp.where(rows < length, v, jnp.zeros_like(v))  # rows past S hold garbage; 0 * NaN = NaN
        pv = _dot_f32(probs.astype(v.dtype), v, 0, interpreting)  # [H, K]
        acc_scratch[...] = alpha * acc_scratch[...] + pv
        m_scratch[...] = m_next

    @pl.when(j == steps - 1)
    def _finish():
        l = l_scratch[...]
        empty = l == 0.0  # a split that got no tile (P > valid tiles): weight 0 in the combine
        o_ref[...] = (acc_scratch[...] / jnp.where(empty, 1.0, l)).astype(o_ref.dtype)
        if split:
            lse_ref[...] = jnp.where(empty, -jnp.inf, m_scratch[...] + jnp.log(jnp.where(empty, 1.0, l)))


def mq_decode_attention_pallas_tpu(q, k_cache, v_cache, lengths, *, sm_scale=None,
                                   interpret=None,
                                   block_sizes: BlockSizes | None = None) -> jax.Array:
    """Pallas TPU decode attention on q [B, H, K], k_cache and v_cache [B, S, K], lengths
    int32 [B]; the reference's arguments and result, plus interpret and block_sizes. No gradient.

    Under jit the lengths cannot be checked; they are clipped to [0, S] so that no DMA leaves the
    cache and no row past S enters the softmax. A length above S then means S and a length of 0
    gives NaN, both as in the reference.
    """
    block_sizes, scale = check_pallas_args(sys.modules[__name__], q, k_cache, v_cache, lengths,
                                           sm_scale=sm_scale, block_sizes=block_sizes)
    batch, heads, head_dim = q.shape
    seq_len = k_cache.shape[1]
    interpret = tpu_interpret(interpret)
    if interpret is False and head_dim % LANE:
        # [H, K] and [bs, K] tiles narrower than 128 lanes are no legal Mosaic layout: natively
        # the head dim is zero-padded to whole lanes (zeros add nothing to q·k or to p·v) and
        # the output sliced back, as in mq_flash_attention. It copies the cache per call, a cost
        # only the small presets (K = 64, 16) pay.
        kp = round_up(head_dim, LANE)
        padded = [pad_to(a, a.shape[:-1] + (kp,)) for a in (q, k_cache, v_cache)]
        out = mq_decode_attention_pallas_tpu(*padded, lengths, sm_scale=scale, interpret=False,
                                             block_sizes=block_sizes)
        return out[..., :head_dim]

    block_s = min(block_sizes.block_s, seq_len)  # = S is always a legal block (full dimension)
    num_tiles = pl.cdiv(seq_len, block_s)
    splits = min(block_sizes.num_splits, num_tiles)
    steps = pl.cdiv(num_tiles, splits)  # static extent; each sequence uses per_split[b] <= steps
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, seq_len)
    valid_tiles = jnp.clip(pl.cdiv(lengths, block_s), 1, num_tiles)
    per_split = pl.cdiv(valid_tiles, splits)

    def cache_index(p, b, j, lengths_ref, valid_tiles_ref, per_split_ref):
        return b, _schedule(p, j, valid_tiles_ref[b], per_split_ref[b])[2], 0

    split = splits > 1
    out_dtype = jnp.float32 if split else q.dtype
    out_shape = [jax.ShapeDtypeStruct((batch, splits, heads, head_dim), out_dtype)]
    out_specs = [pl.BlockSpec((None, None, heads, head_dim), lambda p, b, j, *_: (b, p, 0, 0))]
    if split:
        out_shape.append(jax.ShapeDtypeStruct((batch, splits, heads, 1), jnp.float32))
        out_specs.append(pl.BlockSpec((None, None, heads, 1), lambda p, b, j, *_: (b, p, 0, 0)))

    itemsize = q.dtype.itemsize
    out_bytes = sum(math.prod(s.shape) * s.dtype.itemsize for s in out_shape)
    cost = pl.CostEstimate(
        flops=4 * batch * heads * seq_len * head_dim,
        transcendentals=batch * heads * seq_len,
        bytes_accessed=2 * batch * seq_len * head_dim * itemsize + q.size * itemsize + out_bytes)

    kernel = functools.partial(_decode_kernel, block_s=block_s, steps=steps, scale=scale,
                               split=split, interpreting=interpret is not False)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        # Splits first: at batch 1 they are what a megacore's two TensorCores share.
        grid=(splits, batch, steps),
        in_specs=[
            pl.BlockSpec((None, heads, head_dim), lambda p, b, j, *_: (b, 0, 0)),
            pl.BlockSpec((None, block_s, head_dim), cache_index),
            pl.BlockSpec((None, block_s, head_dim), cache_index),
        ],
        out_specs=out_specs,
        scratch_shapes=[
            pltpu.VMEM((heads, 1), jnp.float32),  # running max m
            pltpu.VMEM((heads, 1), jnp.float32),  # running sum l
            pltpu.VMEM((heads, head_dim), jnp.float32),  # unnormalized output
        ],
    )
    with jax.named_scope(f"palm_mq_decode_attention bs={block_s} splits={splits} steps={steps}"):
        outs = tpu_pallas_call(
            kernel,
            grid_spec=grid_spec,
            out_shape=out_shape,
            compiler_params=compiler_params(
                "parallel", "parallel", "arbitrary",
                vmem_bytes=vmem_bytes(block_sizes, heads, head_dim, q.dtype)),
            cost_estimate=cost,
            interpret=interpret,
            name="palm_mq_decode_fwd",
        )(lengths, valid_tiles, per_split, q, k_cache, v_cache)
        if not split:
            return outs[0][:, 0]  # [B, H, K]
        o_parts, lse = outs  # [B, P, H, K] f32, [B, P, H, 1] f32
        return combine_splits(o_parts, lse, q.dtype)
