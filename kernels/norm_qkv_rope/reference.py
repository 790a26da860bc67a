"""`norm_qkv_rope_reference`, the plain-jnp twin of `kernels.norm_qkv_rope`, and the argument
checks every implementation shares."""

from __future__ import annotations

import jax

from kernels._common import layer_norm_f32, matmul_f32
from kernels.rope.reference import rope_reference


def norm_qkv_rope_reference(
    x: jax.Array,  # [B, T, D]
    norm_scale: jax.Array,  # [D]
    wq: jax.Array,  # [D, H, K]
    wk: jax.Array,  # [D, K]
    wv: jax.Array,  # [D, K]
    positions: jax.Array,  # int [B, T]
    *,
    eps: float,
    base: float = 10000.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Plain-jnp twin: returns q [B, T, H, K], k [B, T, K], v [B, T, K] in x's dtype."""
    check_args(x, norm_scale, wq, wk, wv, positions)
    h = layer_norm_f32(x, norm_scale, eps).astype(x.dtype)  # [B, T, D]
    q = matmul_f32("BTD,DHK->BTHK", h, wq)
    k = matmul_f32("BTD,DK->BTK", h, wk)
    v = matmul_f32("BTD,DK->BTK", h, wv)
    # RoPE straight on the float32 accumulators, one rounding to x's dtype at the end.
    q = rope_reference(q, positions, base=base)
    k = rope_reference(k, positions, base=base)
    return q.astype(x.dtype), k.astype(x.dtype), v.astype(x.dtype)


def check_args(x, norm_scale, wq, wk, wv, positions) -> None:
    """The argument checks every implementation runs first: ValueError naming what is wrong."""
    if x.ndim != 3:
        raise ValueError(f"norm_qkv_rope: x must be [B, T, D], got {x.shape=}")
    _, _, d = x.shape
    if wq.ndim != 3 or wq.shape[0] != d:
        raise ValueError(f"norm_qkv_rope: wq must be [D={d}, H, K], got {wq.shape=}")
    head_dim = wq.shape[2]
    for name, w in (("wk", wk), ("wv", wv)):
        if w.shape != (d, head_dim):
            raise ValueError(f"norm_qkv_rope: {name} must be [D, K] = {(d, head_dim)}, got {w.shape}")
    if norm_scale.shape != (d,):
        raise ValueError(f"norm_qkv_rope: norm_scale must be [D={d}], got {norm_scale.shape=}")
    if positions.shape != x.shape[:2]:
        raise ValueError(f"norm_qkv_rope: positions must be [B, T] = {x.shape[:2]}, got {positions.shape=}")
