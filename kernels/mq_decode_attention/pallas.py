"""What both Pallas backends of `mq_decode_attention` share: the argument checks and the combine
of the splits' partial results (flash-decoding: each split of a sequence's cache returns its
normalised output and log-sum-exp).

A backend module (`tpu` or `gpu`) provides IMPL, its impl name ("pallas_tpu", "pallas_gpu"),
for error messages, and BlockSizes, its frozen tiling with
`get_default(seq_len, num_heads, head_dim, *, dtype, batch)`.
"""

from __future__ import annotations

import math
import types

import jax
import jax.numpy as jnp

from kernels.mq_decode_attention.reference import check_args, check_lengths


def check_pallas_args(backend: types.ModuleType, q, k_cache, v_cache, lengths, *, sm_scale,
                      block_sizes):
    """The reference's checks plus what the kernels need; returns (block_sizes, scale): the
    backend's default tiles for the shapes when None, and 1/sqrt(K) when sm_scale is None."""
    check_args(q, k_cache, v_cache, lengths)
    if q.dtype != k_cache.dtype or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"mq_decode_attention: q, k_cache and v_cache must share a dtype, got "
                         f"{q.dtype=} {k_cache.dtype=} {v_cache.dtype=}")
    batch, heads, head_dim = q.shape
    seq_len = k_cache.shape[1]
    check_lengths(lengths, seq_len)
    if block_sizes is None:
        block_sizes = backend.BlockSizes.get_default(seq_len, heads, head_dim, dtype=q.dtype,
                                                     batch=batch)
    if not isinstance(block_sizes, backend.BlockSizes):
        raise ValueError(f"mq_decode_attention: impl={backend.IMPL!r}: block_sizes must be a "
                         f"{backend.__name__}.BlockSizes, got {block_sizes!r}")
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)
    return block_sizes, scale


def combine_splits(o_parts: jax.Array, lse: jax.Array, dtype) -> jax.Array:
    """The splits' outputs o_parts [B, P, H, K] f32, each normalised over its own cache tiles,
    weighted by exp(lse [B, P, H, 1] f32) into [B, H, K] in dtype. Split 0 always has a tile,
    so the max is finite; an empty split has lse = -inf and weight 0."""
    weights = jnp.exp(lse - jnp.max(lse, axis=1, keepdims=True))  # [B, P, H, 1]
    o = jnp.sum(weights * o_parts, axis=1) / jnp.sum(weights, axis=1)
    return o.astype(dtype)
