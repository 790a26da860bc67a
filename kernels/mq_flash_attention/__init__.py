"""Multi-query attention (Shazeer 2019; PaLM section 2): H query heads share one key/value head.

Causal masking is top-left aligned, as in JAX's TPU `flash_attention`: query row t sees key
columns s <= t. With T == S (training, prefill) that is the usual causal mask; every row sees
at least column 0, so no row is ever empty.

The front door `mq_flash_attention`; its plain-jnp twin `mq_flash_attention_reference`, with
the logsumexp it saves and a hand-written backward (reference.py); the Pallas TPU flash
attention kernels with their tiling (`BlockSizes`, `vmem_bytes`), HBM and VMEM numbers and
design notes (tpu.py); the Pallas GPU (Triton) kernels, `impl="pallas_gpu"`, with the same
residuals and backward decomposition, their own tiling (`gpu.BlockSizes`, num_warps/num_stages,
`gpu.shared_memory_bytes`) and design notes (gpu.py); the Mosaic GPU (Hopper) forward, dk/dv and dq
kernels, `impl="pallas_mosaic_gpu"`, their `mgpu.BlockSizes` and design notes (mgpu.py); what the Pallas backends share, the argument checks, the padding and the
custom_vjp over a backend module, with the interface a backend provides (pallas.py).
"""

from __future__ import annotations

import jax

from kernels._common import kernel_package, pallas_impl, resolve_impl
from kernels.mq_flash_attention.reference import (
    mq_flash_attention_reference,
    mq_flash_attention_reference_bwd,
    mq_flash_attention_reference_lse,
)
from kernels.mq_flash_attention import gpu, mgpu
from kernels.mq_flash_attention.gpu import mq_flash_attention_pallas_gpu
from kernels.mq_flash_attention.mgpu import mq_flash_attention_pallas_mosaic_gpu
from kernels.mq_flash_attention.tpu import BlockSizes, mq_flash_attention_pallas_tpu, vmem_bytes

__all__ = ["BlockSizes", "gpu", "mgpu", "mq_flash_attention", "mq_flash_attention_reference",
           "mq_flash_attention_reference_bwd", "mq_flash_attention_reference_lse",
           "vmem_bytes"]


# Pallas implementations, each taking the reference's arguments plus interpret and block_sizes.
_PALLAS = {"pallas_tpu": mq_flash_attention_pallas_tpu,
           "pallas_gpu": mq_flash_attention_pallas_gpu,
           "pallas_mosaic_gpu": mq_flash_attention_pallas_mosaic_gpu}


def mq_flash_attention(
    q: jax.Array,  # [B, T, H, K]
    k: jax.Array,  # [B, S, K]
    v: jax.Array,  # [B, S, K]
    *,
    causal: bool = True,
    sm_scale: float | None = None,
    impl: str = "auto",
    interpret=None,
    block_sizes=None,
) -> jax.Array:
    """Multi-query softmax attention.

    Args:
      q: [B, T, H, K] queries (RoPE applied).
      k, v: [B, S, K] the single shared key/value head.
      causal: mask key columns after each query row (top-left aligned, see module docstring).
      sm_scale: logit scale; None means 1/sqrt(K).
      impl, interpret, block_sizes: see `kernels.rope.rope`; block_sizes is a `BlockSizes`
        (tpu.py's) for pallas_tpu, a `gpu.BlockSizes` for pallas_gpu, an `mgpu.BlockSizes`
        for pallas_mosaic_gpu.

    Returns:
      [B, T, H, K] in q's dtype.
    """
    impl = resolve_impl(impl, "mq_flash_attention", q.dtype)
    if impl == "xla":
        return mq_flash_attention_reference(q, k, v, causal=causal, sm_scale=sm_scale)
    fn = pallas_impl("mq_flash_attention", impl, _PALLAS)
    return fn(q, k, v, causal=causal, sm_scale=sm_scale, interpret=interpret, block_sizes=block_sizes)


kernel_package(__name__, mq_flash_attention, _PALLAS)
