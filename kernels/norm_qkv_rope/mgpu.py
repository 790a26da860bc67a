"""The Mosaic GPU `norm_qkv_rope` (Hopper: TMA, wgmma, warp specialisation), forward and
backward: `impl="pallas_mosaic_gpu"`.

Why: as kernels/norm_swiglu/mgpu.py, the fused projections' bar is 0.9x a bare matmul, which
needs Hopper's whole tensor-core pipeline. The thread block is `kernels._mgpu.matmul`, as
norm_swiglu's Mosaic forward: a producer streaming LN(x) and weight slices through a ring of
shared-memory buffers, consumers of 64 rows each feeding wgmma from there. LN(x) is one XLA
fusion first ([M, D] in x's dtype), for the reason norm_swiglu/mgpu.py gives: normalising in
the consumers' registers kept the tensor cores waiting (the H200 run: this forward at 423
TFLOP/s at PaLM-8B widths, 0.92x XLA's unfused projection).

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

Budget at PaLM's K = 256 (bf16, 128 rows, 4 buffers): per slot LN(x) 16 KiB and the two
weight halves 2 x 64 x 128 x 2 = 32 KiB: 192 KiB; the epilogue's cos and sin (2 x 128 x 128 x
4 = 128 KiB) and the two output halves (64 KiB) reuse it. Registers: the two halves'
accumulators 64 + 64 per thread, as norm_swiglu's gate and up. FLOPs are gpu.py's forward's
(2 M D (H+2) K); LN(x) is read once per head, from L2 after the first.

Shapes: K/2 must be 64 or 128 (K = 128 or 256: a half is one or two 64-column swizzled rows,
and the accumulators fit); M and D are zero-padded to whole tiles (zero rows and features add
nothing). bf16 only. Other K, or f32, raise an error naming
`pallas_gpu`.

The backward (the same residuals: the inputs and the row statistics) is two streamed matmuls
(`_mgpu.matmul`, [block_rows, 128] output tiles, a ring of 64-deep slices) after one XLA fusion:
  * g [M, (H+2)K] in x's dtype: dq and dk rotated back (R⁻¹: g1 = c1 cos + c2 sin, g2 = c2 cos -
    c1 sin; rope_reference at the negated positions, f32) and dv, the heads side by side,
    rounded once as gpu.py rounds them for its dots. Rotating in XLA costs one extra pass over
    the cotangents (18 MiB read, 18 MiB written at PaLM-8B, M = 2048: ~11 us of HBM against
    the two matmuls' ~160 us at the tensor cores' peak), and buys two plain matmuls: a
    register prologue (gpu.py's) would hold cos and sin beside the accumulators.
  * dh (`palm_norm_qkv_rope_bwd_dx_mosaic`) [M, D] = g·[wq | wk | wv]ᵀ over the (H+2)K
    columns: the producer switches from wq (viewed [D, H·K], no copy) to wk to wv along the
    contraction (`_mgpu.summed_products`), the weight slices [128, 64] read transposed by wgmma.
  * dW (`palm_norm_qkv_rope_bwd_dw_mosaic`) [D, (H+2)K] = LN(x)ᵀ·g over the rows, LN(x)
    materialised once by XLA (as norm_swiglu's dw) and its slices read transposed; each
    128-column tile lies in one head (K = 128 or 256), so its thread block writes dwq, dwk or
    dwv directly.
Shared memory: 4 x (128 + 128) x 64 x 2 = 128 KiB for either. `BlockSizes.mosaic_bwd=False`
runs gpu.py's Triton backward instead.

What CPU checks cover is kernels/norm_swiglu/mgpu.py's: the Mosaic GPU interpreter on jax >=
0.11 against the reference (the wgmmas as plain dots), the CUDA export on both
jax versions; PTX, registers and speed need the GPU (tools/gpu_check.sh).
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

from kernels._common import MOSAIC_GPU_DTYPES, layer_norm_rows, pad2, pad_to, round_up
from kernels._gpu import SHARED_MEMORY_BYTES, check_shared_memory, mosaic_gpu_interpret
from kernels._gpu import mosaic_load
from kernels._mgpu import SLICE, WG_ROWS, check_block_sizes, launch, matmul, matmul_scratch_bytes
from kernels._mgpu import matmul_scratch, store, summed_products, swizzled, window_copy
from kernels.norm_qkv_rope import gpu, pallas
from kernels.rope.reference import rope_angles, rope_reference

IMPL = "pallas_mosaic_gpu"
HALVES = (64, 128)  # K / 2: one or two swizzled rows of 64 two-byte columns
# The backward's output tiles' columns: D's (dh), or (H+2)K's (dW), where a tile then lies in one
# head (K = 128 or 256), so in one of wq, wk, wv.
BWD_COLUMNS = 128


def mosaic_takes(wq) -> bool:
    """Whether this module's kernels take a head dim of wq [D, H, K]'s (K / 2 in HALVES);
    `auto` runs its second choice for others (`kernels._common.resolve_impl`)."""
    return wq.shape[-1] // 2 in HALVES


@dataclasses.dataclass(frozen=True)
class BlockSizes(gpu.BlockSizes):
    """gpu.BlockSizes whose forward tiles drive the Mosaic GPU kernels: block_rows 64 or 128
    (one or two consumer warpgroups; the rows of every kernel's output tiles: M's, or D's for
    dW), block_d the slice of 64; `buffers` is the depth of the ring of slices in shared memory
    (>= 2). `mosaic_bwd` False runs gpu.py's Triton backward instead, on the *_bwd tiles and
    warps (the fallback, and the comparison, on a GPU)."""

    buffers: int = 4
    mosaic_bwd: bool = True

    def __post_init__(self):
        super().__post_init__()
        check_block_sizes(self, rows="block_rows", depth="block_d", flags=("mosaic_bwd",))

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
    """The forward's shared memory: the ring (LN(x) and the two halves' weight slices), which
    the epilogue's cos, sin and output halves reuse."""
    item, half, rows = jnp.dtype(dtype).itemsize, head_dim // 2, blocks.block_rows
    staging = 2 * rows * half * 4 + 2 * rows * half * item
    return matmul_scratch_bytes(rows, half, item, blocks.buffers, staging, n_b=2)


def prepare(x, norm_scale, wq, wk, wv, positions, *, eps: float, base: float = 10000.0,
            interpret=None, block_sizes: BlockSizes | None = None) -> pallas.Settings:
    """The call's `Settings` (pallas.py): the arguments checked (bf16, K = 128 or 256), default
    tiles for the shape, every kernel's shared memory checked."""
    block_sizes = pallas.check_pallas_args(sys.modules[__name__], x, norm_scale, wq, wk, wv,
                                           positions, block_sizes)
    if x.dtype not in MOSAIC_GPU_DTYPES:
        raise ValueError(f"norm_qkv_rope: impl={IMPL!r} takes bfloat16 x (wgmma operands), got "
                         f"{x.dtype}; use impl='pallas_gpu'")
    if not mosaic_takes(wq):
        raise ValueError(f"norm_qkv_rope: impl={IMPL!r} takes head dims 128 or 256 (RoPE's "
                         f"halves of 64 or 128 columns), got {wq.shape[2]}; use "
                         "impl='pallas_gpu'")
    sizes = {"forward": forward_shared_memory_bytes(block_sizes, wq.shape[2], x.dtype)}
    if block_sizes.mosaic_bwd:  # dh and dW: a ring of A and B slices, the output tile reusing it
        rows, item = block_sizes.block_rows, x.dtype.itemsize
        sizes["bwd_dx"] = sizes["bwd_dw"] = matmul_scratch_bytes(
            rows, BWD_COLUMNS, item, block_sizes.buffers, rows * BWD_COLUMNS * item)
    else:
        triton = gpu.shared_memory_bytes(x.shape, wq.shape, x.dtype, block_sizes)
        sizes.update(bwd_dx=triton["bwd_dx"], bwd_dw=triton["bwd_dw"])
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
    # LN(x) [Mp, Dp] (mean, rstd [M, 1]), rounded as the reference rounds it.
    x = pad2(layer_norm_rows(x2, mean, rstd, norm_scale).astype(x2.dtype), mp, dp)
    cos, sin = (pad2(a, mp, half) for a in rope_angles(pos, k, settings.base))  # f32 [Mp, K/2]
    wq, wk, wv = (pad_to(w, (dp, *w.shape[1:])) for w in (wq, wk, wv))
    staging = (*(swizzled((consumers, WG_ROWS, half), jnp.float32) for _ in range(2)),  # cos, sin
               *(swizzled((consumers, WG_ROWS, half), x.dtype) for _ in range(2)))  # out halves
    scratch = matmul_scratch(rows, half, x.dtype, buffers, staging, n_b=2,
                             extra=(plgpu.Barrier(num_barriers=2 * consumers),))  # cos, sin
    kernel = functools.partial(_fwd_kernel, n_d=dp // SLICE, heads=heads,
                               interpret=bool(settings.interpret))
    out_type = [jax.ShapeDtypeStruct((mp, heads, k), x.dtype),
                *(jax.ShapeDtypeStruct((mp, k), x.dtype),) * 2]
    q, k_out, v = launch(
        kernel, scratch, name="palm_norm_qkv_rope_fwd_mosaic", out_type=out_type,
        grid=(mp // rows, heads + 2), grid_names=("rows", "head"), threads=consumers + 1,
        interpret=settings.interpret, scope=f"bm={rows} bd={SLICE} buffers={buffers}",
    )(x, cos, sin, wq, wk, wv)
    return q[:m], k_out[:m], v[:m]


def _fwd_kernel(xn_ref, cos_ref, sin_ref, wq_ref, wk_ref, wv_ref, q_ref, k_ref, v_ref, *scratch,
                n_d: int, heads: int, interpret: bool):
    """One [block_rows, K] tile of one head (module docstring): `_mgpu.matmul` of LN(x)'s rows
    and the head's two halves, then RoPE (not for the value head)."""
    (a_ring, lo_ring, _), _ = scratch[0]  # the ring: LN(x) and the halves' slices
    rows_per_block, half = a_ring.shape[1], lo_ring.shape[-1]
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

    def epilogue(c, accs, staging, extra):
        mine = pl.ds(rows.start + c * WG_ROWS, WG_ROWS)
        lo, hi = accs
        cos_stage, sin_stage, lo_stage, hi_stage = staging
        (angles_ready,) = extra

        def write_halves(out_lo, out_hi, out_window):
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
            pl.when(head < heads)(lambda: write_halves(
                out_lo, out_hi, lambda cols: q_ref.at[mine, head, cols]))
            pl.when(head == heads)(lambda: write_halves(
                out_lo, out_hi, lambda cols: k_ref.at[mine, cols]))

        pl.when(head == heads + 1)(lambda: write_halves(
            lo, hi, lambda cols: v_ref.at[mine, cols]))

    matmul(window_copy(lambda k: xn_ref.at[rows, pl.ds(k * SLICE, SLICE)]),
           (weight_copy(0), weight_copy(1)), scratch, n_steps=n_d, interpret=interpret,
           epilogue=epilogue)


def _for_triton(settings: pallas.Settings) -> pallas.Settings:
    """gpu.py's settings for its backward kernels (`mosaic_bwd=False`): the same tiles,
    interpreted by the generic interpreter when this forward is by the Mosaic GPU one."""
    return dataclasses.replace(settings, interpret=bool(settings.interpret))


def backward_rows(settings: pallas.Settings, x2, norm_scale, wq, wk, wv, pos, mean, rstd, dq, dk,
                  dv):
    """The backward on rows (pallas.py's backend interface): the cotangents rotated back by
    XLA into g [M, (H+2)K], then dh = g·[wq | wk | wv]ᵀ and dW = LN(x)ᵀ·g, two `_mgpu.matmul`
    kernels (module docstring); gpu.py's Triton kernels with `mosaic_bwd=False`."""
    if not settings.block_sizes.mosaic_bwd:
        return gpu.backward_rows(_for_triton(settings), x2, norm_scale, wq, wk, wv, pos, mean,
                                 rstd, dq, dk, dv)
    g = _rotated_back(pos, dq, dk, dv, settings.base)
    dh = _bwd_dx_call(settings, g, wq, wk, wv)
    xn = layer_norm_rows(x2, mean, rstd, norm_scale).astype(x2.dtype)  # [M, D]
    return dh, _bwd_dw_call(settings, xn, g, wq.shape)


def _rotated_back(pos, dq, dk, dv, base: float):
    """g [M, (H+2)K] in x's dtype: the cotangents of q and k rotated back, dv as it is, heads
    side by side; one XLA fusion. R⁻¹, the transpose of RoPE's rotation, is RoPE by -angle:
    the reference's at the negated positions (f32, rounded once)."""
    m, heads, k = dq.shape

    def back(c):  # [M, ...] -> [1, M, ...] for rope_reference's [B, T, ...]
        return rope_reference(c[None], -pos[None], base=base)[0]

    return jnp.concatenate([back(dq).reshape(m, heads * k), back(dk), dv], axis=1)


def _bwd_dx_call(settings: pallas.Settings, g, wq, wk, wv):
    """dh [M, D] in x's dtype = g·[wq | wk | wv]ᵀ: [block_rows, BWD_COLUMNS] tiles of M x D,
    the contraction over the H + 2 heads' K columns in slices of 64 whose producer switches
    from wq to wk to wv (nothing concatenated), the weight slices [BWD_COLUMNS, 64] read
    transposed by wgmma."""
    blocks = settings.block_sizes
    rows, buffers = blocks.block_rows, blocks.buffers
    consumers = rows // WG_ROWS
    (m, n), (d, heads, k) = g.shape, wq.shape
    mp, dp = round_up(m, rows), round_up(d, BWD_COLUMNS)
    gp = pad_to(g, (mp, n))
    wq2 = pad_to(wq.reshape(d, heads * k), (dp, heads * k))
    wk, wv = (pad_to(w, (dp, k)) for w in (wk, wv))
    scratch = matmul_scratch(rows, BWD_COLUMNS, g.dtype, buffers,
                             swizzled((consumers, WG_ROWS, BWD_COLUMNS), g.dtype),
                             transposed_b=True)
    n_q, n_head = heads * k // SLICE, k // SLICE
    kernel = functools.partial(summed_products, (n_q + 2 * n_head,), (n_q, n_head, n_head),
                               interpret=bool(settings.interpret))
    dh = launch(kernel, scratch, name="palm_norm_qkv_rope_bwd_dx_mosaic",
                out_type=jax.ShapeDtypeStruct((mp, dp), g.dtype),
                grid=(mp // rows, dp // BWD_COLUMNS), grid_names=("rows", "cols"),
                threads=consumers + 1, interpret=settings.interpret,
                scope=f"bm={rows} bd={BWD_COLUMNS} bk={SLICE} buffers={buffers}",
                )(gp, wq2, wk, wv)
    return dh[:m, :d]


def _bwd_dw_call(settings: pallas.Settings, xn, g, wq_shape):
    """(dwq [D, H, K], dwk, dwv [D, K]) in x's dtype = LN(x)ᵀ·g: [block_rows, BWD_COLUMNS]
    tiles of D x (H+2)K (each within one head's K, so its thread block writes one of the three
    arrays), the contraction over M in slices of 64, LN(x)'s slices read transposed."""
    blocks = settings.block_sizes
    rows, buffers = blocks.block_rows, blocks.buffers
    consumers = rows // WG_ROWS
    (m, d), n, (_, heads, k) = xn.shape, g.shape[1], wq_shape
    mp, dp = round_up(m, SLICE), round_up(d, rows)
    xnp, gp = pad2(xn, mp, dp), pad_to(g, (mp, n))
    scratch = matmul_scratch(rows, BWD_COLUMNS, xn.dtype, buffers,
                             swizzled((consumers, WG_ROWS, BWD_COLUMNS), xn.dtype),
                             transposed_a=True)
    kernel = functools.partial(_bwd_dw_kernel, n_rows=mp // SLICE,
                               interpret=bool(settings.interpret))
    dwq, dwk, dwv = launch(
        kernel, scratch, name="palm_norm_qkv_rope_bwd_dw_mosaic",
        out_type=[jax.ShapeDtypeStruct((dp, heads * k), xn.dtype),
                  *(jax.ShapeDtypeStruct((dp, k), xn.dtype),) * 2],
        grid=(dp // rows, n // BWD_COLUMNS), grid_names=("rows", "cols"), threads=consumers + 1,
        interpret=settings.interpret, scope=f"bd={rows} bn={BWD_COLUMNS} bm={SLICE} "
                                            f"buffers={buffers}")(xnp, gp)
    return dwq[:d].reshape(d, heads, k), dwk[:d], dwv[:d]


def _bwd_dw_kernel(xn_ref, g_ref, dwq_ref, dwk_ref, dwv_ref, *scratch, n_rows: int,
                   interpret: bool):
    """One [block_rows, BWD_COLUMNS] tile of [dwq | dwk | dwv] (rows of D), written to the
    array its columns fall in."""
    (a_ring, b_ring), _ = scratch[0]
    bd, bn = a_ring.shape[-1], b_ring.shape[-1]
    features = pl.ds(lax.axis_index("rows") * bd, bd)
    start = lax.axis_index("cols") * bn
    q_end, k_end = dwq_ref.shape[1], dwq_ref.shape[1] + dwk_ref.shape[1]
    depth = lambda k: pl.ds(k * SLICE, SLICE)  # noqa: E731

    def epilogue(c, accs, stage, extra):
        (acc,) = accs
        mine = pl.ds(features.start + c * WG_ROWS, WG_ROWS)
        store(stage.at[c], acc, (
            (start < q_end, dwq_ref.at[mine, pl.ds(start, bn)]),
            ((start >= q_end) & (start < k_end), dwk_ref.at[mine, pl.ds(start - q_end, bn)]),
            (start >= k_end, dwv_ref.at[mine, pl.ds(start - k_end, bn)])))

    matmul(window_copy(lambda k: xn_ref.at[depth(k), features]),
           (window_copy(lambda k: g_ref.at[depth(k), pl.ds(start, bn)]),), scratch,
           n_steps=n_rows, interpret=interpret, epilogue=epilogue, transposed_a=True)


# The Mosaic GPU `norm_qkv_rope` (the front door's arguments but impl; block_sizes a
# `kernels.norm_qkv_rope.mgpu.BlockSizes`), and pallas.py's interface functions, on this
# module's kernels (`kernels.block_in` calls the latter).
norm_qkv_rope_pallas_mosaic_gpu = functools.partial(pallas.norm_qkv_rope_pallas,
                                                    sys.modules[__name__])
forward_with_stats = functools.partial(pallas.forward_with_stats, sys.modules[__name__])
backward_to_dh = functools.partial(pallas.backward_to_dh, sys.modules[__name__])
