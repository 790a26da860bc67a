"""What both Pallas backends of `norm_qkv_rope` share: the entry and custom_vjp over a backend
module, the forward and backward around its kernel calls, the call's `Settings`, the argument
checks both `prepare`s make, and the backend interface.

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
  its kernel calls, on the M = B*T rows: x2 [M, D]; pos int32 [M]; mean, rstd float32 [M, 1]:
    forward_rows(settings, x2, norm_scale, wq, wk, wv, pos, mean, rstd) -> q [M, H, K], k, v
               [M, K] in x's dtype (wq [D, H, K]; wk, wv [D, K], as given);
    backward_rows(settings, x2, norm_scale, wq, wk, wv, pos, mean, rstd, dq, dk, dv)
               -> (dh [M, D] in x's dtype, (dwq [D, H, K], dwk, dwv [D, K]) in the weights'
               dtype), from the cotangents dq [M, H, K], dk, dv [M, K] in x's dtype.
  forward_with_stats, backward_to_dh: this module's, bound to the backend (functools.partial),
               which `kernels.block_in` calls to share one LayerNorm with `norm_swiglu`.
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


def forward_with_stats(backend: types.ModuleType, settings, x, norm_scale, wq, wk, wv, positions,
                       mean, rstd):
    """The forward from LayerNorm row statistics computed by the caller.

    Args:
      backend: tpu.py or gpu.py; settings: from its `prepare`.
      x: [B, T, D]; norm_scale: [D]; wq: [D, H, K]; wk, wv: [D, K]; positions: int [B, T].
      mean, rstd: float32 [B*T, 1], `kernels._common.row_stats(x.reshape(B*T, D), eps)`.

    Returns:
      ((q [B, T, H, K], k [B, T, K], v [B, T, K]) in x's dtype, saved), saved being the
      residuals `backward_to_dh` needs beyond the inputs and statistics: None (h is
      recomputed from x and the statistics, never stored).
    """
    b, t, d = x.shape
    _, h, k = wq.shape
    m = b * t
    q2, k2, v2 = backend.forward_rows(settings, x.reshape(m, d), norm_scale, wq, wk, wv,
                                      positions.astype(jnp.int32).reshape(m), mean, rstd)
    return (q2.reshape(b, t, h, k), k2.reshape(b, t, k), v2.reshape(b, t, k)), None


def backward_to_dh(backend: types.ModuleType, settings, x, norm_scale, wq, wk, wv, positions,
                   mean, rstd, saved, cotangents):
    """The backward up to the LayerNorm: its input cotangent and the weight gradients.

    Args:
      backend, settings, x, norm_scale, wq, wk, wv, positions, mean, rstd: as
        `forward_with_stats` got them.
      saved: what `forward_with_stats` returned beside the outputs (None).
      cotangents: (dq [B, T, H, K], dk [B, T, K], dv [B, T, K]).

    Returns:
      (dh [B*T, D] in x's dtype, the cotangent of LN(x) (normalised and scaled); (dwq [D, H, K],
      dwk [D, K], dwv [D, K]) in the weights' dtype). `kernels._common.layer_norm_bwd` turns dh
      into dx and dscale.
    """
    del saved  # None: the statistics and the inputs are all the backward needs
    dq, dk, dv = cotangents  # [B, T, H, K], [B, T, K], [B, T, K]
    b, t, d = x.shape
    _, h, k = wq.shape
    m = b * t
    return backend.backward_rows(settings, x.reshape(m, d), norm_scale, wq, wk, wv,
                                 positions.astype(jnp.int32).reshape(m), mean, rstd,
                                 dq.astype(x.dtype).reshape(m, h, k),
                                 dk.astype(x.dtype).reshape(m, k), dv.astype(x.dtype).reshape(m, k))


def _row_stats(settings, x):
    """mean, rstd float32 [B*T, 1] of x [B, T, D]: the LayerNorm statistics pass."""
    return row_stats(x.reshape(-1, x.shape[-1]), settings.eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _norm_qkv_rope(backend: types.ModuleType, settings, x, norm_scale, wq, wk, wv, positions):
    mean, rstd = _row_stats(settings, x)
    return forward_with_stats(backend, settings, x, norm_scale, wq, wk, wv, positions, mean,
                              rstd)[0]


def _norm_qkv_rope_fwd(backend: types.ModuleType, settings, x, norm_scale, wq, wk, wv,
                       positions):
    mean, rstd = _row_stats(settings, x)
    out, saved = forward_with_stats(backend, settings, x, norm_scale, wq, wk, wv, positions, mean,
                                    rstd)
    # Saved: the inputs (no copies) and 8 bytes per row; h is recomputed, never stored.
    return out, (x, norm_scale, wq, wk, wv, positions, mean, rstd, saved)


def _norm_qkv_rope_bwd(backend: types.ModuleType, settings, residuals, cotangents):
    x, norm_scale, wq, wk, wv, positions, mean, rstd, saved = residuals
    dh2, (dwq, dwk, dwv) = backward_to_dh(backend, settings, x, norm_scale, wq, wk, wv, positions,
                                          mean, rstd, saved, cotangents)
    dx2, dscale = layer_norm_bwd(dh2, x.reshape(dh2.shape), norm_scale, mean, rstd)
    return dx2.reshape(x.shape), dscale, dwq, dwk, dwv, None


_norm_qkv_rope.defvjp(_norm_qkv_rope_fwd, _norm_qkv_rope_bwd)


def norm_qkv_rope_pallas(backend: types.ModuleType, x, norm_scale, wq, wk, wv, positions, *,
                         eps: float, base: float = 10000.0, interpret: Any = None,
                         block_sizes=None):
    """`norm_qkv_rope` on `backend`'s kernels (tpu.py or gpu.py; block_sizes: its BlockSizes):
    the reference's arguments plus interpret and block_sizes."""
    settings = backend.prepare(x, norm_scale, wq, wk, wv, positions, eps=eps, base=base,
                               interpret=interpret, block_sizes=block_sizes)
    return _norm_qkv_rope(backend, settings, x, norm_scale, wq, wk, wv, positions)
