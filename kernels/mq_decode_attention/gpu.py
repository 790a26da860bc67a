"""The Pallas GPU (Triton-lowered) `mq_decode_attention`: flash decoding.

`mq_decode_attention_pallas_gpu`, kernel name `palm_mq_decode_gpu`, computes what the TPU
kernel (tpu.py) computes, with the same semantics for lengths, splits and the combine; it is
inference only too: decoding never differentiates through the cache, and `jax.grad` through it
raises NotImplementedError (a `custom_jvp` that refuses) rather than failing inside Pallas.

How it works
  * Grid (B, P): sequence b, split p of its cache. At batch 1 there is only one row of queries,
    so the cache positions are what the GPU's SMs share ("flash decoding", Dao et al. 2023):
    each sequence's valid tiles, cdiv(length, block_k) of them, are cut into P even runs whose
    partial softmaxes are merged afterwards. The split is by valid tiles, not by fixed slices
    of S, so short rows still spread over P programs, and a program never touches the cache
    past its row's length: the loop bounds are computed in-kernel from `lengths[b]`.
  * Each program loads its row's `lengths[b]` and all H query heads as one [H_pad, K_pad] tile
    (H_pad = max(16, next power of two of H), K_pad likewise of K: Triton arrays are powers of
    two and its dots need dims >= 16; the padding rows/columns are masked loads reading 0, so
    the small q and o are never copied). Then a `fori_loop` over its run of key tiles loads
    k, v [block_k, K_pad] (masked loads: rows at or past the length, and columns past K, read
    0 and fetch nothing) and computes the [H_pad, K_pad] x [K_pad, block_k] product for all
    heads at once: MQA decoding is a matrix product, the cache tile read once for every head.
  * Registers: the q tile, the online-softmax state (running max m [H_pad], sum l [H_pad],
    unnormalised output acc [H_pad, K_pad] float32) and the [H_pad, block_k] logits stay in
    registers for the whole loop; only k and v tiles pass through shared memory (Triton's
    pipeline, `num_stages` buffers each). At H_pad = 16, K = 256 the f32 accumulator is 16 KiB
    per program, 32 registers a thread at 4 warps.
  * The cache block spans the whole (power-of-two rounded) S axis and is sliced with `pl.ds`
    in the loop; the cache is never padded or copied. Rows past S are never read: lengths are
    clipped to [0, S] in the wrapper and every load is masked by the length.
  * Combine, as in tpu.py: with P == 1 the kernel normalises and writes o in q's dtype. With
    P > 1 it writes each split's normalised o (float32) and logsumexp, and XLA merges them:
    o = sum_p exp(lse_p - max lse) o_p / sum_p exp(lse_p - max lse). A split that got no tile
    (P > valid tiles) writes lse = -inf and weighs nothing; split 0 always has a tile.
  * Length 0 gives NaN, a length above S means S, as in the reference (the front door refuses
    both where the lengths are concrete).

FLOPs and bytes per call (one decode step of one layer)
  * FLOPs 4*B*H*L*K for total valid length L = sum_b lengths[b] (2 for q.k, 2 for p.v), plus
    B*H*L exponentials; at PaLM-8B (B=8, S=2048 full, H=16, K=256) 268 MFLOP.
  * Bytes: the cache read, 2*K*itemsize per valid position: 2*8*2048*256*2 = 16.0 MiB at full
    length in bf16, plus q and o (64 KiB each) and, split, 2*B*P*H*(K+1)*4 bytes of partials
    written and read back by the combine. Arithmetic intensity is 2*H/itemsize = 16 FLOP/byte
    in bf16, against ~300 FLOP/byte an H100 needs to be compute bound (990 TFLOP/s dense bf16 over
    3.35 TB/s): decode is bandwidth bound, and what counts is reading each cache byte once,
    with enough programs in flight to keep every SM's loads going.

Defaults for H100 (`BlockSizes.get_default`)
  * block_k: one k + v tile of about 64 KiB (64 rows at K=256 bf16, 32 in f32), clamped to
    [16, 128] and to S. Little's law: ~3.35 TB/s at ~1 us latency is ~3.4 MB in flight, ~26 KiB
    per SM; two stages of 64 KiB cover it with margin, and smaller tiles only add loop steps.
  * num_stages 2 (one tile computing, the next loading), num_warps 4: shared memory is
    num_stages * 2 * block_k * K_pad * itemsize = 128 KiB at PaLM shapes, inside the 227 KiB a
    thread block may use (`shared_memory_bytes`, checked with `check_shared_memory`).
    block_k = 128 at two stages would need 256 KiB and is refused.
  * num_splits: the largest P with B*P <= 132 (the H100 SXM's SMs) such that each split still
    gets two tiles, so the grid fills the card in one wave: 128 KiB of shared memory per
    program leaves room for one program per SM, and a second, partial wave would leave most SMs
    idle while it ran. PaLM-8B, S = 2048: B=1 -> P=16 (16 programs: the call is launch bound
    at 2 MiB of cache anyway; partials add 2*16*16*257*4 = 0.5 MiB); B=8 -> 16 (128
    programs); B=64 -> 2 (128 programs); B >= 67 -> 1, no combine.

What a CPU cannot check
  * tests/ run the kernel under `interpret=True` (values, masking, the schedule, the combine)
    and export it for CUDA (tests/gpu_export.py: the whole Pallas-to-Triton lowering, which
    refuses non power-of-two arrays and unsupported operations). Not checked without a GPU:
    Triton's compile to PTX (register spills, the real shared-memory allocation, which may
    differ from `shared_memory_bytes`), that masked loads past S really fetch nothing, float32
    dots at TF32 (kernels/_gpu.py `dot`), speed, and the choice of defaults.
"""

from __future__ import annotations

import dataclasses
import functools
import sys

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from kernels._gpu import (
    MIN_BLOCK,
    SM_COUNT,
    check_block_sizes,
    check_shared_memory,
    dot,
    gpu_interpret,
    next_power_of_two,
    pallas_call,
)
from kernels.mq_decode_attention.pallas import check_pallas_args, combine_splits

IMPL = "pallas_gpu"


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of the Pallas GPU decode kernel (forward only).

    Attributes:
      block_k: cache positions per tile, a power of two >= 16 (Triton dots). Clamped to S
        rounded up to a power of two.
      num_splits: partitions P of each sequence's valid tiles, separate programs combined
        afterwards (clamped to the number of tiles).
      num_warps: warps per program (a power of two).
      num_stages: Triton pipeline stages of the k, v loads (>= 1).
    """

    block_k: int
    num_splits: int = 1
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        check_block_sizes(self, tiles=("block_k",), warps=("num_warps",), stages=("num_stages",))
        if not (isinstance(self.num_splits, int) and self.num_splits >= 1):
            raise ValueError(f"BlockSizes: num_splits must be an int >= 1, got {self.num_splits!r}")

    @classmethod
    def get_default(cls, seq_len: int, num_heads: int, head_dim: int, *, dtype=jnp.bfloat16,
                    batch: int | None = None) -> BlockSizes:
        """H100 tiles for a cache of seq_len slots; the module docstring says why."""
        del num_heads  # the heads live in registers; they do not bound the tiles
        itemsize = jnp.dtype(dtype).itemsize
        k_pad = max(MIN_BLOCK, next_power_of_two(head_dim))
        rows = (64 << 10) // (2 * k_pad * itemsize)
        block_k = min(max(MIN_BLOCK, 1 << (max(rows, 1).bit_length() - 1)), 128,
                      max(MIN_BLOCK, next_power_of_two(seq_len)))
        tiles = -(-seq_len // block_k)
        splits = max(1, min(SM_COUNT // max(batch or 1, 1), tiles // 2))
        return cls(block_k=block_k, num_splits=splits)


def shared_memory_bytes(block_sizes: BlockSizes, head_dim: int, dtype=jnp.bfloat16) -> int:
    """Shared memory of the k, v pipeline: num_stages buffers of a [block_k, K_pad] tile each."""
    k_pad = max(MIN_BLOCK, next_power_of_two(head_dim))
    tile = block_sizes.block_k * k_pad * jnp.dtype(dtype).itemsize
    return block_sizes.num_stages * 2 * tile


def _store(ref, value, mask):
    if mask is None:
        ref[...] = value
    else:
        pl_triton.store(ref, value, mask=mask)


def _decode_kernel(lengths_ref, q_ref, k_ref, v_ref,  # [], [H_pad, K_pad], [S_pad, K_pad] x 2
                   *out_refs, heads: int, head_dim: int, block_k: int, num_tiles: int,
                   splits: int, scale: float, interpreting: bool):
    h_pad, k_pad = q_ref.shape
    p = pl.program_id(1)
    length = lengths_ref[...]
    # This split's run of valid tiles, as tpu.py's `_schedule`: P even shares of cdiv(length,
    # block_k) (at least one, so that split 0 is never empty).
    valid_tiles = jnp.clip(pl.cdiv(length, block_k), 1, num_tiles)
    per_split = pl.cdiv(valid_tiles, splits)
    first = p * per_split
    last = jnp.minimum(first + per_split, valid_tiles)

    col_ok = None if k_pad == head_dim else (jnp.arange(k_pad) < head_dim)[None, :]
    head_ok = None if h_pad == heads else (jnp.arange(h_pad) < heads)[:, None]
    q_mask = head_ok if col_ok is None else (col_ok if head_ok is None else head_ok & col_ok)
    q = q_ref[...] if q_mask is None else pl_triton.load(q_ref, mask=q_mask, other=0)

    def body(t, carry):
        acc, m_prev, l_prev = carry  # [H_pad, K_pad], [H_pad], [H_pad] float32
        start = t * block_k
        rows = start + jnp.arange(block_k)
        row_ok = rows < length  # past the length (and so past S): neither read nor used
        mask = row_ok[:, None] if col_ok is None else row_ok[:, None] & col_ok
        window = pl.ds(pl.multiple_of(start, block_k), block_k)
        k = pl_triton.load(k_ref.at[window, :], mask=mask, other=0)
        s = dot(q, k, 1, 1, widen=interpreting) * scale  # [H_pad, block_k]
        s = jnp.where(row_ok[None, :], s, -jnp.inf)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))  # finite: the tile has a valid row
        alpha = jnp.exp(m_prev - m_next)  # 0 on the first tile (m_prev = -inf)
        probs = jnp.exp(s - m_next[:, None])
        l_next = alpha * l_prev + jnp.sum(probs, axis=1)
        v = pl_triton.load(v_ref.at[window, :], mask=mask, other=0)  # zeros: 0 * garbage is NaN
        acc = alpha[:, None] * acc + dot(probs.astype(v.dtype), v, 1, 0, widen=interpreting)
        return acc, m_next, l_next

    init = (jnp.zeros((h_pad, k_pad), jnp.float32), jnp.full((h_pad,), -jnp.inf, jnp.float32),
            jnp.zeros((h_pad,), jnp.float32))
    acc, m, l = jax.lax.fori_loop(first, last, body, init)
    empty = l == 0.0  # a split that got no tile: weight 0 in the combine
    l_safe = jnp.where(empty, 1.0, l)
    o_ref = out_refs[0]
    _store(o_ref, (acc / l_safe[:, None]).astype(o_ref.dtype), q_mask)
    if len(out_refs) > 1:
        lse = jnp.where(empty, -jnp.inf, m + jnp.log(l_safe))
        _store(out_refs[1], lse, None if head_ok is None else head_ok[:, 0])


@functools.partial(jax.custom_jvp, nondiff_argnums=(4,))
def _inference_only(q, k_cache, v_cache, lengths, call):
    return call(q, k_cache, v_cache, lengths)


@_inference_only.defjvp
def _inference_only_jvp(call, primals, tangents):
    raise NotImplementedError("mq_decode_attention: impl='pallas_gpu' has no gradient (inference "
                              "only); differentiate impl='xla'")


def mq_decode_attention_pallas_gpu(q, k_cache, v_cache, lengths, *, sm_scale=None,
                                   interpret=None,
                                   block_sizes: BlockSizes | None = None) -> jax.Array:
    """Pallas GPU (Triton) decode attention on q [B, H, K], k_cache and v_cache [B, S, K], lengths
    int32 [B]; the reference's arguments and result, plus interpret and block_sizes.

    No gradient. Under jit the lengths cannot be checked; they are clipped to [0, S] as in
    tpu.py, so that no load leaves the cache.
    """
    block_sizes, scale = check_pallas_args(sys.modules[__name__], q, k_cache, v_cache, lengths,
                                           sm_scale=sm_scale, block_sizes=block_sizes)
    batch, heads, head_dim = q.shape
    seq_len = k_cache.shape[1]
    interpret = gpu_interpret(interpret)

    h_pad = max(MIN_BLOCK, next_power_of_two(heads))
    k_pad = max(MIN_BLOCK, next_power_of_two(head_dim))
    block_k = min(block_sizes.block_k, max(MIN_BLOCK, next_power_of_two(seq_len)))
    check_shared_memory(
        shared_memory_bytes(dataclasses.replace(block_sizes, block_k=block_k), head_dim, q.dtype),
        "palm_mq_decode_gpu")
    s_pad = max(next_power_of_two(seq_len), block_k)  # the block the loop slices; never copied
    num_tiles = pl.cdiv(seq_len, block_k)
    splits = min(block_sizes.num_splits, num_tiles)
    split = splits > 1
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, seq_len)

    out_dtype = jnp.float32 if split else q.dtype
    out_shape = [jax.ShapeDtypeStruct((batch, splits, heads, head_dim), out_dtype)]
    out_specs = [pl.BlockSpec((None, None, h_pad, k_pad), lambda b, p: (b, p, 0, 0))]
    if split:
        out_shape.append(jax.ShapeDtypeStruct((batch, splits, heads), jnp.float32))
        out_specs.append(pl.BlockSpec((None, None, h_pad), lambda b, p: (b, p, 0)))
    cache_spec = pl.BlockSpec((None, s_pad, k_pad), lambda b, p: (b, 0, 0))
    kernel = functools.partial(
        _decode_kernel, heads=heads, head_dim=head_dim, block_k=block_k, num_tiles=num_tiles,
        splits=splits, scale=scale, interpreting=interpret)
    call = pallas_call(
            kernel,
            name="palm_mq_decode_gpu",
            out_shape=out_shape,
            grid=(batch, splits),
            in_specs=[
                pl.BlockSpec((None,), lambda b, p: (b,)),
                pl.BlockSpec((None, h_pad, k_pad), lambda b, p: (b, 0, 0)),
                cache_spec,
                cache_spec,
            ],
            out_specs=out_specs,
            interpret=interpret,
            num_warps=block_sizes.num_warps,
            num_stages=block_sizes.num_stages,
            masked_edges=True,  # q, k, v loads and o, lse stores all carry masks
        )
    with jax.named_scope(f"palm_mq_decode_gpu bk={block_k} splits={splits} "
                         f"warps={block_sizes.num_warps} stages={block_sizes.num_stages}"):
        outs = _inference_only(q, k_cache, v_cache, lengths,
                               lambda q, k, v, n: tuple(call(n, q, k, v)))
        if not split:
            return outs[0][:, 0]  # [B, H, K]
        o_parts, lse = outs  # [B, P, H, K] f32, [B, P, H] f32
        return combine_splits(o_parts, lse[..., None], q.dtype)
