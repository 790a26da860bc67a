"""The attention half's input side: LayerNorm, the q/k/v projections and RoPE on q and k.

PaLM's parallel block (section 2) normalises x once and feeds both the attention and the MLP;
multi-query attention (section 2) projects to H query heads but a single shared key/value head.

The front door `norm_qkv_rope`; its plain-jnp twin `norm_qkv_rope_reference` (reference.py);
the Pallas TPU kernels with their tiling (`BlockSizes`, `vmem_bytes`, `hbm_bytes`), HBM and VMEM
numbers and design notes (tpu.py); the Pallas GPU (Triton) kernels with their own tiling
(`kernels.norm_qkv_rope.gpu.BlockSizes`), FLOPs, bytes, shared memory and design notes (gpu.py);
the Mosaic GPU (Hopper) forward and backward, `impl="pallas_mosaic_gpu"`, and its
`mgpu.BlockSizes` (mgpu.py). The backend modules expose `Settings`, `prepare`, `forward_with_stats` and `backward_to_dh`
with one contract, which `kernels.block_in` composes with norm_swiglu's; that contract, the
`Settings`, the argument checks and the custom_vjp over a backend module, which both backends
share, are in pallas.py.
"""

from __future__ import annotations

import jax

from kernels._common import kernel_package, pallas_impl, resolve_impl
from kernels.norm_qkv_rope.gpu import norm_qkv_rope_pallas_gpu
from kernels.norm_qkv_rope.mgpu import mosaic_takes, norm_qkv_rope_pallas_mosaic_gpu
from kernels.norm_qkv_rope.reference import norm_qkv_rope_reference
from kernels.norm_qkv_rope.tpu import BlockSizes, hbm_bytes, norm_qkv_rope_pallas_tpu, vmem_bytes

__all__ = ["BlockSizes", "hbm_bytes", "norm_qkv_rope", "norm_qkv_rope_reference", "vmem_bytes"]

# Pallas implementations, each taking the reference's arguments plus interpret and block_sizes.
_PALLAS = {"pallas_tpu": norm_qkv_rope_pallas_tpu,
           "pallas_gpu": norm_qkv_rope_pallas_gpu,
           "pallas_mosaic_gpu": norm_qkv_rope_pallas_mosaic_gpu}


def norm_qkv_rope(
    x: jax.Array,  # [B, T, D]
    norm_scale: jax.Array,  # [D]
    wq: jax.Array,  # [D, H, K]
    wk: jax.Array,  # [D, K]
    wv: jax.Array,  # [D, K]
    positions: jax.Array,  # int [B, T]
    *,
    eps: float,
    base: float = 10000.0,
    impl: str = "auto",
    interpret=None,
    block_sizes=None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """LayerNorm(x) projected to q, k, v, with RoPE applied to q and k.

    Args:
      x: [B, T, D] the residual stream.
      norm_scale: [D] LayerNorm scale (no bias).
      wq: [D, H, K]; wk, wv: [D, K] (multi-query: one key/value head).
      positions: int [B, T] positions for RoPE.
      eps: LayerNorm epsilon. base: RoPE frequency base.
      impl, interpret: see `kernels.rope.rope`.
      block_sizes: `BlockSizes` (tpu.py) for pallas_tpu, `kernels.norm_qkv_rope.gpu.BlockSizes`
        for pallas_gpu; None picks a default for the shape.

    Returns:
      q [B, T, H, K], k [B, T, K], v [B, T, K] in x's dtype.
    """
    impl = resolve_impl(impl, "norm_qkv_rope", x.dtype, mosaic_takes=mosaic_takes(wq))
    if impl == "xla":
        return norm_qkv_rope_reference(x, norm_scale, wq, wk, wv, positions, eps=eps, base=base)
    fn = pallas_impl("norm_qkv_rope", impl, _PALLAS)
    return fn(x, norm_scale, wq, wk, wv, positions, eps=eps, base=base,
              interpret=interpret, block_sizes=block_sizes)


kernel_package(__name__, norm_qkv_rope, _PALLAS)
