"""The Pallas GPU `block_in`s on one LayerNorm (the composition is compose.py's): the halves'
Triton kernels (kernels/norm_qkv_rope/gpu.py, kernels/norm_swiglu/gpu.py), `pallas_gpu`; and,
`pallas_mosaic_gpu`, the halves' Mosaic GPU kernels (kernels/norm_qkv_rope/mgpu.py,
kernels/norm_swiglu/mgpu.py), forward and backward."""

from __future__ import annotations

import functools

import kernels.norm_qkv_rope.gpu as qkv_gpu
import kernels.norm_qkv_rope.mgpu as qkv_mgpu
import kernels.norm_swiglu.gpu as mlp_gpu
import kernels.norm_swiglu.mgpu as mlp_mgpu
from kernels.block_in.compose import block_in_pallas

block_in_pallas_gpu = functools.partial(block_in_pallas, qkv_gpu, mlp_gpu)


def block_in_pallas_mosaic_gpu(x, norm_scale, wq, *args, **kwargs):
    """`block_in` on the Mosaic GPU kernels: norm_qkv_rope's where it takes the head dim (128
    or 256, `qkv_mgpu.mosaic_takes`), its Triton kernels for others (a small model, say), so
    that a whole model can be asked for pallas_mosaic_gpu; norm_swiglu's always. (`auto`
    runs XLA's for those head dims instead: `kernels._common.GPU_AUTO`.)"""
    qkv = qkv_mgpu if qkv_mgpu.mosaic_takes(wq) else qkv_gpu
    return block_in_pallas(qkv, mlp_mgpu, x, norm_scale, wq, *args, **kwargs)
