"""What both Pallas backends of `rope` share: the argument checks and the custom_vjp wiring, over
a backend module (`tpu` or `gpu`) that provides the kernel.

The backward of a rotation is the rotation by the opposite angle, so each backend has one
kernel, called with the forward tiles and +angle, or with the backward tiles and -angle on the
cotangent. Nothing is saved but the (integer) positions.

A backend module provides:
  IMPL          its impl name ("pallas_tpu", "pallas_gpu"), for error messages.
  BlockSizes    its frozen tiling, with `get_default(x_shape, dtype)` and the fields block_t,
                block_h (forward) and block_t_bwd, block_h_bwd (backward).
  rotate(settings, x, positions, *, block_t, block_h, inverse) -> x rotated
                x [B, T, H, K] or [B, T, K], positions int [B, T]; by -angle where inverse.
`settings` is `Settings` below: the backend, the frequency base, its resolved `interpret` and
its tiles.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from typing import Any

import jax
import jax.numpy as jnp

from kernels.rope.reference import check_args


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything about a `rope` call that is not an array: the custom_vjp's nondiff argument
    (modules hash by identity)."""

    backend: types.ModuleType
    base: float
    interpret: Any  # the backend's resolved interpret (_common.tpu_interpret, _gpu.gpu_interpret)
    block_sizes: Any  # the backend's BlockSizes


def check_pallas_args(backend: types.ModuleType, x: jax.Array, positions: jax.Array,
                      block_sizes):
    """The reference's checks plus what the kernels need; returns the block sizes (the
    backend's default for the shape when None)."""
    check_args(x, positions)
    if x.dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"rope: x must be float32 or bfloat16, got {x.dtype=}")
    if block_sizes is None:
        return backend.BlockSizes.get_default(x.shape, x.dtype)
    if not isinstance(block_sizes, backend.BlockSizes):
        raise ValueError(f"rope: impl={backend.IMPL!r}: block_sizes must be a "
                         f"{backend.__name__}.BlockSizes, got {type(block_sizes)}")
    return block_sizes


def rope_pallas(backend: types.ModuleType, x: jax.Array, positions: jax.Array, *, base: float,
                interpret: Any, block_sizes) -> jax.Array:
    """`rope` on a backend module's kernel; `interpret` already resolved by the backend."""
    block_sizes = check_pallas_args(backend, x, positions, block_sizes)
    return _rope(Settings(backend, float(base), interpret, block_sizes), x, positions)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _rope(settings: Settings, x: jax.Array, positions: jax.Array) -> jax.Array:
    bs = settings.block_sizes
    return settings.backend.rotate(settings, x, positions, block_t=bs.block_t,
                                   block_h=bs.block_h, inverse=False)


def _rope_fwd(settings: Settings, x: jax.Array, positions: jax.Array):
    return _rope(settings, x, positions), positions


def _rope_bwd(settings: Settings, positions: jax.Array, g: jax.Array):
    # A rotation's transpose is the rotation by the opposite angle: the same kernel, rotating
    # back. positions are integers: no cotangent.
    bs = settings.block_sizes
    dx = settings.backend.rotate(settings, g, positions, block_t=bs.block_t_bwd,
                                 block_h=bs.block_h_bwd, inverse=True)
    return dx, None


_rope.defvjp(_rope_fwd, _rope_bwd)
