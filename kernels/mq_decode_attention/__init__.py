"""Multi-query attention for one new token per sequence against a KV cache.

With one shared key/value head (PaLM section 2) the H query heads of a sequence read the same
cache: the cache is read once per sequence, not once per head, which is what makes MQA decoding
cheap (Pope et al. 2022).

The front door `mq_decode_attention`; its plain-jnp twin `mq_decode_attention_reference`
(reference.py); the Pallas TPU decode kernel with its tiling (`BlockSizes`, `vmem_bytes`),
HBM and VMEM numbers and design notes (tpu.py); the Pallas GPU (Triton) flash-decoding kernel
with its own tiling (`gpu.BlockSizes`: tiles, splits, warps, stages), FLOPs and bytes, H100
defaults and what a CPU cannot check (gpu.py); what the two share, the argument checks and the
combine of the splits (pallas.py). `BlockSizes` here is the TPU one.
"""

from __future__ import annotations

import jax

from kernels._common import kernel_package, pallas_impl, resolve_impl
from kernels.mq_decode_attention.reference import (
    check_args,
    check_lengths,
    mq_decode_attention_reference,
)
from kernels.mq_decode_attention.gpu import mq_decode_attention_pallas_gpu
from kernels.mq_decode_attention.tpu import BlockSizes, mq_decode_attention_pallas_tpu, vmem_bytes

__all__ = ["BlockSizes", "mq_decode_attention", "mq_decode_attention_reference", "vmem_bytes"]


# Pallas implementations, each taking the reference's arguments plus interpret and block_sizes.
_PALLAS = {"pallas_tpu": mq_decode_attention_pallas_tpu, "pallas_gpu": mq_decode_attention_pallas_gpu}


def mq_decode_attention(
    q: jax.Array,  # [B, H, K]
    k_cache: jax.Array,  # [B, S, K]
    v_cache: jax.Array,  # [B, S, K]
    lengths: jax.Array,  # int32 [B]
    *,
    sm_scale: float | None = None,
    impl: str = "auto",
    interpret=None,
    block_sizes=None,
) -> jax.Array:
    """Attention of one query token per sequence over its first lengths[b] cache entries.

    Args:
      q: [B, H, K] the new token's queries.
      k_cache, v_cache: [B, S, K] the shared key/value head for S cache slots.
      lengths: int32 [B], 1 <= lengths[b] <= S; slots at or after lengths[b] are ignored.
      sm_scale: logit scale; None means 1/sqrt(K).
      impl, interpret, block_sizes: see `kernels.rope.rope`; block_sizes is a tpu.BlockSizes
        for pallas_tpu, a gpu.BlockSizes for pallas_gpu.

    Returns:
      [B, H, K] in q's dtype.
    """
    impl = resolve_impl(impl, "mq_decode_attention")
    if impl == "xla":
        check_args(q, k_cache, v_cache, lengths)
        check_lengths(lengths, k_cache.shape[1])
        return mq_decode_attention_reference(q, k_cache, v_cache, lengths, sm_scale=sm_scale)
    fn = pallas_impl("mq_decode_attention", impl, _PALLAS)
    return fn(q, k_cache, v_cache, lengths, sm_scale=sm_scale, interpret=interpret, block_sizes=block_sizes)


kernel_package(__name__, mq_decode_attention, _PALLAS)
