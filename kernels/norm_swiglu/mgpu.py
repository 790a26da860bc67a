"""The Mosaic GPU `norm_swiglu` forward (Hopper: TMA, wgmma, warp specialisation), with gpu.py's
Triton backward: `impl="pallas_mosaic_gpu"`.

Why a second GPU forward: the issue's bar for the fused projections is 0.9x a bare matmul of
the same shape (cuBLAS through XLA), which needs Hopper's full tensor-core pipeline: operands
streamed by TMA while wgmma runs, without registers spent on addresses. Triton reaches wgmma
too, but not warp specialisation; Mosaic GPU lets the kernel split its warpgroups by role as
kernels/_mgpu.py describes, the same way as the attention kernels (kernels/mq_flash_attention/
mgpu.py).

The math and the residuals are tpu.py's and gpu.py's: h = silu(LN(x) w_gate) * (LN(x) w_up),
rows the flattened B*T axis (M), LN(x) rounded to x's dtype before the products, the row
statistics (mean, rstd f32 [M]) from `kernels._common.row_stats` in XLA.

  * grid (M / block_t, F / block_f); a thread block owns a [block_t, block_f] tile of h,
    `block_t / 64` consumer warpgroups of 64 rows (wgmma's M) and one producer.
  * producer: for each of the D / 64 contraction steps, the x slice [block_t, 64], the scale
    slice [64] and the w_gate and w_up slices [64, block_f] into ring slot step % buffers by
    TMA, once the consumers have released what the slot held (`_mgpu.produce`).
  * consumer: its rows' mean and rstd once; per step its x slice [64, 64] from shared memory
    into registers, normalised there ((x - mean) rstd scale, rounded to x's dtype: the
    LayerNorm costs no extra pass over memory), then gate += xn w_gate and up += xn w_up as
    two wgmmas with xn from registers (f32 accumulators [64, block_f] each, issued together,
    awaited once). The epilogue h = silu(gate) up (and gate, up with `save_gate_up`) leaves
    through shared memory by TMA: the ring's memory, once every consumer is past its last
    wgmma (`plgpu.RefUnion`, one meeting of the consumers).

Budget at the defaults (bf16, block_t = block_f = 128, the slice 64, 4 buffers): each slot
holds x 128 x 64 x 2 = 16 KiB, the two weight slices 2 x 64 x 128 x 2 = 32 KiB and the scale
256 B: 193 KiB for 4, under the 227 KiB of a thread block; the outputs' staging (3 x 128 x 128
x 2 = 96 KiB with save_gate_up) reuses it. Registers: gate and up 64 + 64 per thread, the x
slice 32 as f32, the statistics; within the consumers' 232. Per step a consumer reads 16 KiB
of weights and 8 KiB of x from shared memory for 64 x 256 x 64 multiply-adds (512 tensor-core
cycles at 2,048 per cycle for the SM, both consumers sharing them): the tensor cores, not
shared memory (128 bytes per cycle), bound it. FLOPs and HBM bytes are gpu.py's: 4 M D F, the
weights read once per row tile (from L2 after the first), x once per F tile.

The backward is gpu.py's Triton kernels on the same residuals (its *_bwd tiles); the gates
recompute there, so `save_gate_up` saves their forward here as everywhere.

Shapes: M, D, F zero-padded to whole tiles (padded rows have rstd 0 and padded features scale
0, so they add nothing); bf16 or f16 only (wgmma's operands here: an f32 x raises, naming
`pallas_gpu`).

What CPU checks cover: on jax >= 0.11 the Mosaic GPU interpreter runs the kernel on CPU (TMA,
barriers, the warpgroups as threads, with race detection) against the reference; the wgmmas
from registers are plain dots there (`_mgpu.accumulate`) and run natively only in the tests
marked `gpu`. Exporting for CUDA from CPU runs the whole Pallas-to-Mosaic-GPU lowering on both
jax versions. Not covered: PTX compilation, register allocation and speed (tools/gpu_check.sh).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels._common import MOSAIC_GPU_DTYPES, pad2, pad_to, round_up
from kernels._gpu import SHARED_MEMORY_BYTES, check_shared_memory, mosaic_gpu_interpret
from kernels._mgpu import SLICE, WG_ROWS, launch, projection, projection_ring_bytes
from kernels._mgpu import projection_scratch, swizzled, window_copy
from kernels.norm_swiglu import gpu, pallas

IMPL = "pallas_mosaic_gpu"

@dataclasses.dataclass(frozen=True)
class BlockSizes(gpu.BlockSizes):
    """gpu.BlockSizes (the Triton backward's tiles and warps) whose forward tiles drive the
    Mosaic GPU forward: block_t 64 or 128 rows (one or two consumer warpgroups), block_f 64 or
    128 hidden units (gate and up take block_f registers per thread together), block_d the
    slice of 64; `buffers` is the depth of the ring of slices in shared memory (>= 2, so that
    one slice loads while another is used)."""

    buffers: int = 4

    def __post_init__(self):
        super().__post_init__()
        if self.block_t not in (WG_ROWS, 2 * WG_ROWS):
            raise ValueError(f"BlockSizes: block_t={self.block_t} must be 64 or 128 (one or two "
                             "consumer warpgroups of wgmma's 64 rows)")
        if self.block_f not in (64, 128):
            raise ValueError(f"BlockSizes: block_f={self.block_f} must be 64 or 128")
        if self.block_d != SLICE:
            raise ValueError(f"BlockSizes: block_d={self.block_d} must be {SLICE} (one swizzled "
                             "row of two-byte elements)")
        if not (isinstance(self.buffers, int) and self.buffers >= 2):
            raise ValueError(f"BlockSizes: buffers={self.buffers!r} must be an int >= 2")

    @classmethod
    def get_default(cls, rows: int, d_model: int, d_ff: int, dtype=jnp.bfloat16,
                    save_gate_up: bool = False) -> BlockSizes:
        """gpu.py's backward tiles; the forward's 128 x 128 tiles (64 where the problem is no
        larger) with as many buffers (<= 4) as shared memory holds."""
        backward = gpu.BlockSizes.get_default(rows, d_model, d_ff, dtype, save_gate_up)
        blocks = cls(**{**dataclasses.asdict(backward),
                        "block_t": 2 * WG_ROWS if rows > WG_ROWS else WG_ROWS,
                        "block_f": 128 if d_ff > 64 else 64, "block_d": SLICE})
        while (blocks.buffers > 2
               and forward_shared_memory_bytes(blocks, dtype, save_gate_up) > SHARED_MEMORY_BYTES):
            blocks = dataclasses.replace(blocks, buffers=blocks.buffers - 1)
        return blocks


def forward_shared_memory_bytes(blocks: BlockSizes, dtype, save_gate_up: bool = False) -> int:
    """The forward's shared memory: the ring (x, w_gate, w_up and scale slices), which the
    outputs' staging reuses, and the row statistics."""
    item = jnp.dtype(dtype).itemsize
    bt, bf = blocks.block_t, blocks.block_f
    ring = projection_ring_bytes(bt, (bf, bf), item, blocks.buffers)
    staging = (3 if save_gate_up else 1) * bt * bf * item
    return max(ring, staging) + 2 * 4 * bt


@dataclasses.dataclass(frozen=True)
class Settings:
    """The non-array arguments of a call, from `prepare` (pallas.py describes them); interpret
    False or the Mosaic GPU interpreter's parameters (`_gpu.mosaic_gpu_interpret`)."""

    eps: float
    block_sizes: BlockSizes
    interpret: Any
    save_gate_up: bool


def prepare(x, norm_scale, w_gate, w_up, *, eps: float, interpret=None,
            block_sizes: BlockSizes | None = None, save_gate_up: bool = False) -> Settings:
    """The call's `Settings` (pallas.py): the arguments checked (x bf16 or f16), default tiles
    for the shape and mode, every kernel's shared memory checked."""
    pallas.check_pallas_args(x, norm_scale, w_gate, w_up)
    if x.dtype not in MOSAIC_GPU_DTYPES:
        raise ValueError(f"norm_swiglu: impl={IMPL!r} takes bfloat16 x (wgmma operands), got "
                         f"{x.dtype}; use impl='pallas_gpu'")
    b, t, d = x.shape
    save_gate_up = bool(save_gate_up)
    if block_sizes is None:
        block_sizes = BlockSizes.get_default(b * t, d, w_gate.shape[1], x.dtype, save_gate_up)
    elif not isinstance(block_sizes, BlockSizes):
        raise ValueError(f"norm_swiglu: impl={IMPL!r} needs a norm_swiglu.mgpu.BlockSizes, got "
                         f"{block_sizes!r}")
    used = {**gpu.shared_memory_bytes(block_sizes, x.dtype, save_gate_up),
            "fwd": forward_shared_memory_bytes(block_sizes, x.dtype, save_gate_up)}
    for kernel, size in used.items():
        check_shared_memory(size, f"palm_norm_swiglu {kernel} {block_sizes} (impl={IMPL!r})")
    return Settings(float(eps), block_sizes, mosaic_gpu_interpret(interpret), save_gate_up)


def fwd_call(x2, mean, rstd, norm_scale, w_gate, w_up, settings: Settings) -> list[jax.Array]:
    """[h] [M, F] (and gate, up [M, F] in x's dtype when `settings.save_gate_up`)."""
    blocks = settings.block_sizes
    bt, bf, buffers = blocks.block_t, blocks.block_f, blocks.buffers
    consumers = bt // WG_ROWS
    (m, d), f = x2.shape, w_gate.shape[1]
    mp, dp, fp = round_up(m, bt), round_up(d, SLICE), round_up(f, bf)
    x = pad2(x2, mp, dp)
    # Padded rows: rstd 0, so they normalise to 0; padded features: scale 0.
    mean, rstd = (pad_to(a.reshape(m).astype(jnp.float32), (mp,)) for a in (mean, rstd))
    scale = pad_to(norm_scale.astype(jnp.float32), (dp,))
    wg, wu = pad2(w_gate, dp, fp), pad2(w_up, dp, fp)
    outs = 3 if settings.save_gate_up else 1
    staging = tuple(swizzled((consumers, WG_ROWS, bf), x.dtype) for _ in range(outs))
    name = "palm_norm_swiglu_fwd_save_mosaic" if outs == 3 else "palm_norm_swiglu_fwd_mosaic"
    kernel = functools.partial(_fwd_kernel, n_d=dp // SLICE, interpret=bool(settings.interpret))
    outputs = launch(
        kernel, projection_scratch(bt, (bf, bf), x.dtype, buffers, staging), name=name,
        out_type=[jax.ShapeDtypeStruct((mp, fp), x.dtype)] * outs, grid=(mp // bt, fp // bf),
        grid_names=("rows", "cols"), threads=consumers + 1, interpret=settings.interpret,
        scope=f"bt={bt} bf={bf} bd={SLICE} buffers={buffers}",
    )(x, mean, rstd, scale, wg, wu)
    return [a[:m, :f] for a in outputs]


def _fwd_kernel(x_ref, mean_ref, rstd_ref, scale_ref, wg_ref, wu_ref, *refs, n_d: int,
                interpret: bool):
    """One [block_t, block_f] tile of h (and gate, up): `_mgpu.projection` of the gate and up
    slices, and the SwiGLU epilogue."""
    out_refs, scratch = refs[:-6], refs[-6:]
    (x_ring, _, wg_ring, _), _ = scratch[0]  # the ring: x, scale, w_gate, w_up slices
    bt, bf = x_ring.shape[1], wg_ring.shape[-1]
    rows = pl.ds(lax.axis_index("rows") * bt, bt)
    cols = pl.ds(lax.axis_index("cols") * bf, bf)

    weights = tuple(window_copy(functools.partial(
        lambda ref, k: ref.at[pl.ds(k * SLICE, SLICE), cols], ref)) for ref in (wg_ref, wu_ref))

    def epilogue(c, accs, mine, staging, extra):
        gate, up = accs
        # silu(g) = g / (1 + exp(-g)), spelled out for the Mosaic GPU lowering.
        h = gate / (1.0 + jnp.exp(-gate)) * up
        for value, stage in zip((h, gate, up), staging):
            stage.at[c][...] = value.astype(stage.dtype)
        plgpu.commit_smem()
        for stage, out_ref in zip(staging, out_refs):
            plgpu.copy_smem_to_gmem(stage.at[c], out_ref.at[mine, cols])
        plgpu.wait_smem_to_gmem(0)

    projection(x_ref, mean_ref, rstd_ref, scale_ref, rows, weights, scratch, n_d=n_d,
               interpret=interpret, epilogue=epilogue)


def _for_triton(settings: Settings) -> gpu.Settings:
    """gpu.py's settings for its backward kernels: the same tiles, interpreted by the generic
    interpreter when this forward is by the Mosaic GPU one."""
    return gpu.Settings(settings.eps, settings.block_sizes, bool(settings.interpret),
                        settings.save_gate_up)


def bwd_gates_call(x2, mean, rstd, norm_scale, wgp, wup, dhp, settings: Settings):
    return gpu.bwd_gates_call(x2, mean, rstd, norm_scale, wgp, wup, dhp, _for_triton(settings))


def bwd_gates_saved_call(gatep, upp, dhp, settings: Settings):
    return gpu.bwd_gates_saved_call(gatep, upp, dhp, _for_triton(settings))


def bwd_dx_call(d_gate, d_up, wgp, wup, settings: Settings):
    return gpu.bwd_dx_call(d_gate, d_up, wgp, wup, _for_triton(settings))


def bwd_dw_call(xnp, d_gate, d_up, settings: Settings):
    return gpu.bwd_dw_call(xnp, d_gate, d_up, _for_triton(settings))


# The Mosaic GPU `norm_swiglu` (the front door's arguments but impl), and pallas.py's interface
# functions, on this module's kernels (`kernels.block_in` calls the latter).
norm_swiglu_pallas_mosaic_gpu = functools.partial(pallas.norm_swiglu_pallas,
                                                  sys.modules[__name__])
forward_with_stats = functools.partial(pallas.forward_with_stats, sys.modules[__name__])
backward_to_dh = functools.partial(pallas.backward_to_dh, sys.modules[__name__])
