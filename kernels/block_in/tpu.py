"""The Pallas TPU `block_in`: the halves' Mosaic kernels (kernels/norm_qkv_rope/tpu.py,
kernels/norm_swiglu/tpu.py) on one LayerNorm; the composition is compose.py's."""

from __future__ import annotations

import functools

import kernels.norm_qkv_rope.tpu as qkv_tpu
import kernels.norm_swiglu.tpu as mlp_tpu
from kernels.block_in.compose import block_in_pallas

block_in_pallas_tpu = functools.partial(block_in_pallas, qkv_tpu, mlp_tpu)
