"""The parallel block's output side: `x + o·wo + h·w_down` in one pass.

PaLM's parallel formulation (section 2) sums the attention and MLP outputs into the residual;
both output projections contract into one accumulator and the residual joins in the epilogue,
so the block writes its result once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels._common import matmul_f32, pallas_impl, resolve_impl


def block_out_reference(
    x: jax.Array,  # [B, T, D]
    o: jax.Array,  # [B, T, H, K]
    wo: jax.Array,  # [H, K, D]
    h: jax.Array,  # [B, T, F]
    w_down: jax.Array,  # [F, D]
) -> jax.Array:
    """Plain-jnp twin: x + o·wo + h·w_down accumulated in float32, returned in x's dtype."""
    _check(x, o, wo, h, w_down)
    attn = matmul_f32("BTHK,HKD->BTD", o, wo)
    mlp = matmul_f32("BTF,FD->BTD", h, w_down)
    return (x.astype(jnp.float32) + attn + mlp).astype(x.dtype)


def _check(x, o, wo, h, w_down) -> None:
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


# Pallas implementations, each taking the reference's arguments plus interpret and block_sizes.
_PALLAS = {}


def block_out(
    x: jax.Array,  # [B, T, D]
    o: jax.Array,  # [B, T, H, K]
    wo: jax.Array,  # [H, K, D]
    h: jax.Array,  # [B, T, F]
    w_down: jax.Array,  # [F, D]
    *,
    impl: str = "auto",
    interpret=None,
    block_sizes=None,
) -> jax.Array:
    """The parallel block's result `x + o·wo + h·w_down`.

    Args:
      x: [B, T, D] the residual stream (block input).
      o: [B, T, H, K] attention output per head; wo: [H, K, D].
      h: [B, T, F] SwiGLU activations; w_down: [F, D].
      impl, interpret, block_sizes: see `kernels.rope.rope`.

    Returns:
      [B, T, D] in x's dtype.
    """
    impl = resolve_impl(impl)
    if impl == "xla":
        return block_out_reference(x, o, wo, h, w_down)
    fn = pallas_impl("block_out", impl, _PALLAS)
    return fn(x, o, wo, h, w_down, interpret=interpret, block_sizes=block_sizes)
