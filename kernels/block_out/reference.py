"""`block_out_reference`, the plain-jnp twin of `kernels.block_out`; its hand-written backward,
whose weight gradients the Pallas backward also uses; and the argument checks every
implementation shares."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels._common import matmul_f32


def block_out_reference(
    x: jax.Array,  # [B, T, D]
    o: jax.Array,  # [B, T, H, K]
    wo: jax.Array,  # [H, K, D]
    h: jax.Array,  # [B, T, F]
    w_down: jax.Array,  # [F, D]
) -> jax.Array:
    """Plain-jnp twin: x + o·wo + h·w_down accumulated in float32, returned in x's dtype."""
    check_args(x, o, wo, h, w_down)
    attn = matmul_f32("BTHK,HKD->BTD", o, wo)
    mlp = matmul_f32("BTF,FD->BTD", h, w_down)
    return (x.astype(jnp.float32) + attn + mlp).astype(x.dtype)


def block_out_reference_bwd(
    x: jax.Array,  # [B, T, D]
    o: jax.Array,  # [B, T, H, K]
    wo: jax.Array,  # [H, K, D]
    h: jax.Array,  # [B, T, F]
    w_down: jax.Array,  # [F, D]
    dy: jax.Array,  # [B, T, D]
) -> tuple[jax.Array, ...]:
    """Hand-written backward of `block_out_reference` in plain jnp: (dx, do, dwo, dh, dw_down).

    dx = dy (the residual), do = dy·woᵀ, dh = dy·w_downᵀ, dwo = oᵀ·dy, dw_down = hᵀ·dy, each
    accumulated in float32 and rounded to its primal's dtype.
    """
    check_args(x, o, wo, h, w_down)
    do = matmul_f32("BTD,HKD->BTHK", dy, wo).astype(o.dtype)
    dh = matmul_f32("BTD,FD->BTF", dy, w_down).astype(h.dtype)
    dwo, dw_down = weight_grads(o, h, dy, wo.dtype)
    return dy.astype(x.dtype), do, dwo, dh, dw_down


def weight_grads(o, h, dy, dtype):
    """dwo = oᵀ·dy [H, K, D] and dw_down = hᵀ·dy [F, D]: plain XLA matmuls (why: tpu.py)."""
    dwo = matmul_f32("BTHK,BTD->HKD", o, dy).astype(dtype)
    dw_down = matmul_f32("BTF,BTD->FD", h, dy).astype(dtype)
    return dwo, dw_down


def check_args(x, o, wo, h, w_down) -> None:
    """The argument checks every implementation runs first: ValueError naming what is wrong."""
    if x.ndim != 3:
        raise ValueError(f"block_out: x must be [B, T, D], got {x.shape=}")
    b, t, d = x.shape
    if o.ndim != 4 or o.shape[:2] != (b, t):
        raise ValueError(f"block_out: o must be [B={b}, T={t}, H, K], got {o.shape=}")
    if wo.shape != (*o.shape[2:], d):
        raise ValueError(f"block_out: wo must be [H, K, D] = {(*o.shape[2:], d)}, got {wo.shape=}")
    if h.ndim != 3 or h.shape[:2] != (b, t):
        raise ValueError(f"block_out: h must be [B={b}, T={t}, F], got {h.shape=}")
    if w_down.shape != (h.shape[2], d):
        raise ValueError(f"block_out: w_down must be [F, D] = {(h.shape[2], d)}, got {w_down.shape=}")
