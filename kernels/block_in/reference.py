"""`block_in_reference`, the plain-jnp twin of `kernels.block_in`, and its argument checks."""

from __future__ import annotations

import jax

from kernels.norm_qkv_rope.reference import check_args as check_qkv_args
from kernels.norm_qkv_rope.reference import norm_qkv_rope_reference
from kernels.norm_swiglu.reference import check_args as check_mlp_args
from kernels.norm_swiglu.reference import norm_swiglu_reference


def block_in_reference(
    x: jax.Array,  # [B, T, D]
    norm_scale: jax.Array,  # [D]
    wq: jax.Array,  # [D, H, K]
    wk: jax.Array,  # [D, K]
    wv: jax.Array,  # [D, K]
    w_gate: jax.Array,  # [D, F]
    w_up: jax.Array,  # [D, F]
    positions: jax.Array,  # int [B, T]
    *,
    eps: float,
    base: float = 10000.0,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Plain-jnp twin: q [B, T, H, K], k, v [B, T, K] and h [B, T, F] in x's dtype.

    The two halves' references side by side. Both normalise x with the same expression, which
    XLA's common-subexpression pass computes once; under autodiff the two LayerNorm backwards
    stay separate (XLA does not factor the linear map out of a sum), which is correct and
    costs one extra elementwise pass over [M, D].
    """
    check_args(x, norm_scale, wq, wk, wv, w_gate, w_up, positions)
    q, k, v = norm_qkv_rope_reference(x, norm_scale, wq, wk, wv, positions, eps=eps, base=base)
    h = norm_swiglu_reference(x, norm_scale, w_gate, w_up, eps=eps)
    return q, k, v, h


def check_args(x, norm_scale, wq, wk, wv, w_gate, w_up, positions) -> None:
    """Both halves' argument checks: ValueError naming what is wrong."""
    check_qkv_args(x, norm_scale, wq, wk, wv, positions)
    check_mlp_args(x, norm_scale, w_gate, w_up)
