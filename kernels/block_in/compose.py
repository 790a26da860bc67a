"""The Pallas `block_in`: `norm_qkv_rope`'s and `norm_swiglu`'s kernels on one LayerNorm, on
either backend (the halves' `tpu` or `gpu` modules; `tpu.py` and `gpu.py` here pick them).

PaLM's parallel block normalises x once and feeds the result to both halves. Called apart, each
half computes the row statistics itself (an XLA reduction over x: 16 to 32 MiB of reads at
PaLM-8B, B*T = 2048, D = 4096, bf16, as XLA fuses the mean and variance passes or not) and runs
its own LayerNorm backward (norm_qkv_rope's reads its bf16 dLN, x and writes dx: 48 MiB;
norm_swiglu's reads its float32 dLN: 64 MiB), and autodiff then adds the two dx (48 MiB): about
160 MiB of elementwise traffic per layer after the matmul kernels. Here, per layer:
  forward   mean, rstd = row_stats(x)              XLA, once
            q, k, v   = norm_qkv_rope's forward kernel on (x, mean, rstd)
            h         = norm_swiglu's forward kernel on (x, mean, rstd)
  backward  dLN_attn, dwq, dwk, dwv = norm_qkv_rope's backward kernels
            dLN_mlp, dw_gate, dw_up = norm_swiglu's backward kernels
            dx, dscale = one LayerNorm backward of dLN_attn + dLN_mlp   XLA, once
The LayerNorm backward is linear in its cotangent, so one backward of the sum gives the two
backwards' sum: one fused pass reading both dLN and x and writing dx (about 80 MiB at PaLM-8B
instead of 160), and one statistics pass instead of two.

A half's backend module provides `prepare`, `forward_with_stats` and `backward_to_dh` (and its
own `BlockSizes`, which `BlockSizes` here pairs); the kernels, their tiles and their memory
numbers are documented in kernels/norm_qkv_rope/ and kernels/norm_swiglu/.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from typing import Any

import jax
import jax.numpy as jnp

from kernels._common import layer_norm_bwd, row_stats
from kernels.block_in.reference import check_args


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles for `block_in`: each half's own `BlockSizes` for the implementation called
    (`kernels.norm_qkv_rope.tpu.BlockSizes` with pallas_tpu, `...gpu.BlockSizes` with
    pallas_gpu, and `kernels.norm_swiglu.mgpu.BlockSizes` for the MLP half with
    pallas_mosaic_gpu); None picks that half's default."""

    qkv: Any = None
    mlp: Any = None


@dataclasses.dataclass(frozen=True)
class _Settings:
    """The custom_vjp's nondiff argument: the halves' backend modules, their settings and the
    shared epsilon."""

    qkv_backend: types.ModuleType
    mlp_backend: types.ModuleType
    qkv: Any
    mlp: Any
    eps: float


def block_in_pallas(qkv_backend: types.ModuleType, mlp_backend: types.ModuleType, x,
                    norm_scale, wq, wk, wv, w_gate, w_up, positions, *, eps: float,
                    base: float = 10000.0, interpret=None,
                    block_sizes: BlockSizes | None = None, save_gate_up: bool = False):
    """`block_in` on the halves' given backend modules: the reference's arguments plus
    interpret, block_sizes and save_gate_up (see `kernels.norm_swiglu`)."""
    check_args(x, norm_scale, wq, wk, wv, w_gate, w_up, positions)
    if block_sizes is None:
        block_sizes = BlockSizes()
    elif not isinstance(block_sizes, BlockSizes):
        raise ValueError(f"block_in: block_sizes must be a block_in.BlockSizes, got {block_sizes!r}")
    settings = _Settings(
        qkv_backend=qkv_backend, mlp_backend=mlp_backend,
        qkv=qkv_backend.prepare(x, norm_scale, wq, wk, wv, positions, eps=eps, base=base,
                                interpret=interpret, block_sizes=block_sizes.qkv),
        mlp=mlp_backend.prepare(x, norm_scale, w_gate, w_up, eps=eps, interpret=interpret,
                                block_sizes=block_sizes.mlp, save_gate_up=save_gate_up),
        eps=float(eps))
    return _block_in(settings, x, norm_scale, wq, wk, wv, w_gate, w_up, positions)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _block_in(settings: _Settings, x, norm_scale, wq, wk, wv, w_gate, w_up, positions):
    # The primal runs only where nothing is differentiated (inference, generation's prefill and
    # decode): no backward reads norm_swiglu's gate and up, so they are not written.
    plain = dataclasses.replace(settings, mlp=dataclasses.replace(settings.mlp, save_gate_up=False))
    return _block_in_fwd(plain, x, norm_scale, wq, wk, wv, w_gate, w_up, positions)[0]


def _block_in_fwd(settings: _Settings, x, norm_scale, wq, wk, wv, w_gate, w_up, positions):
    b, t, d = x.shape
    mean, rstd = row_stats(x.reshape(b * t, d), settings.eps)  # [M, 1] each, once per layer
    (q, k, v), saved_qkv = settings.qkv_backend.forward_with_stats(
        settings.qkv, x, norm_scale, wq, wk, wv, positions, mean, rstd)
    h, saved_mlp = settings.mlp_backend.forward_with_stats(settings.mlp, x, norm_scale, w_gate,
                                                           w_up, mean, rstd)
    # Saved: the inputs (no copies), 8 bytes of statistics per row, and whatever each half
    # keeps beyond them (norm_swiglu's gate and up with save_gate_up).
    residuals = (x, norm_scale, wq, wk, wv, w_gate, w_up, positions, mean, rstd, saved_qkv,
                 saved_mlp)
    return (q, k, v, h), residuals


def _block_in_bwd(settings: _Settings, residuals, cotangents):
    x, norm_scale, wq, wk, wv, w_gate, w_up, positions, mean, rstd, saved_qkv, saved_mlp = residuals
    dq, dk, dv, dh = cotangents
    b, t, d = x.shape
    dln_attn, (dwq, dwk, dwv) = settings.qkv_backend.backward_to_dh(
        settings.qkv, x, norm_scale, wq, wk, wv, positions, mean, rstd, saved_qkv, (dq, dk, dv))
    dln_mlp, (dw_gate, dw_up) = settings.mlp_backend.backward_to_dh(
        settings.mlp, x, norm_scale, w_gate, w_up, mean, rstd, saved_mlp, dh)
    dln = dln_attn.astype(jnp.float32) + dln_mlp.astype(jnp.float32)  # [M, D]: one LN(x), one cotangent
    dx, dscale = layer_norm_bwd(dln, x.reshape(b * t, d), norm_scale, mean, rstd)
    return dx.reshape(x.shape), dscale, dwq, dwk, dwv, dw_gate, dw_up, None


_block_in.defvjp(_block_in_fwd, _block_in_bwd)
