"""The Pallas GPU (Triton) `rope`.

`rope_pallas_gpu` (registered as impl "pallas_gpu") is one elementwise Triton kernel,
`palm_rope_fwd`; its custom_vjp backward `palm_rope_bwd` is the same kernel rotating by -angle
(a rotation's transpose is its inverse), as in tpu.py. Nothing is saved but the positions. The
checks and the custom_vjp wiring are pallas.py's, shared with tpu.py; this module is the
backend it calls (`rotate`, `BlockSizes`).

Design. x [B, T, H, K] is viewed as [N, H, K] (N = B*T rows, a free reshape; a 3-D x
[B, T, K] as [N, 1, K]) and positions as [N]. The grid is (row tiles, head tiles); a program
loads its [block_t] positions and the [K/2] frequencies, computes cos and sin of the
[block_t, K/2] angles in registers (they never reach memory), and loads the two halves of its
[block_t, block_h, K] x block as two [block_t, block_h, Kh] tensors straight from the ref
(`x_ref.at[..., pl.ds(0, Kh)]` and `pl.ds(K/2, Kh)`): Triton cannot slice or roll a value, but
loading each half is free, so rotate-half needs no roll and no sign trick (tpu.py's): out1 =
x1 cos - x2 sin, out2 = x2 cos + x1 sin, stored the same way. Everything stays in registers.

Shapes that are not powers of two. Triton's arrays must have power-of-two sizes, so a half
is loaded as Kh = next_power_of_two(K/2) lanes (the block's last dim is 2*Kh), and every load
and store is masked: rows past N, heads past H, lanes past K/2 of each half. The Triton lowering
does not mask a boundary block by itself (a plain `ref[...]` there reads and writes past the
array, or into the next row where a middle dim overhangs), so the masks are what keeps ragged
shapes, odd K and the padded halves correct; no operand is ever padded or copied.

Per call (forward; the backward is the same on the cotangent): 3 flops per element plus one
angle per (row, pair), 2 transcendentals per (row, pair and head tile); bytes: x read once, out
written once, 4 bytes of position per row. PaLM-8B q [1, 2048, 16, 256] bf16: 32 MiB, k
[1, 2048, 256]: 2 MiB; at ~3 TB/s (H100 HBM3) ~11 us and ~1 us, memory-bound (0.4 flop/byte).

Default tiles for H100 (`BlockSizes.get_default`): all heads of a row in one tile (up to 16
heads, so the cos/sin of a row are computed once for all of them), and as many rows as make
~8192 elements per program (PaLM-8B q: 2 rows x 16 heads x 256; k: 32 rows x 256), 8 warps
(32 elements per thread, 16 per half: enough independent loads in flight per thread to cover
HBM latency without spilling). One stage: there is no loop to pipeline. Shared memory: none
is needed for an elementwise kernel beyond layout conversions; `shared_memory_bytes` counts the
x and out blocks once per stage as an upper bound (32 KiB at PaLM-8B, well within 227 KiB).

What the CPU cannot check: the tests run the kernel interpreted (`interpret=True`) and export
it for CUDA (tests/gpu_export.py: the whole Pallas-to-Triton lowering, so every array is a
power of two and every operation lowers); the compile of that Triton IR to PTX, register
pressure, and the timing need a GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels import _gpu
from kernels.rope.pallas import Settings, rope_pallas
from kernels.rope.reference import inv_frequencies

IMPL = "pallas_gpu"

# Elements of x per program the defaults aim at (see the module docstring).
_TARGET_ELEMENTS = 8192
_MAX_BLOCK_H = 16


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles for the GPU `rope` (forward) and its VJP (backward, the same kernel rotating back).

    block_t: rows (B*T positions) per program, a power of two.
    block_h: heads per program for a 4-D x, a power of two (heads past H are masked); unused
      for a 3-D x.
    num_warps, num_stages: Triton's launch parameters (both kernels).
    """

    block_t: int
    block_h: int
    block_t_bwd: int
    block_h_bwd: int
    num_warps: int = 8
    num_stages: int = 1

    def __post_init__(self):
        # No dot here, so the tiles may be below _gpu.MIN_BLOCK (`check_block_sizes`' tiles).
        for name in ("block_t", "block_h", "block_t_bwd", "block_h_bwd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"rope.gpu.BlockSizes.{name} must be a positive int, "
                                 f"got {value!r}")
            if not _gpu.is_power_of_two(value):
                raise ValueError(f"rope.gpu.BlockSizes.{name} must be a power of two "
                                 f"(Triton), got {value}")
        _gpu.check_block_sizes(self, warps=("num_warps",), stages=("num_stages",))

    @classmethod
    def get_default(cls, x_shape: tuple[int, ...], dtype) -> "BlockSizes":
        """All heads (up to 16, a power of two) and ~8192 elements per program."""
        del dtype  # the element count, not the bytes, sets the registers per thread
        heads = x_shape[2] if len(x_shape) == 4 else 1
        block_h = min(_gpu.next_power_of_two(heads), _MAX_BLOCK_H)
        lanes = 2 * _gpu.next_power_of_two(x_shape[-1] // 2)
        rows = _gpu.next_power_of_two(x_shape[0] * x_shape[1])
        block_t = max(1, min(_TARGET_ELEMENTS // (block_h * lanes), rows))
        return cls(block_t=block_t, block_h=block_h, block_t_bwd=block_t, block_h_bwd=block_h)


def shared_memory_bytes(x_shape: tuple[int, ...], dtype, block_sizes: BlockSizes) -> int:
    """Upper bound of one program's shared memory (the larger of forward and backward): the x
    and out blocks once per stage."""
    lanes = 2 * _gpu.next_power_of_two(x_shape[-1] // 2)
    itemsize = jnp.dtype(dtype).itemsize
    bs = block_sizes
    per_stage = max(bs.block_t * bs.block_h, bs.block_t_bwd * bs.block_h_bwd) * lanes * itemsize
    return 2 * bs.num_stages * per_stage


def _rope_kernel(pos_ref, freq_ref, x_ref, o_ref, *, n_rows: int, heads: int, half: int,
                 inverse: bool):
    # pos_ref [bt] int32; freq_ref [Kh] f32 (zero past K/2); x_ref, o_ref [bt, bh, 2*Kh].
    bt, bh = x_ref.shape[0], x_ref.shape[1]
    kh = freq_ref.shape[0]
    rows = pl.program_id(0) * bt + jnp.arange(bt, dtype=jnp.int32)  # [bt]
    head_ids = pl.program_id(1) * bh + jnp.arange(bh, dtype=jnp.int32)  # [bh]
    lanes = jnp.arange(kh, dtype=jnp.int32)  # [Kh]
    pos = plgpu.load(pos_ref, mask=rows < n_rows, other=0)
    angles = pos.astype(jnp.float32)[:, None] * freq_ref[...][None, :]  # [bt, Kh]
    cos, sin = jnp.cos(angles)[:, None, :], jnp.sin(angles)[:, None, :]  # [bt, 1, Kh]
    if inverse:
        sin = -sin
    mask = ((rows < n_rows)[:, None, None] & (head_ids < heads)[None, :, None]
            & (lanes < half)[None, None, :])  # [bt, bh, Kh]
    first, second = x_ref.at[:, :, pl.ds(0, kh)], x_ref.at[:, :, pl.ds(half, kh)]
    x1 = plgpu.load(first, mask=mask, other=0).astype(jnp.float32)
    x2 = plgpu.load(second, mask=mask, other=0).astype(jnp.float32)
    plgpu.store(o_ref.at[:, :, pl.ds(0, kh)], (x1 * cos - x2 * sin).astype(o_ref.dtype),
                mask=mask)
    plgpu.store(o_ref.at[:, :, pl.ds(half, kh)], (x2 * cos + x1 * sin).astype(o_ref.dtype),
                mask=mask)


def rotate(settings: Settings, x: jax.Array, positions: jax.Array, *, block_t: int,
           block_h: int, inverse: bool) -> jax.Array:
    """One pallas_call rotating x by +angle (inverse=False) or -angle (inverse=True)
    (kernels/rope/pallas.py)."""
    b, t = x.shape[:2]
    k = x.shape[-1]
    heads = x.shape[2] if x.ndim == 4 else 1
    n = b * t
    half = k // 2
    kh = _gpu.next_power_of_two(half)
    bs = settings.block_sizes
    _gpu.check_shared_memory(shared_memory_bytes(x.shape, x.dtype, bs), "rope")
    block_h = min(block_h, _gpu.next_power_of_two(heads))
    block_t = min(block_t, _gpu.next_power_of_two(n))
    freq = jnp.zeros((kh,), jnp.float32).at[:half].set(inv_frequencies(k, settings.base))
    kernel = functools.partial(_rope_kernel, n_rows=n, heads=heads, half=half, inverse=inverse)
    name = "palm_rope_bwd" if inverse else "palm_rope_fwd"
    x_spec = pl.BlockSpec((block_t, block_h, 2 * kh), lambda i, j: (i, j, 0))
    with jax.named_scope(f"{name} bt={block_t} bh={block_h} K={k}"):
        out = _gpu.pallas_call(
            kernel,
            name=name,
            grid=(pl.cdiv(n, block_t), pl.cdiv(heads, block_h)),
            in_specs=[
                pl.BlockSpec((block_t,), lambda i, j: (i,)),  # positions
                pl.BlockSpec((kh,), lambda i, j: (0,)),  # frequencies
                x_spec,
            ],
            out_specs=x_spec,
            out_shape=jax.ShapeDtypeStruct((n, heads, k), x.dtype),
            interpret=settings.interpret,
            num_warps=bs.num_warps,
            num_stages=bs.num_stages,
            masked_edges=True,  # every load and store is masked
        )(positions.astype(jnp.int32).reshape(n), freq, x.reshape(n, heads, k))
    return out.reshape(x.shape)


def rope_pallas_gpu(x: jax.Array, positions: jax.Array, *, base: float = 10000.0,
                    interpret: Any = None, block_sizes: BlockSizes | None = None) -> jax.Array:
    """The Pallas GPU (Triton) `rope`: `rope_reference`'s arguments plus interpret (None, True
    or False) and block_sizes (a `kernels.rope.gpu.BlockSizes`; None: `get_default`)."""
    return rope_pallas(sys.modules[__name__], x, positions, base=base,
                       interpret=_gpu.gpu_interpret(interpret), block_sizes=block_sizes)
