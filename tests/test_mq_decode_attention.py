"""Pallas multi-query decode attention against its reference: the TPU kernel in TPU interpret
mode, the GPU (Triton) kernel with `interpret=True`, the same properties for both; and both
lowered for their hardware from this CPU machine (Mosaic for TPU, Triton for CUDA).

The kernels have no gradient (inference only), so there is no backward to check; jax.grad must
refuse rather than return something.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from jax.experimental.pallas import tpu as pltpu

from conftest import RaceLog, assert_close, race_log, run
from gpu_export import export_for_gpu, triton_kernel_names
from kernels._gpu import SHARED_MEMORY_BYTES
from kernels.mq_decode_attention import (
    BlockSizes,
    _PALLAS,
    mq_decode_attention,
    mq_decode_attention_reference,
    vmem_bytes,
)
from kernels.mq_decode_attention.gpu import BlockSizes as GpuBlockSizes
from kernels.mq_decode_attention.gpu import shared_memory_bytes
from kernels.mq_decode_attention.tpu import _schedule
from tpu_export import TPU_GENERATIONS, export_for_tpu, mosaic_kernel_names

pallas_tpu = _PALLAS["pallas_tpu"]
pallas_gpu = _PALLAS["pallas_gpu"]
DTYPES = (jnp.float32, jnp.bfloat16)


def _inputs(seed, batch, heads, seq_len, head_dim, dtype):
    # numpy, not jax.random: eager jax ops compile anew for every drawn shape.
    rng = np.random.default_rng(seed)
    shapes = ((batch, heads, head_dim), (batch, seq_len, head_dim), (batch, seq_len, head_dim))
    return tuple(jnp.asarray(rng.standard_normal(shape, np.float32), dtype) for shape in shapes)


def _gpu_blocks(draw):
    # Power-of-two tiles of 16 or 32 rows (Triton's minimum dot size is 16), so that the drawn
    # caches (up to 48) give several tiles and splits; warps and stages change nothing
    # interpreted but must be accepted.
    return GpuBlockSizes(block_k=draw(st.sampled_from([16, 32])), num_splits=draw(st.integers(1, 3)),
                         num_warps=draw(st.sampled_from([2, 4])), num_stages=draw(st.sampled_from([1, 2])))


@st.composite
def _cases(draw):
    impl = draw(st.sampled_from(["pallas_tpu", "pallas_gpu"]))
    # About a quarter of the TPU cases run on two simulated cores with race detection, which
    # costs over 0.1 s of CPU per grid step (B x splits x steps): their caches are at most 24
    # long. Race detection is the TPU interpreter's; the GPU kernel runs under interpret=True.
    races = impl == "pallas_tpu" and draw(st.booleans()) and draw(st.booleans())
    seq_len = draw(st.integers(1, 24 if races else 48))
    batch = draw(st.integers(1, 3))
    edge = st.sampled_from([1, seq_len])
    lengths = draw(st.lists(st.one_of(edge, st.integers(1, seq_len)), min_size=batch, max_size=batch))
    # GPU: also a head dim that is no power of two (its tiles are padded to one, masked).
    head_dims = [2, 4, 8, 16] + ([24] if impl == "pallas_gpu" else [])
    if impl == "pallas_gpu":
        block_sizes = _gpu_blocks(draw)
    else:
        # Small tiles (8..32 rows, rarely dividing S) so several tiles and splits happen.
        block_sizes = BlockSizes(block_s=draw(st.sampled_from([8, 16, 24, 32])),
                                 num_splits=draw(st.integers(1, 3)))
    return dict(
        impl=impl,
        batch=batch,
        heads=draw(st.integers(1, 4)),
        seq_len=seq_len,
        head_dim=draw(st.sampled_from(head_dims)),
        dtype=draw(st.sampled_from(DTYPES)),
        lengths=lengths,
        block_sizes=block_sizes,
        sm_scale=draw(st.sampled_from([None, 0.3])),
        races=races,
        seed=draw(st.integers(0, 2**16)),
    )


def _palm_head_dim(dtype, lengths, impl="pallas_tpu", num_splits=2):
    """PaLM's K = 256 (hypothesis draws K <= 24): two lane tiles, a short cache."""
    if impl == "pallas_tpu":
        block_sizes = BlockSizes(block_s=16, num_splits=num_splits)
    else:
        block_sizes = GpuBlockSizes(block_k=16, num_splits=num_splits)
    return dict(impl=impl, batch=len(lengths), heads=4, seq_len=40, head_dim=256, dtype=dtype,
                lengths=lengths, block_sizes=block_sizes, sm_scale=None, races=False, seed=256)


@example(_palm_head_dim(jnp.float32, [40, 9]))
@example(_palm_head_dim(jnp.bfloat16, [23]))
@example(_palm_head_dim(jnp.float32, [40, 9], "pallas_gpu"))
@example(_palm_head_dim(jnp.bfloat16, [23], "pallas_gpu"))
# Short rows: length 1 leaves two of three splits empty (lse = -inf in the combine).
@example(_palm_head_dim(jnp.bfloat16, [1, 40, 17], "pallas_gpu", num_splits=3))
@given(_cases())
def test_matches_reference(case):
    q, k, v = _inputs(case["seed"], case["batch"], case["heads"], case["seq_len"], case["head_dim"],
                      case["dtype"])
    lengths = jnp.asarray(case["lengths"], jnp.int32)
    if case["races"]:
        # Two simulated TensorCores share the parallel (B, split) points in random order.
        interpret = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2,
                                          random_seed=case["seed"])
    else:
        interpret = True
    kernel = _PALLAS[case["impl"]]

    def both(q, k, v, lengths):  # one compile per example (the wrapper's ops too)
        return (kernel(q, k, v, lengths, sm_scale=case["sm_scale"], interpret=interpret,
                       block_sizes=case["block_sizes"]),
                mq_decode_attention_reference(q, k, v, lengths, sm_scale=case["sm_scale"]))

    with race_log(case["races"]):
        out, expected = run(both, q, k, v, lengths)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert_close(out, expected, case["dtype"], what="decode attention")


def test_two_cores_without_races():
    """Batch 1 on two simulated TensorCores: the split axis alone carries the parallelism, so
    each core must own its partial (m, l, acc) blocks. 3 splits over 5 tiles of 8, one
    length ending mid-tile."""
    q, k, v = _inputs(7, 1, 3, 40, 16, jnp.float32)
    lengths = jnp.asarray([37], jnp.int32)
    interpret = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)

    def both(q, k, v, lengths):  # one compile
        return (pallas_tpu(q, k, v, lengths, interpret=interpret,
                           block_sizes=BlockSizes(block_s=8, num_splits=3)),
                mq_decode_attention_reference(q, k, v, lengths))

    with RaceLog() as log:
        out, expected = run(both, q, k, v, lengths)
    assert log.kernels_checked == 1
    assert_close(out, expected, jnp.float32, what="decode attention")


@given(st.integers(1, 200), st.sampled_from([8, 16, 128]), st.integers(1, 5), st.data())
def test_schedule_fetches_and_computes_each_valid_tile_once(seq_len, block_s, splits, data):
    """The index_map/compute schedule: every valid tile exactly once, no copy of anything else.

    The pipeline copies a block when its index differs from the previous grid step's, so the
    number of index changes is the number of DMAs. Checked for one sequence in grid order.
    """
    length = data.draw(st.integers(1, seq_len))
    num_tiles = -(-seq_len // block_s)
    splits = min(splits, num_tiles)
    steps = -(-num_tiles // splits)
    valid = -(-length // block_s)
    per_split = -(-valid // splits)
    computed, copies, previous, work = [], 0, None, [0] * splits
    for p in range(splits):
        for j in range(steps):
            tile, computes, fetched = (int(x) for x in _schedule(p, j, valid, per_split))
            assert 0 <= fetched < num_tiles
            if fetched != previous:
                copies += 1
                assert computes, f"step ({p}, {j}) copies tile {fetched} but does no work"
            if computes:
                assert fetched == tile
                computed.append(tile)
                work[p] += 1
            previous = fetched
    assert sorted(computed) == list(range(valid))
    assert copies == valid
    assert max(work) == per_split  # the busiest split does no more than its even share


def _poison_beyond(cache, lengths):
    beyond = jnp.arange(cache.shape[1])[None, :, None] >= lengths[:, None, None]
    return jnp.where(beyond, jnp.nan, cache)


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_front_door_jit_and_garbage_beyond_length(impl):
    """Slots at or past a length may hold anything (here NaN): never read into the result."""
    reference = jax.jit(mq_decode_attention_reference)  # eager jnp compiles op by op
    q, k, v = _inputs(1, 3, 4, 40, 8, jnp.float32)
    lengths = jnp.array([1, 17, 40], jnp.int32)
    expected = reference(q, k, v, lengths)
    if impl == "pallas_tpu":
        blocks = BlockSizes(block_s=16, num_splits=2)
    else:
        blocks = GpuBlockSizes(block_k=16, num_splits=2)
    fn = jax.jit(lambda q, k, v, n: mq_decode_attention(q, k, v, n, impl=impl, interpret=True,
                                                        block_sizes=blocks))
    out = fn(q, _poison_beyond(k, lengths), _poison_beyond(v, lengths), lengths)
    assert_close(out, expected, jnp.float32, what="jit, NaN beyond length")
    # Default tiles (one tile of S rows at this size) through the front door, outside jit, bf16.
    q, k, v = _inputs(2, 3, 16, 300, 128, jnp.bfloat16)
    lengths = jnp.array([300, 1, 129], jnp.int32)
    expected = reference(q, k, v, lengths)
    out = mq_decode_attention(q, _poison_beyond(k, lengths), _poison_beyond(v, lengths), lengths,
                              impl=impl, interpret=True)
    assert_close(out, expected, jnp.bfloat16, what="default blocks, bf16")


def test_no_gradient():
    q, k, v = _inputs(2, 1, 2, 16, 4, jnp.float32)
    lengths = jnp.array([9], jnp.int32)
    for kernel in (pallas_tpu, pallas_gpu):
        with pytest.raises(NotImplementedError):
            jax.grad(lambda q: kernel(q, k, v, lengths, interpret=True).sum())(q)


def test_bad_input():
    q, k, v = _inputs(3, 2, 4, 16, 8, jnp.float32)
    lengths = jnp.array([3, 16], jnp.int32)
    for impl in ("xla", "pallas_tpu", "pallas_gpu"):
        call = lambda *a, **kw: mq_decode_attention(*a, impl=impl, interpret=True, **kw)  # noqa: E731
        with pytest.raises(ValueError, match="q must be"):
            call(q[0], k, v, lengths)
        with pytest.raises(ValueError, match="k_cache must be"):
            call(q, k[:, :, :4], v, lengths)
        with pytest.raises(ValueError, match="v_cache must match"):
            call(q, k, v[:, :8], lengths)
        with pytest.raises(ValueError, match="lengths must be int"):
            call(q, k, v, lengths.astype(jnp.float32))
        with pytest.raises(ValueError, match="lengths must be int"):
            call(q, k, v, lengths[:1])
        with pytest.raises(ValueError, match=r"lengths must lie in \[1, S=16\]"):
            call(q, k, v, jnp.array([0, 5], jnp.int32))
        with pytest.raises(ValueError, match=r"lengths must lie in \[1, S=16\]"):
            call(q, k, v, jnp.array([5, 17], jnp.int32))
    for kernel in (pallas_tpu, pallas_gpu):
        with pytest.raises(ValueError, match="share a dtype"):
            kernel(q.astype(jnp.bfloat16), k, v, lengths, interpret=True)
    with pytest.raises(ValueError, match="block_sizes must be a kernels.mq_decode_attention.tpu.BlockSizes"):
        pallas_tpu(q, k, v, lengths, interpret=True, block_sizes=(8, 1))
    for bad in (dict(block_s=0), dict(block_s=12), dict(block_s=8.0), dict(block_s=8, num_splits=0)):
        with pytest.raises(ValueError, match="BlockSizes"):
            BlockSizes(**bad)


def test_defaults():
    for heads in (16, 48):  # PaLM-8B, PaLM-540B
        blocks = BlockSizes.get_default(2048, heads, 256, dtype=jnp.bfloat16, batch=8)
        assert blocks == BlockSizes(block_s=1024, num_splits=1)
        assert vmem_bytes(blocks, heads, 256, jnp.bfloat16) < 4 << 20
        odd = BlockSizes.get_default(2048, heads, 256, dtype=jnp.bfloat16, batch=1)
        assert odd.num_splits == 2 and vmem_bytes(odd, heads, 256, jnp.bfloat16) < 4 << 20
    assert BlockSizes.get_default(2048, 16, 256, dtype=jnp.float32).block_s == 512
    assert BlockSizes.get_default(20, 16, 256) == BlockSizes(block_s=24, num_splits=1)
    assert hash(BlockSizes(128)) == hash(BlockSizes(128, 1))


def test_bad_gpu_block_sizes():
    """GPU tiles Triton would refuse, or that overflow shared memory, fail with a clear error."""
    q, k, v = _inputs(3, 1, 4, 256, 256, jnp.bfloat16)
    lengths = jnp.array([200], jnp.int32)
    for bad in (dict(block_k=24), dict(block_k=8), dict(block_k=16.0), dict(block_k=16, num_splits=0),
                dict(block_k=16, num_warps=3), dict(block_k=16, num_stages=0)):
        with pytest.raises(ValueError, match="BlockSizes"):
            GpuBlockSizes(**bad)
    with pytest.raises(ValueError, match="must be a kernels.mq_decode_attention.gpu.BlockSizes"):
        pallas_gpu(q, k, v, lengths, interpret=True, block_sizes=BlockSizes(block_s=16))
    # 2 stages x k, v x [128, 256] bf16 = 256 KiB > 227 KiB.
    with pytest.raises(ValueError, match="KiB of shared memory"):
        pallas_gpu(q, k, v, lengths, interpret=True, block_sizes=GpuBlockSizes(block_k=128))


def test_gpu_defaults():
    """H100 defaults at PaLM shapes: 64-row tiles in 128 KiB of shared memory, splits filling
    the 132 SMs in one wave."""
    for batch, splits in ((1, 16), (8, 16), (64, 2), (200, 1)):
        blocks = GpuBlockSizes.get_default(2048, 16, 256, dtype=jnp.bfloat16, batch=batch)
        assert blocks == GpuBlockSizes(block_k=64, num_splits=splits, num_warps=4, num_stages=2)
        assert shared_memory_bytes(blocks, 256, jnp.bfloat16) == 128 << 10 <= SHARED_MEMORY_BYTES
    assert GpuBlockSizes.get_default(2048, 16, 256, dtype=jnp.float32, batch=8).block_k == 32
    assert GpuBlockSizes.get_default(20, 16, 256, batch=1) == GpuBlockSizes(block_k=32)
    assert hash(GpuBlockSizes(16)) == hash(GpuBlockSizes(16, 1, 4, 2))


def test_export_for_gpu():
    """The whole Pallas-to-Triton lowering for CUDA at PaLM-8B shapes (S=2048, H=16, K=256,
    bf16): batch 1 (16 splits and the combine) and batch 64 (2 splits)."""
    def args(batch):
        cache = jax.ShapeDtypeStruct((batch, 2048, 256), jnp.bfloat16)
        return (jax.ShapeDtypeStruct((batch, 16, 256), jnp.bfloat16), cache, cache,
                jax.ShapeDtypeStruct((batch,), jnp.int32))

    def fn(q, k, v, lengths):
        return mq_decode_attention(q, k, v, lengths, impl="pallas_gpu")

    for batch in (1, 64):
        assert triton_kernel_names(export_for_gpu(fn, *args(batch))) == ["palm_mq_decode_gpu"], batch


@pytest.mark.parametrize("heads", [16, 48], ids=["palm8b", "palm540b"])
def test_export_for_tpu(heads):
    """Real Mosaic lowering at PaLM shapes (B=8, S=2048, K=256, bf16) for every generation."""
    head_dim = 256

    def args(batch, seq_len):
        cache = jax.ShapeDtypeStruct((batch, seq_len, head_dim), jnp.bfloat16)
        return (jax.ShapeDtypeStruct((batch, heads, head_dim), jnp.bfloat16), cache, cache,
                jax.ShapeDtypeStruct((batch,), jnp.int32))

    def fn(q, k, v, lengths):
        return mq_decode_attention(q, k, v, lengths, impl="pallas_tpu", interpret=False)

    for generation in TPU_GENERATIONS:
        text = export_for_tpu(fn, *args(8, 2048), device_kind=generation)
        assert mosaic_kernel_names(text) == ["palm_mq_decode_fwd"], generation
    # Batch 1 defaults to two splits (the combine path); S = 2000 leaves a partial last tile.
    text = export_for_tpu(fn, *args(1, 2000), device_kind="TPU v5p")
    assert mosaic_kernel_names(text) == ["palm_mq_decode_fwd"]
