"""The Pallas TPU `norm_swiglu`.

Forward, `palm_norm_swiglu_fwd` (Pallas TPU). Rows are the flattened B*T axis (M). The grid is
(M / bt, F / bf, D / bd) with D, the contraction, innermost: each step normalises an x tile
[bt, bd] on the fly and adds its products with the w_gate and w_up tiles [bd, bf] into two
float32 accumulators [bt, bf]; the last D step applies `silu(gate) * up` and writes h once.

LayerNorm statistics: the wrapper computes each row's mean and 1/std in float32 (8 bytes per
row, one XLA reduction over x) and the kernel normalises every D tile from them. The
alternative, a full-D x row tile in VMEM, does not fit at PaLM-540B: D = 18432 bf16 rows cost
36 KiB each, so even bt = 256 needs 9 MiB per buffer (18 MiB double-buffered) before any
weight tile. Tiling D keeps VMEM independent of D, and re-normalising a tile is a few VPU ops
per element against 2 * 2 * bf MXU flops, so recomputing it for every F tile is free.
Statistics are computed exactly as `layer_norm_f32` does (mean, then the mean of squared
deviations), so the kernel sees the reference's values. The kernels get them lane-replicated
(`_lane_stats`), fetched once per row tile.

Backward: three Pallas kernels and the LayerNorm backward in XLA. The forward saves x and the
statistics; with `save_gate_up` also gate and up (below). Then:
- the gates backward, d_gate = dh * up * silu'(gate) and d_up = dh * silu(gate), rounded to
  x's dtype for the MXU. `palm_norm_swiglu_bwd_gates` (default): the forward's grid,
  recomputing gate and up tile by tile, the epilogue turning dh into their cotangents; the
  pre-activations exist only in VMEM. `palm_norm_swiglu_bwd_gates_saved` (`save_gate_up`):
  elementwise on the saved gate and up, grid (M, F), no matmul; d_gate and d_up overwrite
  gate and up in place (`input_output_aliases`).
- `palm_norm_swiglu_bwd_dx`: dLN = d_gate·w_gateᵀ + d_up·w_upᵀ, both products into one
  float32 tile, grid (M, D, F) contracting over F.
- `palm_norm_swiglu_bwd_dw`: d_w_gate = LN(x)ᵀ·d_gate and d_w_up = LN(x)ᵀ·d_up from one read
  of each LN(x) tile, grid (D, F, M) contracting over rows. LN(x) is materialised once by XLA
  for it (M*D elements, 16 MiB at PaLM-8B): normalising in-kernel would re-read the per-row
  statistics for every (D, F) tile (512 MiB at PaLM-8B).
- jnp (XLA): the LayerNorm backward (dx, d_norm_scale). It needs row reductions over all of
  D, which no D-tiled kernel sees; it is one elementwise-and-reduce pass over [M, D] (about
  64 MiB at PaLM-8B against the kernels' gigabytes), which XLA fuses well.
`forward_with_stats` and `backward_to_dh` are these steps without the statistics pass and the
LayerNorm backward, for a caller that shares one LayerNorm between several kernels. They (with
the backward's padding) and the custom_vjp are pallas.py's, shared with gpu.py, over the kernel
calls here (pallas.py's backend interface).

Saving gate and up (`save_gate_up`). The forward kernel (`palm_norm_swiglu_fwd_save`) also
writes the pre-activations gate and up, [M, F] each, rounded to x's dtype (h is still computed
from the float32 values, so no forward value changes): the backward rounds d_gate and d_up to
x's dtype for the MXU anyway, so a bf16 gate adds one rounding of the same size, while float32
copies would double the bytes kept (256 MiB per layer at PaLM-8B). FLOPs at PaLM-8B
(M*D*F = 2048 * 4096 * 16384 = 1.37e11): the forward 4*M*D*F = 550 GFLOP in both modes; the
backward 12*M*D*F = 1649 GFLOP recomputing, 8*M*D*F = 1100 GFLOP saving. The 550 GFLOP saved
are about 15% of a layer's forward and backward. The cost is 2*M*F more elements kept for the
backward (128 MiB bf16 at PaLM-8B, B=1) and the HBM bytes below.

Under `jax.checkpoint` (palm/model.py's remat "full", `nothing_saveable`, and "dots",
`dots_with_no_batch_dims_saveable`, which saves no pallas_call output) this custom_vjp's
residuals are not kept across layers: the block's forward, this kernel included, runs again in
the backward (block_out's backward needs h), and the residuals live only while that layer's
backward runs. Recomputing, gate and up are then computed three times (forward, its rerun, the
gates backward); saving, twice, at no cost in peak memory (d_gate and d_up take gate's and up's
buffers). Without remat ("none") the saved gate and up are kept per layer until the backward,
as XLA's autodiff keeps the reference's float32 gate and up. tests/test_norm_swiglu.py checks
which residuals each policy keeps and which kernels its backward runs.

VMEM (`vmem_bytes`: double-buffered blocks, scratch and the in-kernel float32 temporaries,
the LN(x) tile and dot results; the same at PaLM-8B and 540B, as no tile depends on D or F),
bf16 at the 512 tiles: forward 10.5 MiB (12.5 MiB saving gate and up), bwd_gates 13.5 MiB
(bwd_gates_saved 10.0 MiB), bwd_dx 7.0 MiB, bwd_dw 9.5 MiB. Default tiles shrink (largest
first) until every kernel of the mode fits the target generation's `vmem_budget` (12 MiB on
v4: f32 at 512 tiles would need 20 MiB for bwd_gates, and the saving bf16 forward 12.5 MiB),
and `vmem_limit_bytes` is set from the estimate.

HBM bytes at PaLM-8B (B=1, T=2048, D=4096, F=16384, bf16), counting each tensor once
(compulsory traffic; tile re-reads, which any tiled matmul has, are in the CostEstimates):
- forward: stats pass 16 MiB (read x) + kernel 16 (x) + 256 (w_gate, w_up) + 64 (write h)
  + 4 (stats) = 356 MiB; saving gate and up, + 128 (write them) = 484 MiB. The unfused XLA
  sequence of the reference writes LN(x) (16 MiB) and float32 gate and up (2 x 128 MiB), and
  reads them back: 896 MiB (640 MiB with bf16 pre-activations).
- backward: 466 (gates: x, weights, stats, dh, write d_gate and d_up) + 416 (dx) + 400 (dw)
  + 32 (LN(x)) + 64 (LayerNorm backward) = 1378 MiB; saving, the gates backward reads gate,
  up and dh and writes d_gate and d_up, 320 MiB, for 1232 MiB in all. XLA's autodiff of the
  reference moves about 1760 MiB (it reads the saved float32 gate and up and writes float32
  d_gate and d_up; 1248 MiB in bf16).
So saving moves 18 MiB fewer over forward and backward (1716 MiB against 1734); under remat,
where the forward runs twice, 110 MiB more (2200 MiB against 2090), for 550 GFLOP fewer.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels._common import tpu_interpret
from kernels._tpu import pallas_call as tpu_pallas_call
from kernels._tpu import (
    LANE,
    NT_DIMS,
    check_multiple,
    compiler_params,
    pad2,
    pick_block,
    round_up,
    sublane,
    tile_bytes,
    vmem_budget,
)
from kernels.norm_swiglu import pallas
from kernels.norm_swiglu.reference import swiglu_bwd


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles of the Pallas TPU kernels; rows are the flattened B*T axis.

    Forward (`palm_norm_swiglu_fwd`): block_t rows x block_f hidden units per output tile,
    block_d model features per contraction step. Backward: the three kernels share one tiling
    (so operands are padded once): block_t_bwd rows, block_f_bwd hidden units, block_d_bwd
    model features; each kernel contracts over a different one of them.
    """

    block_t: int = 512
    block_f: int = 512
    block_d: int = 512
    block_t_bwd: int = 512
    block_f_bwd: int = 512
    block_d_bwd: int = 512

    def __post_init__(self):
        for name in ("block_t", "block_t_bwd"):
            check_multiple("BlockSizes", name, getattr(self, name), 8)
        for name in ("block_f", "block_d", "block_f_bwd", "block_d_bwd"):
            check_multiple("BlockSizes", name, getattr(self, name), LANE)

    @classmethod
    def get_default(cls, rows: int, d_model: int, d_ff: int, dtype=jnp.bfloat16,
                    generation: str | None = None, save_gate_up: bool = False) -> "BlockSizes":
        """512-wide tiles (they divide every PaLM shape), shrunk to fit small shapes, then the
        largest tile of a pass halved while one of its kernels (those `save_gate_up` selects)
        exceeds `vmem_budget(generation)` (default: the target generation).

        VMEM is independent of D and F, so the same at PaLM-8B and PaLM-540B (module
        docstring). The backward row tile is a multiple of 128 even for short inputs: the dw
        kernel transposes a [block_t_bwd, block_d_bwd] tile, and Mosaic transposes lane-aligned
        tiles best.
        """
        sub = sublane(dtype)
        bt = pick_block(rows, 512, sub)
        bf = pick_block(d_ff, 512, LANE)
        bd = pick_block(d_model, 512, LANE)
        blocks = cls(bt, bf, bd, pick_block(rows, 512, LANE), bf, bd)
        budget = vmem_budget(generation)
        passes = ((("fwd",), {"block_t": sub, "block_f": LANE, "block_d": LANE}),
                  (("bwd_gates", "bwd_dx", "bwd_dw"),
                   {"block_t_bwd": LANE, "block_f_bwd": LANE, "block_d_bwd": LANE}))
        for kernels, floors in passes:
            while max(vmem_bytes(blocks, dtype, save_gate_up)[k] for k in kernels) > budget:
                shrinkable = [n for n, low in floors.items() if getattr(blocks, n) >= 2 * low]
                if not shrinkable:
                    break  # as small as tiles go
                name = max(shrinkable, key=lambda n: getattr(blocks, n))
                blocks = dataclasses.replace(blocks, **{name: getattr(blocks, name) // 2})
        return blocks


def vmem_bytes(block_sizes: BlockSizes, dtype, save_gate_up: bool = False) -> dict[str, int]:
    """VMEM each kernel of the mode needs ("fwd" and "bwd_gates" are the saving variants when
    `save_gate_up`): double-buffered input and output tiles, scratch, and in-kernel
    temporaries: the float32 LN(x) tile and its cast to x's dtype, the float32 dot results (and
    one more float32 [bt, bf] value in the recomputing gate backward's epilogue; five in the
    saved one's: gate, up, dh, the sigmoid and a product), the dw kernel's transposed LN(x)
    tile.

    Scale [1, bd] tiles are counted at their padded (8, 128) layout.
    """
    s = jnp.dtype(dtype).itemsize
    bs = block_sizes

    def stats(bt):  # [bt, 256] f32: mean and rstd, each replicated across 128 lanes
        return tile_bytes(bt, 2 * LANE, 4)

    def scale(bd):  # [1, bd] f32 pads to 8 sublanes
        return tile_bytes(1, bd, 4)

    bt, bf, bd = bs.block_t, bs.block_f, bs.block_d
    outs = 3 if save_gate_up else 1  # h, and gate and up when saved
    # x, stats, scale, w_gate, w_up and the outputs double-buffered; gate and up f32 accumulators.
    fwd = (2 * (bt * bd * s + stats(bt) + scale(bd) + 2 * bd * bf * s + outs * bt * bf * s)
           + 2 * bt * bf * 4
           + bt * bd * (4 + s) + 2 * bt * bf * 4)  # LN(x) f32 and cast, gate and up dots
    bt, bf, bd = bs.block_t_bwd, bs.block_f_bwd, bs.block_d_bwd
    if save_gate_up:
        # gate, up and dh in, d_gate and d_up out, all [bt, bf]; the float32 epilogue values.
        gates = 2 * 5 * bt * bf * s + 5 * bt * bf * 4
    else:
        # The forward's blocks plus dh in and d_gate, d_up out.
        gates = (2 * (bt * bd * s + stats(bt) + scale(bd) + 2 * bd * bf * s + 3 * bt * bf * s)
                 + 2 * bt * bf * 4
                 + bt * bd * (4 + s) + 3 * bt * bf * 4)  # LN(x), gate and up dots, epilogue
    dx = 2 * (2 * bt * bf * s + 2 * bd * bf * s + bt * bd * 4) + bt * bd * 4  # dot result
    dw = (2 * (bt * bd * s + 2 * bt * bf * s + 2 * bd * bf * s) + 2 * bd * bf * 4
          + bd * bt * s + 2 * bd * bf * 4)  # transposed LN(x), dot results
    return {"fwd": fwd, "bwd_gates": gates, "bwd_dx": dx, "bwd_dw": dw}


@dataclasses.dataclass(frozen=True)
class Settings:
    """The non-array arguments of a call, from `prepare` (pallas.py describes them)."""

    eps: float
    block_sizes: BlockSizes
    interpret: Any  # False or a pltpu.InterpretParams (see kernels._common.tpu_interpret)
    save_gate_up: bool  # the forward also writes gate and up, which the backward reads


def _lane_stats(mean: jax.Array, rstd: jax.Array, rows: int) -> jax.Array:
    """float32 [rows, 256] for the kernels from `row_stats`' [M, 1] columns: mean in lanes
    0-127, rstd in 128-255, each copied across its 128 lanes (TPU vectors are 128 lanes wide: a
    [bt, 1] column would need lane slicing and broadcasts in-kernel; this is the layout JAX's
    TPU flash attention uses for its row statistics). Padded rows get 0 and normalise to 0.
    1 KiB per row, fetched once per row tile (its block index does not change along the F and
    D grid axes)."""
    lanes = jnp.repeat(jnp.concatenate([mean, rstd], axis=1), LANE, axis=1)  # [M, 256]
    return pad2(lanes, rows, 2 * LANE)


def _normalised(x_ref, stats_ref, scale_ref):
    """LN(x) for one [bt, bd] tile in float32: (x - mean) * rstd * scale, the reference's order."""
    x = x_ref[...].astype(jnp.float32)
    reps = x.shape[1] // LANE
    mean = jnp.tile(stats_ref[:, :LANE], (1, reps))
    rstd = jnp.tile(stats_ref[:, LANE:], (1, reps))
    return (x - mean) * rstd * scale_ref[...]


def _accumulate_gate_up(x_ref, stats_ref, scale_ref, wg_ref, wu_ref, gate_acc, up_acc):
    """One contraction step: gate_acc += LN(x)·w_gate and up_acc += LN(x)·w_up over a D tile."""

    @pl.when(pl.program_id(2) == 0)
    def _init():
        gate_acc[...] = jnp.zeros_like(gate_acc)
        up_acc[...] = jnp.zeros_like(up_acc)

    # The reference rounds LN(x) to x's dtype before the matmuls; so does the kernel (and bf16
    # operands are what the MXU runs at full rate).
    xn = _normalised(x_ref, stats_ref, scale_ref).astype(wg_ref.dtype)
    gate_acc[...] += jnp.dot(xn, wg_ref[...], preferred_element_type=jnp.float32)
    up_acc[...] += jnp.dot(xn, wu_ref[...], preferred_element_type=jnp.float32)


def _fwd_kernel(x_ref, stats_ref, scale_ref, wg_ref, wu_ref, h_ref, *refs, n_steps: int):
    """refs: the accumulators (gate_acc, up_acc), after the gate and up outputs when saving."""
    *saved_refs, gate_acc, up_acc = refs
    _accumulate_gate_up(x_ref, stats_ref, scale_ref, wg_ref, wu_ref, gate_acc, up_acc)

    @pl.when(pl.program_id(2) == n_steps - 1)
    def _epilogue():
        gate, up = gate_acc[...], up_acc[...]
        # h from the float32 pre-activations in both modes, so saving changes no forward value.
        h_ref[...] = (gate * jax.nn.sigmoid(gate) * up).astype(h_ref.dtype)
        for ref, value in zip(saved_refs, (gate, up)):
            ref[...] = value.astype(ref.dtype)


def _gate_up_in_specs(bt, bf, bd):
    """BlockSpecs of (x, stats, scale, w_gate, w_up) on the grid (row tile, F tile, D tile)."""
    return [
        pl.BlockSpec((bt, bd), lambda i, j, k: (i, k)),  # x [M, D]
        pl.BlockSpec((bt, 2 * LANE), lambda i, j, k: (i, 0)),  # lane stats [M, 256]
        pl.BlockSpec((1, bd), lambda i, j, k: (0, k)),  # scale [1, D]
        pl.BlockSpec((bd, bf), lambda i, j, k: (k, j)),  # w_gate [D, F]
        pl.BlockSpec((bd, bf), lambda i, j, k: (k, j)),  # w_up [D, F]
    ]


def _padded_inputs(x2, mean, rstd, norm_scale, mp, dp):
    """x [Mp, Dp], the lane stats [Mp, 256] and the float32 scale [1, Dp], zero-padded. Padded
    rows and features normalise to 0 (x, mean, rstd and scale are 0 there) and the weights are
    zero-padded too, so nothing leaks."""
    scale = pad2(norm_scale.astype(jnp.float32)[None, :], 1, dp)
    return pad2(x2, mp, dp), _lane_stats(mean, rstd, mp), scale


def fwd_call(x2, mean, rstd, norm_scale, w_gate, w_up, settings: Settings) -> list[jax.Array]:
    """[h] with h [M, F] = silu(LN(x)·w_gate) * (LN(x)·w_up) by the forward kernel; [h, gate,
    up], gate and up [M, F] in x's dtype, when `settings.save_gate_up`."""
    bs = settings.block_sizes
    bt, bf, bd = bs.block_t, bs.block_f, bs.block_d
    (m, d), f = x2.shape, w_gate.shape[1]
    mp, dp, fp = round_up(m, bt), round_up(d, bd), round_up(f, bf)
    xp, sp, scp = _padded_inputs(x2, mean, rstd, norm_scale, mp, dp)
    wgp, wup = pad2(w_gate, dp, fp), pad2(w_up, dp, fp)
    nt, nf, nd = mp // bt, fp // bf, dp // bd
    s = x2.dtype.itemsize
    outs = 3 if settings.save_gate_up else 1
    name = "palm_norm_swiglu_fwd_save" if settings.save_gate_up else "palm_norm_swiglu_fwd"
    cost = pl.CostEstimate(
        flops=4 * mp * dp * fp + 4 * mp * fp,
        transcendentals=mp * fp,
        # x and scale are re-read for every F tile, the weights for every row tile; the lane
        # stats once per row tile.
        bytes_accessed=((mp * dp * s + dp * 4 * nt) * nf + mp * 1024 + 2 * dp * fp * s * nt
                        + outs * mp * fp * s))
    tile = pl.BlockSpec((bt, bf), lambda i, j, k: (i, j))
    with jax.named_scope(f"{name} bt={bt} bf={bf} bd={bd}"):
        outputs = tpu_pallas_call(
            functools.partial(_fwd_kernel, n_steps=nd),
            out_shape=[jax.ShapeDtypeStruct((mp, fp), x2.dtype)] * outs,
            grid=(nt, nf, nd),
            in_specs=_gate_up_in_specs(bt, bf, bd),
            out_specs=[tile] * outs,
            scratch_shapes=[pltpu.VMEM((bt, bf), jnp.float32), pltpu.VMEM((bt, bf), jnp.float32)],
            compiler_params=compiler_params(
                "parallel", "parallel", "arbitrary",
                vmem_bytes=vmem_bytes(bs, x2.dtype, settings.save_gate_up)["fwd"]),
            cost_estimate=cost,
            interpret=settings.interpret,
            name=name,
        )(xp, sp, scp, wgp, wup)
    return [a[:m, :f] for a in outputs]


def _bwd_gates_kernel(x_ref, stats_ref, scale_ref, wg_ref, wu_ref, dh_ref, dgate_ref, dup_ref,
                      gate_acc, up_acc, *, n_steps: int):
    """Recomputes gate and up for one [bt, bf] tile (as the forward does) and turns dh into
    their cotangents in the epilogue, so the pre-activations never exist in HBM."""
    _accumulate_gate_up(x_ref, stats_ref, scale_ref, wg_ref, wu_ref, gate_acc, up_acc)

    @pl.when(pl.program_id(2) == n_steps - 1)
    def _epilogue():
        d_gate, d_up = swiglu_bwd(gate_acc[...], up_acc[...], dh_ref[...], dgate_ref.dtype)
        dgate_ref[...] = d_gate
        dup_ref[...] = d_up


def _bwd_gates_saved_kernel(gate_ref, up_ref, dh_ref, dgate_ref, dup_ref):
    """d_gate, d_up for one [bt, bf] tile from the saved gate and up: elementwise, no matmul."""
    f32 = jnp.float32
    d_gate, d_up = swiglu_bwd(gate_ref[...].astype(f32), up_ref[...].astype(f32), dh_ref[...],
                              dgate_ref.dtype)
    dgate_ref[...] = d_gate
    dup_ref[...] = d_up


def _bwd_dx_kernel(dgate_ref, dup_ref, wg_ref, wu_ref, dxn_ref):
    """dxn [bt, bd] += d_gate·w_gateᵀ + d_up·w_upᵀ over F tiles, straight into the f32 output."""

    @pl.when(pl.program_id(2) == 0)
    def _init():
        dxn_ref[...] = jnp.zeros_like(dxn_ref)

    f32 = jnp.float32
    dxn_ref[...] += (
        jax.lax.dot_general(dgate_ref[...], wg_ref[...], NT_DIMS, preferred_element_type=f32)
        + jax.lax.dot_general(dup_ref[...], wu_ref[...], NT_DIMS, preferred_element_type=f32))


def _bwd_dw_kernel(xn_ref, dgate_ref, dup_ref, dwg_ref, dwu_ref, dwg_acc, dwu_acc, *,
                   n_steps: int):
    """d_w_gate and d_w_up [bd, bf] += LN(x)ᵀ·d_gate and LN(x)ᵀ·d_up over row tiles, reading
    each LN(x) tile once for both weights."""

    @pl.when(pl.program_id(2) == 0)
    def _init():
        dwg_acc[...] = jnp.zeros_like(dwg_acc)
        dwu_acc[...] = jnp.zeros_like(dwu_acc)

    # Transposed in float32 (the 32-bit transpose is Mosaic's best-supported case; exact).
    xn_t = xn_ref[...].astype(jnp.float32).T.astype(xn_ref.dtype)  # [bd, bt]
    dwg_acc[...] += jnp.dot(xn_t, dgate_ref[...], preferred_element_type=jnp.float32)
    dwu_acc[...] += jnp.dot(xn_t, dup_ref[...], preferred_element_type=jnp.float32)

    @pl.when(pl.program_id(2) == n_steps - 1)
    def _epilogue():
        dwg_ref[...] = dwg_acc[...].astype(dwg_ref.dtype)
        dwu_ref[...] = dwu_acc[...].astype(dwu_ref.dtype)


def bwd_gates_call(x2, mean, rstd, norm_scale, wgp, wup, dhp, settings: Settings):
    """d_gate, d_up [Mp, Fp] in x's dtype, recomputing gate and up from x [M, D] and its
    statistics; grid (row tile, F tile, D tile) as the forward."""
    xp, sp, scp = _padded_inputs(x2, mean, rstd, norm_scale, dhp.shape[0], wgp.shape[0])
    bs = settings.block_sizes
    bt, bf, bd = bs.block_t_bwd, bs.block_f_bwd, bs.block_d_bwd
    (mp, dp), fp, s = xp.shape, wgp.shape[1], xp.dtype.itemsize
    nt, nf, nd = mp // bt, fp // bf, dp // bd
    cost = pl.CostEstimate(
        flops=4 * mp * dp * fp + 10 * mp * fp,
        transcendentals=mp * fp,
        bytes_accessed=((mp * dp * s + dp * 4 * nt) * nf + mp * 1024 + 2 * dp * fp * s * nt
                        + 3 * mp * fp * s))
    tile = pl.BlockSpec((bt, bf), lambda i, j, k: (i, j))
    return tpu_pallas_call(
        functools.partial(_bwd_gates_kernel, n_steps=nd),
        out_shape=[jax.ShapeDtypeStruct((mp, fp), xp.dtype)] * 2,
        grid=(nt, nf, nd),
        in_specs=[*_gate_up_in_specs(bt, bf, bd), tile],
        out_specs=[tile, tile],
        scratch_shapes=[pltpu.VMEM((bt, bf), jnp.float32), pltpu.VMEM((bt, bf), jnp.float32)],
        compiler_params=compiler_params("parallel", "parallel", "arbitrary",
                                        vmem_bytes=vmem_bytes(bs, xp.dtype)["bwd_gates"]),
        cost_estimate=cost,
        interpret=settings.interpret,
        name="palm_norm_swiglu_bwd_gates",
    )(xp, sp, scp, wgp, wup, dhp)


def bwd_gates_saved_call(gatep, upp, dhp, settings: Settings):
    """d_gate, d_up [Mp, Fp] in x's dtype from the saved gate and up [Mp, Fp]; grid (row tile,
    F tile). They overwrite gate and up in place (input_output_aliases): the saved values are
    dead after this kernel, so saving them costs no extra peak memory in the backward."""
    bs = settings.block_sizes
    bt, bf = bs.block_t_bwd, bs.block_f_bwd
    (mp, fp), s = gatep.shape, gatep.dtype.itemsize
    tile = pl.BlockSpec((bt, bf), lambda i, j: (i, j))
    return tpu_pallas_call(
        _bwd_gates_saved_kernel,
        out_shape=[jax.ShapeDtypeStruct((mp, fp), gatep.dtype)] * 2,
        grid=(mp // bt, fp // bf),
        in_specs=[tile, tile, tile],
        out_specs=[tile, tile],
        input_output_aliases={0: 0, 1: 1},
        compiler_params=compiler_params(
            "parallel", "parallel", vmem_bytes=vmem_bytes(bs, gatep.dtype, True)["bwd_gates"]),
        cost_estimate=pl.CostEstimate(flops=10 * mp * fp, transcendentals=mp * fp,
                                      bytes_accessed=5 * mp * fp * s),
        interpret=settings.interpret,
        name="palm_norm_swiglu_bwd_gates_saved",
    )(gatep, upp, dhp)


def bwd_dx_call(d_gate, d_up, wgp, wup, settings: Settings):
    """dxn float32 [Mp, Dp], the cotangent of LN(x); grid (row tile, D tile, F tile)."""
    bs = settings.block_sizes
    bt, bf, bd = bs.block_t_bwd, bs.block_f_bwd, bs.block_d_bwd
    (mp, fp), dp, s = d_gate.shape, wgp.shape[0], d_gate.dtype.itemsize
    nt, nd, nf = mp // bt, dp // bd, fp // bf
    cost = pl.CostEstimate(
        flops=4 * mp * dp * fp,
        transcendentals=0,
        bytes_accessed=2 * mp * fp * s * nd + 2 * dp * fp * s * nt + mp * dp * 4)
    act = pl.BlockSpec((bt, bf), lambda i, j, k: (i, k))
    weight = pl.BlockSpec((bd, bf), lambda i, j, k: (j, k))
    return tpu_pallas_call(
        _bwd_dx_kernel,
        out_shape=jax.ShapeDtypeStruct((mp, dp), jnp.float32),
        grid=(nt, nd, nf),
        in_specs=[act, act, weight, weight],
        out_specs=pl.BlockSpec((bt, bd), lambda i, j, k: (i, j)),
        compiler_params=compiler_params("parallel", "parallel", "arbitrary",
                                        vmem_bytes=vmem_bytes(bs, d_gate.dtype)["bwd_dx"]),
        cost_estimate=cost,
        interpret=settings.interpret,
        name="palm_norm_swiglu_bwd_dx",
    )(d_gate, d_up, wgp, wup)


def bwd_dw_call(xnp, d_gate, d_up, settings: Settings):
    """d_w_gate, d_w_up [Dp, Fp] in the weights' dtype; grid (D tile, F tile, row tile)."""
    bs = settings.block_sizes
    bt, bf, bd = bs.block_t_bwd, bs.block_f_bwd, bs.block_d_bwd
    (mp, dp), fp, s = xnp.shape, d_gate.shape[1], xnp.dtype.itemsize
    nd, nf, nt = dp // bd, fp // bf, mp // bt
    cost = pl.CostEstimate(
        flops=4 * mp * dp * fp,
        transcendentals=0,
        bytes_accessed=mp * dp * s * nf + 2 * mp * fp * s * nd + 2 * dp * fp * s)
    act = pl.BlockSpec((bt, bf), lambda i, j, k: (k, j))
    out = pl.BlockSpec((bd, bf), lambda i, j, k: (i, j))
    return tpu_pallas_call(
        functools.partial(_bwd_dw_kernel, n_steps=nt),
        out_shape=[jax.ShapeDtypeStruct((dp, fp), xnp.dtype)] * 2,
        grid=(nd, nf, nt),
        in_specs=[pl.BlockSpec((bt, bd), lambda i, j, k: (k, i)), act, act],  # LN(x), d_gate, d_up
        out_specs=[out, out],
        scratch_shapes=[pltpu.VMEM((bd, bf), jnp.float32), pltpu.VMEM((bd, bf), jnp.float32)],
        compiler_params=compiler_params("parallel", "parallel", "arbitrary",
                                        vmem_bytes=vmem_bytes(bs, xnp.dtype)["bwd_dw"]),
        cost_estimate=cost,
        interpret=settings.interpret,
        name="palm_norm_swiglu_bwd_dw",
    )(xnp, d_gate, d_up)


def prepare(x, norm_scale, w_gate, w_up, *, eps: float, interpret: Any = None,
            block_sizes: BlockSizes | None = None, save_gate_up: bool = False) -> Settings:
    """The call's `Settings` (pallas.py); default tiles for the target generation and mode."""
    pallas.check_pallas_args(x, norm_scale, w_gate, w_up)
    b, t, d = x.shape
    if block_sizes is None:
        block_sizes = BlockSizes.get_default(b * t, d, w_gate.shape[1], x.dtype,
                                             save_gate_up=bool(save_gate_up))
    elif not isinstance(block_sizes, BlockSizes):
        raise ValueError(f"norm_swiglu: block_sizes must be a norm_swiglu.BlockSizes, got {block_sizes!r}")
    rows = sublane(x.dtype)
    if block_sizes.block_t % rows or block_sizes.block_t_bwd % rows:
        raise ValueError(f"norm_swiglu: {x.dtype} row tiles must be multiples of {rows}, got {block_sizes}")
    return Settings(float(eps), block_sizes, tpu_interpret(interpret), bool(save_gate_up))


# The Pallas TPU `norm_swiglu` (the front door's arguments but impl), and pallas.py's
# interface functions, on this module's kernels (`kernels.block_in` calls the latter).
norm_swiglu_pallas_tpu = functools.partial(pallas.norm_swiglu_pallas, sys.modules[__name__])
forward_with_stats = functools.partial(pallas.forward_with_stats, sys.modules[__name__])
backward_to_dh = functools.partial(pallas.backward_to_dh, sys.modules[__name__])
