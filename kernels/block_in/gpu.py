"""The Pallas GPU `block_in`s on one LayerNorm (the composition is compose.py's): the halves'
Triton kernels (kernels/norm_qkv_rope/gpu.py, kernels/norm_swiglu/gpu.py), `pallas_gpu`; and,
`pallas_mosaic_gpu`, the MLP half's Mosaic GPU forward (kernels/norm_swiglu/mgpu.py) beside the
attention half's Triton kernels (which have no Mosaic version yet)."""

from __future__ import annotations

import functools

import kernels.norm_qkv_rope.gpu as qkv_gpu
import kernels.norm_swiglu.gpu as mlp_gpu
import kernels.norm_swiglu.mgpu as mlp_mgpu
from kernels.block_in.compose import block_in_pallas

block_in_pallas_gpu = functools.partial(block_in_pallas, qkv_gpu, mlp_gpu)
block_in_pallas_mosaic_gpu = functools.partial(block_in_pallas, qkv_gpu, mlp_mgpu)
