"""Collective matmul: an FSDP weight's all-gather over a mesh axis replaced by a ring of
`jax.lax.ppermute`s, each step computing with the shard in hand while the next one travels
(Wang et al. 2023, "Overlap Communication with Dependent Computation via Decomposition in
Large Deep Learning Models"; JAX's shard_map tutorial builds the same ring).

For use inside `jax.shard_map`, where `axis` is manual and a weight w is split into n shards
w_0 ... w_{n-1} along one dimension (its D, "embed", over "data" in palm.sharding). Device i
starts with w_i and passes its shard to device i - 1, so at step s it holds w_{(i + s) mod n}:
n steps and n - 1 permutes, each step needing two shards (the one in hand, the one arriving)
and never the whole weight (autodiff without remat still keeps every shard for the backward,
as it keeps a gathered weight). Two ways to use a shard without the whole weight:

- `ring_sum`: the gathered dimension is contracted, so the product is the sum over shards of
  the activation's matching slice times the shard (`shard_of` cuts the slice).
- `ring_concat`: the gathered dimension is the output's last one, so each shard yields its
  own output columns, placed side by side.

Autodiff needs nothing more: the transpose of a ppermute is the reverse ppermute, so the
backward sends each weight's gradient back round the ring, accumulating on the way, and it
lands reduce-scattered on the shard's owner (the role psum_scatter plays for all_gather).
The ring is unrolled (n is static), so XLA's scheduler sees every permute beside the compute
that does not depend on it; whether it overlaps them is the backend's decision (the latency-
hiding scheduler on GPU and TPU), and on CPU nothing overlaps.
"""

from __future__ import annotations

from typing import Callable, Iterator

import jax
import jax.numpy as jnp


def _ring(w, axis: str) -> Iterator[tuple[jax.Array, object]]:
    """(j, w_j) for every shard of the pytree w over `axis`, this device's own first; the
    permute bringing the next shard is issued before the caller computes with this one."""
    n = jax.lax.axis_size(axis)
    me = jax.lax.axis_index(axis)
    to_left = [(i, (i - 1) % n) for i in range(n)]
    for step in range(n):
        arriving = jax.lax.ppermute(w, axis, to_left) if step + 1 < n else None
        yield (me + step) % n, w
        w = arriving


def shard_of(x: jax.Array, j: jax.Array, axis: str) -> jax.Array:
    """x's j-th of axis_size(axis) equal slices along its last dimension: the columns that
    weight shard j meets."""
    width = x.shape[-1] // jax.lax.axis_size(axis)
    return jax.lax.dynamic_slice_in_dim(x, j * width, width, axis=-1)


def ring_sum(fn: Callable[[jax.Array, object], jax.Array], w, *, axis: str) -> jax.Array:
    """Σ_j fn(j, w_j) over the shards of w along `axis`: a contraction over the gathered
    dimension, fn multiplying `shard_of(activation, j, axis)` by w_j, without gathering w."""
    parts = _ring(w, axis)
    j, shard = next(parts)
    total = fn(j, shard)
    for j, shard in parts:
        total = total + fn(j, shard)
    return total


def ring_concat(fn: Callable[[jax.Array, object], jax.Array], w, *, axis: str) -> jax.Array:
    """fn(j, w_j) for every shard of w along `axis`, placed at columns j of the output's last
    dimension (every part the same shape): fn's output over the gathered w, shard by shard."""
    out = None
    for j, shard in _ring(w, axis):
        part = fn(j, shard)  # [..., C]
        if out is None:
            out = jnp.zeros((*part.shape[:-1], part.shape[-1] * jax.lax.axis_size(axis)), part.dtype)
        out = jax.lax.dynamic_update_slice_in_dim(out, part, j * part.shape[-1], axis=-1)
    return out
