"""Pallas kernels for the PaLM block, each with a plain-jnp `<name>_reference` twin.

Every public kernel takes `impl="auto" | "xla" | "pallas_tpu" | "pallas_gpu"` and
`interpret=None | False | True | params`; see `kernels._common.resolve_impl`.
"""

from kernels._common import IMPLS, resolve_impl, target_backend
from kernels.block_out import block_out, block_out_reference
from kernels.mq_decode_attention import mq_decode_attention, mq_decode_attention_reference
from kernels.mq_flash_attention import mq_flash_attention, mq_flash_attention_reference
from kernels.norm_qkv_rope import norm_qkv_rope, norm_qkv_rope_reference
from kernels.norm_swiglu import norm_swiglu, norm_swiglu_reference
from kernels.rope import rope, rope_reference

__all__ = [
    "IMPLS",
    "resolve_impl",
    "target_backend",
    "block_out",
    "block_out_reference",
    "mq_decode_attention",
    "mq_decode_attention_reference",
    "mq_flash_attention",
    "mq_flash_attention_reference",
    "norm_qkv_rope",
    "norm_qkv_rope_reference",
    "norm_swiglu",
    "norm_swiglu_reference",
    "rope",
    "rope_reference",
]
