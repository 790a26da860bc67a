"""Relative errors computed where the arrays live.

The benchmarks' checks (bench/conftest.py's `assert_close`) and the device script's kernel
checks (tools/gpu_check.py) compare outputs of up to 2^28 elements with their references.
Copied to the host and widened to float64 by numpy, one such comparison took tens of seconds
on the H200 run (bench/results/h200-2026-11-27.md: the ceilings stage timed one of its ten
products in 45 s); on the device it takes milliseconds. float32 sums are exact enough for
tolerances of 1e-5 and up: what is compared is a ratio of two norms, each summed in XLA's
tree order.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


@jax.jit
def _norms(actual: jax.Array, expected: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    actual, expected = actual.astype(jnp.float32), expected.astype(jnp.float32)
    return jnp.linalg.norm(actual - expected), jnp.linalg.norm(expected), jnp.all(jnp.isfinite(actual))


def relative_error(actual, expected) -> float:
    """||actual - expected|| / ||expected|| in float32 on the arrays' device; inf where
    `actual` holds a non-finite value. Raises ValueError on differing shapes."""
    actual, expected = jnp.asarray(actual), jnp.asarray(expected)
    if actual.shape != expected.shape:
        raise ValueError(f"shape {actual.shape} != reference {expected.shape}")
    diff, scale, finite = _norms(actual, expected)
    return float(diff) / max(float(scale), 1e-30) if bool(finite) else math.inf
