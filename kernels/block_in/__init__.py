"""The parallel block's input side: one LayerNorm feeding both halves' projections.

PaLM's parallel block (section 2) is `x + attn(LN(x)) + mlp(LN(x))`: one LayerNorm. `block_in`
returns what both halves need from it, q, k, v (`norm_qkv_rope`: projections, RoPE on q and k)
and h (`norm_swiglu`: the SwiGLU activations), computing the LayerNorm's row statistics once and,
in the backward, one LayerNorm backward on the sum of the two halves' cotangents.

The front door `block_in`; its plain-jnp twin `block_in_reference` (reference.py); the composition
of the two halves' kernels on one LayerNorm and its `BlockSizes` (compose.py), on the halves' Pallas
TPU kernels (tpu.py), Pallas GPU (Triton) kernels or, `pallas_mosaic_gpu`, the MLP half's Mosaic
GPU forward beside them (gpu.py).
"""

from __future__ import annotations

import jax

from kernels._common import kernel_package, pallas_impl, resolve_impl
from kernels.block_in.reference import block_in_reference
from kernels.block_in.compose import BlockSizes
from kernels.block_in.gpu import block_in_pallas_gpu, block_in_pallas_mosaic_gpu
from kernels.block_in.tpu import block_in_pallas_tpu
from kernels.norm_qkv_rope import mgpu as qkv_mgpu

__all__ = ["BlockSizes", "block_in", "block_in_reference"]

# Pallas implementations, each taking the reference's arguments plus interpret, block_sizes and
# save_gate_up.
_PALLAS = {"pallas_tpu": block_in_pallas_tpu, "pallas_gpu": block_in_pallas_gpu,
           "pallas_mosaic_gpu": block_in_pallas_mosaic_gpu}


def block_in(
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
    impl: str = "auto",
    interpret=None,
    block_sizes=None,
    save_gate_up: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """q, k, v (`kernels.norm_qkv_rope`) and h (`kernels.norm_swiglu`) from one LayerNorm of x.

    Args:
      x: [B, T, D] the residual stream.
      norm_scale: [D] the block's LayerNorm scale (no bias).
      wq: [D, H, K]; wk, wv: [D, K] (multi-query: one key/value head).
      w_gate, w_up: [D, F] the MLP's input projections.
      positions: int [B, T] positions for RoPE.
      eps: LayerNorm epsilon. base: RoPE frequency base.
      impl, interpret: see `kernels.rope.rope`. block_sizes: a `block_in.BlockSizes` pairing
        each half's tiles. save_gate_up: see `kernels.norm_swiglu`.

    Returns:
      q [B, T, H, K], k [B, T, K], v [B, T, K], h [B, T, F] in x's dtype.
    """
    impl = resolve_impl(impl, "block_in", x.dtype, mosaic_takes=qkv_mgpu.mosaic_takes(wq))
    if impl == "xla":
        return block_in_reference(x, norm_scale, wq, wk, wv, w_gate, w_up, positions, eps=eps,
                                  base=base)
    fn = pallas_impl("block_in", impl, _PALLAS)
    return fn(x, norm_scale, wq, wk, wv, w_gate, w_up, positions, eps=eps, base=base,
              interpret=interpret, block_sizes=block_sizes, save_gate_up=save_gate_up)


kernel_package(__name__, block_in, _PALLAS)
