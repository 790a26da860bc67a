"""`rope_reference`, the plain-jnp twin of `kernels.rope` (math in float32), and the argument
checks every implementation shares."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def inv_frequencies(head_dim: int, base: float) -> jax.Array:
    """float32 [K/2]: base ** (-i / (K/2)), the rotation speed of pair i.

    Every implementation takes its frequencies from here: bit-identical frequencies matter (at
    position 2048 one ulp of a frequency moves the angle by ~2.4e-4 rad).
    """
    half = head_dim // 2
    return base ** (-jnp.arange(half, dtype=jnp.float32) / half)


def rope_angles(positions: jax.Array, head_dim: int, base: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin of the rotation angles, float32 [..., K/2] for positions [...]."""
    inv_freq = inv_frequencies(head_dim, base)  # [K/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., K/2]
    return jnp.cos(angles), jnp.sin(angles)


def rope_reference(x: jax.Array, positions: jax.Array, *, base: float = 10000.0) -> jax.Array:
    """Rotates x [B, T, H, K] or [B, T, K] by positions int [B, T]; math in float32."""
    check_args(x, positions)
    cos, sin = rope_angles(positions, x.shape[-1], base)  # [B, T, K/2]
    if x.ndim == 4:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # [B, T, 1, K/2]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def check_args(x: jax.Array, positions: jax.Array) -> None:
    """The argument checks every implementation runs first: ValueError naming what is wrong."""
    if x.ndim not in (3, 4):
        raise ValueError(f"rope: x must be [B, T, H, K] or [B, T, K], got {x.shape=}")
    if x.shape[-1] % 2:
        raise ValueError(f"rope: head dim must be even to pair halves, got {x.shape=}")
    if positions.shape != x.shape[:2]:
        raise ValueError(f"rope: positions must be [B, T] = {x.shape[:2]}, got {positions.shape=}")
    if not jnp.issubdtype(positions.dtype, jnp.integer):
        raise ValueError(f"rope: positions must be integers, got {positions.dtype=}")
