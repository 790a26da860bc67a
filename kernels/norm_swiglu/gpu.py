"""The Pallas GPU `norm_swiglu` (Triton lowering; kernels/_gpu.py says why Triton).

The math and the residuals are tpu.py's (read its docstring for the decomposition, the
`save_gate_up` trade-off and what `jax.checkpoint` keeps); only the tiling is Triton's. Rows are
the flattened B*T axis (M). Triton has no scratch memory and no sequential grid axis (all
programs of a grid may run at once), so each program owns one output tile and loops over the
contraction itself: its operands' blocks span the contraction axis and the body reads them in
`pl.ds` slices inside a `lax.fori_loop` whose carries are the float32 accumulators, held in
registers (JAX's ops/gpu/attention.py does the same).

Forward, `palm_norm_swiglu_fwd` (`palm_norm_swiglu_fwd_save` also writes gate and up): grid
(M / bt, F / bf). A program loads its rows' mean and 1/std (float32 [bt] each, from
`kernels._common.row_stats` in XLA, as tpu.py) once, then for each of the D / bd steps loads an
x slice [bt, bd] and the scale slice [bd], normalises the slice (LN(x) rounded to x's dtype, as
the reference), and adds its products with the w_gate and w_up slices [bd, bf] into two float32
[bt, bf] accumulators. The epilogue writes h = silu(gate) * up (and gate and up) once.

Backward, as tpu.py: the forward saves x, the statistics and, with `save_gate_up`, gate and up.
- `palm_norm_swiglu_bwd_gates`: the forward's grid and loop, recomputing gate and up; the
  epilogue turns the dh tile into d_gate and d_up (x's dtype). `palm_norm_swiglu_bwd_gates_saved`
  (`save_gate_up`): elementwise on the saved gate and up, grid (M / bt, F / bf), no loop; as in
  tpu.py, d_gate and d_up overwrite gate and up in place (`input_output_aliases`).
- `palm_norm_swiglu_bwd_dx`: dLN [bt, bd] = d_gate·w_gateᵀ + d_up·w_upᵀ, grid (M / bt, D / bd),
  looping over F in bf slices, one float32 accumulator, written in float32.
- `palm_norm_swiglu_bwd_dw`: d_w_gate, d_w_up [bd, bf] = LN(x)ᵀ·d_gate, LN(x)ᵀ·d_up, grid
  (D / bd, F / bf), looping over M in bt slices, two accumulators; LN(x) is materialised once by
  XLA for it (tpu.py says why).
- the LayerNorm backward in XLA (`kernels._common.layer_norm_bwd`).
`forward_with_stats`, `backward_to_dh` (the backward's padding and this sequence of kernels) and
the custom_vjp are pallas.py's, shared with tpu.py; this module gives them its kernel calls,
`prepare` and `Settings` (pallas.py's backend interface), so `kernels.block_in` can share one
LayerNorm on either backend.

Boundaries. The Pallas Triton lowering does not mask loads or stores at an array's end: the
wrapper zero-pads every operand to whole tiles (M to bt, D to bd, F to bf; padded x columns have
scale 0 and padded rows rstd 0, so they normalise to 0 and add nothing), and outputs are sliced
back. A block spanning a contraction axis must still be a power of two: it is the padded extent
rounded up to one (`next_power_of_two`), larger than the array when that extent is not one
(PaLM-540B's D = 18432 -> 32768); the loop reads only the padded extent, so nothing past the
array is touched on the GPU (the CPU interpreter pads the block with values it never reads).
Such calls pass `masked_edges=True` to `kernels._gpu.pallas_call`, whose whole-block rule they
keep by construction rather than by masks; padding the weights to the power of two instead
would copy them, 78% larger, on every call at PaLM-540B.

FLOPs per call at PaLM-8B (M*D*F = 2048 * 4096 * 16384 = 1.37e11): forward 4*M*D*F = 550 GFLOP;
backward 12*M*D*F = 1649 GFLOP recomputing (8*M*D*F saving). HBM bytes (bf16, each tensor once)
are tpu.py's: forward 356 MiB (484 saving), backward 1378 MiB (1232 saving; the saved-gates
kernel writes over gate and up, so saving adds nothing to the backward's peak memory). Tile
re-reads: every program reads its rows of x and its columns of both weights in full, so x is
read F / bf = 128 times (2 GiB) and the weights M / bt = 16 times (4 GiB). Grid axis 0 is
CUDA's x, the fastest-varying in launch order: the 16 row tiles of one F tile run side by side,
so a weight slice comes from HBM about once and from L2 for the other row tiles, and x (16 MiB)
stays in H100's 50 MiB L2. At ~3.3 TB/s and ~990 dense bf16 TFLOP/s the forward's 0.56 ms of
tensor-core work then outweighs its ~0.1 ms of compulsory HBM traffic; a real GPU measures how
well L2 holds.

Default tiles for H100/H200 (`BlockSizes.get_default`): 128 x 128 output tiles, a 64-wide
contraction slice, 8 warps (the two [128, 128] float32 accumulators are 128 registers per
thread at 256 threads), 3 pipeline stages forward and 2 backward. Shared memory (Triton's
software pipeline keeps `num_stages` copies of every slice the loop loads; `shared_memory_bytes`)
at bf16: forward 3 * (bt*bd + 2*bd*bf) * 2 B = 144 KiB; backward gates 96 KiB, dx 2 * (2*bt*bf +
2*bd*bf) * 2 B = 192 KiB, dw 2 * (bt*bd + 2*bt*bf) * 2 B = 160 KiB, all under the 227 KiB a
thread block has (`check_shared_memory`). float32 doubles them: defaults drop a stage, then halve
the largest tile, until every kernel fits. Small shapes get tiles no larger than the padded
extent (at least 16: Triton's dots need every dimension >= 16).

What CPU checks: the values (interpret mode, tests/test_norm_swiglu.py) and the whole
Pallas-to-Triton lowering at PaLM-8B (`tests/gpu_export.py`), which refuses non power-of-two
arrays and unsupported operations. What it cannot: Triton's compile to PTX (register spills,
the real shared-memory use), out-of-bounds accesses (the interpreter pads), and speed.
"""

from __future__ import annotations

import dataclasses
import functools
import sys

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels._common import NT_DIMS, layer_norm_rows, pad2, pad_to, round_up
from kernels._gpu import (
    check_block_sizes,
    check_shared_memory,
    fit_tile,
    gpu_interpret,
    next_power_of_two,
    pallas_call,
    shrink_to_shared_memory,
)
from kernels.norm_swiglu import pallas
from kernels.norm_swiglu.reference import swiglu_bwd

_F32 = jnp.float32
# lax.dot_general dimension numbers contracting the first axes (aᵀ·b); NT_DIMS is a·bᵀ.
_TN = (((0,), (0,)), ((), ()))


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles and launch settings of the Pallas GPU kernels; rows are the flattened B*T axis.

    Forward: block_t rows x block_f hidden units per output tile, block_d model features per
    loop step. Backward: the three kernels share block_t_bwd, block_f_bwd, block_d_bwd (so
    operands are padded once), each contracting over a different one (gates over D, dx over F,
    dw over rows). num_warps / num_stages: Triton's launch width and pipeline depth, forward and
    backward. Every tile is a power of two >= 16.
    """

    block_t: int = 128
    block_f: int = 128
    block_d: int = 64
    block_t_bwd: int = 128
    block_f_bwd: int = 128
    block_d_bwd: int = 64
    num_warps: int = 8
    num_stages: int = 3
    num_warps_bwd: int = 8
    num_stages_bwd: int = 2

    def __post_init__(self):
        check_block_sizes(self, tiles=("block_t", "block_f", "block_d", "block_t_bwd",
                                       "block_f_bwd", "block_d_bwd"),
                          warps=("num_warps", "num_warps_bwd"),
                          stages=("num_stages", "num_stages_bwd"))

    @classmethod
    def get_default(cls, rows: int, d_model: int, d_ff: int, dtype=jnp.bfloat16,
                    save_gate_up: bool = False) -> "BlockSizes":
        """The H100 tiles (module docstring), no larger than each axis' padded extent, then a
        pipeline stage dropped (down to 2) or the largest tile of a pass halved while one of its
        kernels exceeds the shared memory of a thread block."""
        base = cls()
        blocks = cls(fit_tile(rows, base.block_t), fit_tile(d_ff, base.block_f),
                     fit_tile(d_model, base.block_d), fit_tile(rows, base.block_t_bwd),
                     fit_tile(d_ff, base.block_f_bwd), fit_tile(d_model, base.block_d_bwd))
        passes = ((("fwd",), "num_stages", ("block_t", "block_f", "block_d")),
                  (("bwd_gates", "bwd_dx", "bwd_dw"), "num_stages_bwd",
                   ("block_t_bwd", "block_f_bwd", "block_d_bwd")))
        for kernels, stages, tiles in passes:
            def used(blocks, kernels=kernels):
                return max(shared_memory_bytes(blocks, dtype, save_gate_up)[k] for k in kernels)
            blocks = shrink_to_shared_memory(blocks, used, stages=stages, tiles=tiles)
        return blocks


def shared_memory_bytes(block_sizes: BlockSizes, dtype, save_gate_up: bool = False
                        ) -> dict[str, int]:
    """Shared memory each kernel's software pipeline needs: `num_stages` copies of every slice
    its loop loads (the operands of its dots; the statistics and scale slices are a few hundred
    bytes and left out). The saved-gates kernel has no loop and no dot ("bwd_gates" is it when
    `save_gate_up`)."""
    s = jnp.dtype(dtype).itemsize
    bs = block_sizes
    fwd = bs.num_stages * (bs.block_t * bs.block_d + 2 * bs.block_d * bs.block_f) * s
    bt, bf, bd, n = bs.block_t_bwd, bs.block_f_bwd, bs.block_d_bwd, bs.num_stages_bwd
    gates = 0 if save_gate_up else n * (bt * bd + 2 * bd * bf) * s
    dx = n * (2 * bt * bf + 2 * bd * bf) * s
    dw = n * (bt * bd + 2 * bt * bf) * s
    return {"fwd": fwd, "bwd_gates": gates, "bwd_dx": dx, "bwd_dw": dw}


@dataclasses.dataclass(frozen=True)
class Settings:
    """The non-array arguments of a call, from `prepare` (pallas.py describes them)."""

    eps: float
    block_sizes: BlockSizes
    interpret: bool  # see kernels._gpu.gpu_interpret
    save_gate_up: bool  # the forward also writes gate and up, which the backward reads


def _span(n: int) -> int:
    """Block extent of an axis a program loops over: its padded length as a power of two."""
    return next_power_of_two(n)


def _past_end(n: int) -> bool:
    """Whether a block spanning an axis of padded length n passes the array's end. The loops
    read only [0, n), so no load crosses it; `pallas_call(masked_edges=True)` then skips its
    whole-block rule (every other block is whole: the wrapper pads to tiles)."""
    return _span(n) != n


def _gate_up(x_ref, mean_ref, rstd_ref, scale_ref, wg_ref, wu_ref, *, n_d: int, block_d: int):
    """float32 gate and up [bt, bf] for one tile: the loop over D in block_d slices, each x
    slice normalised from the row statistics and rounded to x's dtype (the reference's LN(x))."""
    bt, bf = x_ref.shape[0], wg_ref.shape[1]
    mean, rstd = mean_ref[...][:, None], rstd_ref[...][:, None]  # [bt, 1]

    def body(k, carry):
        gate, up = carry
        cols = pl.ds(pl.multiple_of(k * block_d, block_d), block_d)
        xn = layer_norm_rows(x_ref[:, cols], mean, rstd, scale_ref[cols][None, :])
        xn = xn.astype(x_ref.dtype)  # [bt, bd]
        gate += jnp.dot(xn, wg_ref[cols, :], preferred_element_type=_F32)
        up += jnp.dot(xn, wu_ref[cols, :], preferred_element_type=_F32)
        return gate, up

    zeros = jnp.zeros((bt, bf), _F32)
    return lax.fori_loop(0, n_d, body, (zeros, zeros))


def _fwd_kernel(x_ref, mean_ref, rstd_ref, scale_ref, wg_ref, wu_ref, h_ref, *saved_refs,
                n_d: int, block_d: int):
    gate, up = _gate_up(x_ref, mean_ref, rstd_ref, scale_ref, wg_ref, wu_ref, n_d=n_d,
                        block_d=block_d)
    h_ref[...] = (jax.nn.silu(gate) * up).astype(h_ref.dtype)
    if saved_refs:  # save_gate_up: the pre-activations rounded to x's dtype
        gate_ref, up_ref = saved_refs
        gate_ref[...] = gate.astype(gate_ref.dtype)
        up_ref[...] = up.astype(up_ref.dtype)


def _bwd_gates_kernel(x_ref, mean_ref, rstd_ref, scale_ref, wg_ref, wu_ref, dh_ref, dgate_ref,
                      dup_ref, *, n_d: int, block_d: int):
    """Recomputes gate and up for one [bt, bf] tile and turns dh into their cotangents."""
    gate, up = _gate_up(x_ref, mean_ref, rstd_ref, scale_ref, wg_ref, wu_ref, n_d=n_d,
                        block_d=block_d)
    d_gate, d_up = swiglu_bwd(gate, up, dh_ref[...], dgate_ref.dtype)
    dgate_ref[...] = d_gate
    dup_ref[...] = d_up


def _bwd_gates_saved_kernel(gate_ref, up_ref, dh_ref, dgate_ref, dup_ref):
    """d_gate, d_up for one [bt, bf] tile from the saved gate and up: elementwise."""
    d_gate, d_up = swiglu_bwd(gate_ref[...].astype(_F32), up_ref[...].astype(_F32), dh_ref[...],
                              dgate_ref.dtype)
    dgate_ref[...] = d_gate
    dup_ref[...] = d_up


def _bwd_dx_kernel(dgate_ref, dup_ref, wg_ref, wu_ref, dxn_ref, *, n_f: int, block_f: int):
    """dLN [bt, bd] = d_gate·w_gateᵀ + d_up·w_upᵀ, looping over F in block_f slices."""
    bt, bd = dxn_ref.shape

    def body(k, acc):
        cols = pl.ds(pl.multiple_of(k * block_f, block_f), block_f)
        acc += lax.dot_general(dgate_ref[:, cols], wg_ref[:, cols], NT_DIMS,
                               preferred_element_type=_F32)
        acc += lax.dot_general(dup_ref[:, cols], wu_ref[:, cols], NT_DIMS,
                               preferred_element_type=_F32)
        return acc

    dxn_ref[...] = lax.fori_loop(0, n_f, body, jnp.zeros((bt, bd), _F32))


def _bwd_dw_kernel(xn_ref, dgate_ref, dup_ref, dwg_ref, dwu_ref, *, n_t: int, block_t: int):
    """d_w_gate, d_w_up [bd, bf] = LN(x)ᵀ·d_gate, LN(x)ᵀ·d_up, looping over rows in block_t
    slices, each LN(x) slice read once for both."""
    bd, bf = dwg_ref.shape

    def body(k, carry):
        dwg, dwu = carry
        rows = pl.ds(pl.multiple_of(k * block_t, block_t), block_t)
        xn = xn_ref[rows, :]  # [bt, bd]
        dwg += lax.dot_general(xn, dgate_ref[rows, :], _TN, preferred_element_type=_F32)
        dwu += lax.dot_general(xn, dup_ref[rows, :], _TN, preferred_element_type=_F32)
        return dwg, dwu

    zeros = jnp.zeros((bd, bf), _F32)
    dwg, dwu = lax.fori_loop(0, n_t, body, (zeros, zeros))
    dwg_ref[...] = dwg.astype(dwg_ref.dtype)
    dwu_ref[...] = dwu.astype(dwu_ref.dtype)


def _padded_inputs(x2, mean, rstd, norm_scale, mp, dp):
    """x [Mp, Dp] zero-padded; mean, rstd float32 [Mp] (padded rows: rstd 0, so they
    normalise to 0); the scale float32 [Dp] (padded features: 0)."""
    m = x2.shape[0]
    return (pad2(x2, mp, dp), pad_to(mean.reshape(m).astype(_F32), (mp,)),
            pad_to(rstd.reshape(m).astype(_F32), (mp,)), pad_to(norm_scale.astype(_F32), (dp,)))


def _gate_up_in_specs(bt, bf, dp):
    """x, mean, rstd, scale, w_gate, w_up for a grid (row tile, F tile) looping over D."""
    ds = _span(dp)
    return [
        pl.BlockSpec((bt, ds), lambda i, j: (i, 0)),  # x [Mp, Dp]
        pl.BlockSpec((bt,), lambda i, j: (i,)),  # mean [Mp]
        pl.BlockSpec((bt,), lambda i, j: (i,)),  # rstd [Mp]
        pl.BlockSpec((ds,), lambda i, j: (0,)),  # scale [Dp]
        pl.BlockSpec((ds, bf), lambda i, j: (0, j)),  # w_gate [Dp, Fp]
        pl.BlockSpec((ds, bf), lambda i, j: (0, j)),  # w_up [Dp, Fp]
    ]


def fwd_call(x2, mean, rstd, norm_scale, w_gate, w_up, settings: Settings) -> list[jax.Array]:
    """[h] [M, F] (and gate, up [M, F] in x's dtype when `settings.save_gate_up`)."""
    bs = settings.block_sizes
    bt, bf, bd = bs.block_t, bs.block_f, bs.block_d
    (m, d), f = x2.shape, w_gate.shape[1]
    mp, dp, fp = round_up(m, bt), round_up(d, bd), round_up(f, bf)
    inputs = _padded_inputs(x2, mean, rstd, norm_scale, mp, dp)
    wgp, wup = pad2(w_gate, dp, fp), pad2(w_up, dp, fp)
    outs = 3 if settings.save_gate_up else 1
    name = "palm_norm_swiglu_fwd_save" if settings.save_gate_up else "palm_norm_swiglu_fwd"
    tile = pl.BlockSpec((bt, bf), lambda i, j: (i, j))
    with jax.named_scope(f"{name} bt={bt} bf={bf} bd={bd}"):
        outputs = pallas_call(
            functools.partial(_fwd_kernel, n_d=dp // bd, block_d=bd),
            name=name,
            out_shape=[jax.ShapeDtypeStruct((mp, fp), x2.dtype)] * outs,
            grid=(mp // bt, fp // bf),
            in_specs=_gate_up_in_specs(bt, bf, dp),
            out_specs=[tile] * outs,
            interpret=settings.interpret,
            masked_edges=_past_end(dp),
            num_warps=bs.num_warps,
            num_stages=bs.num_stages,
        )(*inputs, wgp, wup)
    return [a[:m, :f] for a in outputs]


def bwd_gates_call(x2, mean, rstd, norm_scale, wgp, wup, dhp, settings: Settings):
    """d_gate, d_up [Mp, Fp] in x's dtype, recomputing gate and up from x [M, D] and its
    statistics; grid (row tile, F tile)."""
    bs = settings.block_sizes
    bt, bf, bd = bs.block_t_bwd, bs.block_f_bwd, bs.block_d_bwd
    (mp, fp), dp = dhp.shape, wgp.shape[0]
    inputs = _padded_inputs(x2, mean, rstd, norm_scale, mp, dp)
    tile = pl.BlockSpec((bt, bf), lambda i, j: (i, j))
    return pallas_call(
        functools.partial(_bwd_gates_kernel, n_d=dp // bd, block_d=bd),
        name="palm_norm_swiglu_bwd_gates",
        out_shape=[jax.ShapeDtypeStruct((mp, fp), inputs[0].dtype)] * 2,
        grid=(mp // bt, fp // bf),
        in_specs=[*_gate_up_in_specs(bt, bf, dp), tile],
        out_specs=[tile, tile],
        interpret=settings.interpret,
        masked_edges=_past_end(dp),
        num_warps=bs.num_warps_bwd,
        num_stages=bs.num_stages_bwd,
    )(*inputs, wgp, wup, dhp)


def bwd_gates_saved_call(gatep, upp, dhp, settings: Settings):
    """d_gate, d_up [Mp, Fp] from the saved gate and up; grid (row tile, F tile). They
    overwrite gate and up in place: each program reads its tiles before writing them, and the
    saved values are dead after this kernel, so saving them adds no peak memory here."""
    bs = settings.block_sizes
    bt, bf = bs.block_t_bwd, bs.block_f_bwd
    mp, fp = gatep.shape
    tile = pl.BlockSpec((bt, bf), lambda i, j: (i, j))
    return pallas_call(
        _bwd_gates_saved_kernel,
        name="palm_norm_swiglu_bwd_gates_saved",
        out_shape=[jax.ShapeDtypeStruct((mp, fp), gatep.dtype)] * 2,
        grid=(mp // bt, fp // bf),
        in_specs=[tile, tile, tile],
        out_specs=[tile, tile],
        interpret=settings.interpret,
        num_warps=bs.num_warps_bwd,
        num_stages=bs.num_stages_bwd,
        input_output_aliases={0: 0, 1: 1},
    )(gatep, upp, dhp)


def bwd_dx_call(d_gate, d_up, wgp, wup, settings: Settings):
    """dLN float32 [Mp, Dp]; grid (row tile, D tile), looping over F."""
    bs = settings.block_sizes
    bt, bf, bd = bs.block_t_bwd, bs.block_f_bwd, bs.block_d_bwd
    (mp, fp), dp = d_gate.shape, wgp.shape[0]
    fs = _span(fp)
    act = pl.BlockSpec((bt, fs), lambda i, j: (i, 0))
    weight = pl.BlockSpec((bd, fs), lambda i, j: (j, 0))
    return pallas_call(
        functools.partial(_bwd_dx_kernel, n_f=fp // bf, block_f=bf),
        name="palm_norm_swiglu_bwd_dx",
        out_shape=jax.ShapeDtypeStruct((mp, dp), _F32),
        grid=(mp // bt, dp // bd),
        in_specs=[act, act, weight, weight],
        out_specs=pl.BlockSpec((bt, bd), lambda i, j: (i, j)),
        interpret=settings.interpret,
        masked_edges=_past_end(fp),
        num_warps=bs.num_warps_bwd,
        num_stages=bs.num_stages_bwd,
    )(d_gate, d_up, wgp, wup)


def bwd_dw_call(xnp, d_gate, d_up, settings: Settings):
    """d_w_gate, d_w_up [Dp, Fp] in x's dtype; grid (D tile, F tile), looping over rows."""
    bs = settings.block_sizes
    bt, bf, bd = bs.block_t_bwd, bs.block_f_bwd, bs.block_d_bwd
    (mp, dp), fp = xnp.shape, d_gate.shape[1]
    ms = _span(mp)
    act = pl.BlockSpec((ms, bf), lambda i, j: (0, j))
    out = pl.BlockSpec((bd, bf), lambda i, j: (i, j))
    return pallas_call(
        functools.partial(_bwd_dw_kernel, n_t=mp // bt, block_t=bt),
        name="palm_norm_swiglu_bwd_dw",
        out_shape=[jax.ShapeDtypeStruct((dp, fp), xnp.dtype)] * 2,
        grid=(dp // bd, fp // bf),
        in_specs=[pl.BlockSpec((ms, bd), lambda i, j: (0, i)), act, act],  # LN(x), d_gate, d_up
        out_specs=[out, out],
        interpret=settings.interpret,
        masked_edges=_past_end(mp),
        num_warps=bs.num_warps_bwd,
        num_stages=bs.num_stages_bwd,
    )(xnp, d_gate, d_up)


def prepare(x, norm_scale, w_gate, w_up, *, eps: float, interpret=None,
            block_sizes: BlockSizes | None = None, save_gate_up: bool = False) -> Settings:
    """The call's `Settings` (pallas.py); default tiles for the shape and mode."""
    pallas.check_pallas_args(x, norm_scale, w_gate, w_up)
    b, t, d = x.shape
    save_gate_up = bool(save_gate_up)
    if block_sizes is None:
        block_sizes = BlockSizes.get_default(b * t, d, w_gate.shape[1], x.dtype, save_gate_up)
    elif not isinstance(block_sizes, BlockSizes):
        raise ValueError("norm_swiglu: impl='pallas_gpu' needs a norm_swiglu.gpu.BlockSizes, got "
                         f"{block_sizes!r}")
    for kernel, used in shared_memory_bytes(block_sizes, x.dtype, save_gate_up).items():
        check_shared_memory(used, f"palm_norm_swiglu {kernel} {block_sizes}")
    return Settings(float(eps), block_sizes, gpu_interpret(interpret), save_gate_up)


# The Pallas GPU (Triton) `norm_swiglu` (the front door's arguments but impl), and pallas.py's
# interface functions, on this module's kernels (`kernels.block_in` calls the latter).
norm_swiglu_pallas_gpu = functools.partial(pallas.norm_swiglu_pallas, sys.modules[__name__])
forward_with_stats = functools.partial(pallas.forward_with_stats, sys.modules[__name__])
backward_to_dh = functools.partial(pallas.backward_to_dh, sys.modules[__name__])
