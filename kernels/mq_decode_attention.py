"""Multi-query attention for one new token per sequence against a KV cache.

With one shared key/value head (PaLM section 2) the H query heads of a sequence read the same
cache: the cache is read once per sequence, not once per head, which is what makes MQA decoding
cheap (Pope et al. 2022).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from kernels._common import matmul_f32, pallas_impl, resolve_impl


def mq_decode_attention_reference(
    q: jax.Array,  # [B, H, K]
    k_cache: jax.Array,  # [B, S, K]
    v_cache: jax.Array,  # [B, S, K]
    lengths: jax.Array,  # int32 [B]
    *,
    sm_scale: float | None = None,
) -> jax.Array:
    """Plain-jnp twin: attention of q over cache positions < lengths[b]; [B, H, K] in q's dtype."""
    _check(q, k_cache, v_cache, lengths)
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    s = matmul_f32("BHK,BSK->BHS", q, k_cache) * scale
    valid = jnp.arange(k_cache.shape[1])[None, :] < lengths[:, None]  # [B, S]
    s = jnp.where(valid[:, None, :], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    o = matmul_f32("BHS,BSK->BHK", p.astype(v_cache.dtype), v_cache)
    return o.astype(q.dtype)


def _check(q, k_cache, v_cache, lengths) -> None:
    if q.ndim != 3:
        raise ValueError(f"mq_decode_attention: q must be [B, H, K], got {q.shape=}")
    b, _, head_dim = q.shape
    if k_cache.ndim != 3 or k_cache.shape[0] != b or k_cache.shape[2] != head_dim:
        raise ValueError(f"mq_decode_attention: k_cache must be [B={b}, S, K={head_dim}], got {k_cache.shape=}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"mq_decode_attention: v_cache must match k_cache {k_cache.shape}, got {v_cache.shape=}")
    if lengths.shape != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"mq_decode_attention: lengths must be int [B={b}], got {lengths.shape=} {lengths.dtype=}")


# Pallas implementations, each taking the reference's arguments plus interpret and block_sizes.
_PALLAS = {}


def mq_decode_attention(
    q: jax.Array,  # [B, H, K]
    k_cache: jax.Array,  # [B, S, K]
    v_cache: jax.Array,  # [B, S, K]
    lengths: jax.Array,  # int32 [B]
    *,
    sm_scale: float | None = None,
    impl: str = "auto",
    interpret=None,
    block_sizes=None,
) -> jax.Array:
    """Attention of one query token per sequence over its first lengths[b] cache entries.

    Args:
      q: [B, H, K] the new token's queries.
      k_cache, v_cache: [B, S, K] the shared key/value head for S cache slots.
      lengths: int32 [B], 1 <= lengths[b] <= S; slots at or after lengths[b] are ignored.
      sm_scale: logit scale; None means 1/sqrt(K).
      impl, interpret, block_sizes: see `kernels.rope.rope`.

    Returns:
      [B, H, K] in q's dtype.
    """
    impl = resolve_impl(impl)
    if impl == "xla":
        return mq_decode_attention_reference(q, k_cache, v_cache, lengths, sm_scale=sm_scale)
    fn = pallas_impl("mq_decode_attention", impl, _PALLAS)
    return fn(q, k_cache, v_cache, lengths, sm_scale=sm_scale, interpret=interpret, block_sizes=block_sizes)
