"""The Pallas TPU `rope`.

`rope_pallas_tpu` (registered as impl "pallas_tpu") is one elementwise Mosaic kernel,
`palm_rope_fwd`; its custom_vjp backward `palm_rope_bwd` is the same kernel rotating by -angle
(a rotation's transpose is its inverse). The checks and the custom_vjp wiring are pallas.py's,
shared with gpu.py; this module is the backend it calls (`rotate`, `BlockSizes`). cos and sin
are computed in VMEM from the integer positions and never reach HBM. Layout and the rotation
trick are explained above the kernel.

HBM traffic at PaLM-8B (B=1, T=2048, H=16, K=256, bf16), per call (forward; the backward is
the same with the cotangent in place of x):
  q [B,T,H,K]: kernel 32 MiB (x read once, out written once, 8 KiB of positions). The reference
    op by op (every jaxpr equation's operands read and result written) would move 457 MiB; XLA
    fuses that into about one loop fusion, so against XLA the kernel saves only the
    [B,T,K/2] f32 cos/sin tables (2 MiB written, 2+ MiB read) and guarantees the single pass.
  k [B,T,K]: kernel 2 MiB; reference op by op 37 MiB.
The larger win is RoPE fused into the projection epilogue (`kernels.norm_qkv_rope`), where q
and k are never written before rotation.

VMEM of the default blocks (`vmem_bytes`; double-buffered x and out blocks, cos/sin scratch
and three float32 copies of the x block for the rotation's temporaries): PaLM-8B q bf16:
block_t=128, all 16 heads, 10.4 MiB; the block shrinks while the estimate exceeds the target
generation's `vmem_budget` (12 MiB on v4), and `vmem_limit_bytes` is set from the estimate.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels._common import tpu_interpret
from kernels._tpu import pallas_call as tpu_pallas_call
from kernels._tpu import LANE, MiB, compiler_params, round_up, sublane, tile_bytes, vmem_budget
from kernels.rope.pallas import Settings, rope_pallas
from kernels.rope.reference import inv_frequencies

IMPL = "pallas_tpu"


# ----------------------------------------------------------------------------------------------
# Layout. A 4-D x stays 4-D: blocks are [block_t, block_h, K] windows of [B, T, H, K], so the
# lane axis is K and a (heads, K) slab per position fills whole (8, 128) tiles. Flattening to
# [B, T, H*K] would be a free reshape in XLA's logical view but not in TPU HBM, whose layout
# tiles the two minor axes: (H, K) tiles and (T, H*K) tiles order bytes differently, so the
# reshape would cost a copy of x. A 3-D x ([B, T, K], the shared key head) uses [block_t, K].
#
# Rotation without splitting K. With C = cos(angle) and S = sin(angle) laid out over all K
# lanes (angle[i] = p * f[i mod K/2]),
#     out = x * C + roll(x, K/2) * S',   S' = -S on the first half, +S on the second,
# is exactly (x1 cos - x2 sin, x2 cos + x1 sin): rolling by K/2 swaps the halves whichever way
# it turns. S' comes for free by negating the first half of the frequency row (sin is odd, cos
# even), and the inverse rotation (the backward) negates the other half instead. One code path
# for every even K, no lane slicing at K/2 (which is not 128-aligned for K = 128).
#
# cos and sin depend on (b, t) only: they are computed when the head-block index is 0, kept in
# VMEM scratch for the other head blocks (the head axis is therefore "arbitrary", i.e. runs in
# order on one core), and never reach HBM.
# ----------------------------------------------------------------------------------------------

# Bytes of x per block the defaults aim at: large enough that the ~0.35 us per-step overhead
# is small next to the block's HBM time, small enough that in + out double-buffered stay far
# below the 16 MiB scoped VMEM of v4/v5e.
_TARGET_BLOCK_BYTES = 1 * MiB


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles for `rope` (forward) and its VJP (backward, the same kernel rotating back).

    block_t: positions per block (a multiple of 8, or at least T).
    block_h: heads per block for a 4-D x (natively a multiple of 8, or at least H); unused for
      a 3-D x.
    """

    block_t: int
    block_h: int
    block_t_bwd: int
    block_h_bwd: int

    def __post_init__(self):
        for name in ("block_t", "block_h", "block_t_bwd", "block_h_bwd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"rope.BlockSizes.{name} must be a positive int, got {value!r}")
        for name in ("block_t", "block_t_bwd"):
            if getattr(self, name) % 8:
                raise ValueError(f"rope.BlockSizes.{name} must be a multiple of 8 (TPU sublanes), "
                                 f"got {getattr(self, name)}")

    @classmethod
    def get_default(cls, x_shape: tuple[int, ...], dtype,
                    generation: str | None = None) -> "BlockSizes":
        """All heads in one block; the most positions (a power of two, 8 to 512) in ~1 MiB of x,
        halved while `vmem_bytes` exceeds `vmem_budget(generation)` (default: the target).

        The cap of 512 bounds the f32 cos/sin scratch and the lane-padded positions block
        ([block_t, 1] int32 occupies block_t x 128 lanes) for the single-head [B, T, K] case.
        """
        heads = x_shape[2] if len(x_shape) == 4 else 1
        row_bytes = heads * x_shape[-1] * jnp.dtype(dtype).itemsize
        # block_t is the sublane axis of a 3-D x's [block_t, K] block (16 rows for bf16); for
        # a 4-D x it is a leading axis of [block_t, block_h, K], free but for the int32
        # positions column (8).
        sub = sublane(dtype) if len(x_shape) == 3 else 8
        rows = min(max(_TARGET_BLOCK_BYTES // row_bytes, sub), 512)
        block_t = min(1 << (rows.bit_length() - 1), round_up(x_shape[1], sub))
        budget = vmem_budget(generation)
        while True:
            blocks = cls(block_t=block_t, block_h=heads, block_t_bwd=block_t, block_h_bwd=heads)
            if block_t <= sub or vmem_bytes(x_shape, dtype, blocks) <= budget:
                return blocks
            block_t = max(sub, block_t // 2 // sub * sub)


def vmem_bytes(x_shape: tuple[int, ...], dtype, block_sizes: BlockSizes) -> int:
    """VMEM one `rope` kernel needs (the larger of forward and backward): double-buffered x and
    out blocks, positions and frequency blocks, the cos/sin scratch, and three float32 copies
    of the x block (x widened, its roll, a product), each padded to whole (sublane, 128-lane)
    tiles as Mosaic lays them out."""
    itemsize = jnp.dtype(dtype).itemsize
    t, k = x_shape[1], x_shape[-1]
    heads = x_shape[2] if len(x_shape) == 4 else 1
    total = 0
    for bt, bh in ((block_sizes.block_t, block_sizes.block_h),
                   (block_sizes.block_t_bwd, block_sizes.block_h_bwd)):
        bt, bh = min(bt, t), min(bh, heads)
        if len(x_shape) == 4:
            x_block = bt * tile_bytes(bh, k, itemsize)  # [bt, bh, K]: bt tiles of [bh, K]
            temporaries = 3 * bt * tile_bytes(bh, k, 4)
        else:
            x_block = tile_bytes(bt, k, itemsize)
            temporaries = 3 * tile_bytes(bt, k, 4)
        scratch = 2 * tile_bytes(bt, k, 4)
        small = 2 * (tile_bytes(bt, 1, 4) + tile_bytes(1, k, 4))  # positions, frequencies
        total = max(total, 2 * 2 * x_block + scratch + small + temporaries)
    return total


def frequency_row(head_dim: int, base: float, sign_first: float, sign_second: float) -> jax.Array:
    """[1, K] float32: the RoPE frequencies over all K lanes, each half with its own sign."""
    inv_freq = inv_frequencies(head_dim, base)  # [K/2], exactly the reference's
    return jnp.concatenate([sign_first * inv_freq, sign_second * inv_freq])[None, :]  # [1, K]


def write_cos_sin(pos_ref, freq_ref, cos_ref, sin_ref) -> None:
    """In-kernel: cos and sin [rows, K] f32 scratch of positions [rows, 1] times a
    `frequency_row` [1, K]."""
    angles = pos_ref[...].astype(jnp.float32) * freq_ref[...]  # [rows, K]
    cos_ref[...] = jnp.cos(angles)
    sin_ref[...] = jnp.sin(angles)


def rotate_half(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """In-kernel rotation of float32 x [..., K] by angles whose cos/sin span all K lanes
    (sin signed per half as `frequency_row` arranges): x * cos + roll(x, K/2) * sin."""
    return x * cos + pltpu.roll(x, x.shape[-1] // 2, x.ndim - 1) * sin


def _rope_kernel(pos_ref, freq_ref, x_ref, o_ref, cos_ref, sin_ref):
    # pos_ref [bt, 1] int32; freq_ref [1, K] f32; x_ref/o_ref [bt, bh, K] or [bt, K];
    # cos_ref/sin_ref [bt, K] f32 scratch, valid for the current (b, t) block.
    @pl.when(pl.program_id(2) == 0)
    def _angles():
        write_cos_sin(pos_ref, freq_ref, cos_ref, sin_ref)

    x = x_ref[...].astype(jnp.float32)
    cos, sin = cos_ref[...], sin_ref[...]
    if x.ndim == 3:
        cos, sin = cos[:, None, :], sin[:, None, :]  # [bt, 1, K], shared by the heads
    o_ref[...] = rotate_half(x, cos, sin).astype(o_ref.dtype)


def rotate(settings: Settings, x: jax.Array, positions: jax.Array, *, block_t: int,
           block_h: int, inverse: bool) -> jax.Array:
    """One pallas_call rotating x by +angle (inverse=False) or -angle (inverse=True)
    (kernels/rope/pallas.py)."""
    base, interpret = settings.base, settings.interpret
    b, t = x.shape[:2]
    k = x.shape[-1]
    four_d = x.ndim == 4
    heads = x.shape[2] if four_d else 1
    vmem = vmem_bytes(x.shape, x.dtype, BlockSizes(block_t, block_h, block_t, block_h))
    block_t = t if block_t >= t else block_t
    block_h = heads if block_h >= heads else block_h
    native = interpret is False
    if native and k % LANE:
        # Rolling K < 128 lanes (or K not a multiple of 128) is no legal Mosaic layout; padding
        # K would copy x in HBM for a kernel whose point is a single pass over it.
        raise ValueError(f"rope: head dim K={k} must be a multiple of 128 lanes to compile "
                         "natively (pltpu.roll over fewer lanes is not a legal Mosaic layout); "
                         "use interpret=True or impl='xla' for smaller heads")
    if native and four_d and block_h % 8 and block_h != heads:
        raise ValueError(f"rope: block_h={block_h} must be a multiple of 8 or cover all {heads} "
                         "heads (TPU sublane tiling)")
    # Position tiles first: with B = 1 per chip they are the only axis a megacore can split.
    grid = (pl.cdiv(t, block_t), b, pl.cdiv(heads, block_h))
    if four_d:
        x_spec = pl.BlockSpec((None, block_t, block_h, k), lambda j, i, h: (i, j, h, 0))
    else:
        x_spec = pl.BlockSpec((None, block_t, k), lambda j, i, h: (i, j, 0))
    signs = (1.0, -1.0) if inverse else (-1.0, 1.0)
    freq = frequency_row(k, base, *signs)
    itemsize = x.dtype.itemsize
    cost = pl.CostEstimate(
        flops=3 * x.size + b * t * k,  # two products and a sum per element; the angles
        transcendentals=2 * b * t * k,  # cos and sin once per (position, lane)
        bytes_accessed=2 * x.size * itemsize + positions.size * 4 + k * 4,
    )
    name = "palm_rope_bwd" if inverse else "palm_rope_fwd"
    with jax.named_scope(f"{name} bt={block_t} bh={block_h} K={k}"):
        return tpu_pallas_call(
            _rope_kernel,
            grid=grid,
            in_specs=[
                pl.BlockSpec((None, block_t, 1), lambda j, i, h: (i, j, 0)),
                pl.BlockSpec((1, k), lambda i, j, h: (0, 0)),
                x_spec,
            ],
            out_specs=x_spec,
            out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
            scratch_shapes=[pltpu.VMEM((block_t, k), jnp.float32)] * 2,
            compiler_params=compiler_params("parallel", "parallel", "arbitrary", vmem_bytes=vmem),
            cost_estimate=cost,
            interpret=interpret,
            name=name,
        )(positions.astype(jnp.int32)[:, :, None], freq, x)


def rope_pallas_tpu(x: jax.Array, positions: jax.Array, *, base: float = 10000.0,
                    interpret: Any = None, block_sizes: BlockSizes | None = None) -> jax.Array:
    """The Pallas TPU `rope`: same arguments as `rope_reference` plus interpret, block_sizes."""
    return rope_pallas(sys.modules[__name__], x, positions, base=base,
                       interpret=tpu_interpret(interpret), block_sizes=block_sizes)
