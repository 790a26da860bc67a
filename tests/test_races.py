"""The race detector the kernel tests rely on fires: a planted race is reported, its fix is not.

The kernel sums row tiles into one output block over a grid axis. That axis carries an
accumulation (every step reads and writes the same output block), so it must be "arbitrary";
marked "parallel", two simulated TensorCores each take half the steps and write the block
without ordering: a race. If this test fails, `RaceLog`'s clean verdicts prove nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.pallas import tpu as pltpu

from conftest import RaceLog, assert_close, needs_mosaic_interpreter

TILES, ROWS, LANES = 4, 8, 128


def _row_tile_sum(x, semantics: str):
    def kernel(x_ref, o_ref):
        @pl.when(pl.program_id(0) == 0)
        def _():
            o_ref[...] = jnp.zeros_like(o_ref)

        o_ref[...] += x_ref[...]

    return pl.pallas_call(
        kernel,
        grid=(TILES,),
        in_specs=[pl.BlockSpec((ROWS, LANES), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((ROWS, LANES), lambda i: (0, 0)),
        out_shape=jax.ShapeDtypeStruct((ROWS, LANES), x.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=(semantics,)),
        interpret=pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2),
        name=f"planted_race_{semantics}",
    )(x)


def _x():
    return jnp.asarray(np.random.default_rng(0).standard_normal((TILES * ROWS, LANES)),
                       jnp.float32)


def test_accumulation_axis_marked_parallel_is_a_race():
    with RaceLog(check=False) as log:
        jax.block_until_ready(_row_tile_sum(_x(), "parallel"))
    assert log.kernels_checked == 1
    assert log.races_found, "two cores accumulating into one block went unreported"
    with pytest.raises(AssertionError, match="found a data race"):
        log.assert_clean()


def test_accumulation_axis_marked_arbitrary_is_clean():
    x = _x()
    with RaceLog() as log:  # asserts on exit: detection ran and found nothing
        out = _row_tile_sum(x, "arbitrary")
    assert log.kernels_checked == 1
    assert_close(out, x.reshape(TILES, ROWS, LANES).sum(0), jnp.float32, what="sum")


def test_race_log_fails_when_detection_never_ran():
    """An InterpretParams call without detect_races still creates an interpreter race state;
    RaceLog must not take that for a check."""
    def copy(x_ref, o_ref):
        o_ref[...] = x_ref[...]

    x = _x()
    with RaceLog(check=False) as log:
        pl.pallas_call(
            copy, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
            interpret=pltpu.InterpretParams())(x).block_until_ready()
    assert log.states and log.kernels_checked == 0
    with pytest.raises(AssertionError, match="checked no kernel"):
        log.assert_clean()


# ---- the Mosaic GPU interpreter (jax >= 0.11) ------------------------------------------------

def _handoff(x, synchronised: bool):
    """Warpgroup 0 writes x into shared memory, warpgroup 1 copies it out: ordered by a
    barrier, or (planted race) not."""
    def body(x_ref, o_ref, smem, written):
        wg = jax.lax.axis_index("wg")

        @pl.when(wg == 0)
        def _():
            smem[...] = x_ref[...]
            if synchronised:
                plgpu.barrier_arrive(written)

        @pl.when(wg == 1)
        def _():
            if synchronised:
                plgpu.barrier_wait(written)
            o_ref[...] = smem[...]

    return plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct(x.shape, x.dtype),
        scratch_types=[plgpu.SMEM(x.shape, x.dtype), plgpu.Barrier(num_arrivals=1)],
        num_threads=2, thread_name="wg",
        interpret=plgpu.InterpretGPUParams(detect_races=True))(x)


@needs_mosaic_interpreter
def test_mosaic_gpu_unsynchronised_handoff_is_a_race():
    with RaceLog(check=False) as log:
        jax.block_until_ready(_handoff(_x()[:ROWS], synchronised=False))
    assert log.kernels_checked == 1
    assert log.races_found, "a shared-memory handoff without a barrier went unreported"


@needs_mosaic_interpreter
def test_mosaic_gpu_handoff_through_a_barrier_is_clean():
    x = _x()[:ROWS]
    with RaceLog() as log:
        out = _handoff(x, synchronised=True)
    assert log.kernels_checked == 1
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x))
