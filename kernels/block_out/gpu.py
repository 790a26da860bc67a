"""The Pallas GPU `block_out` (Triton lowering; kernels/_gpu.py says why Triton): its kernels and
tiling (`forward`, `backward_dact`, `BlockSizes`, `check_tiles`: the backend interface pallas.py
describes; the checks, the jit and the custom_vjp wiring are pallas.py's, shared with tpu.py).

The math and the residuals are tpu.py's (its docstring has the decomposition and the HBM
arithmetic); only the tiling is Triton's. Rows are the flattened B*T axis (M); o is viewed as
[M, H*K] and wo as [H*K, D] (free reshapes). Triton has no scratch memory and no sequential grid
axis, so each program owns one output tile and loops over the contraction itself: the blocks of
its operands span the contraction axis and the body reads them in `pl.ds` slices inside
`lax.fori_loop`s whose carry, the float32 accumulator, stays in registers.

Forward, `palm_block_out_fwd`: grid (M / bt, D / bd). A program's accumulator [bt, bd] runs
through two loops over the shared contraction C = [H*K | F] without materialising the
concatenation: H*K / bc steps of o [bt, bc] · wo [bc, bd], then F / bc steps of h [bt, bc] ·
w_down [bc, bd]; the epilogue adds the residual tile x [bt, bd] and writes the result once.

Backward, as tpu.py: the forward saves o, wo, h and w_down; dx = dy (the residual path).
- `palm_block_out_bwd_dact`: do = dy·woᵀ and dh = dy·w_downᵀ in one kernel over the output
  axis C = [H*K | F], grid (M / bt, (H*K + F) / bc): a program with c < H*K / bc computes a do
  tile, the others a dh tile (`lax.cond`; on Triton a program writes only the output it
  stores), looping over D in bd slices of the dy row block and the weight's rows.
- jnp (XLA): dwo = oᵀ·dy and dw_down = hᵀ·dy (`reference.weight_grads`, tpu.py says why).

Boundaries. The Pallas Triton lowering does not mask loads or stores at an array's end: the
wrapper zero-pads every operand to whole tiles (rows to bt, D to bd, H*K and F to bc; padded
contraction entries multiply zeros) and slices outputs back. A block spanning a contraction axis
is the padded extent rounded up to a power of two (Triton's rule), larger than the array when
the extent is not one (PaLM-540B's D = 18432); the loops read only the padded extent, so nothing
past an array is touched on the GPU (the CPU interpreter pads the block with values it never
reads). Such calls pass `masked_edges=True` to `kernels._gpu.pallas_call`, whose whole-block
rule they keep by construction rather than by masks; padding the weights to the power of two
instead would copy them, 78% larger, on every call at PaLM-540B.

FLOPs per call at PaLM-8B (M = 2048, D = 4096, H*K = 4096, F = 16384): forward 2*M*D*(H*K + F)
= 344 GFLOP; backward 4*M*D*(H*K + F) = 687 GFLOP (half in the kernel, half in XLA's weight
gradients). HBM bytes (bf16, each tensor once) are tpu.py's: forward 272 MiB, backward 528 MiB.
Tile re-reads: o and h once per D tile (D / bd = 32 at bd = 128: 2.5 GiB), the weights once
per row tile (M / bt = 16: 2.5 GiB); in the backward dy once per C tile (160 at bc = 128:
2.5 GiB) and the weights once per row tile. Grid axis 0 (rows) is CUDA's x, the fastest-varying
in launch order: the 16 row tiles of one output column tile run side by side and share its
weight slices through L2, so the weights come from HBM about once; the activations' re-reads
(o and h: 80 MiB, more than H100's 50 MiB L2) are partly served by L2, which only a real GPU
measures.

Default tiles for H100/H200 (`BlockSizes.get_default`): 128 x 128 output tiles, a 64-wide
contraction slice, 4 warps (one [128, 128] float32 accumulator is 128 registers per thread at
128 threads: the classic Triton matmul configuration), 4 pipeline stages. Shared memory (Triton
keeps `num_stages` copies of every slice a loop loads; `shared_memory_bytes`) at bf16: forward
4 * (bt*bc + bc*bd) * 2 B = 128 KiB, backward 4 * (bt*bd + bc*bd) * 2 B = 128 KiB, under the
227 KiB of a thread block (`check_shared_memory`); float32 doubles them, and the defaults drop
stages (to 2) and then halve the largest tile until each kernel fits. Small shapes get tiles no
larger than the padded extent (at least 16: Triton's dots need every dimension >= 16).

What CPU checks: the values (interpret mode, tests/test_block_out.py) and the whole
Pallas-to-Triton lowering at PaLM-8B (`tests/gpu_export.py`). What it cannot: Triton's compile
to PTX (register spills, the real shared-memory use), out-of-bounds accesses (the interpreter
pads), and speed.
"""

from __future__ import annotations

import dataclasses
import functools
import sys

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels._common import NT_DIMS, pad2, round_up
from kernels._gpu import (
    check_block_sizes,
    check_shared_memory,
    fit_tile,
    gpu_interpret,
    next_power_of_two,
    pallas_call,
    shrink_to_shared_memory,
)
from kernels.block_out.pallas import Settings, block_out_pallas

IMPL = "pallas_gpu"
_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles and launch settings of the Pallas GPU kernels; rows are the flattened B*T axis,
    C = [H*K | F].

    Forward (`palm_block_out_fwd`): block_t rows x block_d model features per output tile,
    block_c contraction entries per loop step. Backward (`palm_block_out_bwd_dact`):
    block_t_bwd rows x block_c_bwd entries of C per output tile, block_d_bwd model features per
    loop step. num_warps / num_stages: Triton's launch width and pipeline depth, forward and
    backward. Every tile is a power of two >= 16.
    """

    block_t: int = 128
    block_d: int = 128
    block_c: int = 64
    block_t_bwd: int = 128
    block_c_bwd: int = 128
    block_d_bwd: int = 64
    num_warps: int = 4
    num_stages: int = 4
    num_warps_bwd: int = 4
    num_stages_bwd: int = 4

    def __post_init__(self):
        check_block_sizes(self, tiles=("block_t", "block_d", "block_c", "block_t_bwd",
                                       "block_c_bwd", "block_d_bwd"),
                          warps=("num_warps", "num_warps_bwd"),
                          stages=("num_stages", "num_stages_bwd"))

    @classmethod
    def get_default(cls, rows: int, d_model: int, attn_width: int, d_ff: int,
                    dtype=jnp.bfloat16) -> "BlockSizes":
        """Tiles for x [rows, d_model], o [rows, attn_width = H*K], h [rows, d_ff]: the H100
        tiles (module docstring), no larger than each axis' padded extent, then a pipeline
        stage dropped (down to 2) or the largest tile halved while a kernel exceeds the shared
        memory of a thread block."""
        base = cls()
        c = max(attn_width, d_ff)
        blocks = cls(fit_tile(rows, base.block_t), fit_tile(d_model, base.block_d),
                     fit_tile(c, base.block_c), fit_tile(rows, base.block_t_bwd),
                     fit_tile(c, base.block_c_bwd), fit_tile(d_model, base.block_d_bwd))
        passes = (("fwd", "num_stages", ("block_t", "block_d", "block_c")),
                  ("bwd_dact", "num_stages_bwd", ("block_t_bwd", "block_c_bwd", "block_d_bwd")))
        for kernel, stages, tiles in passes:
            blocks = shrink_to_shared_memory(
                blocks, lambda b, kernel=kernel: shared_memory_bytes(b, dtype)[kernel],
                stages=stages, tiles=tiles)
        return blocks


def shared_memory_bytes(block_sizes: BlockSizes, dtype) -> dict[str, int]:
    """Shared memory each kernel's software pipeline needs: `num_stages` copies of the two
    slices a loop step loads (the operands of its dot)."""
    s = jnp.dtype(dtype).itemsize
    bs = block_sizes
    fwd = bs.num_stages * (bs.block_t * bs.block_c + bs.block_c * bs.block_d) * s
    dact = bs.num_stages_bwd * (bs.block_t_bwd * bs.block_d_bwd
                                + bs.block_c_bwd * bs.block_d_bwd) * s
    return {"fwd": fwd, "bwd_dact": dact}


def _pad_to_tiles(rows2, wo2, w_down, bt: int, bd: int, bc: int):
    """rows2 [M, D] (x or dy), wo2 [H*K, D] and w_down [F, D] zero-padded to whole tiles (M to
    bt, D to bd, H*K and F to bc: padded contraction entries multiply zeros, padded outputs are
    sliced off), and the padded extents (Mp, Dp, H*Kp, Fp)."""
    (m, d), hk, f = rows2.shape, wo2.shape[0], w_down.shape[0]
    mp, dp, hkp, fp = round_up(m, bt), round_up(d, bd), round_up(hk, bc), round_up(f, bc)
    return (pad2(rows2, mp, dp), pad2(wo2, hkp, dp), pad2(w_down, fp, dp)), (mp, dp, hkp, fp)


def _fwd_kernel(x_ref, attn_ref, wo_ref, mlp_ref, w_down_ref, out_ref, *, n_attn: int,
                n_mlp: int, block_c: int):
    """One [bt, bd] tile of x + o·wo + h·w_down: the two products in one float32 carry."""

    def step(act_ref, w_ref):
        def body(k, acc):
            cols = pl.ds(pl.multiple_of(k * block_c, block_c), block_c)
            return acc + jnp.dot(act_ref[:, cols], w_ref[cols, :], preferred_element_type=_F32)
        return body

    acc = jnp.zeros(out_ref.shape, _F32)
    acc = lax.fori_loop(0, n_attn, step(attn_ref, wo_ref), acc)
    acc = lax.fori_loop(0, n_mlp, step(mlp_ref, w_down_ref), acc)
    out_ref[...] = (x_ref[...].astype(_F32) + acc).astype(out_ref.dtype)


def forward(settings: Settings, x2, o2, wo2, h2, w_down) -> jax.Array:
    """x + o·wo + h·w_down on the flattened [M, ...] views (kernels/block_out/pallas.py); see the
    module docstring."""
    bs = settings.block_sizes
    bt, bd, bc = bs.block_t, bs.block_d, bs.block_c
    m, d = x2.shape
    (xp, wop, wdp), (mp, dp, hkp, fp) = _pad_to_tiles(x2, wo2, w_down, bt, bd, bc)
    op, hp = pad2(o2, mp, hkp), pad2(h2, mp, fp)
    hks, fs = next_power_of_two(hkp), next_power_of_two(fp)  # blocks spanning the contraction
    kernel = functools.partial(_fwd_kernel, n_attn=hkp // bc, n_mlp=fp // bc, block_c=bc)
    out = pallas_call(
        kernel,
        name="palm_block_out_fwd",
        out_shape=jax.ShapeDtypeStruct((mp, dp), x2.dtype),
        grid=(mp // bt, dp // bd),
        in_specs=[
            pl.BlockSpec((bt, bd), lambda i, j: (i, j)),  # x [Mp, Dp]
            pl.BlockSpec((bt, hks), lambda i, j: (i, 0)),  # o [Mp, H*K]
            pl.BlockSpec((hks, bd), lambda i, j: (0, j)),  # wo [H*K, Dp]
            pl.BlockSpec((bt, fs), lambda i, j: (i, 0)),  # h [Mp, F]
            pl.BlockSpec((fs, bd), lambda i, j: (0, j)),  # w_down [F, Dp]
        ],
        out_specs=pl.BlockSpec((bt, bd), lambda i, j: (i, j)),
        interpret=settings.interpret,
        # Blocks spanning H*K or F may pass the array's end; the loops read only [0, hkp) and
        # [0, fp), and every other block is whole (module docstring).
        masked_edges=(hks, fs) != (hkp, fp),
        num_warps=bs.num_warps,
        num_stages=bs.num_stages,
    )(xp, op, wop, hp, wdp)
    return out[:m, :d]


def _bwd_dact_kernel(dy_ref, wo_ref, w_down_ref, do_ref, dh_ref, *, n_attn: int, n_d: int,
                     block_d: int):
    """One [bt, bc] tile of [do | dh] = dy·[wo ; w_down]ᵀ, looping over D in block_d slices."""
    bt, bc = do_ref.shape

    def product(w_ref):
        def body(k, acc):
            cols = pl.ds(pl.multiple_of(k * block_d, block_d), block_d)
            return acc + lax.dot_general(dy_ref[:, cols], w_ref[:, cols], NT_DIMS,
                                         preferred_element_type=_F32)
        return lax.fori_loop(0, n_d, body, jnp.zeros((bt, bc), _F32))

    def attention():
        do_ref[...] = product(wo_ref).astype(do_ref.dtype)

    def mlp():
        dh_ref[...] = product(w_down_ref).astype(dh_ref.dtype)

    lax.cond(pl.program_id(1) < n_attn, attention, mlp)


def backward_dact(settings: Settings, dy2, wo2, w_down):
    """do [M, H*K] and dh [M, F] in one kernel; grid (row tile, C tile), looping over D.

    The idle output's and weight's block indices are clamped to a valid tile; a program stores
    only the output it computes.
    """
    bs = settings.block_sizes
    bt, bc, bd = bs.block_t_bwd, bs.block_c_bwd, bs.block_d_bwd
    m, hk, f = dy2.shape[0], wo2.shape[0], w_down.shape[0]
    (dyp, wop, wdp), (mp, dp, hkp, fp) = _pad_to_tiles(dy2, wo2, w_down, bt, bd, bc)
    na, nm = hkp // bc, fp // bc
    ds = next_power_of_two(dp)  # blocks spanning the contraction

    def attn_c(c):
        return jnp.minimum(c, na - 1)

    def mlp_c(c):
        return jnp.maximum(c - na, 0)

    kernel = functools.partial(_bwd_dact_kernel, n_attn=na, n_d=dp // bd, block_d=bd)
    do, dh = pallas_call(
        kernel,
        name="palm_block_out_bwd_dact",
        out_shape=[jax.ShapeDtypeStruct((mp, hkp), dy2.dtype),
                   jax.ShapeDtypeStruct((mp, fp), dy2.dtype)],
        grid=(mp // bt, na + nm),
        in_specs=[
            pl.BlockSpec((bt, ds), lambda i, c: (i, 0)),  # dy [Mp, Dp]
            pl.BlockSpec((bc, ds), lambda i, c: (attn_c(c), 0)),  # wo [H*K, Dp]
            pl.BlockSpec((bc, ds), lambda i, c: (mlp_c(c), 0)),  # w_down [F, Dp]
        ],
        out_specs=[
            pl.BlockSpec((bt, bc), lambda i, c: (i, attn_c(c))),  # do [Mp, H*K]
            pl.BlockSpec((bt, bc), lambda i, c: (i, mlp_c(c))),  # dh [Mp, F]
        ],
        interpret=settings.interpret,
        masked_edges=ds != dp,  # as the forward's: the loop reads only [0, dp)
        num_warps=bs.num_warps_bwd,
        num_stages=bs.num_stages_bwd,
    )(dyp, wop, wdp)
    return do[:m, :hk], dh[:m, :f]


def check_tiles(block_sizes: BlockSizes, dtype) -> None:
    """Each kernel's shared memory within a thread block's (kernels/block_out/pallas.py)."""
    for kernel, used in shared_memory_bytes(block_sizes, dtype).items():
        check_shared_memory(used, f"palm_block_out {kernel} {block_sizes}")


def block_out_pallas_gpu(x, o, wo, h, w_down, *, interpret=None,
                        block_sizes: BlockSizes | None = None) -> jax.Array:
    """The Pallas GPU (Triton) `block_out` (module docstring): `block_out`'s arrays x [B, T, D],
    o [B, T, H, K], wo [H, K, D], h [B, T, F], w_down [F, D], interpret and block_sizes (None:
    `BlockSizes.get_default`)."""
    return block_out_pallas(sys.modules[__name__], x, o, wo, h, w_down,
                            interpret=gpu_interpret(interpret), block_sizes=block_sizes)
