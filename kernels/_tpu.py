"""What the Pallas TPU kernels share: tile rules, VMEM accounting and budgets, Mosaic settings.

Tiles follow the TPU's vector registers: the minor (lane) axis of a block is a multiple of 128,
the second-minor (sublane) axis a multiple of 8 for 4-byte types and 16 for bf16, which packs
two rows per sublane. Where a wrapper zero-pads operands up to whole tiles, the padding is a
no-op at PaLM shapes, where every default tile divides its axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

# Re-exported: the TPU modules take their padding helpers from here with the rest.
from kernels._common import NT_DIMS, pad2, pad_to, round_up  # noqa: F401

LANE = 128
MiB = 2**20
# VMEM per TensorCore by device_kind (as the TPU runtime reports it), the figures of JAX's own
# jax/_src/pallas/mosaic/tpu_info.py (jax 0.10.2). v5p reports "TPU v5", v5e "TPU v5 lite" and
# v6e "TPU v6 lite"; both spellings are listed.
VMEM_CAPACITY = {
    "TPU v4": 16 * MiB,
    "TPU v5 lite": 128 * MiB,
    "TPU v5e": 128 * MiB,
    "TPU v5": 64 * MiB,
    "TPU v5p": 64 * MiB,
    "TPU v6 lite": 128 * MiB,
    "TPU v6e": 128 * MiB,
}
# The generation assumed when none can be read (not on a TPU, no abstract mesh naming one, or a
# device_kind missing above): the one with the least VMEM, so the tiles fit everywhere.
SMALLEST_GENERATION = "TPU v4"
# Mosaic's default scoped VMEM limit is 16 MiB on v4/v5e (32 MiB on v5p/v6e); `vmem_limit` never
# asks for less than this, so an estimate that undercounts costs nothing where it used to work.
SCOPED_VMEM = 16 * MiB


def target_generation() -> str:
    """The TPU generation a kernel is being built for, as a `VMEM_CAPACITY` key: the abstract
    mesh's device_kind when one is set (how tests/tpu_export.py targets a generation from a CPU
    machine), else the default device's when it is a TPU, else `SMALLEST_GENERATION`."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    kind = device.device_kind if device is not None else None
    if kind is None and jax.default_backend() == "tpu":
        kind = jax.devices()[0].device_kind
    return kind if kind in VMEM_CAPACITY else SMALLEST_GENERATION


def vmem_capacity(generation: str | None = None) -> int:
    """VMEM bytes per TensorCore of `generation` (default `target_generation()`)."""
    return VMEM_CAPACITY.get(generation or target_generation(), VMEM_CAPACITY[SMALLEST_GENERATION])


def vmem_headroom(generation: str | None = None) -> int:
    """What a kernel leaves free: a quarter of the capacity (4 MiB on v4), for Mosaic's internal
    scratch (`internal_scratch_in_bytes`), register spills, semaphores and the small values our
    estimates do not itemise."""
    return vmem_capacity(generation) // 4


def vmem_budget(generation: str | None = None) -> int:
    """The most a kernel's `vmem_bytes` estimate (tiles, scratch and in-kernel temporaries) may
    be for its default tiles: capacity less `vmem_headroom` (v4 12 MiB, v5p 48 MiB, v5e and v6e
    96 MiB)."""
    return vmem_capacity(generation) - vmem_headroom(generation)


def vmem_limit(estimate: int, generation: str | None = None) -> int:
    """`vmem_limit_bytes` for a kernel whose estimate is `estimate`: the estimate plus the
    headroom, in whole MiB, at least the default scoped limit, at most the capacity (a larger
    estimate, from explicit oversized tiles, is left for Mosaic to refuse)."""
    want = round_up(estimate, MiB) + vmem_headroom(generation)
    return min(vmem_capacity(generation), max(SCOPED_VMEM, want))




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


def check_block_shape(block_shape, array_shape, dtype, what: str) -> None:
    """ValueError unless a BlockSpec's block shape is a legal Mosaic tiling of an operand.

    Mosaic's rule, per block dimension against the (padded) array dimension: the last a multiple
    of 128 lanes or the whole dimension; the second-to-last a multiple of `sublane(dtype)` rows
    (8 for 32-bit types, 16 for bf16, which packs two rows per sublane) or the whole dimension.
    Leading dimensions are free; None (a squeezed dimension) is a block of 1 and allowed
    anywhere but the last two. Pallas' own check at lowering uses 8 rows whatever the dtype;
    the bf16 rule is libtpu's, which an export from CPU never runs.

    Args:
      block_shape: the BlockSpec's block shape (ints, None for squeezed dimensions).
      array_shape: the operand's shape as the pallas_call receives it (after padding).
      dtype: the operand's dtype.
      what: "<kernel> <operand>", for the message.
    """
    if len(block_shape) != len(array_shape):
        raise ValueError(f"{what}: block shape {tuple(block_shape)} has a different rank than the "
                         f"operand {tuple(array_shape)}")
    rules = ((1, LANE, "lanes"), (2, sublane(dtype), f"sublane rows for {jnp.dtype(dtype).name}"))
    for back, multiple, unit in rules:
        if len(block_shape) < back:
            continue
        block, dim = block_shape[-back], array_shape[-back]
        if block is None:
            block = 1
        if block != dim and block % multiple:
            raise ValueError(
                f"{what}: block shape {tuple(block_shape)} of operand {tuple(array_shape)} "
                f"{jnp.dtype(dtype).name}: dimension {len(block_shape) - back} is {block}, which "
                f"must be a multiple of {multiple} ({unit}) or the whole dimension {dim} "
                "(Mosaic tiling)")


def pallas_call(kernel, *, name: str, out_shape, interpret, in_specs=None, out_specs=None,
                grid_spec=None, **kwargs):
    """`pl.pallas_call` that first checks every BlockSpec's block shape against its operand
    (`check_block_shape`) when the kernel is compiled natively (interpret=False), so a tile
    libtpu would reject fails here, at trace time, with the kernel and operand named."""
    specs = ({"grid_spec": grid_spec} if grid_spec is not None
             else {"in_specs": in_specs, "out_specs": out_specs})
    call = pl.pallas_call(kernel, name=name, out_shape=out_shape, interpret=interpret, **specs,
                          **kwargs)
    if interpret is not False:
        return call
    skip = grid_spec.num_scalar_prefetch if grid_spec is not None else 0
    ins = grid_spec.in_specs if grid_spec is not None else in_specs
    outs = grid_spec.out_specs if grid_spec is not None else out_specs

    def checked(*args):
        pairs = [(f"input {i}", spec, a) for i, (spec, a) in enumerate(zip(ins, args[skip:]))]
        pairs += [(f"output {i}", spec, a) for i, (spec, a) in
                  enumerate(zip(jax.tree.leaves(outs), jax.tree.leaves(out_shape)))]
        for what, spec, a in pairs:
            if getattr(spec, "block_shape", None) is not None:
                check_block_shape(spec.block_shape, a.shape, a.dtype, f"{name} {what}")
        return call(*args)

    return checked


def compiler_params(*semantics: str, vmem_bytes: int) -> pltpu.CompilerParams:
    """Mosaic parameters: the grid's dimension semantics ("parallel" axes may be split across
    TensorCores on v4/v5p megacore; a contraction or carried axis is "arbitrary", i.e.
    sequential) and `vmem_limit_bytes` from the kernel's VMEM estimate (`vmem_limit`), for the
    generation being targeted."""
    return pltpu.CompilerParams(dimension_semantics=semantics,
                                vmem_limit_bytes=vmem_limit(vmem_bytes))
