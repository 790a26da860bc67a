"""What both Pallas backends of `block_out` share: the argument checks, the jitted entry and the
custom_vjp wiring, over a backend module (`tpu` or `gpu`) that provides the kernels.

Both backends compute the same thing on the same residuals (tpu.py has the decomposition):
the forward x + o·wo + h·w_down on the flattened [M = B*T, ...] views; the backward dx = dy,
do and dh from one kernel, dwo and dw_down from XLA (`reference.weight_grads`).

A backend module provides:
  IMPL          its impl name ("pallas_tpu", "pallas_gpu"), for error messages.
  BlockSizes    its frozen tiling, with `get_default(rows, d_model, attn_width, d_ff, dtype)`
                and the fields block_t, block_d, block_c (forward) and block_t_bwd, block_c_bwd,
                block_d_bwd (backward), which name the kernels' scopes.
  check_tiles(block_sizes, dtype)
                what its kernels need of the tiles beyond `BlockSizes`' own checks (a dtype's
                row alignment, a shared-memory budget); raises ValueError.
  forward(settings, x2, o2, wo2, h2, w_down) -> out [M, D]
                x2 [M, D], o2 [M, H*K], wo2 [H*K, D], h2 [M, F], w_down [F, D].
  backward_dact(settings, dy2, wo2, w_down) -> (do [M, H*K], dh [M, F])
                dy2 [M, D].
`settings` is `Settings` below: the backend, its tiles and its resolved `interpret`.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from typing import Any

import jax
import jax.numpy as jnp

from kernels.block_out.reference import check_args, weight_grads


@dataclasses.dataclass(frozen=True)
class Settings:
    """The custom_vjp's nondiff argument, hashable as one static value (modules hash by
    identity)."""

    backend: types.ModuleType
    block_sizes: Any  # the backend's BlockSizes
    interpret: Any  # the backend's resolved interpret (_common.tpu_interpret, _gpu.gpu_interpret)


def check_pallas_args(backend: types.ModuleType, x, o, wo, h, w_down, block_sizes):
    """The reference's shape checks plus what the kernels need; returns the block sizes (the
    backend's default for the shapes when None)."""
    check_args(x, o, wo, h, w_down)
    if x.dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"block_out: x must be float32 or bfloat16, got {x.dtype=}")
    for name, a in (("o", o), ("wo", wo), ("h", h), ("w_down", w_down)):
        if a.dtype != x.dtype:
            raise ValueError(f"block_out: {name} must have x's dtype {x.dtype}, got {a.dtype}")
    b, t, d = x.shape
    if block_sizes is None:
        block_sizes = backend.BlockSizes.get_default(b * t, d, o.shape[2] * o.shape[3],
                                                     h.shape[2], x.dtype)
    elif not isinstance(block_sizes, backend.BlockSizes):
        raise ValueError(f"block_out: impl={backend.IMPL!r}: block_sizes must be a "
                         f"{backend.__name__}.BlockSizes, got {block_sizes!r}")
    backend.check_tiles(block_sizes, x.dtype)
    return block_sizes


def block_out_pallas(
    backend: types.ModuleType,
    x: jax.Array,  # [B, T, D]
    o: jax.Array,  # [B, T, H, K]
    wo: jax.Array,  # [H, K, D]
    h: jax.Array,  # [B, T, F]
    w_down: jax.Array,  # [F, D]
    *,
    interpret: Any,
    block_sizes,
) -> jax.Array:
    """`block_out` on a backend module's kernels; `interpret` already resolved by the backend."""
    block_sizes = check_pallas_args(backend, x, o, wo, h, w_down, block_sizes)
    return _block_out_jit(x, o, wo, h, w_down, Settings(backend, block_sizes, interpret))


# Jitted so that the wrapper's reshapes, padding and slicing compile together with the kernel.
@functools.partial(jax.jit, static_argnums=(5,))
def _block_out_jit(x, o, wo, h, w_down, settings: Settings):
    return _block_out(x, o, wo, h, w_down, settings)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _block_out(x, o, wo, h, w_down, settings: Settings):
    return _block_out_fwd(x, o, wo, h, w_down, settings)[0]


def _block_out_fwd(x, o, wo, h, w_down, settings: Settings):
    b, t, d = x.shape
    m, hk = b * t, o.shape[2] * o.shape[3]
    bs = settings.block_sizes
    with jax.named_scope(f"palm_block_out_fwd bt={bs.block_t} bd={bs.block_d} bc={bs.block_c}"):
        out = settings.backend.forward(settings, x.reshape(m, d), o.reshape(m, hk),
                                       wo.reshape(hk, d), h.reshape(m, -1), w_down)
    return out.reshape(b, t, d), (o, wo, h, w_down)


def _block_out_bwd(settings: Settings, residuals, dy):
    o, wo, h, w_down = residuals
    b, t, hh, kk = o.shape
    m, d = b * t, dy.shape[-1]
    bs = settings.block_sizes
    with jax.named_scope(f"palm_block_out_bwd bt={bs.block_t_bwd} bc={bs.block_c_bwd} "
                         f"bd={bs.block_d_bwd}"):
        do, dh = settings.backend.backward_dact(settings, dy.reshape(m, d),
                                                wo.reshape(hh * kk, d), w_down)
        dwo, dw_down = weight_grads(o, h, dy, wo.dtype)
    return dy, do.reshape(o.shape), dwo, dh.reshape(h.shape), dw_down


_block_out.defvjp(_block_out_fwd, _block_out_bwd)
