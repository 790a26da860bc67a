"""What both Pallas backends of `norm_swiglu` share: the custom_vjp over a backend module, its
jitted entry, the argument checks both `prepare`s make, and the backend interface.

A backend module (tpu.py: Mosaic, gpu.py: Triton) provides, with one meaning on both, so that
`kernels.block_in` can share one LayerNorm between this op and `norm_qkv_rope` on either:
  BlockSizes   its tiles (frozen, hashable), with `get_default`.
  Settings     the non-array arguments of a call, hashable: the custom_vjp's nondiff argument
               and what a caller sharing the LayerNorm passes on. Fields: eps (float),
               block_sizes (its BlockSizes), interpret (what its pallas_calls get), save_gate_up
               (bool: the forward also writes gate and up, which the backward then reads).
  prepare(x, norm_scale, w_gate, w_up, *, eps, interpret=None, block_sizes=None,
          save_gate_up=False) -> Settings
               checks the arguments (`check_pallas_args` plus what its kernels need) and bundles
               the settings: default tiles for the shape, mode and target when block_sizes is
               None; `interpret` as the front door takes it.
  forward_with_stats(settings, x, norm_scale, w_gate, w_up, mean, rstd) -> (h, saved)
               the forward from given LayerNorm statistics. x: [B, T, D]; norm_scale: [D];
               w_gate, w_up: [D, F]; mean, rstd: float32 [B*T, 1], `kernels._common.row_stats`
               of x's rows. h: [B, T, F] in x's dtype. saved: what `backward_to_dh` needs
               beyond the inputs and the statistics: (gate, up) [B*T, F] in x's dtype when
               `settings.save_gate_up`, else None (the backward recomputes them).
  backward_to_dh(settings, x, norm_scale, w_gate, w_up, mean, rstd, saved, dh_out)
          -> (dh, (d_w_gate, d_w_up))
               the backward up to the LayerNorm: its input cotangent and the weight gradients.
               The arguments as `forward_with_stats` got and returned them; dh_out: [B, T, F]
               the cotangent of h, any float dtype. dh: float32 [B*T, D], the cotangent of
               LN(x) (normalised and scaled), which `kernels._common.layer_norm_bwd` turns into
               dx and d_norm_scale; d_w_gate, d_w_up: [D, F] in the weights' dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp

from kernels._common import layer_norm_bwd, row_stats
from kernels.norm_swiglu.reference import check_args


def check_pallas_args(x, norm_scale, w_gate, w_up) -> None:
    """The reference's shape checks plus the dtypes both backends' kernels take: x float32 or
    bfloat16, the weights in x's dtype, a floating norm_scale."""
    check_args(x, norm_scale, w_gate, w_up)
    if x.dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"norm_swiglu: x must be float32 or bfloat16, got {x.dtype=}")
    if w_gate.dtype != x.dtype or w_up.dtype != x.dtype:
        raise ValueError(f"norm_swiglu: weights must have x's dtype {x.dtype}, got "
                         f"{w_gate.dtype=} {w_up.dtype=}")
    if not jnp.issubdtype(norm_scale.dtype, jnp.floating):
        raise ValueError(f"norm_swiglu: norm_scale must be floating, got {norm_scale.dtype=}")


def _row_stats(settings, x):
    """mean, rstd float32 [B*T, 1] of x [B, T, D]: the LayerNorm statistics pass."""
    return row_stats(x.reshape(-1, x.shape[-1]), settings.eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _norm_swiglu(backend: types.ModuleType, settings, x, norm_scale, w_gate, w_up):
    # The primal runs only where nothing is differentiated (inference): no backward will read
    # gate and up, so the forward does not write them whatever save_gate_up says.
    mean, rstd = _row_stats(settings, x)
    plain = dataclasses.replace(settings, save_gate_up=False)
    return backend.forward_with_stats(plain, x, norm_scale, w_gate, w_up, mean, rstd)[0]


def _norm_swiglu_fwd(backend: types.ModuleType, settings, x, norm_scale, w_gate, w_up):
    """Saves the inputs (no copies), 8 bytes of LayerNorm statistics per row, and `saved`."""
    mean, rstd = _row_stats(settings, x)
    h, saved = backend.forward_with_stats(settings, x, norm_scale, w_gate, w_up, mean, rstd)
    return h, (x, norm_scale, w_gate, w_up, mean, rstd, saved)


def _norm_swiglu_bwd(backend: types.ModuleType, settings, residuals, dh_out):
    x, norm_scale, w_gate, w_up, mean, rstd, saved = residuals
    dh, (dw_gate, dw_up) = backend.backward_to_dh(settings, x, norm_scale, w_gate, w_up, mean,
                                                  rstd, saved, dh_out)
    dx2, dscale = layer_norm_bwd(dh, x.reshape(dh.shape), norm_scale, mean, rstd)
    return dx2.reshape(x.shape), dscale, dw_gate, dw_up


_norm_swiglu.defvjp(_norm_swiglu_fwd, _norm_swiglu_bwd)


# Jitted so that the wrapper's statistics, padding and slicing compile together with the kernels
# (op-by-op dispatch would compile each small op separately for every new shape).
@functools.partial(jax.jit, static_argnums=(0, 1))
def norm_swiglu_pallas(backend: types.ModuleType, settings, x, norm_scale, w_gate, w_up):
    """`norm_swiglu` on `backend`'s kernels (tpu.py or gpu.py), with the settings its `prepare`
    made: x [B, T, D], norm_scale [D], w_gate, w_up [D, F] -> h [B, T, F] in x's dtype."""
    return _norm_swiglu(backend, settings, x, norm_scale, w_gate, w_up)
