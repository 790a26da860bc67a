"""block_out: the Pallas TPU and GPU kernels (interpret mode) against the jnp reference, and the
real-TPU and Triton lowerings at PaLM shapes."""

from __future__ import annotations

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.pallas import tpu as pltpu

import kernels.block_out as bo
from conftest import MOSAIC_INTERPRETS, RaceLog, assert_close, race_log, run
from gpu_export import export_for_gpu, mosaic_gpu_kernel_count, triton_kernel_names
from kernels.block_out import gpu, mgpu
from tpu_export import TPU_GENERATIONS, export_for_tpu, mosaic_kernel_names

DTYPES = (jnp.float32, jnp.bfloat16)
NAMES = ("dx", "do", "dwo", "dh", "dw_down")
# The Mosaic GPU kernels are drawn where jax's Mosaic GPU interpreter exists (jax >= 0.11),
# one time in seven (their fixed examples run every time): that interpreter costs several
# seconds a case, the CI's time.
IMPLS = ("pallas_tpu", "pallas_gpu") * 3 + (("pallas_mosaic_gpu",) if MOSAIC_INTERPRETS else ())


def _inputs(seed, b, t, d, h, k, f, dtype):
    # numpy, not jax.random: eager jax ops compile anew for every drawn shape (seconds each).
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, t, d))
    o = rng.standard_normal((b, t, h, k))
    wo = rng.standard_normal((h, k, d)) / np.sqrt(h * k)
    hid = rng.standard_normal((b, t, f))
    w_down = rng.standard_normal((f, d)) / np.sqrt(f)
    return tuple(jnp.asarray(a, dtype) for a in (x, o, wo, hid, w_down))


def _cotangent(seed, shape, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed + 1).standard_normal(shape), dtype)


@st.composite
def cases(draw, max_t=20, max_width=220):
    """Any Pallas implementation; small shapes (often not multiples of the tiles) with small
    tiles: several grid steps. GPU: power-of-two tiles of 16 or 32, so shapes give several
    tiles per axis and several steps of each in-kernel loop. Mosaic GPU: bf16, its forward's
    64/128-row, 64..256-column tiles over a ring of 2 to 4, Triton's backward tiles of 16 or
    32, a quarter under race detection."""
    impl = draw(st.sampled_from(IMPLS))
    dtype = draw(st.sampled_from(DTYPES))
    rows = 8 if dtype == jnp.float32 else 16
    b, t = draw(st.integers(1, 2)), draw(st.integers(1, max_t))
    d, f = draw(st.integers(1, max_width)), draw(st.integers(1, max_width))
    h, k = draw(st.integers(1, 4)), draw(st.integers(1, 64))
    if impl == "pallas_gpu":
        tiles = [draw(st.sampled_from([16, 32])) for _ in range(6)]
        return impl, (b, t, d, h, k, f), dtype, gpu.BlockSizes(*tiles), True, draw(
            st.integers(0, 2**16))
    if impl == "pallas_mosaic_gpu":
        # Narrower (two tiles or slices at most per axis): the Mosaic GPU interpreter costs
        # ~0.1 s a thread block, and every kernel of the vjp is one; the fixed examples are
        # wider.
        d, f = min(d, 100), min(f, 100)
        forward = draw(st.sampled_from([64, 128])), draw(st.sampled_from([64, 128, 256]))
        backward = [draw(st.sampled_from([16, 32])) for _ in range(3)]
        block_sizes = mgpu.BlockSizes(*forward, mgpu.SLICE, *backward,
                                      buffers=draw(st.integers(2, 4)))
        races = draw(st.integers(0, 3)) == 0
        interpret = plgpu.InterpretGPUParams(detect_races=True) if races else True
        return impl, (b, t, d, h, k, f), jnp.bfloat16, block_sizes, interpret, draw(
            st.integers(0, 2**16))
    # Up to 2 tiles per axis: the TPU interpreter costs ~0.1 s per grid step. A backward D
    # tile of 384 covers every drawn D: the resident-dy path of the PaLM-8B default.
    bt, bt2 = draw(st.sampled_from([rows, 2 * rows])), draw(st.sampled_from([rows, 2 * rows]))
    bd, bc, bc2 = (draw(st.sampled_from([128, 256])) for _ in range(3))
    bd2 = draw(st.sampled_from([128, 256, 384]))
    block_sizes = bo.BlockSizes(bt, bd, bc, bt2, bc2, bd2)
    # A quarter of the cases run the TPU interpreter's race detector.
    races = draw(st.integers(0, 3)) == 0
    interpret = pltpu.InterpretParams(detect_races=True) if races else True
    seed = draw(st.integers(0, 2**16))
    return "pallas_tpu", (b, t, d, h, k, f), dtype, block_sizes, interpret, seed


# GPU cases every run: ragged on every axis with several tiles each (and several steps of
# both contraction loops), f32 and bf16.
GPU_EXAMPLES = [
    ("pallas_gpu", (1, 13, 130, 2, 40, 150), jnp.float32, gpu.BlockSizes(16, 32, 16, 16, 32, 32),
     True, 6),
    ("pallas_gpu", (2, 11, 150, 3, 24, 140), jnp.bfloat16, gpu.BlockSizes(16, 16, 32, 32, 16, 16),
     True, 7),
]


# The Mosaic kernels: two consumers, several output tiles, both contraction segments over a
# ring of two; one consumer with 256-column tiles. Where the interpreter exists, examples of
# the gradient test under race detection (MOSAIC_CASES).
MOSAIC_EXAMPLES = [
    ((2, 40, 300, 3, 48, 150), mgpu.BlockSizes(128, 128, 64, 16, 32, 32, buffers=2), 8),
    ((1, 13, 200, 2, 40, 70), mgpu.BlockSizes(64, 256, 64, 16, 16, 16), 9),
]
MOSAIC_CASES = [("pallas_mosaic_gpu", shape, jnp.bfloat16, blocks,
                 plgpu.InterpretGPUParams(detect_races=True), seed)
                for shape, blocks, seed in MOSAIC_EXAMPLES] if MOSAIC_INTERPRETS else []


def _detects_races(interpret) -> bool:
    """Whether `interpret` asks the TPU or the Mosaic GPU interpreter to detect races."""
    return bool(getattr(interpret, "detect_races", False))


def _gpu_examples(test, cases=GPU_EXAMPLES):
    for case in reversed(cases):
        test = example(case)(test)
    return test


def _gpu_and_mosaic_examples(test):
    """The GPU examples and, for the gradient test (which checks the forward too), the Mosaic
    ones."""
    return _gpu_examples(test, GPU_EXAMPLES + MOSAIC_CASES)


@_gpu_examples
@given(cases())
def test_forward_matches_reference(case):
    impl, shape, dtype, block_sizes, interpret, seed = case
    args = _inputs(seed, *shape, dtype)

    def both(*a):  # one compile per example: compiling dominates the test's time
        return (bo.block_out(*a, impl=impl, interpret=interpret, block_sizes=block_sizes),
                bo.block_out_reference(*a))

    with race_log(_detects_races(interpret)):
        out, expected = run(both, *args)
    assert out.shape == args[0].shape and out.dtype == dtype
    assert_close(out, expected, dtype, what="y")


# The gradient cases run two kernels each plus the weight-gradient matmuls: smaller shapes than
# the forward test (at most 2 tiles per axis, fewer grid steps), the full profile's examples.
@pytest.mark.long
@_gpu_and_mosaic_examples
@given(cases(max_t=12, max_width=160))
def test_vjp_forward_and_grads_match_reference(case):
    impl, shape, dtype, block_sizes, interpret, seed = case
    args = _inputs(seed, *shape, dtype)
    ct = _cotangent(seed, args[0].shape)

    def weighted(fn):
        def loss(*a):
            y = fn(*a)
            return jnp.sum(y.astype(jnp.float32) * ct), y
        return jax.grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)

    def pallas(*a):
        return bo.block_out(*a, impl=impl, interpret=interpret, block_sizes=block_sizes)

    def both(*a):  # one compile per example
        return weighted(pallas)(*a), weighted(bo.block_out_reference)(*a)

    with race_log(_detects_races(interpret)):  # both kernels checked
        (grads, y), (ref_grads, ref_y) = run(both, *args)
    assert_close(y, ref_y, dtype, what="y through vjp")
    for name, g, r in zip(NAMES, grads, ref_grads):
        assert g.shape == r.shape and g.dtype == r.dtype, name
        assert_close(g, r, dtype, what=name)


def test_two_cores_without_races():
    """The forward and backward kernels (through jax.vjp) with their "parallel" axes split over
    two simulated TensorCores, batch 1 so the row (and D) tiles carry the split: each core
    must own its accumulators and output blocks. Two tiles per axis, few grid steps (two-core
    race detection pays per step; the plain forward is the property test's)."""
    args = _inputs(6, 1, 13, 130, 2, 40, 150, jnp.float32)
    ct = _cotangent(6, (1, 13, 130))
    interpret = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
    block_sizes = bo.BlockSizes(8, 128, 128, 8, 128, 128)

    def value_and_grads(fn, *a):
        out, pullback = jax.vjp(fn, *a)
        return out, pullback(ct)

    def pallas(*a):
        return bo.block_out(*a, impl="pallas_tpu", interpret=interpret, block_sizes=block_sizes)

    def both(*a):  # one compile
        return value_and_grads(pallas, *a), value_and_grads(bo.block_out_reference, *a)

    with RaceLog() as log:
        (out, grads), (expected, expected_grads) = run(both, *args)
    assert log.kernels_checked == 2  # forward, backward
    assert_close(out, expected, jnp.float32, what="y")
    for name, g, r in zip(NAMES, grads, expected_grads):
        assert_close(g, r, jnp.float32, what=name)


@given(st.sampled_from(DTYPES), st.integers(1, 2), st.integers(1, 24), st.integers(1, 96),
       st.integers(1, 4), st.integers(1, 32), st.integers(1, 96), st.integers(0, 2**16))
def test_reference_bwd_matches_autodiff(dtype, b, t, d, h, k, f, seed):
    args = _inputs(seed, b, t, d, h, k, f, dtype)
    dy = _cotangent(seed, (b, t, d), dtype)
    def both(a, dy):  # one compile per shape
        return bo.block_out_reference_bwd(*a, dy), jax.vjp(bo.block_out_reference, *a)[1](dy)

    got, expected = run(both, args, dy)
    for name, g, r in zip(NAMES, got, expected):
        assert g.shape == r.shape and g.dtype == r.dtype, name
        assert_close(g, r, dtype, what=name)


def test_default_block_sizes():
    # PaLM-8B on v5p and up (v4's budget is too small; tests/test_tpu_rules.py): 512 tiles;
    # the backward holds a full-D dy row tile (read once), 13 MiB.
    bs = bo.BlockSizes.get_default(2048, 4096, 16 * 256, 16384, jnp.bfloat16, "TPU v5p")
    assert bs == bo.BlockSizes(block_c_bwd=128, block_d_bwd=4096)
    # PaLM-540B: D = 18432 is too wide to hold; 512 tiles throughout.
    bs540 = bo.BlockSizes.get_default(2048, 18432, 48 * 256, 73728, jnp.bfloat16, "TPU v5p")
    assert bs540 == bo.BlockSizes()
    for b in (bs, bs540):
        assert max(bo.vmem_bytes(b, jnp.bfloat16).values()) <= 16 * 2**20
    # Small shapes: one aligned tile; H*K and F share the contraction tile that pads least.
    small = bo.BlockSizes.get_default(20, 40, 120, 300, jnp.bfloat16)
    assert (small.block_t, small.block_d, small.block_c) == (32, 128, 128)


def test_bad_input_raises():
    x, o, wo, h, w_down = _inputs(0, 1, 8, 16, 2, 8, 24, jnp.float32)
    with pytest.raises(ValueError, match="multiple of 128"):
        bo.BlockSizes(block_c=200)
    with pytest.raises(ValueError, match="multiple of 8"):
        bo.BlockSizes(block_t_bwd=4)
    bf16 = [a.astype(jnp.bfloat16) for a in (x, o, wo, h, w_down)]
    with pytest.raises(ValueError, match="multiples of 16"):
        bo.block_out(*bf16, impl="pallas_tpu", block_sizes=bo.BlockSizes(block_t=8))
    with pytest.raises(ValueError, match="x's dtype"):
        bo.block_out(x, o, wo, h.astype(jnp.bfloat16), w_down, impl="pallas_tpu")
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        bo.block_out(*[a.astype(jnp.float16) for a in (x, o, wo, h, w_down)], impl="pallas_tpu")
    with pytest.raises(ValueError, match="w_down must be"):
        bo.block_out(x, o, wo, h, w_down[:, :3], impl="pallas_tpu")
    with pytest.raises(ValueError, match="BlockSizes"):
        bo.block_out(x, o, wo, h, w_down, impl="pallas_tpu", block_sizes={"block_t": 8})


def test_bad_gpu_block_sizes_raise():
    args = _inputs(0, 1, 8, 16, 2, 8, 24, jnp.float32)
    with pytest.raises(ValueError, match="block_c=48 must be a power of two"):
        gpu.BlockSizes(block_c=48)
    with pytest.raises(ValueError, match="block_t_bwd=8 must be a power of two >= 16"):
        gpu.BlockSizes(block_t_bwd=8)
    with pytest.raises(ValueError, match="num_stages=0"):
        gpu.BlockSizes(num_stages=0)
    with pytest.raises(ValueError, match="gpu.BlockSizes"):  # the TPU tiling on the GPU path
        bo.block_out(*args, impl="pallas_gpu", block_sizes=bo.BlockSizes())
    with pytest.raises(ValueError, match="shared memory"):  # 4 * (256*256 + 256*256) * 4 B
        bo.block_out(*args, impl="pallas_gpu",
                     block_sizes=gpu.BlockSizes(256, 256, 256, 256, 256, 256))


def test_gpu_default_block_sizes():
    """The docstring's H100 tiles and shared memory at PaLM-8B bf16; float32 and small shapes
    shrink until both kernels fit."""
    bs = gpu.BlockSizes.get_default(2048, 4096, 16 * 256, 16384, jnp.bfloat16)
    assert bs == gpu.BlockSizes()
    assert gpu.shared_memory_bytes(bs, jnp.bfloat16) == {"fwd": 128 * 1024,
                                                         "bwd_dact": 128 * 1024}
    bs32 = gpu.BlockSizes.get_default(2048, 4096, 16 * 256, 16384, jnp.float32)
    assert max(gpu.shared_memory_bytes(bs32, jnp.float32).values()) <= 227 * 1024
    small = gpu.BlockSizes.get_default(20, 40, 120, 300, jnp.bfloat16)
    assert (small.block_t, small.block_d, small.block_c) == (32, 64, 64)


# ---- Real-TPU lowering (Mosaic) at PaLM shapes, B=1, T=2048, bf16 ----
PALM = {"8B": (4096, 16, 16384), "540B": (18432, 48, 73728)}


def _structs(d, h, f):
    bf16, t = jnp.bfloat16, 2048
    return (jax.ShapeDtypeStruct((1, t, d), bf16), jax.ShapeDtypeStruct((1, t, h, 256), bf16),
            jax.ShapeDtypeStruct((h, 256, d), bf16), jax.ShapeDtypeStruct((1, t, f), bf16),
            jax.ShapeDtypeStruct((f, d), bf16))


def _native(*args):
    return bo.block_out(*args, impl="pallas_tpu", interpret=False)


@pytest.mark.parametrize("model", sorted(PALM))
def test_export_forward(model):
    for kind in TPU_GENERATIONS:
        text = export_for_tpu(_native, *_structs(*PALM[model]), device_kind=kind)
        assert mosaic_kernel_names(text) == ["palm_block_out_fwd"]


@pytest.mark.parametrize("model", sorted(PALM))
def test_export_grad(model):
    def loss(*args):
        return jnp.sum(_native(*args).astype(jnp.float32))

    for kind in TPU_GENERATIONS:
        text = export_for_tpu(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)),
                              *_structs(*PALM[model]), device_kind=kind)
        assert mosaic_kernel_names(text) == ["palm_block_out_fwd", "palm_block_out_bwd_dact"]


# ---- Triton lowering (Pallas GPU) at PaLM-8B, B=1, T=2048, bf16, exported from CPU ----


def test_export_gpu_forward_and_vjp():
    def forward_and_vjp(*args):
        *primals, dy = args
        fn = lambda *a: bo.block_out(*a, impl="pallas_gpu", interpret=False)  # noqa: E731
        y, pullback = jax.vjp(fn, *primals)
        return y, pullback(dy)

    d = PALM["8B"][0]
    structs = (*_structs(*PALM["8B"]), jax.ShapeDtypeStruct((1, 2048, d), jnp.bfloat16))
    names = triton_kernel_names(export_for_gpu(forward_and_vjp, *structs))
    assert names == ["palm_block_out_fwd", "palm_block_out_bwd_dact"]


@pytest.mark.parametrize("model", sorted(PALM))
def test_export_mosaic_gpu_forward_and_vjp(model):
    """The Mosaic GPU forward and backward kernels lower at PaLM-8B and 540B without padding
    (D, H*K and F divide 256)."""
    def forward_and_vjp(*args):
        *primals, dy = args
        fn = lambda *a: bo.block_out(*a, impl="pallas_mosaic_gpu", interpret=False)  # noqa: E731
        y, pullback = jax.vjp(fn, *primals)
        return y, pullback(dy)

    d = PALM[model][0]
    structs = (*_structs(*PALM[model]), jax.ShapeDtypeStruct((1, 2048, d), jnp.bfloat16))
    text = export_for_gpu(forward_and_vjp, *structs)
    assert mosaic_gpu_kernel_count(text) == 2 and not triton_kernel_names(text)
    assert "stablehlo.pad" not in text


def test_mosaic_gpu_block_sizes():
    """PaLM-8B: 128 x 256 tiles over a ring of 4 (192 KiB), gpu.py's backward tiles; small
    shapes narrow the tiles; bad tiles and dtypes are refused."""
    blocks = mgpu.BlockSizes.get_default(2048, 4096, 4096, 16384, jnp.bfloat16)
    assert (blocks.block_t, blocks.block_d, blocks.block_c, blocks.buffers) == (128, 256, 64, 4)
    assert mgpu.forward_shared_memory_bytes(blocks, jnp.bfloat16) == 192 * 1024
    small = mgpu.BlockSizes.get_default(20, 100, 64, 70, jnp.bfloat16)
    assert (small.block_t, small.block_d) == (64, 128)
    for kwargs, match in [(dict(block_t=32), "block_t=32 must be 64 or 128"),
                          (dict(block_d=512), "block_d=512 must be 64, 128 or 256"),
                          (dict(block_c=128), "block_c=128 must be 64"),
                          (dict(buffers=1), "buffers=1")]:
        with pytest.raises(ValueError, match=match):
            mgpu.BlockSizes(**kwargs)
    args = _inputs(0, 1, 8, 16, 2, 8, 24, jnp.float32)
    with pytest.raises(ValueError, match="bfloat16 x .* use impl='pallas_gpu'"):
        bo.block_out(*args, impl="pallas_mosaic_gpu", interpret=False)
    args = tuple(a.astype(jnp.bfloat16) for a in args)
    with pytest.raises(ValueError, match="mgpu.BlockSizes"):
        bo.block_out(*args, impl="pallas_mosaic_gpu", interpret=False,
                     block_sizes=gpu.BlockSizes())
    with pytest.raises(ValueError, match="fwd .* shared memory"):  # 5 x 48 KiB
        bo.block_out(*args, impl="pallas_mosaic_gpu", interpret=False,
                     block_sizes=mgpu.BlockSizes(block_c=64, buffers=5))


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="native: needs a GPU")
@pytest.mark.parametrize("example", range(len(MOSAIC_EXAMPLES)))
def test_mosaic_gpu_native_matches_reference(example):
    """The Mosaic examples compiled for the GPU (real wgmma, barriers and TMA): forward and
    gradients."""
    shape, block_sizes, seed = MOSAIC_EXAMPLES[example]
    args = _inputs(seed, *shape, jnp.bfloat16)
    ct = _cotangent(seed, args[0].shape)

    def weighted(fn):
        return jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * ct),
                        argnums=(0, 1, 2, 3, 4))

    def pallas(*a):
        return bo.block_out(*a, impl="pallas_mosaic_gpu", interpret=False,
                            block_sizes=block_sizes)

    y, ref_y = run(lambda *a: (pallas(*a), bo.block_out_reference(*a)), *args)
    assert_close(y, ref_y, jnp.bfloat16, what="y")
    grads, ref_grads = run(lambda *a: (weighted(pallas)(*a),
                                       weighted(bo.block_out_reference)(*a)), *args)
    for name, g, r in zip(NAMES, grads, ref_grads):
        assert_close(g, r, jnp.bfloat16, what=name)
