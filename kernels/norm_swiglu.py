"""The MLP half's input side: LayerNorm, both MLP input projections and the SwiGLU gate.

PaLM (section 2) uses SwiGLU, `silu(h·w_gate) * (h·w_up)`; fused, the [.., 2F] pre-activations
never reach HBM.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels._common import layer_norm_f32, matmul_f32, pallas_impl, resolve_impl


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


def _check(x, norm_scale, w_gate, w_up) -> None:
    if x.ndim != 3:
        raise ValueError(f"norm_swiglu: x must be [B, T, D], got {x.shape=}")
    d = x.shape[-1]
    if w_gate.ndim != 2 or w_gate.shape[0] != d or w_up.shape != w_gate.shape:
        raise ValueError(f"norm_swiglu: w_gate and w_up must both be [D={d}, F], got {w_gate.shape=} {w_up.shape=}")
    if norm_scale.shape != (d,):
        raise ValueError(f"norm_swiglu: norm_scale must be [D={d}], got {norm_scale.shape=}")


# Pallas implementations, each taking the reference's arguments plus interpret and block_sizes.
_PALLAS = {}


def norm_swiglu(
    x: jax.Array,  # [B, T, D]
    norm_scale: jax.Array,  # [D]
    w_gate: jax.Array,  # [D, F]
    w_up: jax.Array,  # [D, F]
    *,
    eps: float,
    impl: str = "auto",
    interpret=None,
    block_sizes=None,
) -> jax.Array:
    """SwiGLU hidden activations of LayerNorm(x).

    Args:
      x: [B, T, D] the residual stream.
      norm_scale: [D] LayerNorm scale (no bias).
      w_gate, w_up: [D, F] the two MLP input projections.
      eps: LayerNorm epsilon.
      impl, interpret, block_sizes: see `kernels.rope.rope`.

    Returns:
      [B, T, F] in x's dtype.
    """
    impl = resolve_impl(impl)
    if impl == "xla":
        return norm_swiglu_reference(x, norm_scale, w_gate, w_up, eps=eps)
    fn = pallas_impl("norm_swiglu", impl, _PALLAS)
    return fn(x, norm_scale, w_gate, w_up, eps=eps, interpret=interpret, block_sizes=block_sizes)
