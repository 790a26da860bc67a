"""Pallas kernels for the PaLM block, each with a plain-jnp `<name>_reference` twin.

`block_in` composes `norm_qkv_rope` and `norm_swiglu` on one LayerNorm (the parallel block's
input side); `block_out` is its output side. One package per kernel, `kernels/<name>/`: the front door (`__init__.py`), the reference twin
(`reference.py`) and one module per backend (`tpu.py`). Each package is also its kernel:
`kernels.rope(x, positions)` calls it, `kernels.rope.BlockSizes` is its TPU tiling (see
`kernels._common.KernelPackage`).

Every public kernel takes `impl="auto" | "xla" | "pallas_tpu" | "pallas_gpu" |
"pallas_mosaic_gpu"` and `interpret=None | False | True | params`; see
`kernels._common.resolve_impl`. `pallas_gpu` is Pallas lowered through Triton;
`pallas_mosaic_gpu` is Pallas lowered through Mosaic GPU (Hopper), which `mq_flash_attention`,
`norm_swiglu`, `norm_qkv_rope`, `block_out` and `block_in` have (each module docstring says
which of its kernels), every other kernel running its Triton version under that name.
"""

from kernels import (
    block_in,
    block_out,
    mq_decode_attention,
    mq_flash_attention,
    norm_qkv_rope,
    norm_swiglu,
    rope,
)
from kernels._common import IMPLS, resolve_impl, target_backend
from kernels.block_in import block_in_reference
from kernels.block_out import block_out_reference
from kernels.mq_decode_attention import mq_decode_attention_reference
from kernels.mq_flash_attention import mq_flash_attention_reference
from kernels.norm_qkv_rope import norm_qkv_rope_reference
from kernels.norm_swiglu import norm_swiglu_reference
from kernels.rope import rope_reference

__all__ = [
    "IMPLS",
    "resolve_impl",
    "target_backend",
    "block_in",
    "block_in_reference",
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
