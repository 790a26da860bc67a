"""The Pallas TPU `block_out`: its kernels and tiling (`forward`, `backward_dact`, `BlockSizes`,
`check_tiles`: the backend interface pallas.py describes; the checks, the jit and the custom_vjp
wiring are pallas.py's, shared with gpu.py).

Pallas TPU forward (`palm_block_out_fwd`). Rows are the flattened B*T axis (M); o is viewed as
[M, H*K] and wo as [H*K, D] (free reshapes). The two products share one contraction axis
C = [H*K | F] without materialising the concatenation: the grid is (M / bt, D / bd, C / bk)
with C innermost; its first H*K / bk steps read tiles of o and wo, the rest tiles of h and
w_down, all into one float32 accumulator [bt, bd]. The index maps clamp the idle pair to the
tile it holds at the phase boundary, so Pallas (which skips a copy when a block index repeats)
fetches no tile twice. The last step adds the residual x and writes the result once.

Backward: dx = dy (the residual path), do = dy·woᵀ, dh = dy·w_downᵀ, dwo = oᵀ·dy,
dw_down = hᵀ·dy, all plain matmuls; none has a large intermediate to keep out of HBM, so
Pallas is used only where it saves bytes:
- `palm_block_out_bwd_dact` (Pallas): do and dh in one kernel over the output axis
  C = [H*K | F] (the forward's trick, on the output side), contracting over D. When one D
  tile spans all of D (the PaLM-8B default, block_d_bwd = 4096), the dy row tile's block
  index is the same for every C tile, so each dy row is read from HBM once; two separate
  512-tiled matmuls re-read it once per output column tile (40 times at PaLM-8B).
- jnp (XLA): dwo and dw_down, contractions over the rows M = B*T. They read o, h and dy once
  per output tile whatever runs them and write nothing intermediate, so a Pallas kernel would
  move the same bytes as XLA's matmul emitter.

VMEM (bf16, `vmem_bytes`: double-buffered blocks, the float32 accumulator and the float32
temporaries, i.e. the dot result and the widened x): forward 9.0 MiB at both PaLM-8B and 540B;
backward 13.0 MiB with a resident [512, 4096] dy row tile at PaLM-8B, which the default uses
where it fits the target generation's `vmem_budget` (v5e, v5p, v6e; not v4's 12 MiB, which
gets 512 tiles throughout: 7.0 MiB, as at PaLM-540B, where a full D = 18432 row tile would
need 36 MiB). `vmem_limit_bytes` is set from the estimate.

HBM bytes at PaLM-8B (B=1, T=2048, D=4096, H*K=4096, F=16384, bf16), each tensor counted once:
- forward: reads x 16 + o 16 + h 64 + wo 32 + w_down 128, writes 16: 272 MiB. The unfused
  XLA sequence of the reference writes the float32 o·wo and h·w_down (2 x 32 MiB) and reads
  them back with x: 400 MiB (336 MiB with bf16 intermediates). Saved: 128 MiB (64 MiB).
- backward: do/dh kernel 16 (dy once) + 160 (weights) + 80 (do, dh) = 256 MiB, weight
  gradients 272 MiB: 528 MiB against 544 MiB for separate XLA matmuls (one dy read fewer).
  The tiled traffic is where it pays: 736 MiB for the kernel (the CostEstimate: weights
  re-read per 512-row tile) against 1360 MiB for two 512-tiled matmuls, whose dy re-reads
  alone are 640 MiB.
"""

from __future__ import annotations

import dataclasses
import functools
import sys

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
    pick_shared_block,
    round_up,
    sublane,
    vmem_budget,
)
from kernels.block_out.pallas import Settings, block_out_pallas

IMPL = "pallas_tpu"


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles of the Pallas TPU kernels; rows are the flattened B*T axis, C = [H*K | F].

    Forward (`palm_block_out_fwd`): block_t rows x block_d model features per output tile,
    block_c contraction entries per step. Backward (`palm_block_out_bwd_dact`, do and dh):
    block_t_bwd rows x block_c_bwd entries of C per output tile, block_d_bwd model features
    per contraction step; when block_d_bwd covers D, each dy row tile is read from HBM once.
    """

    block_t: int = 512
    block_d: int = 512
    block_c: int = 512
    block_t_bwd: int = 512
    block_c_bwd: int = 512
    block_d_bwd: int = 512

    def __post_init__(self):
        for name in ("block_t", "block_t_bwd"):
            check_multiple("BlockSizes", name, getattr(self, name), 8)
        for name in ("block_d", "block_c", "block_c_bwd", "block_d_bwd"):
            check_multiple("BlockSizes", name, getattr(self, name), LANE)

    @classmethod
    def get_default(cls, rows: int, d_model: int, attn_width: int, d_ff: int,
                    dtype=jnp.bfloat16, generation: str | None = None) -> "BlockSizes":
        """Tiles for x [rows, d_model], o [rows, attn_width = H*K], h [rows, d_ff].

        Forward: 512-wide tiles (they divide every PaLM shape), shrunk for small shapes.
        Backward: a full-D dy row tile with bt = 512 and bc = 128 when it fits
        `vmem_budget(generation)` (default: the target generation; PaLM-8B bf16 needs 13 MiB),
        so dy is read once instead of once per C tile; otherwise (v4, PaLM-540B) 512-wide
        tiles throughout. Row tiles are halved while a kernel still exceeds the budget.
        """
        sub = sublane(dtype)
        bt = pick_block(rows, 512, sub)
        bd = pick_block(d_model, 512, LANE)
        bc = pick_shared_block((attn_width, d_ff), 512, LANE)
        resident = cls(bt, bd, bc, bt, LANE, round_up(d_model, LANE))
        budget = vmem_budget(generation)
        if max(vmem_bytes(resident, dtype).values()) <= budget:
            return resident
        while True:
            blocks = cls(bt, bd, bc, bt, bc, bd)
            if bt <= sub or max(vmem_bytes(blocks, dtype).values()) <= budget:
                return blocks
            bt = max(sub, bt // 2 // sub * sub)


def vmem_bytes(block_sizes: BlockSizes, dtype) -> dict[str, int]:
    """VMEM each kernel needs: double-buffered input and output tiles, scratch, and the float32
    temporaries (the dot result; the forward's widened x tile)."""
    s = jnp.dtype(dtype).itemsize
    bt, bd, bc = block_sizes.block_t, block_sizes.block_d, block_sizes.block_c
    # x, (o, wo), (h, w_down) and the output double-buffered; the f32 accumulator.
    fwd = 2 * (bt * bd * s + 2 * (bt * bc * s + bc * bd * s) + bt * bd * s) + 3 * bt * bd * 4
    bt, bc, bd = block_sizes.block_t_bwd, block_sizes.block_c_bwd, block_sizes.block_d_bwd
    # dy, wo, w_down and the do and dh tiles double-buffered; the f32 accumulator.
    dact = 2 * (bt * bd * s + 2 * bc * bd * s + 2 * bt * bc * s) + 2 * bt * bc * 4
    return {"fwd": fwd, "bwd_dact": dact}


def _fwd_kernel(x_ref, attn_ref, wo_ref, mlp_ref, w_down_ref, out_ref, acc_ref, *, n_attn: int,
                n_steps: int):
    c = pl.program_id(2)

    @pl.when(c == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(c < n_attn)
    def _attention():
        acc_ref[...] += jnp.dot(attn_ref[...], wo_ref[...], preferred_element_type=jnp.float32)

    @pl.when(c >= n_attn)
    def _mlp():
        acc_ref[...] += jnp.dot(mlp_ref[...], w_down_ref[...], preferred_element_type=jnp.float32)

    @pl.when(c == n_steps - 1)
    def _epilogue():
        out_ref[...] = (x_ref[...].astype(jnp.float32) + acc_ref[...]).astype(out_ref.dtype)


def forward(settings: Settings, x2, o2, wo2, h2, w_down) -> jax.Array:
    """x + o·wo + h·w_down on the flattened [M, ...] views (kernels/block_out/pallas.py); see the
    module docstring."""
    bs = settings.block_sizes
    bt, bd, bc = bs.block_t, bs.block_d, bs.block_c
    m, d = x2.shape
    hk, f = o2.shape[1], h2.shape[1]
    mp, dp = round_up(m, bt), round_up(d, bd)
    hkp, fp = round_up(hk, bc), round_up(f, bc)
    # Zero padding: padded contraction entries multiply zeros, padded rows/columns are sliced.
    xp, op, wop = pad2(x2, mp, dp), pad2(o2, mp, hkp), pad2(wo2, hkp, dp)
    hp, wdp = pad2(h2, mp, fp), pad2(w_down, fp, dp)
    nt, nd, na, nm = mp // bt, dp // bd, hkp // bc, fp // bc
    s = x2.dtype.itemsize
    cost = pl.CostEstimate(
        flops=2 * mp * dp * (hkp + fp) + mp * dp,
        transcendentals=0,
        # o and h are re-read for every D tile, the weights for every row tile.
        bytes_accessed=mp * (hkp + fp) * s * nd + (hkp + fp) * dp * s * nt + 2 * mp * dp * s)

    def attn_k(c):
        return jnp.minimum(c, na - 1)

    def mlp_k(c):
        return jnp.maximum(c - na, 0)

    kernel = functools.partial(_fwd_kernel, n_attn=na, n_steps=na + nm)
    out = tpu_pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((mp, dp), x2.dtype),
        grid=(nt, nd, na + nm),
        in_specs=[
            pl.BlockSpec((bt, bd), lambda i, j, c: (i, j)),  # x [M, D]
            pl.BlockSpec((bt, bc), lambda i, j, c: (i, attn_k(c))),  # o [M, H*K]
            pl.BlockSpec((bc, bd), lambda i, j, c: (attn_k(c), j)),  # wo [H*K, D]
            pl.BlockSpec((bt, bc), lambda i, j, c: (i, mlp_k(c))),  # h [M, F]
            pl.BlockSpec((bc, bd), lambda i, j, c: (mlp_k(c), j)),  # w_down [F, D]
        ],
        out_specs=pl.BlockSpec((bt, bd), lambda i, j, c: (i, j)),
        scratch_shapes=[pltpu.VMEM((bt, bd), jnp.float32)],
        compiler_params=compiler_params("parallel", "parallel", "arbitrary",
                                        vmem_bytes=vmem_bytes(bs, x2.dtype)["fwd"]),
        cost_estimate=cost,
        interpret=settings.interpret,
        name="palm_block_out_fwd",
    )(xp, op, wop, hp, wdp)
    return out[:m, :d]


def _bwd_dact_kernel(dy_ref, wo_ref, w_down_ref, do_ref, dh_ref, acc_ref, *, n_attn: int,
                     n_steps: int):
    """One [bt, bc] tile of [do | dh] = dy·[wo ; w_down]ᵀ, accumulated over D tiles."""
    c, k = pl.program_id(1), pl.program_id(2)
    last = k == n_steps - 1

    @pl.when(k == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(c < n_attn)
    def _attention():
        acc_ref[...] += jax.lax.dot_general(dy_ref[...], wo_ref[...], NT_DIMS,
                                            preferred_element_type=jnp.float32)

    @pl.when(c >= n_attn)
    def _mlp():
        acc_ref[...] += jax.lax.dot_general(dy_ref[...], w_down_ref[...], NT_DIMS,
                                            preferred_element_type=jnp.float32)

    @pl.when(jnp.logical_and(last, c < n_attn))
    def _write_do():
        do_ref[...] = acc_ref[...].astype(do_ref.dtype)

    @pl.when(jnp.logical_and(last, c >= n_attn))
    def _write_dh():
        dh_ref[...] = acc_ref[...].astype(dh_ref.dtype)


def backward_dact(settings: Settings, dy2, wo2, w_down):
    """do [M, H*K] and dh [M, F] in one kernel; grid (row tile, C tile, D tile).

    Output tiles run over C = [H*K | F] like the forward's contraction. Each output's block
    index is clamped while the other one is being computed, so an idle output block is neither
    written nor flushed; idle weights are parked on the tile they hold at the phase boundary.
    """
    bs = settings.block_sizes
    bt, bc, bd = bs.block_t_bwd, bs.block_c_bwd, bs.block_d_bwd
    m, d = dy2.shape
    hk, f = wo2.shape[0], w_down.shape[0]
    mp, dp = round_up(m, bt), round_up(d, bd)
    hkp, fp = round_up(hk, bc), round_up(f, bc)
    dyp, wop, wdp = pad2(dy2, mp, dp), pad2(wo2, hkp, dp), pad2(w_down, fp, dp)
    nt, na, nm, nd = mp // bt, hkp // bc, fp // bc, dp // bd
    s = dy2.dtype.itemsize
    cost = pl.CostEstimate(
        flops=2 * mp * dp * (hkp + fp),
        transcendentals=0,
        # dy is re-read for every C tile unless one tile spans D; weights for every row tile.
        bytes_accessed=(mp * dp * s * (1 if nd == 1 else na + nm) + (hkp + fp) * dp * s * nt
                        + mp * (hkp + fp) * s))

    def wo_index(i, c, k):
        return jnp.where(c < na, c, na - 1), jnp.where(c < na, k, nd - 1)

    def w_down_index(i, c, k):
        return jnp.where(c < na, 0, c - na), jnp.where(c < na, 0, k)

    kernel = functools.partial(_bwd_dact_kernel, n_attn=na, n_steps=nd)
    do, dh = tpu_pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((mp, hkp), dy2.dtype),
                   jax.ShapeDtypeStruct((mp, fp), dy2.dtype)],
        grid=(nt, na + nm, nd),
        in_specs=[
            pl.BlockSpec((bt, bd), lambda i, c, k: (i, k)),  # dy [M, D]
            pl.BlockSpec((bc, bd), wo_index),  # wo [H*K, D]
            pl.BlockSpec((bc, bd), w_down_index),  # w_down [F, D]
        ],
        out_specs=[
            pl.BlockSpec((bt, bc), lambda i, c, k: (i, jnp.minimum(c, na - 1))),  # do [M, H*K]
            pl.BlockSpec((bt, bc), lambda i, c, k: (i, jnp.maximum(c - na, 0))),  # dh [M, F]
        ],
        scratch_shapes=[pltpu.VMEM((bt, bc), jnp.float32)],
        compiler_params=compiler_params("parallel", "arbitrary", "arbitrary",
                                        vmem_bytes=vmem_bytes(bs, dy2.dtype)["bwd_dact"]),
        cost_estimate=cost,
        interpret=settings.interpret,
        name="palm_block_out_bwd_dact",
    )(dyp, wop, wdp)
    return do[:m, :hk], dh[:m, :f]


def check_tiles(block_sizes: BlockSizes, dtype) -> None:
    """The row tiles a dtype's sublane packing needs (kernels/block_out/pallas.py)."""
    rows = sublane(dtype)
    if block_sizes.block_t % rows or block_sizes.block_t_bwd % rows:
        raise ValueError(f"block_out: {jnp.dtype(dtype)} row tiles must be multiples of {rows}, "
                         f"got {block_sizes}")


def block_out_pallas_tpu(x, o, wo, h, w_down, *, interpret=None,
                        block_sizes: BlockSizes | None = None) -> jax.Array:
    """The Pallas TPU `block_out` (module docstring): `block_out`'s arrays x [B, T, D],
    o [B, T, H, K], wo [H, K, D], h [B, T, F], w_down [F, D], interpret and block_sizes (None:
    `BlockSizes.get_default`)."""
    return block_out_pallas(sys.modules[__name__], x, o, wo, h, w_down,
                            interpret=tpu_interpret(interpret), block_sizes=block_sizes)
