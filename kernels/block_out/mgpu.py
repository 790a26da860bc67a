"""The Mosaic GPU `block_out` (Hopper: TMA, wgmma, warp specialisation), forward and activation
gradients: `impl="pallas_mosaic_gpu"`.

Why: the fused projections' bar is 0.9x a bare matmul of the same shape, which needs Hopper's
whole tensor-core pipeline (kernels/_mgpu.py; the same structure as the input projections'
Mosaic forwards, kernels/norm_swiglu/mgpu.py).

The math is gpu.py's and tpu.py's: out = x + o·wo + h·w_down on the flattened [M = B*T, ...]
views, the two products summed in one f32 accumulator over the contraction C = [H*K | F]
without concatenating anything.

  * grid (M / block_t, D / block_d); a thread block owns a [block_t, block_d] output tile,
    `block_t / 64` consumer warpgroups of 64 rows (wgmma's M) and one producer.
  * producer: for each of the C / 64 contraction steps, the activation slice [block_t, 64]
    (of o for the first H*K / 64 steps, then of h) and the weight slice [64, block_d] (of wo,
    then of w_down) into ring slot step % buffers by TMA (`_mgpu.produce`).
  * consumer: per step acc += a[its 64 rows] @ w, one wgmma with both operands in shared
    memory; f32 acc [64, block_d]. Once every consumer is past its last wgmma, the residual
    tile x [64, block_d] comes by TMA into the ring's memory, acc + x leaves through it.

Budget at the defaults (bf16, block_t = 128, block_d = 256, 4 buffers): each slot holds the
activation slice 16 KiB and the weight slice 64 x 256 x 2 = 32 KiB: 192 KiB; the residual
tiles (64 KiB) reuse it. Registers: acc 128 per thread. Per step a consumer reads 8 KiB of
activations and 32 KiB of weights from shared memory for 64 x 256 x 64 multiply-adds: for both
consumers 1,024 tensor-core cycles at 2,048 per cycle for the SM against 640 cycles of
shared-memory reads at 128 bytes per cycle, so the tensor cores bound it. FLOPs and HBM bytes
are gpu.py's forward's (2 M D (H*K + F)).

The backward's activation gradients, do = dy·woᵀ and dh = dy·w_downᵀ, are one kernel as in
gpu.py (`palm_block_out_bwd_dact_mosaic`): grid (M / block_t, (H*K + F) / block_d), a thread
block owning a [block_t, block_d] tile of do (column tiles below H*K / block_d) or of dh, the
same streamed matmul over D with the weight slices [block_d, 64] stored as they are in HBM
and read transposed by wgmma. The weight gradients are XLA's, as on every backend.

Shapes: M, D, H*K and F are zero-padded to whole tiles (padded contraction entries multiply
zeros); bf16 only (an f32 x raises, naming `pallas_gpu`). What CPU checks cover is
kernels/norm_swiglu/mgpu.py's: the Mosaic GPU interpreter on jax >= 0.11 against the
reference (the wgmmas as plain dots), the CUDA export on both jax versions; PTX, registers and
speed need the GPU (tools/gpu_check.sh).
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

from kernels._common import MOSAIC_GPU_DTYPES, pad2, round_up
from kernels._gpu import SHARED_MEMORY_BYTES, check_shared_memory, mosaic_gpu_interpret
from kernels._gpu import mosaic_load
from kernels._mgpu import SLICE, WG_ROWS, check_block_sizes, launch, matmul, matmul_scratch_bytes
from kernels._mgpu import matmul_scratch, segments, store, swizzled, window_copy
from kernels.block_out import gpu
from kernels.block_out.pallas import Settings, block_out_pallas

IMPL = "pallas_mosaic_gpu"


@dataclasses.dataclass(frozen=True)
class BlockSizes(gpu.BlockSizes):
    """gpu.BlockSizes whose forward tiles drive both Mosaic GPU kernels (the *_bwd fields only
    name the backward's profile scope): block_t 64 or 128 rows (one or two consumer
    warpgroups), block_d 64, 128 or 256 output columns (D in the forward, [H*K | F] in the
    backward; the f32 acc takes block_d / 2 registers per thread), block_c the slice of 64;
    `buffers` is the depth of the ring of slices in shared memory (>= 2)."""

    block_d: int = 256
    buffers: int = 4

    def __post_init__(self):
        super().__post_init__()
        check_block_sizes(self, rows="block_t", depth="block_c",
                          columns=(("block_d", (64, 128, 256)),))

    @classmethod
    def get_default(cls, rows: int, d_model: int, attn_width: int, d_ff: int,
                    dtype=jnp.bfloat16) -> BlockSizes:
        """gpu.py's backward tiles; the forward's 128 x 256 tiles (64 rows for 64 rows or fewer,
        the output width no wider than D needs) with as many buffers (<= 4) as fit."""
        backward = gpu.BlockSizes.get_default(rows, d_model, attn_width, d_ff, dtype)
        width = next(w for w in (64, 128, 256) if w >= min(d_model, 256))
        blocks = cls(**{**dataclasses.asdict(backward), "block_c": SLICE, "block_d": width,
                        "block_t": 2 * WG_ROWS if rows > WG_ROWS else WG_ROWS})
        while (blocks.buffers > 2
               and forward_shared_memory_bytes(blocks, dtype) > SHARED_MEMORY_BYTES):
            blocks = dataclasses.replace(blocks, buffers=blocks.buffers - 1)
        return blocks


def forward_shared_memory_bytes(blocks: BlockSizes, dtype) -> int:
    """The forward's: the ring of activation and weight slices (the residual tiles reuse it)."""
    item = jnp.dtype(dtype).itemsize
    return matmul_scratch_bytes(blocks.block_t, blocks.block_d, item, blocks.buffers,
                                blocks.block_t * blocks.block_d * item)


def check_tiles(block_sizes: BlockSizes, dtype) -> None:
    """The Mosaic forward's dtype, then each kernel's shared memory (pallas.py's interface)."""
    if jnp.dtype(dtype) not in MOSAIC_GPU_DTYPES:
        raise ValueError(f"block_out: impl={IMPL!r} takes bfloat16 x (wgmma operands), got "
                         f"{jnp.dtype(dtype).name}; use impl='pallas_gpu'")
    # The backward's kernel has the forward's tiles and ring ([block_t, block_d] of [do | dh]).
    sizes = {"fwd": forward_shared_memory_bytes(block_sizes, dtype)}
    for kernel, used in sizes.items():
        check_shared_memory(used, f"palm_block_out {kernel} {block_sizes} (impl={IMPL!r})")


def forward(settings: Settings, x2, o2, wo2, h2, w_down) -> jax.Array:
    """x + o·wo + h·w_down on the flattened [M, ...] views (module docstring)."""
    blocks = settings.block_sizes
    bt, bd, buffers = blocks.block_t, blocks.block_d, blocks.buffers
    consumers = bt // WG_ROWS
    (m, d), hk, f = x2.shape, wo2.shape[0], w_down.shape[0]
    mp, dp, hkp, fp = round_up(m, bt), round_up(d, bd), round_up(hk, SLICE), round_up(f, SLICE)
    x, o, h = pad2(x2, mp, dp), pad2(o2, mp, hkp), pad2(h2, mp, fp)
    wo, wd = pad2(wo2, hkp, dp), pad2(w_down, fp, dp)
    scratch = matmul_scratch(bt, bd, x.dtype, buffers,
                             swizzled((consumers, WG_ROWS, bd), x.dtype),  # residual, in and out
                             extra=(plgpu.Barrier(num_barriers=consumers),))  # residual ready
    kernel = functools.partial(_fwd_kernel, n_attn=hkp // SLICE, n_mlp=fp // SLICE,
                               interpret=bool(settings.interpret))
    out = launch(kernel, scratch, name="palm_block_out_fwd_mosaic",
                 out_type=jax.ShapeDtypeStruct((mp, dp), x.dtype), grid=(mp // bt, dp // bd),
                 grid_names=("rows", "cols"), threads=consumers + 1,
                 interpret=settings.interpret,
                 scope=f"bt={bt} bd={bd} bc={SLICE} buffers={buffers}")(x, o, wo, h, wd)
    return out[:m, :d]


def _fwd_kernel(x_ref, o_ref, wo_ref, h_ref, wd_ref, out_ref, *scratch, n_attn: int,
                n_mlp: int, interpret: bool):
    """One [block_t, block_d] output tile (module docstring): `_mgpu.matmul` over both
    products, then the residual."""
    (a_ring, w_ring), _ = scratch[0]
    bt, bd = a_ring.shape[1], w_ring.shape[-1]
    rows = pl.ds(lax.axis_index("rows") * bt, bt)
    cols = pl.ds(lax.axis_index("cols") * bd, bd)
    depth = lambda k: pl.ds(k * SLICE, SLICE)  # noqa: E731

    def epilogue(c, accs, x_stage, extra):
        (acc,) = accs
        (x_ready,) = extra
        mine = pl.ds(rows.start + c * WG_ROWS, WG_ROWS)
        plgpu.copy_gmem_to_smem(x_ref.at[mine, cols], x_stage.at[c], x_ready.at[c])
        plgpu.barrier_wait(x_ready.at[c])
        out = acc + mosaic_load(x_stage.at[c], plgpu.Layout.WGMMA).astype(jnp.float32)
        store(x_stage.at[c], out, ((True, out_ref.at[mine, cols]),))

    matmul(segments((lambda k: o_ref.at[rows, depth(k)], n_attn),
                    (lambda k: h_ref.at[rows, depth(k)], n_mlp)),
           (segments((lambda k: wo_ref.at[depth(k), cols], n_attn),
                     (lambda k: wd_ref.at[depth(k), cols], n_mlp)),),
           scratch, n_steps=n_attn + n_mlp, interpret=interpret, epilogue=epilogue)


def backward_dact(settings: Settings, dy2, wo2, w_down):
    """do [M, H*K] and dh [M, F] = dy·woᵀ and dy·w_downᵀ in one kernel (module docstring)."""
    blocks = settings.block_sizes
    bt, bc, buffers = blocks.block_t, blocks.block_d, blocks.buffers
    consumers = bt // WG_ROWS
    (m, d), hk, f = dy2.shape, wo2.shape[0], w_down.shape[0]
    mp, dp, hkp, fp = round_up(m, bt), round_up(d, SLICE), round_up(hk, bc), round_up(f, bc)
    dy, wo, wd = pad2(dy2, mp, dp), pad2(wo2, hkp, dp), pad2(w_down, fp, dp)
    scratch = matmul_scratch(bt, bc, dy.dtype, buffers,
                             swizzled((consumers, WG_ROWS, bc), dy.dtype), transposed_b=True)
    kernel = functools.partial(_bwd_dact_kernel, n_attn=hkp // bc, n_d=dp // SLICE,
                               interpret=bool(settings.interpret))
    do, dh = launch(kernel, scratch, name="palm_block_out_bwd_dact_mosaic",
                    out_type=[jax.ShapeDtypeStruct((mp, hkp), dy.dtype),
                              jax.ShapeDtypeStruct((mp, fp), dy.dtype)],
                    grid=(mp // bt, (hkp + fp) // bc), grid_names=("rows", "cols"),
                    threads=consumers + 1, interpret=settings.interpret,
                    scope=f"bt={bt} bc={bc} bd={SLICE} buffers={buffers}")(dy, wo, wd)
    return do[:m, :hk], dh[:m, :f]


def _bwd_dact_kernel(dy_ref, wo_ref, wd_ref, do_ref, dh_ref, *scratch, n_attn: int, n_d: int,
                     interpret: bool):
    """One [block_t, block_d] tile of [do | dh]: column tiles below n_attn are do's (from wo),
    the others dh's (from w_down); `_mgpu.matmul` over D with the weight slices transposed."""
    (a_ring, w_ring), _ = scratch[0]
    bt, bc = a_ring.shape[1], w_ring.shape[1]
    rows = pl.ds(lax.axis_index("rows") * bt, bt)
    tile = lax.axis_index("cols")
    attention = tile < n_attn
    out_cols = (pl.ds(tile * bc, bc), pl.ds((tile - n_attn) * bc, bc))  # in do, in dh
    depth = lambda k: pl.ds(k * SLICE, SLICE)  # noqa: E731

    def weight_copy(k, dst, barrier):
        pl.when(attention)(lambda: plgpu.copy_gmem_to_smem(wo_ref.at[out_cols[0], depth(k)],
                                                           dst, barrier))
        pl.when(~attention)(lambda: plgpu.copy_gmem_to_smem(wd_ref.at[out_cols[1], depth(k)],
                                                            dst, barrier))

    def epilogue(c, accs, stage, extra):
        (acc,) = accs
        mine = pl.ds(rows.start + c * WG_ROWS, WG_ROWS)
        store(stage.at[c], acc, ((attention, do_ref.at[mine, out_cols[0]]),
                                 (~attention, dh_ref.at[mine, out_cols[1]])))

    matmul(window_copy(lambda k: dy_ref.at[rows, depth(k)]), (weight_copy,), scratch, n_steps=n_d,
           interpret=interpret, epilogue=epilogue, transposed_b=True)


def block_out_pallas_mosaic_gpu(x, o, wo, h, w_down, *, interpret=None,
                                block_sizes: BlockSizes | None = None) -> jax.Array:
    """The Mosaic GPU kernels (module docstring): `block_out`'s arrays,
    interpret (None, a bool or a `plgpu.InterpretGPUParams`) and block_sizes (None:
    `BlockSizes.get_default`)."""
    return block_out_pallas(sys.modules[__name__], x, o, wo, h, w_down,
                            interpret=mosaic_gpu_interpret(interpret), block_sizes=block_sizes)
