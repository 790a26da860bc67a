"""The Mosaic GPU `norm_qkv_rope` forward (Hopper: TMA, wgmma, warp specialisation), with gpu.py's
Triton backward: `impl="pallas_mosaic_gpu"`.

Why: as kernels/norm_swiglu/mgpu.py, the fused projections' bar is 0.9x a bare matmul, which
needs Hopper's whole tensor-core pipeline. The thread block is `kernels._mgpu.projection`, the
LayerNorm-prologue projection norm_swiglu's Mosaic forward runs too: a producer streaming x,
scale and weight slices through a ring of shared-memory buffers, consumers of 64 rows each
normalising their x slice in registers and feeding it to wgmma from there.

Design, as gpu.py's (M = B*T rows; "head" is one of the H query heads, the key head or the
value head, H + 2 in all): grid (M / block_rows, H + 2), a thread block owns one [block_rows,
K] output tile of one head. Its two weight operands are the head's two halves, w[:, :K/2] and
w[:, K/2:] ([64, K/2] slices by TMA straight from wq [D, H, K], wk or wv [D, K]: the producer
picks the array by the head, so nothing is concatenated or copied), accumulated into two f32
[64, K/2] per consumer: RoPE's partner of every column is then in the other accumulator, and
the epilogue rotates without slicing registers (out1 = a1 cos - a2 sin, out2 = a2 cos + a1
sin; the value head is not rotated). cos and sin are rope_angles of the rows' positions,
computed in XLA ([M, K/2] f32 each, 2 MiB at PaLM-8B, as the reference computes them), and
loaded by TMA into the ring's memory once the loop is done; the outputs leave through it too.

Budget at PaLM's K = 256 (bf16, 128 rows, 4 buffers): per slot x 16 KiB, the two weight halves
2 x 64 x 128 x 2 = 32 KiB and the scale slice: 193 KiB; the epilogue's cos and sin (2 x 128 x
128 x 4 = 128 KiB) and the two output halves (64 KiB) reuse it. Registers: the two halves'
accumulators 64 + 64 per thread, as norm_swiglu's gate and up. FLOPs and HBM bytes are
gpu.py's forward's (2 M D (H+2) K; x read once per head, from L2 after the first).

Shapes: K/2 must be 64 or 128 (K = 128 or 256: a half is one or two 64-column swizzled rows,
and the accumulators fit); M and D are zero-padded to whole tiles (padded rows have rstd 0 and
padded features scale 0, so they add nothing). bf16 only. Other K, or f32, raise an error naming
`pallas_gpu`.

The backward is gpu.py's Triton kernels on the same residuals. What CPU checks cover is
kernels/norm_swiglu/mgpu.py's: the Mosaic GPU interpreter on jax >= 0.11 against the reference
(the wgmmas from registers as plain dots), the CUDA export on both jax versions; PTX, registers
and speed need the GPU (tools/gpu_check.sh).
"""

from __future__ import annotations

import dataclasses
import functools
import sys

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels._common import MOSAIC_GPU_DTYPES, pad2, pad_to, round_up
from kernels._gpu import SHARED_MEMORY_BYTES, check_shared_memory, mosaic_gpu_interpret
from kernels._gpu import mosaic_load
from kernels._mgpu import SLICE, WG_ROWS, check_block_sizes, launch, projection
from kernels._mgpu import projection_ring_bytes, projection_scratch, swizzled
from kernels.norm_qkv_rope import gpu, pallas
from kernels.rope.reference import rope_angles

IMPL = "pallas_mosaic_gpu"
HALVES = (64, 128)  # K / 2: one or two swizzled rows of 64 two-byte columns


@dataclasses.dataclass(frozen=True)
class BlockSizes(gpu.BlockSizes):
    """gpu.BlockSizes (the Triton backward's tiles and warps) whose forward tiles drive the
    Mosaic GPU forward: block_rows 64 or 128 (one or two consumer warpgroups), block_d the
    slice of 64; `buffers` is the depth of the ring of slices in shared memory (>= 2)."""

    buffers: int = 4

    def __post_init__(self):
        super().__post_init__()
        check_block_sizes(self, rows="block_rows", depth="block_d")

    @classmethod
    def get_default(cls, x_shape: tuple[int, ...], wq_shape: tuple[int, ...],
                    dtype) -> BlockSizes:
        """gpu.py's backward tiles; the forward's 128 rows (64 for 64 rows or fewer) with as
        many buffers (<= 4) as shared memory holds."""
        backward = gpu.BlockSizes.get_default(x_shape, wq_shape, dtype)
        m = x_shape[0] * x_shape[1]
        blocks = cls(**{**dataclasses.asdict(backward), "block_d": SLICE,
                        "block_rows": 2 * WG_ROWS if m > WG_ROWS else WG_ROWS})
        while (blocks.buffers > 2
               and forward_shared_memory_bytes(blocks, wq_shape[2], dtype) > SHARED_MEMORY_BYTES):
            blocks = dataclasses.replace(blocks, buffers=blocks.buffers - 1)
        return blocks


def forward_shared_memory_bytes(blocks: BlockSizes, head_dim: int, dtype) -> int:
    """The forward's shared memory: the ring, which the epilogue's cos, sin and output halves
    reuse, and the row statistics."""
    item, half, rows = jnp.dtype(dtype).itemsize, head_dim // 2, blocks.block_rows
    ring = projection_ring_bytes(rows, (half, half), item, blocks.buffers)
    staging = 2 * rows * half * 4 + 2 * rows * half * item
    return max(ring, staging) + 2 * 4 * rows


def prepare(x, norm_scale, wq, wk, wv, positions, *, eps: float, base: float = 10000.0,
            interpret=None, block_sizes: BlockSizes | None = None) -> pallas.Settings:
    """The call's `Settings` (pallas.py): the arguments checked (bf16, K = 128 or 256), default
    tiles for the shape, every kernel's shared memory checked."""
    block_sizes = pallas.check_pallas_args(sys.modules[__name__], x, norm_scale, wq, wk, wv,
                                           positions, block_sizes)
    if x.dtype not in MOSAIC_GPU_DTYPES:
        raise ValueError(f"norm_qkv_rope: impl={IMPL!r} takes bfloat16 x (wgmma operands), got "
                         f"{x.dtype}; use impl='pallas_gpu'")
    if wq.shape[2] // 2 not in HALVES:
        raise ValueError(f"norm_qkv_rope: impl={IMPL!r} takes head dims 128 or 256 (RoPE's "
                         f"halves of 64 or 128 columns), got {wq.shape[2]}; use "
                         "impl='pallas_gpu'")
    triton = gpu.shared_memory_bytes(x.shape, wq.shape, x.dtype, block_sizes)
    sizes = {"forward": forward_shared_memory_bytes(block_sizes, wq.shape[2], x.dtype),
             "bwd_dx": triton["bwd_dx"], "bwd_dw": triton["bwd_dw"]}
    for kernel, size in sizes.items():
        check_shared_memory(size, f"palm_norm_qkv_rope {kernel} {block_sizes} (impl={IMPL!r})")
    return pallas.Settings(eps=float(eps), base=float(base),
                           interpret=mosaic_gpu_interpret(interpret), block_sizes=block_sizes)


def forward_rows(settings: pallas.Settings, x2, norm_scale, wq, wk, wv, pos, mean, rstd):
    """The forward on rows (pallas.py's backend interface): q [M, H, K], k, v [M, K]."""
    blocks = settings.block_sizes
    rows, buffers = blocks.block_rows, blocks.buffers
    consumers = rows // WG_ROWS
    (m, d), (_, heads, k) = x2.shape, wq.shape
    half = k // 2
    mp, dp = round_up(m, rows), round_up(d, SLICE)
    x = pad2(x2, mp, dp)
    # Padded rows: rstd 0, so they normalise to 0; padded features: scale 0.
    mean, rstd = (pad_to(a.reshape(m).astype(jnp.float32), (mp,)) for a in (mean, rstd))
    scale = pad_to(norm_scale.astype(jnp.float32), (dp,))
    cos, sin = (pad2(a, mp, half) for a in rope_angles(pos, k, settings.base))  # f32 [Mp, K/2]
    wq, wk, wv = (pad_to(w, (dp, *w.shape[1:])) for w in (wq, wk, wv))
    staging = (*(swizzled((consumers, WG_ROWS, half), jnp.float32) for _ in range(2)),  # cos, sin
               *(swizzled((consumers, WG_ROWS, half), x.dtype) for _ in range(2)))  # out halves
    scratch = projection_scratch(rows, (half, half), x.dtype, buffers, staging,
                                 extra=(plgpu.Barrier(num_barriers=2 * consumers),))  # cos, sin
    kernel = functools.partial(_fwd_kernel, n_d=dp // SLICE, heads=heads,
                               interpret=bool(settings.interpret))
    out_type = [jax.ShapeDtypeStruct((mp, heads, k), x.dtype),
                *(jax.ShapeDtypeStruct((mp, k), x.dtype),) * 2]
    q, k_out, v = launch(
        kernel, scratch, name="palm_norm_qkv_rope_fwd_mosaic", out_type=out_type,
        grid=(mp // rows, heads + 2), grid_names=("rows", "head"), threads=consumers + 1,
        interpret=settings.interpret, scope=f"bm={rows} bd={SLICE} buffers={buffers}",
    )(x, mean, rstd, scale, cos, sin, wq, wk, wv)
    return q[:m], k_out[:m], v[:m]


def _fwd_kernel(x_ref, mean_ref, rstd_ref, scale_ref, cos_ref, sin_ref, wq_ref, wk_ref, wv_ref,
                q_ref, k_ref, v_ref, *scratch, n_d: int, heads: int, interpret: bool):
    """One [block_rows, K] tile of one head (module docstring): `_mgpu.projection` of the
    head's two halves, then RoPE (not for the value head)."""
    (x_ring, _, lo_ring, _), _ = scratch[0]  # the ring: x, scale and the halves' slices
    rows_per_block, half = x_ring.shape[1], lo_ring.shape[-1]
    rows = pl.ds(lax.axis_index("rows") * rows_per_block, rows_per_block)
    head = lax.axis_index("head")
    halves = (pl.ds(0, half), pl.ds(half, half))

    def weight_copy(i):
        def copy(k, dst, barrier):
            depth = pl.ds(k * SLICE, SLICE)
            pl.when(head < heads)(lambda: plgpu.copy_gmem_to_smem(
                wq_ref.at[depth, head, halves[i]], dst, barrier))
            for w_ref, which in ((wk_ref, heads), (wv_ref, heads + 1)):
                pl.when(head == which)(functools.partial(
                    lambda w_ref: plgpu.copy_gmem_to_smem(w_ref.at[depth, halves[i]], dst,
                                                          barrier), w_ref))
        return copy

    def epilogue(c, accs, mine, staging, extra):
        lo, hi = accs
        cos_stage, sin_stage, lo_stage, hi_stage = staging
        (angles_ready,) = extra

        def store(out_lo, out_hi, out_window):
            lo_stage.at[c][...] = out_lo.astype(lo_stage.dtype)
            hi_stage.at[c][...] = out_hi.astype(hi_stage.dtype)
            plgpu.commit_smem()
            for stage, columns in zip((lo_stage, hi_stage), halves):
                plgpu.copy_smem_to_gmem(stage.at[c], out_window(columns))
            plgpu.wait_smem_to_gmem(0)

        @pl.when(head <= heads)  # the query heads and the key head: rotated
        def _rotated():
            for i, (src, stage) in enumerate(((cos_ref, cos_stage), (sin_ref, sin_stage))):
                plgpu.copy_gmem_to_smem(src.at[mine], stage.at[c], angles_ready.at[2 * c + i])
            for i in range(2):
                plgpu.barrier_wait(angles_ready.at[2 * c + i])
            cos, sin = (mosaic_load(stage.at[c], plgpu.Layout.WGMMA)
                        for stage in (cos_stage, sin_stage))
            out_lo, out_hi = lo * cos - hi * sin, hi * cos + lo * sin
            pl.when(head < heads)(lambda: store(out_lo, out_hi,
                                                lambda cols: q_ref.at[mine, head, cols]))
            pl.when(head == heads)(lambda: store(out_lo, out_hi,
                                                 lambda cols: k_ref.at[mine, cols]))

        pl.when(head == heads + 1)(lambda: store(lo, hi, lambda cols: v_ref.at[mine, cols]))

    projection(x_ref, mean_ref, rstd_ref, scale_ref, rows, (weight_copy(0), weight_copy(1)),
               scratch, n_d=n_d, interpret=interpret, epilogue=epilogue)


def _for_triton(settings: pallas.Settings) -> pallas.Settings:
    """gpu.py's settings for its backward kernels: the same tiles, interpreted by the generic
    interpreter when this forward is by the Mosaic GPU one."""
    return dataclasses.replace(settings, interpret=bool(settings.interpret))


def backward_rows(settings: pallas.Settings, x2, norm_scale, wq, wk, wv, pos, mean, rstd, dq, dk,
                  dv):
    """gpu.py's backward (pallas.py's backend interface)."""
    return gpu.backward_rows(_for_triton(settings), x2, norm_scale, wq, wk, wv, pos, mean, rstd,
                             dq, dk, dv)


# The Mosaic GPU `norm_qkv_rope` (the front door's arguments but impl; block_sizes a
# `kernels.norm_qkv_rope.mgpu.BlockSizes`), and pallas.py's interface functions, on this
# module's kernels (`kernels.block_in` calls the latter).
norm_qkv_rope_pallas_mosaic_gpu = functools.partial(pallas.norm_qkv_rope_pallas,
                                                    sys.modules[__name__])
forward_with_stats = functools.partial(pallas.forward_with_stats, sys.modules[__name__])
backward_to_dh = functools.partial(pallas.backward_to_dh, sys.modules[__name__])
