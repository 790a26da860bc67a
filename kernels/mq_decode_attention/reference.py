"""`mq_decode_attention_reference`, the plain-jnp twin of `kernels.mq_decode_attention`, and the
argument checks every implementation shares."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from kernels._common import matmul_f32


def mq_decode_attention_reference(
    q: jax.Array,  # [B, H, K]
    k_cache: jax.Array,  # [B, S, K]
    v_cache: jax.Array,  # [B, S, K]
    lengths: jax.Array,  # int32 [B]
    *,
    sm_scale: float | None = None,
) -> jax.Array:
    """Plain-jnp twin: attention of q over cache positions < lengths[b]; [B, H, K] in q's dtype."""
    check_args(q, k_cache, v_cache, lengths)
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    s = matmul_f32("BHK,BSK->BHS", q, k_cache) * scale
    valid = jnp.arange(k_cache.shape[1])[None, :] < lengths[:, None]  # [B, S]
    s = jnp.where(valid[:, None, :], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    o = matmul_f32("BHS,BSK->BHK", p.astype(v_cache.dtype), v_cache)
    return o.astype(q.dtype)


def check_args(q, k_cache, v_cache, lengths) -> None:
    """The argument checks every implementation runs first: ValueError naming what is wrong."""
    if q.ndim != 3:
        raise ValueError(f"mq_decode_attention: q must be [B, H, K], got {q.shape=}")
    b, _, head_dim = q.shape
    if k_cache.ndim != 3 or k_cache.shape[0] != b or k_cache.shape[2] != head_dim:
        raise ValueError(f"mq_decode_attention: k_cache must be [B={b}, S, K={head_dim}], got {k_cache.shape=}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"mq_decode_attention: v_cache must match k_cache {k_cache.shape}, got {v_cache.shape=}")
    if lengths.shape != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"mq_decode_attention: lengths must be int [B={b}], got {lengths.shape=} {lengths.dtype=}")


def check_lengths(lengths: jax.Array, seq_len: int) -> None:
    """1 <= lengths <= S where the values are known (outside jit); traced lengths can't be checked."""
    try:
        values = np.asarray(lengths)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return
    if values.size and (values.min() < 1 or values.max() > seq_len):
        raise ValueError(
            f"mq_decode_attention: lengths must lie in [1, S={seq_len}], got min {values.min()} "
            f"max {values.max()} in {values.tolist()}")
