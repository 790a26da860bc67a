"""What both Pallas backends of `mq_flash_attention` share: the argument checks, the fold and
padding of the operands, the call's `Settings`, and the custom_vjp over a backend module (`tpu`
or `gpu`) that provides the kernels.

Both backends compute the same thing on the same residuals (tpu.py has the design, gpu.py the
Triton loop order): heads folded into the query rows, q [B, T, H, K] viewed as [B, R = T*H, K];
the forward saves o and the logsumexp; the backward is a dk/dv kernel and a dq kernel using
q, k, v, o, lse and delta = rowsum(do * o). The rows R are zero-padded to a multiple of every
query tile, the keys S to one of every key tile, K to the backend's `padded_head_dim`.

A backend module provides:
  IMPL          its impl name ("pallas_tpu", "pallas_gpu"), for error messages.
  BlockSizes    its frozen tiling, with `get_default(*, q_len, kv_len, num_heads, head_dim,
                dtype)`, `fit(rows, kv_len)` (the tiles shrunk to the problem) and the fields
                block_q, block_k (forward), block_q_dkv, block_k_dkv (dk/dv), block_q_dq,
                block_k_dq (dq); `*_q` count folded query rows, `*_k` key positions.
  padded_head_dim(head_dim) -> Kp
                K as its kernels take it (zeros there change neither logits nor outputs).
  check_tiles(blocks, head_dim, dtype)
                what its kernels need of the fitted tiles beyond `BlockSizes`' own checks (a
                shared-memory budget); raises ValueError.
  forward(q, k, v, settings) -> (o, lse)
                q [B, Rp, Kp] folded and padded, k, v [B, Sp, Kp]; o [B, Rp, Kp] in q's dtype,
                lse f32 in the backend's row layout ([B, 1, Rp] lane-dense on TPU, [B, Rp] on
                GPU).
  backward_dkv(q, k, v, do, lse, delta, settings) -> (dk, dv)
                do like q, delta f32 in lse's layout; dk, dv [B, Sp, Kp] in k's dtype.
  backward_dq(q, k, v, do, lse, delta, settings) -> dq [B, Rp, Kp] in q's dtype.
`settings` is `Settings` below.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kernels._common import pad_to, round_up
from kernels.mq_flash_attention.reference import check_args

# A large finite negative logit for masked entries: exp(MASK - m) underflows to exactly 0, and
# unlike -inf it cannot make (-inf) - (-inf) = NaN in the running-max correction.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


# The tile fields of both backends' BlockSizes: `*_q` count folded query rows, `*_k` keys.
TILES = ("block_q", "block_k", "block_q_dkv", "block_k_dkv", "block_q_dq", "block_k_dq")


def fit_tiles(blocks, rows: int, kv_len: int, smallest: int):
    """`blocks` (a backend's BlockSizes) with each tile no larger than needed for `rows` folded
    query rows or `kv_len` keys: the next power of two >= the length, at least `smallest`."""
    def fit(block: int, n: int) -> int:
        return min(block, max(smallest, 1 << max(n - 1, 0).bit_length()))

    return dataclasses.replace(blocks, **{
        name: fit(getattr(blocks, name), rows if name.startswith("block_q") else kv_len)
        for name in TILES})


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything static about one call: hashable (modules hash by identity), the custom_vjp's
    nondiff argument."""

    backend: types.ModuleType
    causal: bool
    sm_scale: float
    num_heads: int  # H: rows per position in the folded query matrix
    kv_len: int  # S before padding: keys at or past it are masked
    blocks: Any  # the backend's BlockSizes, already fitted to the shape
    interpret: Any  # what its pallas_calls get (_common.tpu_interpret, _gpu.gpu_interpret)


def check_pallas_args(backend: types.ModuleType, q, k, v, *, sm_scale, block_sizes):
    """The reference's shape checks plus what the kernels need; returns (block_sizes, scale):
    the backend's default tiles for the shapes when None, 1/sqrt(K) when sm_scale is None."""
    check_args(q, k, v)
    if not (q.dtype == k.dtype == v.dtype) or not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(f"mq_flash_attention: q, k, v must share one float dtype, got "
                         f"{q.dtype=}, {k.dtype=}, {v.dtype=}")
    batch, q_len, heads, head_dim = q.shape
    kv_len = k.shape[1]
    if min(batch, q_len, heads, head_dim, kv_len) == 0:
        raise ValueError(f"mq_flash_attention: empty dimension in {q.shape=} or {k.shape=}")
    if block_sizes is not None and not isinstance(block_sizes, backend.BlockSizes):
        raise ValueError(f"mq_flash_attention: impl={backend.IMPL!r}: block_sizes must be a "
                         f"{backend.__name__}.BlockSizes, got {block_sizes!r}")
    if sm_scale is not None and not isinstance(sm_scale, (int, float, np.integer, np.floating)):
        raise ValueError(f"mq_flash_attention: sm_scale must be a Python number (it is compiled "
                         f"into the kernels), got {type(sm_scale).__name__}")
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)
    if block_sizes is None:
        block_sizes = backend.BlockSizes.get_default(q_len=q_len, kv_len=kv_len, num_heads=heads,
                                                     head_dim=head_dim, dtype=q.dtype)
    return block_sizes, scale


def mq_flash_attention_pallas(
    backend: types.ModuleType,
    q: jax.Array,  # [B, T, H, K]
    k: jax.Array,  # [B, S, K]
    v: jax.Array,  # [B, S, K]
    *,
    causal: bool,
    sm_scale: float | None,
    interpret: Any,
    block_sizes,
) -> jax.Array:
    """`mq_flash_attention` on a backend module's kernels, differentiable; `interpret` already
    resolved by the backend. [B, T, H, K] in q's dtype."""
    block_sizes, scale = check_pallas_args(backend, q, k, v, sm_scale=sm_scale,
                                           block_sizes=block_sizes)
    batch, q_len, heads, head_dim = q.shape
    kv_len = k.shape[1]
    rows = q_len * heads
    blocks = block_sizes.fit(rows, kv_len)
    backend.check_tiles(blocks, head_dim, q.dtype)
    # One padded length serves all three kernels' tiles (all powers of two in practice).
    rows_p = round_up(rows, math.lcm(blocks.block_q, blocks.block_q_dkv, blocks.block_q_dq))
    kv_p = round_up(kv_len, math.lcm(blocks.block_k, blocks.block_k_dkv, blocks.block_k_dq))
    kp = backend.padded_head_dim(head_dim)
    settings = Settings(backend=backend, causal=bool(causal), sm_scale=scale, num_heads=heads,
                        kv_len=kv_len, blocks=blocks, interpret=interpret)
    qr = pad_to(q.reshape(batch, rows, head_dim), (batch, rows_p, kp))  # [B, T*H, Kp]
    kr = pad_to(k, (batch, kv_p, kp))
    vr = pad_to(v, (batch, kv_p, kp))
    o = _mq_flash(qr, kr, vr, settings)  # [B, Rp, Kp]
    return o[:, :rows, :head_dim].reshape(batch, q_len, heads, head_dim)


# ---- custom_vjp on the folded, padded arrays ---------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _mq_flash(q, k, v, settings: Settings):
    """q [B, R, Kp] folded and padded, k/v [B, Sp, Kp] -> o [B, R, Kp]."""
    return settings.backend.forward(q, k, v, settings)[0]


def _mq_flash_fwd(q, k, v, settings: Settings):
    o, lse = settings.backend.forward(q, k, v, settings)
    return o, (q, k, v, o, lse)


def _mq_flash_bwd(settings: Settings, residuals, do):
    q, k, v, o, lse = residuals
    # delta = rowsum(do * o), f32 in lse's layout: one fused elementwise-and-reduce pass (a
    # kernel of its own would save nothing).
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1).reshape(lse.shape)
    dk, dv = settings.backend.backward_dkv(q, k, v, do, lse, delta, settings)
    dq = settings.backend.backward_dq(q, k, v, do, lse, delta, settings)
    return dq, dk, dv


_mq_flash.defvjp(_mq_flash_fwd, _mq_flash_bwd)
