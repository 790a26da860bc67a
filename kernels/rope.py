"""Rotary position embedding (Su et al. 2021) as PaLM uses it (section 2), rotate-half convention.

The first half of the head dimension K is paired with the second half: for i < K/2,
(x[i], x[i + K/2]) is rotated by the angle `position * base ** (-i / (K/2))`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels._common import pallas_impl, resolve_impl


def rope_angles(positions: jax.Array, head_dim: int, base: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin of the rotation angles, float32 [..., K/2] for positions [...]."""
    half = head_dim // 2
    inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [K/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., K/2]
    return jnp.cos(angles), jnp.sin(angles)


def rope_reference(x: jax.Array, positions: jax.Array, *, base: float = 10000.0) -> jax.Array:
    """Rotates x [B, T, H, K] or [B, T, K] by positions int [B, T]; math in float32."""
    _check(x, positions)
    cos, sin = rope_angles(positions, x.shape[-1], base)  # [B, T, K/2]
    if x.ndim == 4:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # [B, T, 1, K/2]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def _check(x: jax.Array, positions: jax.Array) -> None:
    if x.ndim not in (3, 4):
        raise ValueError(f"rope: x must be [B, T, H, K] or [B, T, K], got {x.shape=}")
    if x.shape[-1] % 2:
        raise ValueError(f"rope: head dim must be even to pair halves, got {x.shape=}")
    if positions.shape != x.shape[:2]:
        raise ValueError(f"rope: positions must be [B, T] = {x.shape[:2]}, got {positions.shape=}")
    if not jnp.issubdtype(positions.dtype, jnp.integer):
        raise ValueError(f"rope: positions must be integers, got {positions.dtype=}")


# Pallas implementations, each taking (x, positions, *, base, interpret, block_sizes).
_PALLAS = {}


def rope(
    x: jax.Array,  # [B, T, H, K] or [B, T, K]
    positions: jax.Array,  # int [B, T]
    *,
    base: float = 10000.0,
    impl: str = "auto",
    interpret=None,
    block_sizes=None,
) -> jax.Array:
    """Rotary embedding, see the module docstring.

    Args:
      x: [B, T, H, K] or [B, T, K] queries or keys, K even.
      positions: int [B, T] absolute positions.
      base: the frequency base (PaLM: 10000).
      impl: "auto" | "xla" | "pallas_tpu" | "pallas_gpu" (`kernels._common.resolve_impl`).
      interpret: None (native where it compiles, interpret elsewhere), False or True.
      block_sizes: the Pallas tiling; None picks a default for the shape.
    """
    impl = resolve_impl(impl)
    if impl == "xla":
        return rope_reference(x, positions, base=base)
    fn = pallas_impl("rope", impl, _PALLAS)
    return fn(x, positions, base=base, interpret=interpret, block_sizes=block_sizes)
