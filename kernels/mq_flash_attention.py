"""Multi-query attention (Shazeer 2019; PaLM section 2): H query heads share one key/value head.

Causal masking is top-left aligned, as in JAX's TPU `flash_attention`: query row t sees key
columns s <= t. With T == S (training, prefill) that is the usual causal mask; every row sees
at least column 0, so no row is ever empty.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from kernels._common import matmul_f32, pallas_impl, resolve_impl


def mq_flash_attention_reference(
    q: jax.Array,  # [B, T, H, K]
    k: jax.Array,  # [B, S, K]
    v: jax.Array,  # [B, S, K]
    *,
    causal: bool = True,
    sm_scale: float | None = None,
) -> jax.Array:
    """Plain-jnp twin: softmax(q·k^T * sm_scale) · v with the softmax in float32; [B, T, H, K]."""
    _check(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    s = matmul_f32("BTHK,BSK->BHTS", q, k) * scale
    if causal:
        t, src = q.shape[1], k.shape[1]
        visible = jnp.arange(t)[:, None] >= jnp.arange(src)[None, :]  # [T, S]
        s = jnp.where(visible, s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    o = matmul_f32("BHTS,BSK->BTHK", p.astype(v.dtype), v)
    return o.astype(q.dtype)


def _check(q, k, v) -> None:
    if q.ndim != 4:
        raise ValueError(f"mq_flash_attention: q must be [B, T, H, K], got {q.shape=}")
    b, _, _, head_dim = q.shape
    if k.ndim != 3 or k.shape[0] != b or k.shape[2] != head_dim:
        raise ValueError(f"mq_flash_attention: k must be [B={b}, S, K={head_dim}], got {k.shape=}")
    if v.shape != k.shape:
        raise ValueError(f"mq_flash_attention: v must match k's shape {k.shape}, got {v.shape=}")


# Pallas implementations, each taking the reference's arguments plus interpret and block_sizes.
_PALLAS = {}


def mq_flash_attention(
    q: jax.Array,  # [B, T, H, K]
    k: jax.Array,  # [B, S, K]
    v: jax.Array,  # [B, S, K]
    *,
    causal: bool = True,
    sm_scale: float | None = None,
    impl: str = "auto",
    interpret=None,
    block_sizes=None,
) -> jax.Array:
    """Multi-query softmax attention.

    Args:
      q: [B, T, H, K] queries (RoPE applied).
      k, v: [B, S, K] the single shared key/value head.
      causal: mask key columns after each query row (top-left aligned, see module docstring).
      sm_scale: logit scale; None means 1/sqrt(K).
      impl, interpret, block_sizes: see `kernels.rope.rope`.

    Returns:
      [B, T, H, K] in q's dtype.
    """
    impl = resolve_impl(impl)
    if impl == "xla":
        return mq_flash_attention_reference(q, k, v, causal=causal, sm_scale=sm_scale)
    fn = pallas_impl("mq_flash_attention", impl, _PALLAS)
    return fn(q, k, v, causal=causal, sm_scale=sm_scale, interpret=interpret, block_sizes=block_sizes)
