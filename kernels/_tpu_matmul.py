"""Tiling helpers shared by the fused-projection TPU kernels (`norm_swiglu`, `block_out`).

Tiles follow the TPU's vector registers: the minor (lane) axis of a block is a multiple of 128,
the second-minor (sublane) axis a multiple of 8 for 4-byte types and 16 for bf16, which packs
two rows per sublane. Operands are zero-padded up to whole tiles in the wrappers; the padding
is a no-op at PaLM shapes, where every default tile divides its axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

LANE = 128
# The scoped VMEM a kernel may use without raising `vmem_limit_bytes`: 16 MiB on v4 and v5e
# (v5p and v6e allow 32 MiB). Default tiles are chosen to stay below this.
VMEM_BUDGET = 16 * 2**20
# dot_general dimension numbers for a·bᵀ (contract both operands' minor axes).
NT_DIMS = (((1,), (1,)), ((), ()))


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def sublane(dtype) -> int:
    """Rows per packed sublane tile: 8 for 4-byte types, 16 for bf16."""
    return 8 * (4 // jnp.dtype(dtype).itemsize)


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


def pad2(a: jax.Array, rows: int, cols: int) -> jax.Array:
    """Zero-pads a 2-D array at the end to [rows, cols] (no copy when it already fits)."""
    if a.shape == (rows, cols):
        return a
    return jnp.pad(a, ((0, rows - a.shape[0]), (0, cols - a.shape[1])))


def compiler_params(*semantics: str) -> pltpu.CompilerParams:
    """Mosaic parameters: the grid's dimension semantics ("parallel" axes may be split across
    TensorCores on v4/v5p megacore; the contraction axis is "arbitrary", i.e. sequential)."""
    return pltpu.CompilerParams(dimension_semantics=semantics)
