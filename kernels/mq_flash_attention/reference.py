"""`mq_flash_attention_reference`, the plain-jnp twin of `kernels.mq_flash_attention`; the
logsumexp the Pallas forward saves and the backward it tiles, in plain jnp; and the argument
checks every implementation shares."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from kernels._common import matmul_f32


def mq_flash_attention_reference(
    q: jax.Array,  # [B, T, H, K]
    k: jax.Array,  # [B, S, K]
    v: jax.Array,  # [B, S, K]
    *,
    causal: bool = True,
    sm_scale: float | None = None,
) -> jax.Array:
    """Plain-jnp twin: softmax(q·k^T * sm_scale) · v with the softmax in float32; [B, T, H, K]."""
    check_args(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    s = matmul_f32("BTHK,BSK->BHTS", q, k) * scale
    if causal:
        t, src = q.shape[1], k.shape[1]
        visible = jnp.arange(t)[:, None] >= jnp.arange(src)[None, :]  # [T, S]
        s = jnp.where(visible, s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    o = matmul_f32("BHTS,BSK->BTHK", p.astype(v.dtype), v)
    return o.astype(q.dtype)


def mq_flash_attention_reference_lse(
    q: jax.Array,  # [B, T, H, K]
    k: jax.Array,  # [B, S, K]
    *,
    causal: bool = True,
    sm_scale: float | None = None,
) -> jax.Array:
    """The softmax's logsumexp per query row, float32 [B, T, H]: what the forward saves."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    s = matmul_f32("BTHK,BSK->BTHS", q, k) * scale
    if causal:
        visible = jnp.arange(q.shape[1])[:, None] >= jnp.arange(k.shape[1])[None, :]  # [T, S]
        s = jnp.where(visible[:, None, :], s, -jnp.inf)
    return jax.nn.logsumexp(s, axis=-1)


def mq_flash_attention_reference_bwd(
    q: jax.Array,  # [B, T, H, K]
    k: jax.Array,  # [B, S, K]
    v: jax.Array,  # [B, S, K]
    o: jax.Array,  # [B, T, H, K]
    lse: jax.Array,  # f32 [B, T, H]
    do: jax.Array,  # [B, T, H, K]
    *,
    causal: bool = True,
    sm_scale: float | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Hand-written backward of the reference from the saved logsumexp: (dq, dk, dv).

    The math the Pallas backward tiles: p = exp(s - lse), dv = p^T do, dp = do v^T,
    ds = p (dp - delta) with delta = rowsum(do * o) (= rowsum(p * dp), the softmax's Jacobian
    in one number per row), dq = ds k * scale, dk = ds^T q * scale. dk and dv sum over heads:
    every head read the same key/value head.
    """
    check_args(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    s = matmul_f32("BTHK,BSK->BTHS", q, k) * scale
    p = jnp.exp(s - lse[..., None])  # [B, T, H, S]
    if causal:
        visible = jnp.arange(q.shape[1])[:, None] >= jnp.arange(k.shape[1])[None, :]  # [T, S]
        p = jnp.where(visible[:, None, :], p, 0.0)
    dv = matmul_f32("BTHS,BTHK->BSK", p.astype(do.dtype), do)
    dp = matmul_f32("BTHK,BSK->BTHS", do, v)
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)  # [B, T, H]
    ds = p * (dp - delta[..., None])
    dq = matmul_f32("BTHS,BSK->BTHK", ds, k) * scale
    dk = matmul_f32("BTHS,BTHK->BSK", ds, q) * scale
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def check_args(q, k, v) -> None:
    """The argument checks every implementation runs first: ValueError naming what is wrong."""
    if q.ndim != 4:
        raise ValueError(f"mq_flash_attention: q must be [B, T, H, K], got {q.shape=}")
    b, _, _, head_dim = q.shape
    if k.ndim != 3 or k.shape[0] != b or k.shape[2] != head_dim:
        raise ValueError(f"mq_flash_attention: k must be [B={b}, S, K={head_dim}], got {k.shape=}")
    if v.shape != k.shape:
        raise ValueError(f"mq_flash_attention: v must match k's shape {k.shape}, got {v.shape=}")
