"""Other people's kernels for the same math, as benchmark baselines.

Each attention baseline is measured in its own native layout: the conversion from ours
(q [B, T, H, K], one shared k, v [B, S, K]) happens once outside the timed region, and its
outputs are converted back only to be checked against our reference. A baseline that must
repeat K/V per head pays for reading them H times inside its kernel; that is its cost, and
the byte counts stay those of the multi-query math (bench/costs.py).

  splash_mqa        TPU  jax.experimental.pallas.ops.tpu.splash_attention, MQA mode.
  flash_tiled       TPU  jax.experimental.pallas.ops.tpu.flash_attention, K/V tiled to H heads
                         (it needs equal head counts).
  cudnn             GPU  jax.nn.dot_product_attention(implementation="cudnn") with its native
                         grouped-query support: one K/V head for all H.
  pallas_gpu_mha    GPU  jax.experimental.pallas.ops.gpu.attention.mha (Triton), K/V tiled.
  pallas_gpu_decode GPU  jax.experimental.pallas.ops.gpu.decode_attention.mqa.

Both bundled attention kernels default to sm_scale=1.0 (splash has no scale at all, so q is
pre-scaled); every baseline here is given 1/sqrt(K) explicitly.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, ContextManager

import jax
import jax.numpy as jnp

ATTENTION = {"tpu": ("splash_mqa", "flash_tiled"), "gpu": ("cudnn", "pallas_gpu_mha")}
DECODE = {"gpu": ("pallas_gpu_decode",)}
ALL = frozenset(n for table in (ATTENTION, DECODE) for names in table.values() for n in names)

# Tiles for the bundled kernels where their defaults (128) would under-sell them at PaLM
# shapes; clamped to the sequence so small shapes still run.
_TPU_BLOCK = 512


@dataclasses.dataclass(frozen=True)
class AttentionBaseline:
    """A baseline in its own layout. `attend(*layout(q, k, v))` is what gets timed."""

    layout: Callable[[jax.Array, jax.Array, jax.Array], tuple]  # ours -> theirs (q, k, v)
    layout_out: Callable[[jax.Array], jax.Array]  # an o-shaped array, ours -> theirs
    attend: Callable[..., jax.Array]
    restore: Callable[[jax.Array], jax.Array]  # o, theirs -> ours [B, T, H, K]
    restore_grads: Callable[[tuple], tuple]  # (dq, dk, dv), theirs -> ours
    # Entered around every call of the jitted function (lowering happens at the first call).
    context: Callable[[], ContextManager] = contextlib.nullcontext


def _bhtk(x):  # [B, T, H, K] <-> [B, H, T, K]
    return jnp.swapaxes(x, 1, 2)


def _interpret(backend: str, interpret: bool | None) -> bool:
    """None: interpret exactly when not on the kernel's own backend (as our kernels do)."""
    return jax.default_backend() != backend if interpret is None else interpret


def attention(name: str, *, heads: int, causal: bool, sm_scale: float,
              interpret: bool | None = None, cudnn_implementation: str = "cudnn") -> AttentionBaseline:
    """The named baseline for q [B, T, H, K], k, v [B, S, K].

    The Pallas baselines run in interpret mode off their own backend (`interpret=None`), and
    `cudnn_implementation="xla"` swaps cuDNN for XLA behind the same call: both let a CPU
    machine check the wiring (layouts, scale, masking) that the accelerators then time.
    """
    if name == "splash_mqa":
        from jax.experimental.pallas.ops.tpu import splash_attention as splash

        def layout(q, k, v):
            return _bhtk(q * jnp.asarray(sm_scale, q.dtype)), k, v

        def attend(q, k, v):  # q [B, H, T, K] pre-scaled, k, v [B, S, K]
            t, s = q.shape[2], k.shape[1]
            mask = splash.MultiHeadMask([splash.CausalMask((t, s)) if causal else splash.FullMask((t, s))
                                         for _ in range(heads)])
            bq, bkv = min(_TPU_BLOCK, t), min(_TPU_BLOCK, s)
            blocks = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                                       block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq,
                                       block_kv_dq=bkv)
            kernel = splash.make_splash_mqa_single_device(mask=mask, block_sizes=blocks,
                                                          interpret=_interpret("tpu", interpret))
            return jax.vmap(kernel)(q, k, v)

        return AttentionBaseline(layout, _bhtk, attend, _bhtk,
                                 lambda g: (_bhtk(g[0]) * sm_scale, g[1], g[2]))

    if name == "flash_tiled":
        from jax.experimental.pallas.ops.tpu import flash_attention as fa

        def layout(q, k, v):  # K/V materialised per head, [B, H, S, K]
            tiled = lambda x: jnp.broadcast_to(x[:, None], (x.shape[0], heads, *x.shape[1:]))  # noqa: E731
            return _bhtk(q), tiled(k), tiled(v)

        def attend(q, k, v):
            bq, bk = min(_TPU_BLOCK, q.shape[2]), min(_TPU_BLOCK, k.shape[2])
            blocks = fa.BlockSizes(block_q=bq, block_k_major=bk, block_k=bk, block_b=1, block_q_major_dkv=bq,
                                   block_k_major_dkv=bk, block_k_dkv=bk, block_q_dkv=bq, block_k_major_dq=bk,
                                   block_k_dq=bk, block_q_dq=bq)
            return fa.flash_attention(q, k, v, causal=causal, sm_scale=sm_scale, block_sizes=blocks)

        context = contextlib.nullcontext
        if _interpret("tpu", interpret):  # flash_attention takes no interpret argument
            from jax.experimental.pallas import tpu as pltpu

            context = pltpu.force_tpu_interpret_mode
        return AttentionBaseline(layout, _bhtk, attend, _bhtk,
                                 lambda g: (_bhtk(g[0]), g[1].sum(axis=1), g[2].sum(axis=1)), context)

    if name == "cudnn":
        def layout(q, k, v):  # BTNH with N = 1 key/value head
            return q, k[:, :, None, :], v[:, :, None, :]

        def attend(q, k, v):
            return jax.nn.dot_product_attention(q, k, v, scale=sm_scale, is_causal=causal,
                                                implementation=cudnn_implementation)

        same = lambda x: x  # noqa: E731
        return AttentionBaseline(layout, same, attend, same, lambda g: (g[0], g[1][:, :, 0], g[2][:, :, 0]))

    if name == "pallas_gpu_mha":
        from jax.experimental.pallas.ops.gpu import attention as gpu_attention

        def layout(q, k, v):  # K/V materialised per head, [B, S, H, K]
            tiled = lambda x: jnp.broadcast_to(x[:, :, None], (*x.shape[:2], heads, x.shape[2]))  # noqa: E731
            return q, tiled(k), tiled(v)

        def attend(q, k, v):
            # Tiles that fit shared memory at K = 256 (the defaults, 128, need ~2x too much).
            big = q.shape[-1] > 128
            blocks = gpu_attention.BlockSizes(block_q=64 if big else 128, block_k=64 if big else 128,
                                              block_q_dkv=32, block_kv_dkv=32, block_q_dq=32, block_kv_dq=32)
            return gpu_attention.mha(q, k, v, None, sm_scale=sm_scale, causal=causal, block_sizes=blocks,
                                     interpret=_interpret("gpu", interpret))

        same = lambda x: x  # noqa: E731
        return AttentionBaseline(layout, same, attend, same, lambda g: (g[0], g[1].sum(axis=2), g[2].sum(axis=2)))

    raise ValueError(f"unknown attention baseline {name!r}; valid: {', '.join(sorted(ALL))}")


def decode(name: str, *, sm_scale: float, interpret: bool | None = None) -> Callable[..., Any]:
    """The named decode baseline: fn(q [B, H, K], k_cache, v_cache [B, S, K], lengths [B])."""
    if name == "pallas_gpu_decode":
        from jax.experimental.pallas.ops.gpu import decode_attention

        def attend(q, k_cache, v_cache, lengths):
            return decode_attention.mqa(q, k_cache, v_cache, kv_seq_len=lengths, sm_scale=sm_scale,
                                        interpret=_interpret("gpu", interpret))

        return attend
    raise ValueError(f"unknown decode baseline {name!r}; valid: {', '.join(sorted(DECODE['gpu']))}")
