"""What both Pallas backends of `norm_qkv_rope` share: the custom_vjp over a backend module, its
entry, the call's `Settings`, the argument checks both `prepare`s make, and the backend interface.

A backend module (tpu.py: Mosaic, gpu.py: Triton) provides, with one meaning on both, so that
`kernels.block_in` can share one LayerNorm between this op and `norm_swiglu` on either:
  BlockSizes   its tiles (frozen, hashable), with `get_default`.
  Settings     `Settings` below (the backends import it), filled by the backend's `prepare`
               with its own BlockSizes and interpret.
  prepare(x, norm_scale, wq, wk, wv, positions, *, eps, base=10000.0, interpret=None,
          block_sizes=None) -> Settings
               checks the arguments and bundles the settings (`check_pallas_args`: default
               tiles for the shape and target when block_sizes is None); `interpret` as the
               front door takes it.
  forward_with_stats(settings, x, norm_scale, wq, wk, wv, positions, mean, rstd)
          -> ((q, k, v), saved)
               the forward from LayerNorm row statistics computed by the caller. x: [B, T, D];
               norm_scale: [D]; wq: [D, H, K]; wk, wv: [D, K]; positions: int [B, T]; mean,
               rstd: float32 [B*T, 1], `kernels._common.row_stats(x.reshape(B*T, D), eps)`.
               q [B, T, H, K], k [B, T, K], v [B, T, K] in x's dtype; saved: the residuals
               `backward_to_dh` needs beyond the inputs and statistics, None (h = LN(x) is
               recomputed from x and the statistics, never stored).
  backward_to_dh(settings, x, norm_scale, wq, wk, wv, positions, mean, rstd, saved, cotangents)
          -> (dh, (dwq, dwk, dwv))
               the backward up to the LayerNorm: its input cotangent and the weight gradients.
               The arguments as `forward_with_stats` got and returned them; cotangents: (dq
               [B, T, H, K], dk [B, T, K], dv [B, T, K]). dh: [B*T, D] in x's dtype, the
               cotangent of LN(x) (normalised and scaled), which `kernels._common.layer_norm_bwd`
               turns into dx and dscale; dwq [D, H, K], dwk, dwv [D, K] in the weights' dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from typing import Any

import jax
import jax.numpy as jnp

from kernels._common import layer_norm_bwd, row_stats
from kernels.norm_qkv_rope.reference import check_args


@dataclasses.dataclass(frozen=True)
class Settings:
    """The non-array arguments of a call (a backend's `prepare` makes them), hashable: the
    custom_vjp's nondiff argument, and what a caller sharing the LayerNorm (`kernels.block_in`)
    passes to `forward_with_stats` and `backward_to_dh`."""

    eps: float
    base: float
    interpret: Any  # what the backend's pallas_calls get: tpu_interpret's or gpu_interpret's
    block_sizes: Any  # the backend's BlockSizes


def check_pallas_args(backend: types.ModuleType, x, norm_scale, wq, wk, wv, positions,
                      block_sizes):
    """The reference's shape checks plus what both backends' kernels take: x float32 or
    bfloat16, the weights in x's dtype, an even head dim (RoPE's halves), integer positions.
    Returns the block sizes: the backend's default for the shape when None, else its own
    `BlockSizes` (a ValueError for another's)."""
    check_args(x, norm_scale, wq, wk, wv, positions)
    if x.dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"norm_qkv_rope: x must be float32 or bfloat16, got {x.dtype=}")
    for name, w in (("wq", wq), ("wk", wk), ("wv", wv)):
        if w.dtype != x.dtype:
            raise ValueError(f"norm_qkv_rope: {name} must have x's dtype {x.dtype}, got {w.dtype}")
    if wq.shape[2] % 2:
        raise ValueError(f"norm_qkv_rope: head dim must be even for RoPE, got {wq.shape=}")
    if not jnp.issubdtype(positions.dtype, jnp.integer):
        raise ValueError(f"norm_qkv_rope: positions must be integers, got {positions.dtype=}")
    if block_sizes is None:
        return backend.BlockSizes.get_default(x.shape, wq.shape, x.dtype)
    if not isinstance(block_sizes, backend.BlockSizes):
        raise ValueError(f"norm_qkv_rope: block_sizes must be a {backend.__name__}.BlockSizes, "
                         f"got {type(block_sizes)}")
    return block_sizes


def _row_stats(settings, x):
    """mean, rstd float32 [B*T, 1] of x [B, T, D]: the LayerNorm statistics pass."""
    return row_stats(x.reshape(-1, x.shape[-1]), settings.eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _norm_qkv_rope(backend: types.ModuleType, settings, x, norm_scale, wq, wk, wv, positions):
    mean, rstd = _row_stats(settings, x)
    return backend.forward_with_stats(settings, x, norm_scale, wq, wk, wv, positions, mean,
                                      rstd)[0]


def _norm_qkv_rope_fwd(backend: types.ModuleType, settings, x, norm_scale, wq, wk, wv,
                       positions):
    mean, rstd = _row_stats(settings, x)
    out, saved = backend.forward_with_stats(settings, x, norm_scale, wq, wk, wv, positions,
                                            mean, rstd)
    # Saved: the inputs (no copies) and 8 bytes per row; h is recomputed, never stored.
    return out, (x, norm_scale, wq, wk, wv, positions, mean, rstd, saved)


def _norm_qkv_rope_bwd(backend: types.ModuleType, settings, residuals, cotangents):
    x, norm_scale, wq, wk, wv, positions, mean, rstd, saved = residuals
    dh2, (dwq, dwk, dwv) = backend.backward_to_dh(settings, x, norm_scale, wq, wk, wv, positions,
                                                  mean, rstd, saved, cotangents)
    dx2, dscale = layer_norm_bwd(dh2, x.reshape(dh2.shape), norm_scale, mean, rstd)
    return dx2.reshape(x.shape), dscale, dwq, dwk, dwv, None


_norm_qkv_rope.defvjp(_norm_qkv_rope_fwd, _norm_qkv_rope_bwd)


def norm_qkv_rope_pallas(backend: types.ModuleType, settings, x, norm_scale, wq, wk, wv,
                         positions):
    """`norm_qkv_rope` on `backend`'s kernels (tpu.py or gpu.py), with the settings its
    `prepare` made; the arguments and results are `forward_with_stats`'s, without the
    statistics and `saved`."""
    return _norm_qkv_rope(backend, settings, x, norm_scale, wq, wk, wv, positions)
