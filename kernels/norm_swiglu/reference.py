"""`norm_swiglu_reference`, the plain-jnp twin of `kernels.norm_swiglu`; its hand-written
backward, the jnp steps the Pallas backward also uses; and the argument checks every
implementation shares."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels._common import layer_norm_f32, matmul_f32


def norm_swiglu_reference(
    x: jax.Array,  # [B, T, D]
    norm_scale: jax.Array,  # [D]
    w_gate: jax.Array,  # [D, F]
    w_up: jax.Array,  # [D, F]
    *,
    eps: float,
) -> jax.Array:
    """Plain-jnp twin: returns silu(LN(x)·w_gate) * (LN(x)·w_up), [B, T, F] in x's dtype."""
    _check(x, norm_scale, w_gate, w_up)
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
    _check(x, norm_scale, w_gate, w_up)
    b, t, d = x.shape
    x2 = x.reshape(b * t, d)  # [M, D]
    stats = _row_stats(x2, eps)  # [M, 2]
    xn = _normalise_rows(x2, stats, norm_scale)  # [M, D]
    gate = matmul_f32("MD,DF->MF", xn, w_gate)
    up = matmul_f32("MD,DF->MF", xn, w_up)
    d_gate, d_up = _swiglu_bwd(gate, up, dh.reshape(b * t, -1), x.dtype)  # [M, F] each
    dxn = matmul_f32("MF,DF->MD", d_gate, w_gate) + matmul_f32("MF,DF->MD", d_up, w_up)
    dw_gate = matmul_f32("MD,MF->DF", xn, d_gate).astype(w_gate.dtype)
    dw_up = matmul_f32("MD,MF->DF", xn, d_up).astype(w_up.dtype)
    dx, dscale = _layer_norm_bwd(x2, stats, norm_scale, dxn)
    return dx.reshape(x.shape), dscale, dw_gate, dw_up


def _swiglu_bwd(gate, up, dh, dtype):
    """Cotangents of the float32 pre-activations of h = silu(gate) * up, rounded to `dtype` for
    the matmuls that consume them. silu'(g) = sigmoid(g) * (1 + g * (1 - sigmoid(g)))."""
    dh = dh.astype(jnp.float32)
    sig = jax.nn.sigmoid(gate)
    d_gate = dh * up * (sig * (1.0 + gate * (1.0 - sig)))
    d_up = dh * (gate * sig)
    return d_gate.astype(dtype), d_up.astype(dtype)


def _normalise_rows(x2, stats, norm_scale):
    """LN(x) [M, D] in x's dtype from the [M, 2] statistics, as `layer_norm_f32` computes it."""
    xf = x2.astype(jnp.float32)
    return ((xf - stats[:, 0:1]) * stats[:, 1:2] * norm_scale.astype(jnp.float32)).astype(x2.dtype)


def _layer_norm_bwd(x2, stats, norm_scale, dxn):
    """dx [M, D] and d_norm_scale [D] from dxn, the float32 cotangent of LN(x) [M, D]."""
    xhat = (x2.astype(jnp.float32) - stats[:, 0:1]) * stats[:, 1:2]
    dscale = jnp.sum(dxn * xhat, axis=0)
    g = dxn * norm_scale.astype(jnp.float32)  # cotangent of xhat
    dx = stats[:, 1:2] * (g - jnp.mean(g, axis=-1, keepdims=True)
                          - xhat * jnp.mean(g * xhat, axis=-1, keepdims=True))
    return dx.astype(x2.dtype), dscale.astype(norm_scale.dtype)


def _check(x, norm_scale, w_gate, w_up) -> None:
    if x.ndim != 3:
        raise ValueError(f"norm_swiglu: x must be [B, T, D], got {x.shape=}")
    d = x.shape[-1]
    if w_gate.ndim != 2 or w_gate.shape[0] != d or w_up.shape != w_gate.shape:
        raise ValueError(f"norm_swiglu: w_gate and w_up must both be [D={d}, F], got {w_gate.shape=} {w_up.shape=}")
    if norm_scale.shape != (d,):
        raise ValueError(f"norm_swiglu: norm_scale must be [D={d}], got {norm_scale.shape=}")


def _row_stats(x2: jax.Array, eps: float) -> jax.Array:
    """float32 [M, 2]: each row's mean and 1/sqrt(var + eps), as `layer_norm_f32` computes them."""
    xf = x2.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    centered = xf - mean
    var = jnp.mean(centered * centered, axis=-1, keepdims=True)
    return jnp.concatenate([mean, jax.lax.rsqrt(var + eps)], axis=-1)
