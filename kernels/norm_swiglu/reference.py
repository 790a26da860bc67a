"""`norm_swiglu_reference`, the plain-jnp twin of `kernels.norm_swiglu`; its hand-written
backward, the jnp steps the Pallas backward also uses; and the argument checks every
implementation shares."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels._common import layer_norm_bwd, layer_norm_f32, layer_norm_rows, matmul_f32, row_stats


def norm_swiglu_reference(
    x: jax.Array,  # [B, T, D]
    norm_scale: jax.Array,  # [D]
    w_gate: jax.Array,  # [D, F]
    w_up: jax.Array,  # [D, F]
    *,
    eps: float,
) -> jax.Array:
    """Plain-jnp twin: returns silu(LN(x)·w_gate) * (LN(x)·w_up), [B, T, F] in x's dtype."""
    check_args(x, norm_scale, w_gate, w_up)
    h = layer_norm_f32(x, norm_scale, eps).astype(x.dtype)  # [B, T, D]
    gate = matmul_f32("BTD,DF->BTF", h, w_gate)
    up = matmul_f32("BTD,DF->BTF", h, w_up)
    return (jax.nn.silu(gate) * up).astype(x.dtype)


def norm_swiglu_reference_bwd(
    x: jax.Array,  # [B, T, D]
    norm_scale: jax.Array,  # [D]
    w_gate: jax.Array,  # [D, F]
    w_up: jax.Array,  # [D, F]
    dh: jax.Array,  # [B, T, F]
    *,
    eps: float,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Hand-written backward of `norm_swiglu_reference` in plain jnp, step for step what the
    Pallas backward does tile by tile; returns (dx, d_norm_scale, d_w_gate, d_w_up)."""
    check_args(x, norm_scale, w_gate, w_up)
    b, t, d = x.shape
    x2 = x.reshape(b * t, d)  # [M, D]
    mean, rstd = row_stats(x2, eps)  # [M, 1] each
    xn = layer_norm_rows(x2, mean, rstd, norm_scale).astype(x.dtype)  # LN(x) [M, D]
    gate = matmul_f32("MD,DF->MF", xn, w_gate)
    up = matmul_f32("MD,DF->MF", xn, w_up)
    d_gate, d_up = swiglu_bwd(gate, up, dh.reshape(b * t, -1), x.dtype)  # [M, F] each
    dxn = matmul_f32("MF,DF->MD", d_gate, w_gate) + matmul_f32("MF,DF->MD", d_up, w_up)
    dw_gate = matmul_f32("MD,MF->DF", xn, d_gate).astype(w_gate.dtype)
    dw_up = matmul_f32("MD,MF->DF", xn, d_up).astype(w_up.dtype)
    dx, dscale = layer_norm_bwd(dxn, x2, norm_scale, mean, rstd)
    return dx.reshape(x.shape), dscale, dw_gate, dw_up


def swiglu_bwd(gate, up, dh, dtype):
    """Cotangents of the float32 pre-activations of h = silu(gate) * up, rounded to `dtype` for
    the matmuls that consume them. silu'(g) = sigmoid(g) * (1 + g * (1 - sigmoid(g)))."""
    dh = dh.astype(jnp.float32)
    sig = jax.nn.sigmoid(gate)
    d_gate = dh * up * (sig * (1.0 + gate * (1.0 - sig)))
    d_up = dh * (gate * sig)
    return d_gate.astype(dtype), d_up.astype(dtype)


def check_args(x, norm_scale, w_gate, w_up) -> None:
    """The argument checks every implementation runs first: ValueError naming what is wrong."""
    if x.ndim != 3:
        raise ValueError(f"norm_swiglu: x must be [B, T, D], got {x.shape=}")
    d = x.shape[-1]
    if w_gate.ndim != 2 or w_gate.shape[0] != d or w_up.shape != w_gate.shape:
        raise ValueError(f"norm_swiglu: w_gate and w_up must both be [D={d}, F], got {w_gate.shape=} {w_up.shape=}")
    if norm_scale.shape != (d,):
        raise ValueError(f"norm_swiglu: norm_scale must be [D={d}], got {norm_scale.shape=}")
