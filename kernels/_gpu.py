"""What the Pallas GPU kernels (`impl="pallas_gpu"`, `"pallas_mosaic_gpu"`) share: the Triton
lowering's compiler parameters and its block-shape rule, interpret resolution (both
lowerings), and the card's shared-memory budget.

Pallas has two GPU lowerings. Mosaic GPU is jax's default since 0.10 and the faster one on
Hopper (TMA, wgmma, warp specialisation); its CPU interpreter runs real kernels from jax 0.11
on (`mosaic_gpu_interpret`; jax 0.10's only took whole-array blocks), and exporting for
CUDA from CPU runs its whole lowering on both. The Triton lowering, chosen by passing Triton
compiler parameters, runs under `interpret=True` on CPU on both jax versions, so the same
hypothesis suite that checks the TPU kernels checks these here; and exporting for CUDA from a
CPU machine runs the whole Pallas-to-Triton lowering (tests/gpu_export.py), which rejects what
a GPU would (non power-of-two blocks, unsupported operations) before any GPU is involved. jax
0.11 deprecates the Triton lowering (warning `jax-pallas-triton`); it still lowers and runs
there. Most kernels here are Triton (`impl="pallas_gpu"`); Mosaic GPU ones are
`impl="pallas_mosaic_gpu"`.

Rules every kernel here follows, because interpret mode does not enforce them:
  - every block dimension, and every array a kernel body computes, has a power-of-two size
    (`check_block_shape`; the lowering refuses anything else);
  - no block crosses an operand's end unless the kernel masks it: Pallas's Triton lowering
    does NOT mask BlockSpec loads and stores at array edges (jax 0.10.2 and 0.11.2: a partial
    edge block reads past the buffer and writes past it, corrupting memory), while the
    interpreter pads such blocks with NaN and drops the writes, so CPU tests would not see the
    corruption. `pallas_call` therefore refuses partial edge blocks unless the caller says
    `masked_edges=True` (every load and store of a partial block carries a mask, e.g.
    `pl_triton.load(ref.at[...], mask=...)`); otherwise the wrapper pads operands to whole
    blocks (with zeros, which also makes padded contraction terms vanish);
  - grid extents reach the body as static keyword arguments (kernels/_common.py says why).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from kernels._common import current_backend

# Shared memory one thread block may use on Hopper (H100/H200: 228 KiB per SM, 227 KiB per
# block). Triton's software pipeline keeps `num_stages` copies of every tile a loop loads.
SHARED_MEMORY_BYTES = 227 * 1024


# Streaming multiprocessors of the cards we target (H100 SXM and H200: 132): the programs a
# grid needs to fill the card in one wave (flash attention's dk/dv split, decoding's splits).
SM_COUNT = 132

# Triton's dots need every dimension >= 16, so tiles that meet a dot are at least this.
MIN_BLOCK = 16


def check_block_sizes(block_sizes, *, tiles=(), warps=(), stages=()) -> None:
    """Validates a GPU `BlockSizes` (call it from its `__post_init__`): the named tile fields
    are powers of two >= MIN_BLOCK, the warp counts powers of two <= 32, the stage counts >= 1;
    a ValueError names the field otherwise."""
    owner = type(block_sizes).__name__
    for name in tiles:
        value = getattr(block_sizes, name)
        if not (isinstance(value, int) and is_power_of_two(value) and value >= MIN_BLOCK):
            raise ValueError(f"{owner}: {name}={value!r} must be a power of two >= {MIN_BLOCK} "
                             "(Triton: power-of-two arrays, dots >= 16)")
    for name in warps:
        value = getattr(block_sizes, name)
        if not (isinstance(value, int) and is_power_of_two(value) and value <= 32):
            raise ValueError(f"{owner}: {name}={value!r} must be a power of two <= 32")
    for name in stages:
        value = getattr(block_sizes, name)
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{owner}: {name}={value!r} must be a positive int")


def fit_tile(n: int, tile: int) -> int:
    """A default tile for an axis of n: `tile`, or n rounded up to a power of two when that is
    smaller, and never under MIN_BLOCK."""
    return max(MIN_BLOCK, min(tile, next_power_of_two(n)))


def shrink_to_shared_memory(block_sizes, used: Callable[[Any], int], *, stages: str,
                            tiles: tuple[str, ...]):
    """`block_sizes` with, while `used(block_sizes)` (bytes of shared memory) exceeds
    SHARED_MEMORY_BYTES, first the pipeline stage count field `stages` lowered (down to 2: fewer
    stages stop hiding the loads), then the largest of the fields `tiles` halved (down to
    MIN_BLOCK); as small as that goes when nothing fits (the call's check then says so)."""
    while used(block_sizes) > SHARED_MEMORY_BYTES:
        if getattr(block_sizes, stages) > 2:
            block_sizes = dataclasses.replace(block_sizes,
                                              **{stages: getattr(block_sizes, stages) - 1})
            continue
        shrinkable = [n for n in tiles if getattr(block_sizes, n) >= 2 * MIN_BLOCK]
        if not shrinkable:
            break
        name = max(shrinkable, key=lambda n: getattr(block_sizes, n))
        block_sizes = dataclasses.replace(block_sizes, **{name: getattr(block_sizes, name) // 2})
    return block_sizes


def dot(a: jax.Array, b: jax.Array, contract_a: int, contract_b: int, *,
        widen: bool) -> jax.Array:
    """a . b in a kernel body, contracting axis `contract_a` of a with `contract_b` of b,
    accumulated in float32, at jax's matmul precision: what XLA's own dots get, TF32 for float32
    operands on a GPU unless `jax.default_matmul_precision` asks for more (the Triton lowering
    maps DEFAULT to TF32, HIGHEST to IEEE; bf16 operands are unaffected). One policy for every
    GPU kernel: the XLA path and ours agree on what a float32 dot means.

    `widen`: the body is interpreted, on XLA:CPU, which rejects some bf16 x bf16 -> f32 dots
    (_common.matmul_f32), so bf16 operands are widened to float32 there (exact: a product of two
    bf16 numbers fits in float32)."""
    if widen and jnp.float32 not in (a.dtype, b.dtype):
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                               preferred_element_type=jnp.float32)


def gpu_interpret(interpret: Any) -> bool:
    """What `pl.pallas_call(interpret=...)` gets for a Triton kernel.

    None: native on GPU, interpreted elsewhere. True: always interpreted (the generic Pallas
    interpreter, on any backend). False: always native (e.g. to export for CUDA from CPU). A
    `plgpu.InterpretGPUParams` (the Mosaic GPU interpreter's, for the Mosaic kernels of the same
    call): interpreted.
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if interpret is None:
        return current_backend() != "gpu"
    if isinstance(interpret, bool):
        return interpret
    params = getattr(plgpu, "InterpretGPUParams", None)
    if params is not None and isinstance(interpret, params):
        return True
    raise ValueError(
        f"pallas_gpu: interpret must be None, True or False, got {interpret!r} (TPU "
        "InterpretParams are for impl='pallas_tpu')")


# XLA:CPU threads the Mosaic GPU interpreter needs: each warpgroup runs as a thread whose
# barrier waits block a thread of XLA:CPU's pool, which has one thread per core unless the
# NPROC environment variable (read when JAX creates its CPU client) says more. On a 2-core
# machine the 3-warpgroup attention forward deadlocked in most runs; with NPROC=4 it ran every
# time (tests/conftest.py sets this).
MOSAIC_INTERPRET_THREADS = 8


def mosaic_gpu_interpret(interpret: Any):
    """What a Mosaic GPU kernel (`plgpu.kernel(interpret=...)`) gets: False (native), or the
    Mosaic GPU interpreter's parameters, which simulate shared memory, TMA, barriers, wgmma
    and the warpgroups as threads on CPU.

    None, True and False as `gpu_interpret`; a `plgpu.InterpretGPUParams` (e.g. with
    detect_races=True) is used as it is. jax 0.10 has no interpreter that runs kernels with
    windows (JAX_NOTES.md): this is the one place that knows.
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    params = getattr(plgpu, "InterpretGPUParams", None)
    if params is not None and isinstance(interpret, params):
        return interpret
    if not gpu_interpret(interpret):
        return False
    if params is None:
        raise NotImplementedError(
            f"interpreting a Mosaic GPU kernel needs jax >= 0.11 (its Mosaic GPU interpreter); "
            f"this is jax {jax.__version__}: run it natively on a GPU")
    threads = int(os.environ.get("NPROC") or os.cpu_count() or 1)
    if threads < 4:
        warnings.warn(
            f"the Mosaic GPU interpreter may deadlock: XLA:CPU has about {threads} threads and "
            f"each waiting warpgroup holds one; start Python with NPROC="
            f"{MOSAIC_INTERPRET_THREADS} in the environment", RuntimeWarning, stacklevel=3)
    return params()


def mosaic_load(ref, layout):
    """A whole Mosaic GPU ref loaded into registers in `layout`. The one version shim here:
    jax 0.10's `plgpu.load` requires the index, jax 0.11 deprecates passing it."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    index = inspect.signature(plgpu.load).parameters["idx"]
    if index.default is inspect.Parameter.empty:  # jax 0.10
        return plgpu.load(ref, (), layout=layout)
    return plgpu.load(ref, layout=layout)


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def next_power_of_two(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def check_block_shape(block_shape, what: str) -> None:
    """Triton's rule: every dimension of every block is a power of two."""
    for axis, size in enumerate(block_shape):
        size = 1 if size is None else getattr(size, "block_size", size)
        if not is_power_of_two(int(size)):
            raise ValueError(
                f"{what}: block shape {tuple(block_shape)}: dimension {axis} is {size}, which is "
                "not a power of two (the Triton lowering requires one)")


def check_shared_memory(estimate: int, what: str) -> None:
    """Refuses tiles whose shared-memory estimate exceeds one thread block's budget."""
    if estimate > SHARED_MEMORY_BYTES:
        raise ValueError(
            f"{what}: tiles need ~{estimate // 1024} KiB of shared memory, more than the "
            f"{SHARED_MEMORY_BYTES // 1024} KiB one thread block has on Hopper; use smaller "
            "blocks or fewer stages")


def check_whole_blocks(block_shape, array_shape, what: str) -> None:
    """Refuses a block shape that leaves a partial block at an operand's end (see the module
    docstring: Triton would read and write past the buffer there)."""
    for axis, (block, size) in enumerate(zip(block_shape, array_shape)):
        block = 1 if block is None else int(getattr(block, "block_size", block))
        if size % block:
            raise ValueError(
                f"{what}: block shape {tuple(block_shape)} leaves a partial block at the end of "
                f"dimension {axis} of operand {tuple(array_shape)}: the Triton lowering does not "
                "mask it (loads and stores would run past the buffer); pad the operand to whole "
                "blocks, or mask every access and pass masked_edges=True")


def pallas_call(kernel, *, name: str, out_shape, grid, in_specs, out_specs, interpret: bool,
                num_warps: int, num_stages: int, masked_edges: bool = False,
                input_output_aliases: dict[int, int] | None = None):
    """`pl.pallas_call` lowered through Triton, every block shape checked first (native and
    interpreted alike, so CPU tests catch a tile the GPU would refuse or a partial edge block
    that Triton would not mask); `masked_edges=True` when the kernel masks its edges itself;
    `input_output_aliases` as pl.pallas_call takes it (an output written over an input)."""
    for i, spec in enumerate(jax.tree.leaves(in_specs)):
        check_block_shape(spec.block_shape, f"{name} input {i}")
    for i, spec in enumerate(jax.tree.leaves(out_specs)):
        check_block_shape(spec.block_shape, f"{name} output {i}")
    call = pl.pallas_call(
        kernel, name=name, out_shape=out_shape, grid=grid, in_specs=in_specs,
        out_specs=out_specs, interpret=interpret, input_output_aliases=input_output_aliases or {},
        compiler_params=pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages))
    if masked_edges:
        return call

    def checked(*args):
        pairs = [(f"{name} input {i}", spec, a)
                 for i, (spec, a) in enumerate(zip(jax.tree.leaves(in_specs), args))]
        pairs += [(f"{name} output {i}", spec, a) for i, (spec, a) in
                  enumerate(zip(jax.tree.leaves(out_specs), jax.tree.leaves(out_shape)))]
        for what, spec, a in pairs:
            if getattr(spec, "block_shape", None) is not None:
                check_whole_blocks(spec.block_shape, a.shape, what)
        return call(*args)

    return checked
