"""What the Mosaic GPU kernels (`impl="pallas_mosaic_gpu"`) share: warp-specialised thread
blocks on Hopper, one producer warpgroup streaming tiles into rings of shared-memory buffers by
TMA and consumer warpgroups running wgmma on them (FlashAttention-3, Shah et al. 2024; the
kernels/mq_flash_attention/mgpu.py and kernels/norm_swiglu/mgpu.py docstrings use it).

  * `swizzled`: shared memory in the swizzled layout TMA writes and wgmma reads.
  * `launch`: a `plgpu.kernel` over a named grid whose warpgroups share scratch allocated once.
  * `produce`: the producer's loop: tile i of each source into ring slot i % depth, signalling
    a `ready` barrier per slot, refilling a slot once every consumer has released it (`free`).
  * `accumulate`: f32 accumulators += products, by wgmma natively (issued together, awaited
    once) and by plain dots in the Mosaic GPU interpreter, which has no `pl.run_state`.

Interpretation (`kernels._gpu.mosaic_gpu_interpret`) and the version shim for loads
(`kernels._gpu.mosaic_load`) are in kernels/_gpu.py with the rest of the GPU settings.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

# Registers per thread after `set_max_registers` (a multiple of 8, 24..256): consumers hold
# f32 accumulators of up to [64, 256] (128 registers) plus their operands; the producer only
# issues copies. Two consumers and a producer: 2 x 232 + 40 = 504 x 128 threads, within the
# 64 K-register file.
CONSUMER_REGISTERS = 232
PRODUCER_REGISTERS = 40


def swizzled(shape: tuple[int, ...], dtype, swizzle: int = 128) -> Any:
    """Shared memory in swizzled rows of `swizzle` bytes (128: 64 two-byte elements), the
    layout TMA writes and wgmma reads."""
    columns = swizzle // jnp.dtype(dtype).itemsize
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, columns)),
                                                plgpu.SwizzleTransform(swizzle)))


def launch(kernel: Callable[..., None], scratch: Sequence[Any], *, name: str, out_type,
           grid: tuple[int, ...], grid_names: tuple[str, ...], threads: int, interpret: Any,
           scope: str):
    """`kernel(*operand_refs, *scratch_refs)` as a plgpu.kernel over `grid` (axes named
    `grid_names`) with `threads` warpgroups (axis "wg") sharing `scratch`, allocated once for
    all of them; interpret False or the Mosaic GPU interpreter's parameters. Traced under the
    named scope `name scope` (say the tiling there), for profiles."""
    def entry(*refs):
        pl.run_scoped(lambda *scoped: kernel(*refs, *scoped), *scratch, collective_axes="wg")

    call = plgpu.kernel(
        entry, out_type=out_type, grid=grid, grid_names=grid_names, num_threads=threads,
        thread_name="wg", compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret or None, kernel_name=name)

    def launched(*operands):
        with jax.named_scope(f"{name} {scope}"):
            return call(*operands)

    return launched


def ring_slot(step, buffers: int):
    """The ring slot of tile `step`."""
    return lax.rem(step, jnp.int32(buffers))


def produce(sources: Sequence[Callable[[Any], Any]], rings: Sequence[Any], ready, free, *,
            first, count):
    """The producer warpgroup: for tiles first .. first+count-1, `sources[i](tile)` (a window
    of a gmem ref) into ring slot (tile - first) % depth of `rings[i]` by TMA, signalling
    `ready[i]` (barrier arrays, one barrier per slot); each slot refilled once every consumer
    has released what it held (every barrier array of `free`)."""
    plgpu.set_max_registers(PRODUCER_REGISTERS, action="decrease")
    buffers = rings[0].shape[0]

    @pl.loop(0, count)
    def _load(step):
        at = ring_slot(step, buffers)

        @pl.when(step >= buffers)  # the slot held step - buffers: wait for its release
        def _():
            for released in free:
                plgpu.barrier_wait(released.at[at])

        for source, ring, signal in zip(sources, rings, ready):
            plgpu.copy_gmem_to_smem(source(first + step), ring.at[at], signal.at[at])

    # The last releases, so that every phase of the free barriers is observed before the
    # scratch goes away (the interpreter checks that; on the GPU it costs an idle wait).
    @pl.loop(jnp.maximum(count - buffers, 0), count)
    def _drain(step):
        for released in free:
            plgpu.barrier_wait(released.at[ring_slot(step, buffers)])


def accumulate(accs, products, interpret: bool, while_running: Callable[[], None] = lambda: None):
    """accs[i] + the sum of a @ b over the (a, b) pairs of products[i], f32, with a in
    registers or shared memory and b a shared-memory tile, calling `while_running()` after the
    wgmmas are issued and before they are awaited. Natively wgmma accumulates into the accs'
    registers (`pl.run_state` over the accumulators). The Mosaic GPU interpreter has neither
    `run_state` nor wgmma from registers, so there it is plain dots (the same sums)."""
    if interpret:
        while_running()
        sums = tuple(acc + sum(jnp.dot(a[...], b[...], preferred_element_type=jnp.float32)
                               for a, b in pairs)
                     for acc, pairs in zip(accs, products))
        # Those reads went through the generic proxy, which the producer's next TMA write
        # (async proxy) must be ordered after: a proxy fence (wgmma reads through the async
        # proxy itself, so the native path needs none).
        plgpu.commit_smem()
        return sums

    def run(acc_refs):
        for acc_ref, pairs in zip(acc_refs, products):
            for a, b in pairs:
                plgpu.wgmma(acc_ref, a, b)
        while_running()

    return pl.run_state(run)(tuple(plgpu.ACC.init(acc) for acc in accs))


def zeros(shape: tuple[int, int]) -> jax.Array:
    """An f32 accumulator of zeros in wgmma's register layout."""
    return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)


def meet(barrier) -> None:
    """The consumers meet: one phase of a barrier with an arrival per consumer."""
    plgpu.barrier_arrive(barrier)
    plgpu.barrier_wait(barrier)

