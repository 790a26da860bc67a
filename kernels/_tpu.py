"""What the Pallas TPU kernels share: tile rules, VMEM accounting and budgets, Mosaic settings.

Tiles follow the TPU's vector registers: the minor (lane) axis of a block is a multiple of 128,
the second-minor (sublane) axis a multiple of 8 for 4-byte types and 16 for bf16, which packs
two rows per sublane. Where a wrapper zero-pads operands up to whole tiles, the padding is a
no-op at PaLM shapes, where every default tile divides its axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

LANE = 128
MiB = 2**20
# The scoped VMEM a kernel may use without raising `vmem_limit_bytes`: 16 MiB on v4 and v5e
# (v5p and v6e allow 32 MiB). No kernel here raises it.
SCOPED_VMEM = 16 * MiB
# What a kernel's default tiles aim under where its `BlockSizes.get_default` shrinks tiles to
# fit (`vmem_bytes`): the scoped VMEM less headroom for Mosaic's internal scratch and
# temporaries. One number would change a default: block_out keeps a whole [512, 4096] dy row
# resident at PaLM-8B (12.75 MiB, so not under 12), and 13 MiB would give norm_qkv_rope more
# rows for float32 inputs at PaLM shapes. rope, norm_swiglu and mq_decode_attention aim at
# fixed tile sizes that stay far below SCOPED_VMEM (their tpu.py docstrings give the numbers).
VMEM_BUDGET = {
    "norm_qkv_rope": 12 * MiB,
    "mq_flash_attention": 12 * MiB,
    "block_out": 13 * MiB,
}
# dot_general dimension numbers for a·bᵀ (contract both operands' minor axes).
NT_DIMS = (((1,), (1,)), ((), ()))


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def sublane(dtype) -> int:
    """Rows per packed (sublane, 128-lane) tile: 8 for 4-byte types, 16 for bf16."""
    return 32 // jnp.dtype(dtype).itemsize


def tile_bytes(rows: int, cols: int, itemsize: int) -> int:
    """VMEM bytes of a [rows, cols] block as Mosaic lays it out: whole (sublane, 128-lane)
    tiles."""
    return round_up(rows, 32 // itemsize) * round_up(cols, LANE) * itemsize


def pick_block(dim: int, target: int, align: int) -> int:
    """The default tile for an axis of length `dim`; see `pick_shared_block`."""
    return pick_shared_block((dim,), target, align)


def pick_shared_block(dims, target: int, align: int) -> int:
    """One tile for several axes (e.g. H*K and F, which share a contraction tile): a multiple
    of `align`, at most `target` (or the largest axis rounded up, if smaller), that wastes the
    least padding over all of them, the larger tile on ties."""
    top = min(target, round_up(max(dims), align))
    candidates = range(top, align - 1, -align)
    return min(candidates, key=lambda b: (sum(round_up(n, b) - n for n in dims), -b))


def check_multiple(owner: str, name: str, value, multiple: int) -> None:
    """ValueError unless `value` is a positive int multiple of `multiple` (a BlockSizes field)."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value % multiple:
        raise ValueError(f"{owner}.{name} must be a positive multiple of {multiple}, got {value!r}")


def pad_to(a: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Zero-pads `a` at the end of each axis to `shape` (no copy when it already fits)."""
    if a.shape == tuple(shape):
        return a
    return jnp.pad(a, [(0, want - have) for have, want in zip(a.shape, shape)])


def pad2(a: jax.Array, rows: int, cols: int) -> jax.Array:
    """Zero-pads a 2-D array at the end to [rows, cols]."""
    return pad_to(a, (rows, cols))


def compiler_params(*semantics: str) -> pltpu.CompilerParams:
    """Mosaic parameters: the grid's dimension semantics ("parallel" axes may be split across
    TensorCores on v4/v5p megacore; a contraction or carried axis is "arbitrary", i.e.
    sequential)."""
    return pltpu.CompilerParams(dimension_semantics=semantics)
