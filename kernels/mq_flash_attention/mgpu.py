"""The Mosaic GPU `mq_flash_attention` forward, dk/dv and dq kernels (Hopper: TMA, wgmma, warp
specialisation): `impl="pallas_mosaic_gpu"`.

Why a second GPU forward: Triton's dots on Hopper cannot keep a K = 256 accumulator and a
software pipeline deep enough to hide HBM at once, while Mosaic GPU lets a kernel split its
warpgroups by role (FlashAttention-3, Shah et al. 2024): one producer warpgroup only issues TMA
copies of K/V tiles into a ring of shared-memory buffers, and the consumer warpgroups only run
wgmma and the softmax, so loads and math overlap without registers spent on addresses.

Same math and residuals as gpu.py (the design and the row fold are in tpu.py and pallas.py):
q [B, T, H, K] viewed as [B, T*H, K], row r = t*H + h, one K/V tile serving all H heads of a
query tile; causal is top-left aligned (row r sees key s iff r >= s*H); the forward saves
lse [B, R] f32 (natural log of the row's sum of exp(scaled logits)). The backward, through
pallas.py's custom_vjp on these residuals, is this module's dk/dv and dq kernels (or gpu.py's
Triton ones, `BlockSizes.mosaic_dkv=False`, `mosaic_dq=False`).

  * grid (T*H / block_q, B), one thread block per query tile of block_q rows, causal tiles
    longest first; `block_q // 64` consumer warpgroups of 64 rows (wgmma's M) and one producer.
  * producer: copies K and V tile j into ring slot j % kv_buffers (TMA, `k_ready`/`v_ready`
    barriers), first waiting until every consumer has released what the slot held
    (`k_free`/`v_free`, one arrival per consumer).
  * consumer: its q tile [64, Kp] by TMA once, then per key tile: s = q k^T (wgmma, f32
    [64, block_k]), the online softmax in base 2 (the scale and log2(e) folded into one
    multiply), acc = acc * alpha + p v (wgmma accumulating into the f32 [64, Kp] acc), waiting
    for the next key tile while that runs; o and lse leave through shared memory by TMA. A
    consumer whose rows see fewer key tiles than the thread block's last rows still waits for
    and releases the remaining slots, so that no consumer can release a slot twice before the
    other has released it once.
  * ping-pong (`BlockSizes.ping_pong`, two consumers): the consumers take turns on the tensor
    cores through a two-arrival `schedule` barrier, met twice per key tile (after issuing
    q k^T, and before issuing p v), consumer 1 starting half a turn behind: while one runs
    its softmax, the other's wgmma runs (FlashAttention-3's inter-warpgroup overlap, as in
    JAX's attention_mgpu). A consumer past its last key tile keeps meeting the barrier.
  * causal: tiles wholly visible run an unmasked loop; the tiles crossing the diagonal (and the
    one holding the last real key when S is not a multiple of block_k) a masked one.
  * dq, grid (T*H / 64, B): one consumer and the producer (the same ring). The consumer loads
    its q, do tiles [64, Kp] and lse, delta [64] by TMA once, then per visible key tile:
    s = q k^T and dp = do v^T (two wgmmas, f32 [64, block_k]), p = exp2(s c - lse log2 e),
    ds = p (dp - delta), dq += ds k (wgmma from registers into the f32 [64, Kp] dq), waiting
    for the next tile while that runs; dq * scale leaves through q's buffer. One consumer:
    q, do and a ring of 2 fill 192 KiB at K = 256, so a second one would not fit; 2 x T*H/64
    thread blocks at PaLM-8B (512) fill the SMs anyway.
  * dk/dv, grid (S / 64, B, row splits): a thread block owns 64 keys and walks the 64-row
    query tiles that see them (causal: from the first that sees its first key, the tiles
    crossing the diagonal masked), in `dkv_splits` as gpu.py's (f32 partials summed in
    XLA). Both [64, Kp] f32 accumulators in one warpgroup would take 256 registers per thread
    at K = 256, so each of two consumers owns half of dk's and dv's columns ([64, Kp/2]
    each, 128 registers) and half of each step's rows for the scores: consumer c computes
    s^T = k q_c^T and dp^T = v do_c^T for its 32 rows (two wgmmas, f32 [64, 32]; transposed,
    so lse and delta broadcast along columns), p^T = exp2(s^T c - lse log2 e), ds^T =
    p^T (dp^T - delta), and writes both in bf16 to its half of the exchange buffers; after
    the two meet (`meet`, a two-arrival barrier), each runs dv_c += p^T do[:, c] and
    dk_c += ds^T q[:, c] over both halves (four wgmmas from shared memory; FlashAttention-3's
    head-dim-256 backward splits the same way). A second meeting per step, before the
    writes, keeps a consumer from overwriting a half the other is still reading. The
    producer streams q, do, lse, delta tiles through a ring of `kv_buffers`; k and v are
    loaded once. dk * scale and dv leave through shared memory that the ring's q/do part
    shares (`plgpu.RefUnion`) once both consumers are past their last wgmma. These wgmmas
    read both operands from shared memory, which must then share one swizzle: 64 bytes,
    the exchanged halves' 32 columns.

Shapes: K is zero-padded to a power of two >= 64 (the 128-byte swizzle's 64 bf16 columns and
gpu.py's power-of-two rule), at most 256 (registers: the acc is 128 per thread at 256); rows
and keys are zero-padded to whole tiles by pallas.py. bf16 or f16 only (wgmma's operands here).

Budget at PaLM's K = 256, bf16, block_q = 128, block_k = 64, kv_buffers = 2: shared memory q
2 x 64 x 256 x 2 = 64 KiB, the K/V ring 2 x 2 x 64 x 256 x 2 = 128 KiB, lse 512 B: 192.5 KiB
of 227 KiB. Registers: consumers raise theirs to 232 per thread (acc 128, s 32, p 16, the
statistics and addresses), the producer lowers to 40: 2 x 232 + 40 = 504 x 128 threads fits
the 64 K-register file. dq: dq 128, s and dp 32 each, p and ds; the same 232. dk/dv: k and v
64 KiB, the q/do ring 2 x 2 x 64 x 256 x 2 = 128 KiB (the f32 dk/dv staging, 2 x 2 x 64 x
128 x 4, is as large), lse/delta 1 KiB, the exchange halves 16 KiB: 209 KiB; registers dk and
dv halves 64 each, s^T and dp^T 16 each, p^T and ds^T. FLOPs and bytes as gpu.py's kernels.
Per step the dk/dv consumers read about 288 KiB of shared memory for 4 x 64 x 64 x 256
multiply-adds (the [64, 32] score wgmmas re-read the whole k or v tile for half the rows):
2,300 cycles at 128 bytes per cycle against 2,048 on the tensor cores, so that kernel is
bounded near 90% of the tensor-core peak before any stall.

What CPU checks cover: on jax >= 0.11 the Mosaic GPU interpreter runs these kernels on CPU
(TMA, barriers, wgmma, the warpgroups as threads, with race detection), so the hypothesis
suite checks them against the reference. The one step that interpreter cannot run, a wgmma
accumulating into registers (p v, ds k, and dk/dv's; `pl.run_state`), is a plain dot there
(`_mgpu.accumulate`), the same sum; tests marked `gpu` run the native one on the GPU.
Exporting for CUDA from CPU runs the whole Pallas-to-Mosaic-GPU lowering (layouts,
transforms, wgmma shapes) on both jax versions. Not covered: PTX compilation,
register allocation and speed, which the device script (tools/gpu_check.sh) measures.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels._common import MOSAIC_GPU_DTYPES
from kernels._mgpu import CONSUMER_REGISTERS, accumulate, launch, meet, produce, ring_slot
from kernels._mgpu import swizzled, window_copy, zeros
from kernels._gpu import SHARED_MEMORY_BYTES, check_shared_memory, mosaic_gpu_interpret
from kernels._gpu import mosaic_load, next_power_of_two
from kernels.mq_flash_attention import gpu
from kernels.mq_flash_attention.pallas import MASK_VALUE, Settings, mq_flash_attention_pallas

IMPL = "pallas_mosaic_gpu"

# wgmma's M: the rows one consumer warpgroup owns.
WG_ROWS = 64
# The largest padded head dim: the acc takes Kp / 2 registers per thread.
MAX_HEAD_DIM = 256
# The dk/dv kernel's tiles: a thread block's keys (wgmma's M for dk and dv, each consumer
# holding half of their columns) and the query rows of one step (half of them per consumer for
# the transposed scores s^T = k q^T, [64 keys, 32 rows]).
DKV_KEYS = 64
DKV_ROWS = 64
# Its shared-memory operands' swizzle in bytes: a wgmma's two operands share one, and the
# exchanged p^T and ds^T halves are 32 two-byte columns wide.
DKV_SWIZZLE = 64


@dataclasses.dataclass(frozen=True)
class BlockSizes(gpu.BlockSizes):
    """gpu.BlockSizes (the Triton backward's tiles and warps, and `dkv_splits`) whose forward
    tiles drive the Mosaic GPU forward: block_q 64 or 128 rows (one or two consumer
    warpgroups), block_k 64 or 128 keys; `kv_buffers` is the depth of each kernel's ring in
    shared memory (K/V tiles, or dk/dv's q/do tiles; >= 2, so that one tile loads while
    another is used); `ping_pong` takes turns on the tensor cores between
    two consumers (module docstring; ignored with one); `mosaic_dq` runs dq with this module's
    kernel (64-row tiles, the forward's block_k and ring) rather than gpu.py's; `mosaic_dkv`
    runs dk/dv with this module's kernel (64 keys by 64 rows, a ring of `kv_buffers` q/do
    tiles, `dkv_splits`) rather than gpu.py's, whose tiles are the *_dkv fields."""

    kv_buffers: int = 2
    ping_pong: bool = True
    mosaic_dq: bool = True
    mosaic_dkv: bool = True

    def __post_init__(self):
        super().__post_init__()
        for name in ("ping_pong", "mosaic_dq", "mosaic_dkv"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"BlockSizes: {name}={getattr(self, name)!r} must be a bool")
        if self.block_q not in (WG_ROWS, 2 * WG_ROWS):
            raise ValueError(f"BlockSizes: block_q={self.block_q} must be 64 or 128 (one or two "
                             "consumer warpgroups of wgmma's 64 rows)")
        if self.block_k not in (64, 128):
            raise ValueError(f"BlockSizes: block_k={self.block_k} must be 64 or 128")
        if not (isinstance(self.kv_buffers, int) and self.kv_buffers >= 2):
            raise ValueError(f"BlockSizes: kv_buffers={self.kv_buffers!r} must be an int >= 2")

    @classmethod
    def get_default(cls, *, q_len: int, kv_len: int, num_heads: int, head_dim: int,
                    dtype: Any) -> BlockSizes:
        """gpu.py's tiles for the backward; forward 128 x 64 with as many K/V buffers (<= 4)
        as shared memory holds in the forward and dq kernels (2 at K = 256, 4 at K <= 128),
        shrunk to the problem."""
        backward = gpu.BlockSizes.get_default(q_len=q_len, kv_len=kv_len, num_heads=num_heads,
                                              head_dim=head_dim, dtype=dtype)
        blocks = cls(**{**dataclasses.asdict(backward), "block_q": 2 * WG_ROWS, "block_k": 64})
        blocks = blocks.fit(q_len * num_heads, kv_len)
        for buffers in (4, 3):
            deeper = dataclasses.replace(blocks, kv_buffers=buffers)
            if mosaic_shared_memory_bytes(deeper, head_dim) <= SHARED_MEMORY_BYTES:
                return deeper
        return blocks

    def fit(self, rows: int, kv_len: int) -> BlockSizes:
        """gpu.BlockSizes.fit, the forward tiles kept at the Mosaic kernel's smallest (64)."""
        triton = {f.name: getattr(self, f.name) for f in dataclasses.fields(gpu.BlockSizes)}
        fitted = gpu.BlockSizes(**triton).fit(rows, kv_len)
        return dataclasses.replace(self, **{
            **dataclasses.asdict(fitted), "block_q": max(WG_ROWS, fitted.block_q),
            "block_k": max(64, fitted.block_k)})


def padded_head_dim(head_dim: int) -> int:
    """K as the kernels see it: a power of two >= 64 (the swizzled tile's width, and gpu.py's
    rule for the backward), zero-padded."""
    return max(64, next_power_of_two(head_dim))


def forward_shared_memory_bytes(blocks: BlockSizes, head_dim: int) -> int:
    """The forward's shared memory (2-byte operands): q tiles, the K/V ring, lse tiles."""
    kp = padded_head_dim(head_dim)
    return (2 * blocks.block_q * kp + blocks.kv_buffers * 2 * 2 * blocks.block_k * kp
            + 4 * blocks.block_q)


def dq_shared_memory_bytes(blocks: BlockSizes, head_dim: int) -> int:
    """The Mosaic dq kernel's: q and do tiles, the K/V ring, lse and delta."""
    kp = padded_head_dim(head_dim)
    return (2 * 2 * WG_ROWS * kp + blocks.kv_buffers * 2 * 2 * blocks.block_k * kp
            + 2 * 4 * WG_ROWS)


def dkv_shared_memory_bytes(blocks: BlockSizes, head_dim: int) -> int:
    """The Mosaic dk/dv kernel's: k and v tiles, the ring of q and do tiles with their lse and
    delta (the q/do part shared with the f32 dk/dv staging at the end, which is no larger
    from two buffers on), and the exchanged p^T and ds^T halves."""
    kp = padded_head_dim(head_dim)
    ring = blocks.kv_buffers * 2 * DKV_ROWS * kp * 2
    staging = 2 * DKV_KEYS * kp * 4
    return (2 * DKV_KEYS * kp * 2 + max(ring, staging) + blocks.kv_buffers * 2 * 4 * DKV_ROWS
            + 2 * DKV_KEYS * DKV_ROWS * 2)


def mosaic_shared_memory_bytes(blocks: BlockSizes, head_dim: int) -> int:
    """The most shared memory one of this module's kernels needs (forward, dq and dk/dv if
    used)."""
    return max(forward_shared_memory_bytes(blocks, head_dim),
               dq_shared_memory_bytes(blocks, head_dim) if blocks.mosaic_dq else 0,
               dkv_shared_memory_bytes(blocks, head_dim) if blocks.mosaic_dkv else 0)


def check_tiles(blocks: BlockSizes, head_dim: int, dtype: Any) -> None:
    """The Mosaic kernels' limits (dtype, head dim), then every kernel's shared memory: the
    Mosaic forward's and dq's, and gpu.py's dk/dv (and dq without mosaic_dq)."""
    if jnp.dtype(dtype) not in MOSAIC_GPU_DTYPES:
        raise ValueError(f"mq_flash_attention: impl={IMPL!r} takes bfloat16 or float16 (wgmma "
                         f"operands), got {jnp.dtype(dtype).name}; use impl='pallas_gpu'")
    if padded_head_dim(head_dim) > MAX_HEAD_DIM:
        raise ValueError(f"mq_flash_attention: impl={IMPL!r} takes head dims up to "
                         f"{MAX_HEAD_DIM} (the f32 accumulator's registers), got {head_dim}")
    sizes = {**gpu.shared_memory_bytes(blocks, head_dim, dtype),
             "forward": forward_shared_memory_bytes(blocks, head_dim)}  # not Triton's forward
    if blocks.mosaic_dq:
        sizes["dq"] = dq_shared_memory_bytes(blocks, head_dim)
    if blocks.mosaic_dkv:
        sizes["dkv"] = dkv_shared_memory_bytes(blocks, head_dim)
    for kernel, size in sizes.items():
        check_shared_memory(size, f"palm_mq_flash_attention {kernel} ({blocks}, K={head_dim}, "
                                  f"{jnp.dtype(dtype).name}, impl={IMPL!r})")


def forward(q, k, v, settings: Settings):
    """q [B, R, Kp] (folded, padded), k/v [B, Sp, Kp] -> o [B, R, Kp], lse f32 [B, R]."""
    batch, rows, kp = q.shape
    blocks = settings.blocks
    consumers = blocks.block_q // WG_ROWS
    n_tiles = rows // blocks.block_q
    scratch = (
        (swizzled((consumers, WG_ROWS, kp), q.dtype),  # q, then o
         swizzled((blocks.kv_buffers, blocks.block_k, kp), k.dtype),
         swizzled((blocks.kv_buffers, blocks.block_k, kp), v.dtype),
         plgpu.SMEM((consumers, WG_ROWS), jnp.float32)),  # lse
        (plgpu.Barrier(num_barriers=blocks.kv_buffers),  # k_ready
         plgpu.Barrier(num_barriers=blocks.kv_buffers),  # v_ready
         plgpu.Barrier(num_barriers=consumers)),  # q_ready
        (plgpu.Barrier(num_arrivals=consumers, num_barriers=blocks.kv_buffers),) * 2,  # free
        plgpu.Barrier(num_arrivals=consumers),  # schedule: the consumers' turns (ping_pong)
    )
    out_type = (jax.ShapeDtypeStruct(q.shape, q.dtype),
                jax.ShapeDtypeStruct((batch, rows), jnp.float32))
    return _launch(_forward_kernel, scratch, "palm_mq_flash_attention_fwd_mosaic", out_type,
                   (n_tiles, batch), consumers + 1, settings,
                   _ring_scope(settings, blocks.block_q), n_tiles=n_tiles)(q, k, v)


def _tile(settings: Settings, n_tiles: int):
    """This thread block's query tile: causal grids run in reverse, longest tiles first."""
    tile = lax.axis_index("tile")
    return n_tiles - 1 - tile if settings.causal else tile


def _launch(kernel, scratch, name: str, out_type, grid: tuple[int, ...], threads: int,
            settings: Settings, scope: str, **params):
    """`_mgpu.launch` of `kernel` over `grid` (axes "tile", "batch", and "split" if there is a
    third), the kernel getting settings, interpret and `params` as keywords; the named scope
    adds the heads and causality to `scope`."""
    body = functools.partial(kernel, settings=settings, interpret=bool(settings.interpret),
                             **params)
    return launch(body, scratch, name=name, out_type=out_type, grid=grid,
                  grid_names=("tile", "batch", "split")[:len(grid)], threads=threads,
                  interpret=settings.interpret,
                  scope=f"{scope} H={settings.num_heads} causal={settings.causal}")


def _ring_scope(settings: Settings, tile_rows: int) -> str:
    """The forward's and dq's tiling, for `_launch`'s scope."""
    blocks = settings.blocks
    return f"bq={tile_rows} bk={blocks.block_k} buffers={blocks.kv_buffers}"


def _tiles(refs, batch, rows: int):
    """The producer's copies: tile t (`rows` along axis 1: keys, or query rows) of each ref
    at batch row `batch`."""
    return tuple(window_copy(functools.partial(
        lambda ref, t: ref.at[batch, pl.ds(t * rows, rows)], ref)) for ref in refs)


def _forward_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, smem, ready, free, schedule, *,
                    settings: Settings, n_tiles: int, interpret: bool):
    q_smem, k_smem, v_smem, lse_smem = smem
    k_ready, v_ready, q_ready = ready
    k_free, v_free = free
    blocks = settings.blocks
    bk, buffers = blocks.block_k, blocks.kv_buffers
    consumers = blocks.block_q // WG_ROWS
    ping_pong = blocks.ping_pong and consumers == 2
    batch = lax.axis_index("batch")
    tile_row0 = _tile(settings, n_tiles) * blocks.block_q
    wg = lax.axis_index("wg")
    # The thread block's last consumer holds its last rows, which see the most key tiles.
    _, tile_steps, _ = gpu.key_ranges(settings, tile_row0 + (consumers - 1) * WG_ROWS,
                                       WG_ROWS, bk)

    def take_turns():
        """Both consumers meet (one barrier phase each); only with ping_pong."""
        if ping_pong:
            plgpu.barrier_arrive(schedule)
            plgpu.barrier_wait(schedule)

    pl.when(wg == consumers)(lambda: produce(_tiles((k_ref, v_ref), batch, bk),
                                             (k_smem, v_smem), ready, free, first=0,
                                             count=tile_steps))

    @pl.when(wg < consumers)
    def _consumer():
        plgpu.set_max_registers(CONSUMER_REGISTERS, action="increase")
        row0 = tile_row0 + wg * WG_ROWS
        q_tile, lse_tile = q_smem.at[wg], lse_smem.at[wg]
        plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(row0, WG_ROWS)], q_tile, q_ready.at[wg])
        plgpu.barrier_wait(q_ready.at[wg])
        kp = q_tile.shape[-1]
        n_full, n_vis, any_masked = gpu.key_ranges(settings, row0, WG_ROWS, bk)
        plgpu.barrier_wait(k_ready.at[0])  # key tile 0: every row sees it
        pl.when(wg == 1)(take_turns)  # consumer 1 starts half a turn behind
        # Base-2 online softmax: m is kept in log2 units, so exp2(s * c - m) is one FMA away.
        log2_scale = settings.sm_scale * math.log2(math.e)

        def step(masked: bool):
            def body(j, carry):
                acc, m_prev, l_prev = carry
                slot = ring_slot(j, buffers)  # k_ready[slot] was waited for before this step

                def scores(s_ref):
                    plgpu.wgmma(s_ref, q_tile, k_smem.at[slot].transpose((1, 0)))
                    take_turns()  # the other consumer's turn on the tensor cores
                    return s_ref[...]

                s = pl.run_scoped(scores, plgpu.ACC((WG_ROWS, bk), jnp.float32))
                plgpu.barrier_arrive(k_free.at[slot])
                s = s * log2_scale
                if masked:
                    s = jnp.where(_visible(settings, row0, j * bk, s.shape), s, MASK_VALUE)
                # Key 0 is visible to every row, so m is finite after the first tile and a
                # masked entry later gets exp2(MASK - m) = 0.
                m_next = jnp.maximum(m_prev, s.max(axis=1))
                alpha = jnp.exp2(m_prev - m_next)
                p = jnp.exp2(s - lax.broadcast_in_dim(m_next, s.shape, [0]))
                l_next = l_prev * alpha + p.sum(axis=1)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                if ping_pong:  # softmax done; p v goes once the other's s is issued
                    plgpu.barrier_arrive(schedule)
                    plgpu.barrier_wait(v_ready.at[slot])
                    plgpu.barrier_wait(schedule)
                else:
                    plgpu.barrier_wait(v_ready.at[slot])

                def while_pv_runs():  # the next key tile's wait, hidden behind p v
                    @pl.when(j + 1 < n_vis)
                    def _():
                        plgpu.barrier_wait(k_ready.at[ring_slot(j + 1, buffers)])

                acc, = accumulate((acc,), (((p.astype(v_smem.dtype), v_smem.at[slot]),),),
                                   interpret, while_pv_runs)
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_next, l_next
            return body

        carry = (zeros((WG_ROWS, kp)),
                 plgpu.layout_cast(jnp.full((WG_ROWS,), -jnp.inf, jnp.float32),
                                   plgpu.Layout.WGMMA.reduce(1)),
                 plgpu.layout_cast(jnp.zeros((WG_ROWS,), jnp.float32),
                                   plgpu.Layout.WGMMA.reduce(1)))
        carry = lax.fori_loop(0, n_full, step(False), carry)
        if any_masked:
            carry = lax.fori_loop(n_full, n_vis, step(True), carry)
        acc, m, l = carry

        # The slots of key tiles only later rows of this thread block see: waited for and
        # released in order, so this consumer never runs a phase ahead of the other; and the
        # two turns per step the other consumer still takes.
        @pl.loop(n_vis, tile_steps)
        def _release(j):
            slot = ring_slot(j, buffers)
            plgpu.barrier_wait(k_ready.at[slot])
            plgpu.barrier_arrive(k_free.at[slot])
            plgpu.barrier_wait(v_ready.at[slot])
            plgpu.barrier_arrive(v_free.at[slot])
            take_turns()
            take_turns()

        pl.when(wg == 0)(take_turns)  # consumer 0's last half turn

        q_tile[...] = (acc / lax.broadcast_in_dim(l, acc.shape, [0])).astype(q_tile.dtype)
        lse_tile[...] = (m + jnp.log2(l)) * math.log(2.0)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_tile, o_ref.at[batch, pl.ds(row0, WG_ROWS)])
        plgpu.copy_smem_to_gmem(lse_tile, lse_ref.at[batch, pl.ds(row0, WG_ROWS)])
        plgpu.wait_smem_to_gmem(0)


def backward_dkv(q, k, v, do, lse, delta, settings: Settings):
    """dk, dv [B, Sp, Kp] in k's dtype: this module's kernel (`_dkv_kernel`) or, without
    `BlockSizes.mosaic_dkv`, gpu.py's (interpreted by the generic interpreter when this
    module's kernels are by the Mosaic GPU one)."""
    blocks = settings.blocks
    if not blocks.mosaic_dkv:
        return gpu.backward_dkv(q, k, v, do, lse, delta, _for_triton(settings))
    batch, rows, kp = q.shape
    buffers, half = blocks.kv_buffers, kp // 2
    n_q, n_k = rows // DKV_ROWS, pl.cdiv(settings.kv_len, DKV_KEYS)  # padding-only key tiles:
    per_split, n_split = gpu.dkv_splits(n_q, n_k * batch,  # their rows are sliced off
                                        blocks.dkv_splits)
    partials = gpu.dkv_partials(k, n_split)
    # The operands of wgmmas that read the exchanged [64, 32] halves of p^T and ds^T from
    # shared memory: 64-byte swizzle (32 columns), as a wgmma's two operands must share one.
    narrow = functools.partial(swizzled, swizzle=DKV_SWIZZLE)
    staging = swizzled((2, DKV_KEYS, half), partials.dtype,
                        min(128, half * jnp.dtype(partials.dtype).itemsize))
    scratch = (
        (narrow((DKV_KEYS, kp), k.dtype), narrow((DKV_KEYS, kp), v.dtype)),
        # The q/do ring, then (the loop done) each consumer's dk and dv halves leaving.
        plgpu.RefUnion((narrow((buffers, DKV_ROWS, kp), q.dtype),
                        narrow((buffers, DKV_ROWS, kp), do.dtype)), (staging, staging)),
        (plgpu.SMEM((buffers, DKV_ROWS), jnp.float32),) * 2,  # lse, delta
        # p^T, ds^T: each consumer's half, one buffer each (a constant index into one buffer
        # would not lower inside the accumulating wgmmas' run_state).
        ((narrow((DKV_KEYS, DKV_ROWS // 2), q.dtype),) * 2,) * 2,
        plgpu.Barrier(num_barriers=2),  # k, v ready
        (plgpu.Barrier(num_barriers=buffers),) * 4,  # q, do, lse, delta ready
        plgpu.Barrier(num_arrivals=2, num_barriers=buffers),  # free
        plgpu.Barrier(num_arrivals=2),  # exchange: the consumers meet
    )
    dk, dv = _launch(_dkv_kernel, scratch, "palm_mq_flash_attention_bwd_dkv_mosaic",
                     (partials, partials), (n_k, batch, n_split), 3, settings,
                     f"bq={DKV_ROWS} bk={DKV_KEYS} buffers={buffers} splits={n_split}",
                     n_q=n_q, per_split=per_split)(q, k, v, do, lse, delta)
    return gpu.summed_partials((dk, dv), k.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, kv_smem, union,
                stats_smem, exchanged, kv_ready, ready, free, exchange, *, settings: Settings,
                interpret: bool, n_q: int, per_split: int):
    """One (key tile, batch, row split) thread block: dk, dv [64, Kp] of its keys summed over
    the visible 64-row query tiles of its split; two consumers and the producer (module
    docstring). Scores are transposed, s^T = k q^T, so lse and delta broadcast along columns."""
    k_smem, v_smem = kv_smem
    (q_smem, do_smem), staging = union
    lse_smem, delta_smem = stats_smem
    p_smem, ds_smem = exchanged
    buffers, kp = q_smem.shape[0], q_smem.shape[-1]
    half, half_rows = kp // 2, DKV_ROWS // 2
    batch, split = lax.axis_index("batch"), lax.axis_index("split")
    col0 = lax.axis_index("tile") * DKV_KEYS
    keys = pl.ds(col0, DKV_KEYS)
    lo = split * per_split
    hi = jnp.minimum(lo + per_split, n_q)
    # This split's visible row tiles [start, hi), the first n_masked crossing the diagonal.
    first, first_full = gpu.query_ranges(settings, col0, DKV_ROWS, DKV_KEYS, n_q)
    start = jnp.maximum(first, lo)
    count = jnp.maximum(hi - start, 0)
    n_masked = jnp.clip(jnp.minimum(first_full, hi) - start, 0, count)
    wg = lax.axis_index("wg")
    pl.when(wg == 2)(lambda: produce(
        _tiles((q_ref, do_ref, lse_ref, delta_ref), batch, DKV_ROWS),
        (q_smem, do_smem, lse_smem, delta_smem), ready, (free,), first=start, count=count))

    def consumer(c: int):
        """Consumer c: the transposed scores of rows [32c, 32c + 32) of each step, and columns
        [c Kp/2, (c+1) Kp/2) of dk and dv."""
        plgpu.set_max_registers(CONSUMER_REGISTERS, action="increase")
        plgpu.copy_gmem_to_smem((k_ref, v_ref)[c].at[batch, keys], kv_smem[c], kv_ready.at[c])
        plgpu.barrier_wait(kv_ready.at[0])
        plgpu.barrier_wait(kv_ready.at[1])
        mine = pl.ds(c * half_rows, half_rows)
        columns = pl.ds(c * half, half)
        halves = [pl.ds(h * half_rows, half_rows) for h in range(2)]
        log2e = math.log2(math.e)
        log2_scale = settings.sm_scale * log2e
        along_rows = plgpu.Layout.WGMMA.reduce(0)  # a [32] vector broadcast over s^T's keys

        def step(masked: bool):
            def body(i, carry):
                dk, dv = carry
                slot = ring_slot(i, buffers)
                for signal in ready:  # q, do, lse, delta of row tile start + i
                    plgpu.barrier_wait(signal.at[slot])

                def scores(s_ref, dp_ref):
                    plgpu.wgmma(s_ref, k_smem, q_smem.at[slot, mine].transpose((1, 0)))
                    plgpu.wgmma(dp_ref, v_smem, do_smem.at[slot, mine].transpose((1, 0)))
                    return s_ref[...], dp_ref[...]

                s_t, dp_t = pl.run_scoped(
                    scores, plgpu.ACC((DKV_KEYS, half_rows), jnp.float32),
                    plgpu.ACC((DKV_KEYS, half_rows), jnp.float32))
                lse2 = mosaic_load(lse_smem.at[slot, mine], along_rows) * log2e
                delta = mosaic_load(delta_smem.at[slot, mine], along_rows)
                p_t = jnp.exp2(s_t * log2_scale - lax.broadcast_in_dim(lse2, s_t.shape, [1]))
                if masked:
                    row0 = (start + i) * DKV_ROWS + c * half_rows
                    p_t = jnp.where(_visible(settings, row0, col0, p_t.shape, transposed=True),
                                    p_t, 0.0)
                ds_t = p_t * (dp_t - lax.broadcast_in_dim(delta, dp_t.shape, [1]))
                meet(exchange)  # the other consumer's last reads of p^T and ds^T are done
                p_smem[c][...] = p_t.astype(p_smem[c].dtype)
                ds_smem[c][...] = ds_t.astype(ds_smem[c].dtype)
                plgpu.commit_smem()  # those writes, before wgmmas (async proxy) read them
                meet(exchange)  # both halves written
                dv, dk = accumulate(
                    (dv, dk),
                    (tuple((p_smem[h], do_smem.at[slot, halves[h], columns]) for h in range(2)),
                     tuple((ds_smem[h], q_smem.at[slot, halves[h], columns]) for h in range(2))),
                    interpret)
                plgpu.barrier_arrive(free.at[slot])
                return dk, dv
            return body

        empty = zeros((DKV_KEYS, half))
        carry = lax.fori_loop(0, n_masked, step(True), (empty, empty))
        dk, dv = lax.fori_loop(n_masked, count, step(False), carry)
        meet(exchange)  # the other consumer's last wgmmas are done: the ring may be reused
        dk_stage, dv_stage = staging
        dk_stage.at[c][...] = (dk * settings.sm_scale).astype(dk_stage.dtype)
        dv_stage.at[c][...] = dv.astype(dv_stage.dtype)
        plgpu.commit_smem()
        out = (batch, split, keys, columns)
        plgpu.copy_smem_to_gmem(dk_stage.at[c], dk_ref.at[out])
        plgpu.copy_smem_to_gmem(dv_stage.at[c], dv_ref.at[out])
        plgpu.wait_smem_to_gmem(0)

    for c in range(2):
        pl.when(wg == c)(functools.partial(consumer, c))


def backward_dq(q, k, v, do, lse, delta, settings: Settings):
    """dq [B, R, Kp] in q's dtype: this module's kernel (`_dq_kernel`) or, without
    `BlockSizes.mosaic_dq`, gpu.py's."""
    blocks = settings.blocks
    if not blocks.mosaic_dq:
        return gpu.backward_dq(q, k, v, do, lse, delta, _for_triton(settings))
    batch, rows, kp = q.shape
    n_tiles = rows // WG_ROWS
    scratch = (
        (swizzled((WG_ROWS, kp), q.dtype),  # q, then dq
         swizzled((WG_ROWS, kp), do.dtype),
         swizzled((blocks.kv_buffers, blocks.block_k, kp), k.dtype),
         swizzled((blocks.kv_buffers, blocks.block_k, kp), v.dtype),
         plgpu.SMEM((WG_ROWS,), jnp.float32),  # lse
         plgpu.SMEM((WG_ROWS,), jnp.float32)),  # delta
        (plgpu.Barrier(num_barriers=blocks.kv_buffers),  # k_ready
         plgpu.Barrier(num_barriers=blocks.kv_buffers),  # v_ready
         plgpu.Barrier(num_barriers=4)),  # the row tiles: q, do, lse, delta
        (plgpu.Barrier(num_barriers=blocks.kv_buffers),) * 2,  # free
    )
    return _launch(_dq_kernel, scratch, "palm_mq_flash_attention_bwd_dq_mosaic",
                   jax.ShapeDtypeStruct(q.shape, q.dtype), (n_tiles, batch), 2,
                   settings, _ring_scope(settings, WG_ROWS), n_tiles=n_tiles,
                   )(q, k, v, do, lse, delta)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, smem, ready, free, *,
               settings: Settings, n_tiles: int, interpret: bool):
    """One 64-row query tile's dq = scale * sum over its visible key tiles of ds k, with
    p = exp(scale q k^T - lse), dp = do v^T, ds = p (dp - delta); one consumer warpgroup (its
    q and do tiles and the ring fill shared memory at K = 256) and the producer."""
    q_smem, do_smem, k_smem, v_smem, lse_smem, delta_smem = smem
    k_ready, v_ready, rows_ready = ready
    k_free, v_free = free
    blocks = settings.blocks
    bk, buffers = blocks.block_k, blocks.kv_buffers
    batch = lax.axis_index("batch")
    row0 = _tile(settings, n_tiles) * WG_ROWS
    wg = lax.axis_index("wg")
    n_full, n_vis, any_masked = gpu.key_ranges(settings, row0, WG_ROWS, bk)
    pl.when(wg == 1)(lambda: produce(_tiles((k_ref, v_ref), batch, bk), (k_smem, v_smem),
                                     ready, free, first=0, count=n_vis))

    @pl.when(wg == 0)
    def _consumer():
        plgpu.set_max_registers(CONSUMER_REGISTERS, action="increase")
        rows = pl.ds(row0, WG_ROWS)
        loads = ((q_ref, q_smem), (do_ref, do_smem), (lse_ref, lse_smem), (delta_ref, delta_smem))
        for i, (src, dst) in enumerate(loads):
            plgpu.copy_gmem_to_smem(src.at[batch, rows], dst, rows_ready.at[i])
        for i in range(len(loads)):
            plgpu.barrier_wait(rows_ready.at[i])
        log2e = math.log2(math.e)
        row_layout = plgpu.Layout.WGMMA.reduce(1)
        lse2 = mosaic_load(lse_smem, row_layout) * log2e  # in log2 units
        delta = mosaic_load(delta_smem, row_layout)
        log2_scale = settings.sm_scale * log2e
        plgpu.barrier_wait(k_ready.at[0])

        def step(masked: bool):
            def body(j, dq):
                slot = ring_slot(j, buffers)  # k_ready[slot] was waited for before this step

                def scores(s_ref, dp_ref):
                    plgpu.wgmma(s_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
                    plgpu.barrier_wait(v_ready.at[slot])
                    plgpu.wgmma(dp_ref, do_smem, v_smem.at[slot].transpose((1, 0)))
                    return s_ref[...], dp_ref[...]

                s, dp = pl.run_scoped(scores, plgpu.ACC((WG_ROWS, bk), jnp.float32),
                                      plgpu.ACC((WG_ROWS, bk), jnp.float32))
                plgpu.barrier_arrive(v_free.at[slot])
                p = jnp.exp2(s * log2_scale - lax.broadcast_in_dim(lse2, s.shape, [0]))
                if masked:
                    p = jnp.where(_visible(settings, row0, j * bk, p.shape), p, 0.0)
                ds = p * (dp - lax.broadcast_in_dim(delta, dp.shape, [0]))

                def while_ds_k_runs():  # the next key tile's wait, hidden behind ds k
                    @pl.when(j + 1 < n_vis)
                    def _():
                        plgpu.barrier_wait(k_ready.at[ring_slot(j + 1, buffers)])

                dq, = accumulate((dq,), (((ds.astype(k_smem.dtype), k_smem.at[slot]),),),
                                  interpret, while_ds_k_runs)
                plgpu.barrier_arrive(k_free.at[slot])
                return dq
            return body

        dq = zeros(q_smem.shape)
        dq = lax.fori_loop(0, n_full, step(False), dq)
        if any_masked:
            dq = lax.fori_loop(n_full, n_vis, step(True), dq)
        q_smem[...] = (dq * settings.sm_scale).astype(q_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[batch, rows])
        plgpu.wait_smem_to_gmem(0)


def _for_triton(settings: Settings) -> Settings:
    return dataclasses.replace(settings, interpret=bool(settings.interpret))


def _visible(settings: Settings, row0, col0, shape: tuple[int, int], transposed: bool = False):
    """gpu.py's visibility mask (causal, and key < S) in wgmma's register layout: [rows, keys]
    from row0 and col0, or [keys, rows] transposed (the dk/dv kernel's s^T)."""
    row_axis, col_axis = (1, 0) if transposed else (0, 1)
    r = row0 + plgpu.broadcasted_iota(jnp.int32, shape, row_axis, layout=plgpu.Layout.WGMMA)
    c = col0 + plgpu.broadcasted_iota(jnp.int32, shape, col_axis, layout=plgpu.Layout.WGMMA)
    ok = c < settings.kv_len
    if settings.causal:
        ok = jnp.logical_and(ok, r >= c * settings.num_heads)
    return ok


def mq_flash_attention_pallas_mosaic_gpu(q, k, v, *, causal=True, sm_scale=None, interpret=None,
                                         block_sizes: BlockSizes | None = None) -> jax.Array:
    """The Mosaic GPU kernels (module docstring), differentiable: the front door's arrays and
    settings, block_sizes this module's `BlockSizes` (None: sized for an H100/H200) and
    interpret None, a bool or a `plgpu.InterpretGPUParams` (interpreted: the Mosaic kernels by
    the Mosaic GPU interpreter, jax >= 0.11, the Triton ones a BlockSizes asks for by the
    generic Pallas interpreter; `_gpu.mosaic_gpu_interpret`)."""
    return mq_flash_attention_pallas(sys.modules[__name__], q, k, v, causal=causal,
                                     sm_scale=sm_scale, interpret=mosaic_gpu_interpret(interpret),
                                     block_sizes=block_sizes)
