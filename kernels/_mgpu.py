"""What the Mosaic GPU kernels (`impl="pallas_mosaic_gpu"`) share: warp-specialised thread
blocks on Hopper, one producer warpgroup streaming tiles into rings of shared-memory buffers by
TMA and consumer warpgroups running wgmma on them (FlashAttention-3, Shah et al. 2024; the
kernels/mq_flash_attention/mgpu.py and kernels/norm_swiglu/mgpu.py docstrings use it).

  * `swizzled`: shared memory in the swizzled layout TMA writes and wgmma reads.
  * `launch`: a `plgpu.kernel` over a named grid whose warpgroups share scratch allocated once.
  * `produce`: the producer's loop: tile i of each source into ring slot i % depth, signalling
    a `ready` barrier per slot, refilling a slot once every consumer has released it (`free`);
    its copies are `window_copy`s, `segments` (several arrays along one contraction) or a
    kernel's own choice per thread block.
  * `store`: an epilogue's output tile through shared memory to one of several outputs.
  * `accumulate`: f32 accumulators += products, by wgmma natively (issued together, awaited
    once) and by plain dots in the Mosaic GPU interpreter, which has no `pl.run_state`.
  * `consume`: a consumer's walk over the ring: wait for a slot, accumulate, release it.
  * `matmul`: a streamed matmul whose producer may switch arrays along the contraction
    (block_out's two products), with an epilogue (the residual, SwiGLU, RoPE, or a plain
    store): every projection kernel, forward and backward, the input projections' forwards on
    LN(x) from XLA (kernels/norm_swiglu/mgpu.py says why); `summed_products` the whole kernel
    for sums of products with B transposed (the input projections' dx).

Interpretation (`kernels._gpu.mosaic_gpu_interpret`) and the version shim for loads
(`kernels._gpu.mosaic_load`) are in kernels/_gpu.py with the rest of the GPU settings.
"""

from __future__ import annotations

import functools
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


def window_copy(window: Callable[[Any], Any]) -> Callable[[Any, Any, Any], None]:
    """A `produce` copy of tile t from `window(t)` (a window of a gmem ref), by TMA."""
    return lambda tile, dst, barrier: plgpu.copy_gmem_to_smem(window(tile), dst, barrier)


def segments(*parts: tuple[Callable[[Any], Any], Any]):
    """A `produce` copy of step k from the part it falls in: parts (window, steps), in their
    order along one contraction (several products summed into one accumulator), step k of a
    part read from `window(k - the steps before it)` (a gmem window)."""
    def copy(k, dst, barrier):
        start = 0
        for window, steps in parts:
            pl.when((k >= start) & (k < start + steps))(functools.partial(
                lambda window, start: plgpu.copy_gmem_to_smem(window(k - start), dst, barrier),
                window, start))
            start = start + steps
    return copy


def store(stage, value, destinations) -> None:
    """An epilogue's output tile: `value` into the shared-memory `stage` (in its dtype), then
    by TMA to the gmem window of each (condition, window) of `destinations` whose condition
    holds (a bool, or a traced one: outputs chosen per thread block), awaited."""
    stage[...] = value.astype(stage.dtype)
    plgpu.commit_smem()
    for condition, window in destinations:
        pl.when(condition)(functools.partial(plgpu.copy_smem_to_gmem, stage, window))
    plgpu.wait_smem_to_gmem(0)


def produce(copies: Sequence[Callable[[Any, Any, Any], None]], rings: Sequence[Any], ready,
            free, *, first, count):
    """The producer warpgroup: for tiles first .. first+count-1, `copies[i](tile, slot ref,
    barrier)` fills ring slot (tile - first) % depth of `rings[i]` (a TMA signalling the
    barrier: `window_copy`, or one chosen per thread block), signalling `ready[i]` (barrier
    arrays, one barrier per slot); each slot refilled once every consumer has released what
    it held (every barrier array of `free`)."""
    plgpu.set_max_registers(PRODUCER_REGISTERS, action="decrease")
    buffers = rings[0].shape[0]

    @pl.loop(0, count)
    def _load(step):
        at = ring_slot(step, buffers)

        @pl.when(step >= buffers)  # the slot held step - buffers: wait for its release
        def _():
            for released in free:
                plgpu.barrier_wait(released.at[at])

        for copy, ring, signal in zip(copies, rings, ready):
            copy(first + step, ring.at[at], signal.at[at])

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


def consume(n_steps, depth: int, ready, free, products: Callable[[Any], Any], accs,
            interpret: bool):
    """A consumer's walk over a ring of `depth` slots filled by `produce`: per step k, once
    slot k % depth is ready (every barrier array of `ready`), accs += `products(slot)`
    (`accumulate`'s products), then the slot released (`free`); returns the accumulators."""
    def step(k, accs):
        at = ring_slot(k, depth)
        for signal in ready:
            plgpu.barrier_wait(signal.at[at])
        accs = accumulate(accs, products(at), interpret)
        plgpu.barrier_arrive(free.at[at])
        return accs

    return lax.fori_loop(0, n_steps, step, accs)


def zeros(shape: tuple[int, int]) -> jax.Array:
    """An f32 accumulator of zeros in wgmma's register layout."""
    return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)


def meet(barrier) -> None:
    """The consumers meet: one phase of a barrier with an arrival per consumer."""
    plgpu.barrier_arrive(barrier)
    plgpu.barrier_wait(barrier)


# ---- Tiles ----------------------------------------------------------------------------------

# wgmma's M: the rows one consumer warpgroup owns.
WG_ROWS = 64
# The contraction slice of one ring slot: one 128-byte swizzled row of two-byte elements.
SLICE = 64


def check_block_sizes(blocks, *, rows: str, depth: str, columns=(), flags=()) -> None:
    """Validates a Mosaic GPU `BlockSizes` (call it from its `__post_init__`): the `rows` field
    64 or 128 (one or two consumer warpgroups of wgmma's 64 rows), the `depth` field the slice
    of SLICE, each (field, widths) of `columns` one of its widths, `buffers` an int >= 2, each
    field named in `flags` a bool; a ValueError names the field otherwise."""
    owner = type(blocks).__name__
    value = getattr(blocks, rows)
    if value not in (WG_ROWS, 2 * WG_ROWS):
        raise ValueError(f"{owner}: {rows}={value} must be 64 or 128 (one or two consumer "
                         "warpgroups of wgmma's 64 rows)")
    for name, widths in columns:
        if getattr(blocks, name) not in widths:
            raise ValueError(f"{owner}: {name}={getattr(blocks, name)} must be "
                             f"{', '.join(map(str, widths[:-1]))} or {widths[-1]}")
    if getattr(blocks, depth) != SLICE:
        raise ValueError(f"{owner}: {depth}={getattr(blocks, depth)} must be {SLICE} (one "
                         "swizzled row of two-byte elements)")
    if not (isinstance(blocks.buffers, int) and blocks.buffers >= 2):
        raise ValueError(f"{owner}: buffers={blocks.buffers!r} must be an int >= 2")
    for name in flags:
        if not isinstance(getattr(blocks, name), bool):
            raise ValueError(f"{owner}: {name}={getattr(blocks, name)!r} must be a bool")


# ---- The streamed matmul (every projection's forward and backward but attention) -----------


def matmul_scratch(rows: int, cols: int, dtype, buffers: int, staging, *, n_b: int = 1,
                   transposed_a: bool = False, transposed_b: bool = False, extra=()) -> tuple:
    """The scratch of a `matmul` thread block of [rows, cols] (64 rows per consumer) with `n_b`
    B operands: the ring of A slices ([rows, SLICE], or stored transposed [SLICE, rows]) and
    of each B's slices ([SLICE, cols], or stored transposed [cols, SLICE]), unioned with
    `staging` (the epilogue's shared memory); the ring's ready and free barriers and the
    consumers' meeting barrier; then `extra`."""
    consumers = rows // WG_ROWS
    a_shape = (buffers, SLICE, rows) if transposed_a else (buffers, rows, SLICE)
    b_shape = (buffers, cols, SLICE) if transposed_b else (buffers, SLICE, cols)
    ring = (swizzled(a_shape, dtype), *(swizzled(b_shape, dtype) for _ in range(n_b)))
    return (plgpu.RefUnion(ring, staging),
            (plgpu.Barrier(num_barriers=buffers),) * len(ring),  # each ring's slot ready
            plgpu.Barrier(num_arrivals=consumers, num_barriers=buffers),  # slot free
            plgpu.Barrier(num_arrivals=consumers),  # done: every consumer past its last wgmma
            *extra)


def matmul_scratch_bytes(rows: int, cols: int, itemsize: int, buffers: int, staging: int,
                         n_b: int = 1) -> int:
    """Shared memory of `matmul_scratch`: its ring of A and B slices, unioned with the
    epilogue's `staging` bytes (barriers aside)."""
    return max(buffers * (rows + n_b * cols) * SLICE * itemsize, staging)


def matmul(a_copy, b_copies, scratch, *, n_steps: int, interpret: bool, epilogue,
           transposed_a: bool = False, transposed_b: bool = False) -> None:
    """The body of a streamed-matmul thread block, acc_i = sum over k < n_steps of A_k @ B_ik
    for each B operand i, inside a plgpu.kernel with a warpgroup per 64 rows plus the
    producer, on `matmul_scratch` (laid out with the same transposes).

    The producer fills ring slot k % depth with `a_copy(k, ...)` (A's slice [rows, SLICE], or
    its transpose [SLICE, rows]) and each `b_copies[i](k, ...)` (B's [SLICE, cols], or its
    transpose [cols, SLICE]): `produce` copies, which may pick their arrays per step (several
    products summed into one accumulator, `segments`) or per thread block. Consumer c runs
    acc_i += A_k[its 64 rows] @ B_ik, wgmmas with both operands in shared memory (transposed
    there as stored) into f32 [64, cols], issued together. Once every consumer is past its
    last wgmma (the ring's memory is then free for the staging), each calls `epilogue(c,
    accs, staging, extra)`."""
    union, ready, free, done, *extra = scratch
    (a_ring, *b_rings), staging = union
    buffers = a_ring.shape[0]
    rows = a_ring.shape[2] if transposed_a else a_ring.shape[1]
    cols = b_rings[0].shape[1] if transposed_b else b_rings[0].shape[2]
    consumers = rows // WG_ROWS
    wg = lax.axis_index("wg")
    pl.when(wg == consumers)(lambda: produce((a_copy, *b_copies), (a_ring, *b_rings), ready,
                                             (free,), first=0, count=n_steps))

    def consumer(c: int):
        plgpu.set_max_registers(CONSUMER_REGISTERS, action="increase")
        own_rows = pl.ds(c * WG_ROWS, WG_ROWS)

        def products(at):  # both operands in shared memory, transposed there as stored
            a = (a_ring.at[at, :, own_rows].transpose((1, 0)) if transposed_a
                 else a_ring.at[at, own_rows])
            return tuple(((a, ring.at[at].transpose((1, 0)) if transposed_b else ring.at[at]),)
                         for ring in b_rings)

        accs = consume(n_steps, buffers, ready, free, products,
                       tuple(zeros((WG_ROWS, cols)) for _ in b_rings), interpret)
        meet(done)
        epilogue(c, accs, staging, extra)

    for c in range(consumers):
        pl.when(wg == c)(functools.partial(consumer, c))


def summed_products(a_steps: Sequence[int], b_steps: Sequence[int], *refs,
                    interpret: bool) -> None:
    """A `launch`able kernel over the grid ("rows", "cols") on `matmul_scratch(...,
    transposed_b=True)`: one [rows, cols] tile of out = sum_i A_i·B_iᵀ along one contraction
    in slices of SLICE. refs: the parts of A ([M, ·], a_steps[i] slices each), then those of B
    ([N, ·], b_steps[i] slices; the two walk the same steps side by side), then out [M, N],
    then the scratch; B's slices [cols, SLICE] are read transposed by wgmma, and the tile
    leaves through the staging in its dtype."""
    n_parts = len(a_steps) + len(b_steps)
    a_refs, b_refs = refs[:len(a_steps)], refs[len(a_steps):n_parts]
    out_ref, scratch = refs[n_parts], refs[n_parts + 1:]
    (a_ring, b_ring), _ = scratch[0]
    bm, bn = a_ring.shape[1], b_ring.shape[1]
    rows = pl.ds(lax.axis_index("rows") * bm, bm)
    cols = pl.ds(lax.axis_index("cols") * bn, bn)

    def parts(part_refs, steps, window):
        return segments(*((functools.partial(lambda ref, k: ref.at[window, pl.ds(k * SLICE, SLICE)],
                                             ref), n) for ref, n in zip(part_refs, steps)))

    def epilogue(c, accs, stage, extra):
        (acc,) = accs
        mine = pl.ds(rows.start + c * WG_ROWS, WG_ROWS)
        store(stage.at[c], acc, ((True, out_ref.at[mine, cols]),))

    matmul(parts(a_refs, a_steps, rows), (parts(b_refs, b_steps, cols),), scratch,
           n_steps=sum(a_steps), interpret=interpret, epilogue=epilogue, transposed_b=True)
