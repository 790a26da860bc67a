"""The Pallas GPU `block_in`: the halves' Triton kernels (kernels/norm_qkv_rope/gpu.py,
kernels/norm_swiglu/gpu.py) on one LayerNorm; the composition is compose.py's."""

from __future__ import annotations

import functools

import kernels.norm_qkv_rope.gpu as qkv_gpu
import kernels.norm_swiglu.gpu as mlp_gpu
from kernels.block_in.compose import block_in_pallas

block_in_pallas_gpu = functools.partial(block_in_pallas, qkv_gpu, mlp_gpu)
