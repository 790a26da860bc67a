"""What both Pallas backends of `norm_swiglu` share: the entry and custom_vjp over a backend
module, the forward and backward around its kernel calls, the argument checks both `prepare`s
make, and the backend interface.

A backend module (tpu.py: Mosaic, gpu.py: Triton) provides, with one meaning on both:
  BlockSizes   its tiles (frozen, hashable), with `get_default`; the backward's three kernels
               share block_t_bwd, block_f_bwd and block_d_bwd, to which operands are padded.
  Settings     the non-array arguments of a call, hashable: the custom_vjp's nondiff argument
               and what a caller sharing the LayerNorm passes on. Fields: eps (float),
               block_sizes (its BlockSizes), interpret (what its pallas_calls get), save_gate_up
               (bool: the forward also writes gate and up, which the backward then reads).
  prepare(x, norm_scale, w_gate, w_up, *, eps, interpret=None, block_sizes=None,
          save_gate_up=False) -> Settings
               checks the arguments (`check_pallas_args` plus what its kernels need) and bundles
               the settings: default tiles for the shape, mode and target when block_sizes is
               None; `interpret` as the front door takes it.
  its kernel calls, on rows M = B*T (x2 [M, D]; mean, rstd float32 [M, 1]) and on operands
  padded with zeros to whole backward tiles (Mp, Dp, Fp):
    fwd_call(x2, mean, rstd, norm_scale, w_gate, w_up, settings) -> [h] [M, F] in x's dtype,
               and gate, up [M, F] in x's dtype after it when `settings.save_gate_up`;
    bwd_gates_call(x2, mean, rstd, norm_scale, wgp, wup, dhp, settings) -> d_gate, d_up
               [Mp, Fp] in x's dtype, recomputing gate and up (wgp, wup [Dp, Fp]; dhp [Mp, Fp]);
    bwd_gates_saved_call(gatep, upp, dhp, settings) -> the same from the saved gate and up;
    bwd_dx_call(d_gate, d_up, wgp, wup, settings) -> dLN float32 [Mp, Dp];
    bwd_dw_call(xnp, d_gate, d_up, settings) -> d_w_gate, d_w_up [Dp, Fp] (xnp: LN(x) [Mp, Dp]
               in x's dtype).
  forward_with_stats, backward_to_dh: this module's, bound to the backend (functools.partial),
               which `kernels.block_in` calls to share one LayerNorm with `norm_qkv_rope`.
"""

from __future__ import annotations

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp

from kernels._common import layer_norm_bwd, layer_norm_rows, pad2, round_up, row_stats
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
    return forward_with_stats(backend, plain, x, norm_scale, w_gate, w_up, mean, rstd)[0]


def _norm_swiglu_fwd(backend: types.ModuleType, settings, x, norm_scale, w_gate, w_up):
    """Saves the inputs (no copies), 8 bytes of LayerNorm statistics per row, and `saved`."""
    mean, rstd = _row_stats(settings, x)
    h, saved = forward_with_stats(backend, settings, x, norm_scale, w_gate, w_up, mean, rstd)
    return h, (x, norm_scale, w_gate, w_up, mean, rstd, saved)


def _norm_swiglu_bwd(backend: types.ModuleType, settings, residuals, dh_out):
    x, norm_scale, w_gate, w_up, mean, rstd, saved = residuals
    dh, (dw_gate, dw_up) = backward_to_dh(backend, settings, x, norm_scale, w_gate, w_up, mean,
                                          rstd, saved, dh_out)
    dx2, dscale = layer_norm_bwd(dh, x.reshape(dh.shape), norm_scale, mean, rstd)
    return dx2.reshape(x.shape), dscale, dw_gate, dw_up


_norm_swiglu.defvjp(_norm_swiglu_fwd, _norm_swiglu_bwd)


def forward_with_stats(backend: types.ModuleType, settings, x, norm_scale, w_gate, w_up, mean,
                       rstd):
    """The forward from given LayerNorm statistics.

    Args:
      backend: tpu.py or gpu.py; settings: from its `prepare`.
      x: [B, T, D]; norm_scale: [D]; w_gate, w_up: [D, F].
      mean, rstd: float32 [B*T, 1], `kernels._common.row_stats` of x's rows.

    Returns:
      (h [B, T, F] in x's dtype, saved): `saved` is what `backward_to_dh` needs beyond the
      inputs and the statistics: (gate, up) [B*T, F] in x's dtype when
      `settings.save_gate_up`, else None (the backward recomputes them).
    """
    b, t, d = x.shape
    h, *saved = backend.fwd_call(x.reshape(b * t, d), mean, rstd, norm_scale, w_gate, w_up,
                                 settings)
    return h.reshape(b, t, -1), (tuple(saved) or None)  # h [B, T, F]


def backward_to_dh(backend: types.ModuleType, settings, x, norm_scale, w_gate, w_up, mean, rstd,
                   saved, dh_out):
    """The backward up to the LayerNorm: its input cotangent and the weight gradients.

    Args:
      backend, settings, x, norm_scale, w_gate, w_up, mean, rstd: as `forward_with_stats` got
        them.
      saved: what `forward_with_stats` returned beside h.
      dh_out: [B, T, F] the cotangent of h, any float dtype.

    Returns:
      (dh float32 [B*T, D], the cotangent of LN(x) (normalised and scaled); (d_w_gate,
      d_w_up) [D, F] in the weights' dtype). `kernels._common.layer_norm_bwd` turns dh into dx
      and d_norm_scale.
    """
    b, t, d = x.shape
    m, f = b * t, w_gate.shape[1]
    bs = settings.block_sizes
    bt, bf, bd = bs.block_t_bwd, bs.block_f_bwd, bs.block_d_bwd
    mp, dp, fp = round_up(m, bt), round_up(d, bd), round_up(f, bf)
    x2 = x.reshape(m, d)  # [M, D]
    wgp, wup = pad2(w_gate, dp, fp), pad2(w_up, dp, fp)
    dhp = pad2(dh_out.reshape(m, f).astype(x.dtype), mp, fp)
    with jax.named_scope(f"palm_norm_swiglu_bwd bt={bt} bf={bf} bd={bd}"):
        if saved is None:  # recompute gate and up
            d_gate, d_up = backend.bwd_gates_call(x2, mean, rstd, norm_scale, wgp, wup, dhp,
                                                  settings)  # [Mp, Fp] each
        else:
            gatep, upp = (pad2(a, mp, fp) for a in saved)
            d_gate, d_up = backend.bwd_gates_saved_call(gatep, upp, dhp, settings)
        dxn = backend.bwd_dx_call(d_gate, d_up, wgp, wup, settings)[:m, :d]  # f32 [M, D]
        # LN(x) materialised once (one fused XLA pass): the dw kernel contracts over rows, so
        # normalising in-kernel would re-read the per-row statistics for every (D, F) tile.
        xnp = pad2(layer_norm_rows(x2, mean, rstd, norm_scale).astype(x.dtype), mp, dp)
        dw_gate, dw_up = backend.bwd_dw_call(xnp, d_gate, d_up, settings)  # [Dp, Fp] each
    return dxn, (dw_gate[:d, :f], dw_up[:d, :f])


def norm_swiglu_pallas(
    backend: types.ModuleType,
    x: jax.Array,  # [B, T, D]
    norm_scale: jax.Array,  # [D]
    w_gate: jax.Array,  # [D, F]
    w_up: jax.Array,  # [D, F]
    *,
    eps: float,
    interpret=None,
    block_sizes=None,
    save_gate_up: bool = False,
) -> jax.Array:
    """`norm_swiglu` on `backend`'s kernels (tpu.py or gpu.py; block_sizes: its BlockSizes):
    h [B, T, F] in x's dtype."""
    settings = backend.prepare(x, norm_scale, w_gate, w_up, eps=eps, interpret=interpret,
                               block_sizes=block_sizes, save_gate_up=save_gate_up)
    return _norm_swiglu_jit(backend, settings, x, norm_scale, w_gate, w_up)


# Jitted so that the wrapper's statistics, padding and slicing compile together with the kernels
# (op-by-op dispatch would compile each small op separately for every new shape).
@functools.partial(jax.jit, static_argnums=(0, 1))
def _norm_swiglu_jit(backend: types.ModuleType, settings, x, norm_scale, w_gate, w_up):
    return _norm_swiglu(backend, settings, x, norm_scale, w_gate, w_up)
