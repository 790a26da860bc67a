"""The Mosaic GPU `norm_swiglu` (Hopper: TMA, wgmma, warp specialisation), forward and backward
(but the elementwise saved-gates kernel, gpu.py's): `impl="pallas_mosaic_gpu"`.

Why a second GPU forward: the issue's bar for the fused projections is 0.9x a bare matmul of
the same shape (cuBLAS through XLA), which needs Hopper's full tensor-core pipeline: operands
streamed by TMA while wgmma runs, without registers spent on addresses. Triton reaches wgmma
too, but not warp specialisation; Mosaic GPU lets the kernel split its warpgroups by role as
kernels/_mgpu.py describes, the same way as the attention kernels (kernels/mq_flash_attention/
mgpu.py).

The math and the residuals are tpu.py's and gpu.py's: h = silu(LN(x) w_gate) * (LN(x) w_up),
rows the flattened B*T axis (M), LN(x) rounded to x's dtype before the products, the row
statistics (mean, rstd f32 [M, 1]) from `kernels._common.row_stats` in XLA.

LN(x) itself is one XLA fusion before the kernel ([M, D] in x's dtype), not a prologue in the
kernel's registers. That prologue ran on an H200 (bench/results/h200-2026-11-27.md): each
consumer loaded its x slice from shared memory, normalised it and fed the wgmma from
registers, and the tensor cores waited for it at every slice. The forward saving gate and
up in the profiled `1b` step ran at 473 TFLOP/s, the pure streamed matmuls beside it (block_out's,
this module's dx and dw) at 640-790, and at PaLM-8B widths the forward reached 0.68x the bare
matmul. The separate pass costs 2 M D bytes of writes and reads (16 MiB at the `1b` width,
M = 2048: a few microseconds), and the backward needs LN(x) for dw anyway.

  * grid (M / block_t, F / block_f); a thread block owns a [block_t, block_f] tile of h,
    `block_t / 64` consumer warpgroups of 64 rows (wgmma's M) and one producer
    (`_mgpu.matmul` with two B operands).
  * producer: for each of the D / 64 contraction steps, the LN(x) slice [block_t, 64] and the
    w_gate and w_up slices [64, block_f] into ring slot step % buffers by TMA, once the
    consumers have released what the slot held (`_mgpu.produce`).
  * consumer: per step gate += LN(x) w_gate and up += LN(x) w_up as two wgmmas with both
    operands in shared memory (f32 accumulators [64, block_f] each, issued together). The
    epilogue h = silu(gate) up (and gate, up with `save_gate_up`) leaves through shared
    memory by TMA: the ring's memory, once every consumer is past its last wgmma
    (`plgpu.RefUnion`, one meeting of the consumers).

Budget at the defaults (bf16, block_t = block_f = 128, the slice 64, 4 buffers): each slot
holds LN(x) 128 x 64 x 2 = 16 KiB and the two weight slices 2 x 64 x 128 x 2 = 32 KiB: 192
KiB for 4, under the 227 KiB of a thread block; the outputs' staging (3 x 128 x 128 x 2 = 96
KiB with save_gate_up) reuses it. Registers: gate and up 64 + 64 per thread, within the
consumers' 232. Per step a consumer reads 32 KiB of weights and its 8 KiB of LN(x) from
shared memory for 64 x 256 x 64 multiply-adds: for both consumers 1,024 tensor-core cycles
at 2,048 per cycle for the SM against 640 cycles of shared-memory reads at 128 bytes per
cycle, so the tensor cores bound it. FLOPs are gpu.py's, 4 M D F; HBM bytes the weights once
per row tile (from L2 after the first) and LN(x) once per F tile.

The backward's first kernel, without `save_gate_up`, recomputes gate and up: the same thread
block with another epilogue (`palm_norm_swiglu_bwd_gates_mosaic`: dh's tile [64, block_f] by
TMA into the ring's memory, d_gate = dh up silu'(gate), d_up = dh silu(gate), as
reference.swiglu_bwd, written in x's dtype), on the forward's tiles (the backward's padded
operands re-padded to them where they differ). With `save_gate_up`, gpu.py's elementwise
kernel turns the saved gate and up into d_gate, d_up instead. Then two streamed matmuls
(`_mgpu.matmul`, 128 x 128 tiles, a ring of 64-deep slices):
  * dx (`palm_norm_swiglu_bwd_dx_mosaic`): dLN f32 [M, D] = d_gate·w_gateᵀ + d_up·w_upᵀ, the
    two products one contraction over [F | F] whose producer switches arrays halfway; the
    weight slices [128, 64] of D x F are read transposed by wgmma.
  * dw (`palm_norm_swiglu_bwd_dw_mosaic`): d_w_gate, d_w_up [D, F] = LN(x)ᵀ·d_gate,
    LN(x)ᵀ·d_up over the rows, LN(x)'s slices [64, 128] read transposed, two accumulators
    sharing them (LN(x) materialised once by XLA, as pallas.py says why).
The LayerNorm backward is XLA's, as on every backend.

Shapes: M, D, F zero-padded to whole tiles (zero rows and features add nothing); bf16 or f16
only (wgmma's operands here: an f32 x raises, naming
`pallas_gpu`).

What CPU checks cover: on jax >= 0.11 the Mosaic GPU interpreter runs the kernel on CPU (TMA,
barriers, the warpgroups as threads, with race detection) against the reference; the wgmmas
are plain dots there (`_mgpu.accumulate`) and run natively only in the tests marked `gpu`.
Exporting for CUDA from CPU runs the whole Pallas-to-Mosaic-GPU lowering on both jax
versions. Not covered: PTX compilation, register allocation and speed (tools/gpu_check.sh).
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

from kernels._common import MOSAIC_GPU_DTYPES, layer_norm_rows, pad2, round_up
from kernels._gpu import SHARED_MEMORY_BYTES, check_shared_memory, mosaic_gpu_interpret
from kernels._gpu import mosaic_load
from kernels._mgpu import SLICE, WG_ROWS, check_block_sizes, launch, matmul, matmul_scratch_bytes
from kernels._mgpu import matmul_scratch, store, summed_products, swizzled, window_copy
from kernels.norm_swiglu import gpu, pallas

IMPL = "pallas_mosaic_gpu"

@dataclasses.dataclass(frozen=True)
class BlockSizes(gpu.BlockSizes):
    """gpu.BlockSizes whose forward tiles drive every Mosaic GPU kernel here (the *_bwd fields
    pad the backward's operands, pallas.py, and tile gpu.py's saved-gates kernel): block_t 64 or
    128 rows (one or two consumer warpgroups; D's rows for dw), block_f 64 or 128 columns (F's,
    or D's for dx; gate and up take block_f registers per thread together), block_d the slice
    of 64; `buffers` is the depth of the ring of slices in shared memory (>= 2, so that one
    slice loads while another is used)."""

    buffers: int = 4

    def __post_init__(self):
        super().__post_init__()
        check_block_sizes(self, rows="block_t", depth="block_d",
                          columns=(("block_f", (64, 128)),))

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
    """The forward's shared memory: the ring (LN(x), w_gate and w_up slices), which the
    outputs' staging reuses."""
    item = jnp.dtype(dtype).itemsize
    bt, bf = blocks.block_t, blocks.block_f
    staging = (3 if save_gate_up else 1) * bt * bf * item
    return matmul_scratch_bytes(bt, bf, item, blocks.buffers, staging, n_b=2)


def dx_shared_memory_bytes(blocks: BlockSizes, dtype) -> int:
    """The dx kernel's: its ring of cotangent and weight slices, which the f32 output tiles
    reuse."""
    return matmul_scratch_bytes(blocks.block_t, blocks.block_f, jnp.dtype(dtype).itemsize,
                                blocks.buffers, blocks.block_t * blocks.block_f * 4)


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
    if not save_gate_up:  # the recomputing gates kernel is this module's: dh and two outputs
        used["bwd_gates"] = forward_shared_memory_bytes(block_sizes, x.dtype, True)
    used["bwd_dx"] = dx_shared_memory_bytes(block_sizes, x.dtype)
    tile = block_sizes.block_t * block_sizes.block_f * x.dtype.itemsize
    used["bwd_dw"] = matmul_scratch_bytes(block_sizes.block_t, block_sizes.block_f,
                                          x.dtype.itemsize, block_sizes.buffers, 2 * tile, n_b=2)
    for kernel, size in used.items():
        check_shared_memory(size, f"palm_norm_swiglu {kernel} {block_sizes} (impl={IMPL!r})")
    return Settings(float(eps), block_sizes, mosaic_gpu_interpret(interpret), save_gate_up)


def _gates_call(x2, mean, rstd, norm_scale, w_gate, w_up, settings: Settings, *,
                shape: tuple[int, int], dh=None, save: bool = False) -> list[jax.Array]:
    """The gates kernel on [M, F] = `shape`: the forward's outputs, h (and gate, up with
    `save`), or with `dh` [M, F] the backward's d_gate, d_up; in x's dtype. LN(x) is one XLA
    fusion first (the module docstring says why); operands are zero-padded to whole tiles."""
    blocks = settings.block_sizes
    bt, bf, buffers = blocks.block_t, blocks.block_f, blocks.buffers
    consumers = bt // WG_ROWS
    m, f = shape
    mp, dp, fp = round_up(m, bt), round_up(w_gate.shape[0], SLICE), round_up(f, bf)
    # LN(x) [Mp, Dp] (mean, rstd [M, 1]), rounded as the references round it: in the
    # recomputing backward the same expression as pallas.py's dw operand, for XLA's CSE.
    xn = pad2(layer_norm_rows(x2, mean, rstd, norm_scale).astype(x2.dtype), mp, dp)
    wg, wu = pad2(w_gate, dp, fp), pad2(w_up, dp, fp)
    outs = 2 if dh is not None else 3 if save else 1
    # The epilogue's tiles in the ring's memory: dh (backward), then the outputs.
    staging = tuple(swizzled((consumers, WG_ROWS, bf), xn.dtype)
                    for _ in range(outs + (dh is not None)))
    extra = (plgpu.Barrier(num_barriers=consumers),) if dh is not None else ()  # dh ready
    name = ("palm_norm_swiglu_bwd_gates_mosaic" if dh is not None
            else "palm_norm_swiglu_fwd_save_mosaic" if save else "palm_norm_swiglu_fwd_mosaic")
    kernel = functools.partial(_gates_kernel, n_d=dp // SLICE, outs=outs,
                               backward=dh is not None, interpret=bool(settings.interpret))
    operands = (xn, wg, wu) + ((pad2(dh, mp, fp),) if dh is not None else ())
    outputs = launch(
        kernel, matmul_scratch(bt, bf, xn.dtype, buffers, staging, n_b=2, extra=extra), name=name,
        out_type=[jax.ShapeDtypeStruct((mp, fp), xn.dtype)] * outs, grid=(mp // bt, fp // bf),
        grid_names=("rows", "cols"), threads=consumers + 1, interpret=settings.interpret,
        scope=f"bt={bt} bf={bf} bd={SLICE} buffers={buffers}",
    )(*operands)
    return [a[:m, :f] for a in outputs]


def _gates_kernel(xn_ref, wg_ref, wu_ref, *refs, n_d: int, outs: int, backward: bool,
                  interpret: bool):
    """One [block_t, block_f] tile: `_mgpu.matmul` of LN(x)'s rows and the gate and up slices
    (two accumulators sharing each LN(x) slice), then the forward's epilogue (h = silu(gate)
    up, and gate and up when saving) or, `backward` (refs then start with dh's), the
    backward's (d_gate, d_up from the recomputed gate and up)."""
    dh_ref = refs[0] if backward else None
    out_refs = refs[backward:backward + outs]
    scratch = refs[backward + outs:]
    (a_ring, wg_ring, _), _ = scratch[0]  # the ring: LN(x), w_gate, w_up slices
    bt, bf = a_ring.shape[1], wg_ring.shape[-1]
    rows = pl.ds(lax.axis_index("rows") * bt, bt)
    cols = pl.ds(lax.axis_index("cols") * bf, bf)
    depth = lambda k: pl.ds(k * SLICE, SLICE)  # noqa: E731

    def epilogue(c, accs, staging, extra):
        mine = pl.ds(rows.start + c * WG_ROWS, WG_ROWS)
        gate, up = accs
        # sigmoid and silu spelled out for the Mosaic GPU lowering.
        sig = 1.0 / (1.0 + jnp.exp(-gate))
        if backward:
            dh_stage, *staging = staging
            (dh_ready,) = extra
            plgpu.copy_gmem_to_smem(dh_ref.at[mine, cols], dh_stage.at[c], dh_ready.at[c])
            plgpu.barrier_wait(dh_ready.at[c])
            dh = mosaic_load(dh_stage.at[c], plgpu.Layout.WGMMA).astype(jnp.float32)
            # reference.swiglu_bwd: silu'(g) = sigmoid(g) (1 + g (1 - sigmoid(g))).
            values = (dh * up * (sig * (1.0 + gate * (1.0 - sig))), dh * (gate * sig))
        else:
            values = (gate * sig * up, gate, up)
        for value, stage in zip(values, staging):
            stage.at[c][...] = value.astype(stage.dtype)
        plgpu.commit_smem()
        for stage, out_ref in zip(staging, out_refs):
            plgpu.copy_smem_to_gmem(stage.at[c], out_ref.at[mine, cols])
        plgpu.wait_smem_to_gmem(0)

    matmul(window_copy(lambda k: xn_ref.at[rows, depth(k)]),
           tuple(window_copy(functools.partial(lambda ref, k: ref.at[depth(k), cols], ref))
                 for ref in (wg_ref, wu_ref)),
           scratch, n_steps=n_d, interpret=interpret, epilogue=epilogue)


def fwd_call(x2, mean, rstd, norm_scale, w_gate, w_up, settings: Settings) -> list[jax.Array]:
    """[h] [M, F] (and gate, up [M, F] in x's dtype when `settings.save_gate_up`)."""
    return _gates_call(x2, mean, rstd, norm_scale, w_gate, w_up, settings,
                       shape=(x2.shape[0], w_gate.shape[1]), save=settings.save_gate_up)


def bwd_gates_call(x2, mean, rstd, norm_scale, wgp, wup, dhp, settings: Settings):
    """d_gate, d_up [Mp, Fp] in x's dtype, recomputing gate and up (this module's gates
    kernel; pallas.py's interface)."""
    return tuple(_gates_call(x2, mean, rstd, norm_scale, wgp, wup, settings, shape=dhp.shape,
                             dh=dhp))


def _for_triton(settings: Settings) -> gpu.Settings:
    """gpu.py's settings for its backward kernels: the same tiles, interpreted by the generic
    interpreter when this forward is by the Mosaic GPU one."""
    return gpu.Settings(settings.eps, settings.block_sizes, bool(settings.interpret),
                        settings.save_gate_up)


def bwd_gates_saved_call(gatep, upp, dhp, settings: Settings):
    return gpu.bwd_gates_saved_call(gatep, upp, dhp, _for_triton(settings))


def bwd_dx_call(d_gate, d_up, wgp, wup, settings: Settings):
    """dLN f32 [Mp, Dp] = d_gate·w_gateᵀ + d_up·w_upᵀ (pallas.py's interface): `_mgpu.matmul`
    over both products, [block_t, block_f] output tiles, the weight slices [block_f, 64]
    transposed in shared memory; the operands re-padded to those tiles where they differ."""
    blocks = settings.block_sizes
    bt, bn, buffers = blocks.block_t, blocks.block_f, blocks.buffers
    consumers = bt // WG_ROWS
    (m, f), d = d_gate.shape, wgp.shape[0]
    mp, fp, dp = round_up(m, bt), round_up(f, SLICE), round_up(d, bn)
    dg, du = pad2(d_gate, mp, fp), pad2(d_up, mp, fp)
    wg, wu = pad2(wgp, dp, fp), pad2(wup, dp, fp)
    scratch = matmul_scratch(bt, bn, dg.dtype, buffers,
                             swizzled((consumers, WG_ROWS, bn), jnp.float32), transposed_b=True)
    n_f = fp // SLICE
    kernel = functools.partial(summed_products, (n_f, n_f), (n_f, n_f),
                               interpret=bool(settings.interpret))
    dxn = launch(kernel, scratch, name="palm_norm_swiglu_bwd_dx_mosaic",
                 out_type=jax.ShapeDtypeStruct((mp, dp), jnp.float32), grid=(mp // bt, dp // bn),
                 grid_names=("rows", "cols"), threads=consumers + 1,
                 interpret=settings.interpret,
                 scope=f"bt={bt} bd={bn} bf={SLICE} buffers={buffers}")(dg, du, wg, wu)
    return dxn[:m, :d]


def bwd_dw_call(xnp, d_gate, d_up, settings: Settings):
    """d_w_gate, d_w_up [Dp, Fp] in x's dtype = LN(x)ᵀ·d_gate, LN(x)ᵀ·d_up (pallas.py's
    interface): `_mgpu.matmul` over the rows with LN(x)'s slices transposed in shared memory
    and two accumulators, [block_t, block_f] tiles of D x F; the operands re-padded to those
    tiles where they differ."""
    blocks = settings.block_sizes
    bt, bf, buffers = blocks.block_t, blocks.block_f, blocks.buffers
    consumers = bt // WG_ROWS
    (m, d), f = xnp.shape, d_gate.shape[1]
    mp, dp, fp = round_up(m, SLICE), round_up(d, bt), round_up(f, bf)
    xn = pad2(xnp, mp, dp)
    dg, du = pad2(d_gate, mp, fp), pad2(d_up, mp, fp)
    staging = tuple(swizzled((consumers, WG_ROWS, bf), xn.dtype) for _ in range(2))
    scratch = matmul_scratch(bt, bf, xn.dtype, buffers, staging, n_b=2, transposed_a=True)
    kernel = functools.partial(_bwd_dw_kernel, n_rows=mp // SLICE,
                               interpret=bool(settings.interpret))
    dwg, dwu = launch(kernel, scratch, name="palm_norm_swiglu_bwd_dw_mosaic",
                      out_type=[jax.ShapeDtypeStruct((dp, fp), xn.dtype)] * 2,
                      grid=(dp // bt, fp // bf), grid_names=("rows", "cols"),
                      threads=consumers + 1, interpret=settings.interpret,
                      scope=f"bd={bt} bf={bf} bt={SLICE} buffers={buffers}")(xn, dg, du)
    return dwg[:d, :f], dwu[:d, :f]


def _bwd_dw_kernel(xn_ref, dg_ref, du_ref, dwg_ref, dwu_ref, *scratch, n_rows: int,
                   interpret: bool):
    """One [block_t, block_f] tile of both weight gradients (rows of D, columns of F)."""
    (a_ring, b_ring, _), _ = scratch[0]
    bd, bf = a_ring.shape[-1], b_ring.shape[-1]
    features = pl.ds(lax.axis_index("rows") * bd, bd)
    cols = pl.ds(lax.axis_index("cols") * bf, bf)
    depth = lambda k: pl.ds(k * SLICE, SLICE)  # noqa: E731

    def epilogue(c, accs, staging, extra):
        mine = pl.ds(features.start + c * WG_ROWS, WG_ROWS)
        for acc, stage, out_ref in zip(accs, staging, (dwg_ref, dwu_ref)):
            store(stage.at[c], acc, ((True, out_ref.at[mine, cols]),))

    matmul(window_copy(lambda k: xn_ref.at[depth(k), features]),
           tuple(window_copy(functools.partial(lambda ref, k: ref.at[depth(k), cols], ref))
                 for ref in (dg_ref, du_ref)),
           scratch, n_steps=n_rows, interpret=interpret, epilogue=epilogue, transposed_a=True)


# The Mosaic GPU `norm_swiglu` (the front door's arguments but impl), and pallas.py's interface
# functions, on this module's kernels (`kernels.block_in` calls the latter).
norm_swiglu_pallas_mosaic_gpu = functools.partial(pallas.norm_swiglu_pallas,
                                                  sys.modules[__name__])
forward_with_stats = functools.partial(pallas.forward_with_stats, sys.modules[__name__])
backward_to_dh = functools.partial(pallas.backward_to_dh, sys.modules[__name__])
