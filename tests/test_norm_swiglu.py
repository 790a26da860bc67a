"""norm_swiglu: the Pallas TPU and GPU kernels (interpret mode) against the jnp reference in
both modes (gate and up recomputed or saved), what jax.checkpoint keeps of them, and the real-TPU
and Triton lowerings at PaLM shapes."""

from __future__ import annotations

import contextlib
import functools
import io

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given
from jax.ad_checkpoint import print_saved_residuals
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.pallas import tpu as pltpu

import kernels.norm_swiglu as ns
from conftest import MOSAIC_INTERPRETS, RaceLog, assert_close, race_log, run
from kernels._common import layer_norm_f32, matmul_f32, row_stats
from kernels._tpu import vmem_budget
from gpu_export import export_for_gpu, jaxpr_eqns, mosaic_gpu_kernel_count, triton_kernel_names
from kernels.norm_swiglu import gpu, mgpu, tpu
from tpu_export import TPU_GENERATIONS, export_for_tpu, mosaic_kernel_names

EPS = 1e-6
# LayerNorm over D <= 2 features is constant (0 or +-scale), so its true dx is 0 and a computed
# one is pure rounding noise, which a relative error cannot judge.
MIN_D = 3
DTYPES = (jnp.float32, jnp.bfloat16)
GRADS = ("dx", "d_norm_scale", "d_w_gate", "d_w_up")
MODULES = {"pallas_tpu": tpu, "pallas_gpu": gpu, "pallas_mosaic_gpu": mgpu}
# The Mosaic GPU kernels are drawn where jax's Mosaic GPU interpreter exists (jax >= 0.11),
# one time in seven (their fixed examples run every time): that interpreter costs several
# seconds a case, the CI's time.
IMPLS = ("pallas_tpu", "pallas_gpu") * 3 + (("pallas_mosaic_gpu",) if MOSAIC_INTERPRETS else ())


def _inputs(seed, b, t, d, f, dtype):
    # numpy, not jax.random: eager jax ops compile anew for every drawn shape (seconds each).
    rng = np.random.default_rng(seed)
    # An offset and a spread per row, so the LayerNorm really has a mean and scale to remove.
    x = rng.standard_normal((b, t, d)) * 2.0 + rng.standard_normal((b, t, 1))
    norm_scale = 1.0 + 0.2 * rng.standard_normal(d)
    w_gate = rng.standard_normal((d, f)) / np.sqrt(d)
    w_up = rng.standard_normal((d, f)) / np.sqrt(d)
    return tuple(jnp.asarray(a, dtype) for a in (x, norm_scale, w_gate, w_up))


def _cotangent(seed, shape, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed + 1).standard_normal(shape), dtype)


_reference = functools.partial(ns.norm_swiglu_reference, eps=EPS)


def _pallas(interpret, block_sizes, save_gate_up, impl="pallas_tpu"):
    return lambda *a: ns.norm_swiglu(*a, eps=EPS, impl=impl, interpret=interpret,  # noqa: E731
                                     block_sizes=block_sizes, save_gate_up=save_gate_up)


def _value_and_grads(fn, ct):
    """(h, gradients of sum(h * ct) in all four inputs)."""
    def loss(*a):
        h = fn(*a)
        return jnp.sum(h.astype(jnp.float32) * ct), h

    def run(*a):
        grads, h = jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(*a)
        return h, grads
    return run


@st.composite
def cases(draw, max_t, max_width):
    """Any Pallas implementation, small shapes (often not multiples of the tiles) with small
    tiles, either mode. TPU: at most two tiles per axis (the TPU interpreter costs ~0.1 s per
    grid step). GPU: power-of-two tiles of 16 or 32, so shapes give several tiles per axis and
    several steps of each in-kernel loop (the generic interpreter is cheap per step). Mosaic
    GPU: bf16 (wgmma), its forward's 64/128 tiles over a ring of 2 to 4 slices, the Triton
    backward's tiles of 16 or 32, a quarter under race detection."""
    impl = draw(st.sampled_from(IMPLS))
    dtype = draw(st.sampled_from(DTYPES))
    b, t = draw(st.integers(1, 2)), draw(st.integers(1, max_t))
    d, f = draw(st.integers(MIN_D, max_width)), draw(st.integers(1, max_width))
    save_gate_up = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    if impl == "pallas_gpu":
        tiles = [draw(st.sampled_from([16, 32])) for _ in range(6)]
        return impl, (b, t, d, f), dtype, gpu.BlockSizes(*tiles), save_gate_up, True, seed
    if impl == "pallas_mosaic_gpu":
        # Narrower (two tiles or slices at most per axis): the Mosaic GPU interpreter costs
        # ~0.1 s a thread block, and every kernel of the vjp is one; the fixed examples are
        # wider.
        d, f = min(d, 100), min(f, 100)
        forward = [draw(st.sampled_from([64, 128])) for _ in range(2)]
        backward = [draw(st.sampled_from([16, 32])) for _ in range(3)]
        block_sizes = mgpu.BlockSizes(*forward, mgpu.SLICE, *backward,
                                      buffers=draw(st.integers(2, 4)))
        races = draw(st.integers(0, 3)) == 0
        interpret = plgpu.InterpretGPUParams(detect_races=True) if races else True
        return impl, (b, t, d, f), jnp.bfloat16, block_sizes, save_gate_up, interpret, seed
    rows = 8 if dtype == jnp.float32 else 16
    bt, bt2 = draw(st.sampled_from([rows, 2 * rows])), draw(st.sampled_from([rows, 2 * rows]))
    bf, bd, bf2, bd2 = (draw(st.sampled_from([128, 256])) for _ in range(4))
    block_sizes = ns.BlockSizes(bt, bf, bd, bt2, bf2, bd2)
    # A quarter of the TPU cases run the TPU interpreter's race detector.
    races = draw(st.integers(0, 3)) == 0
    interpret = pltpu.InterpretParams(detect_races=True) if races else True
    return impl, (b, t, d, f), dtype, block_sizes, save_gate_up, interpret, seed


# The GPU counterparts of the explicit TPU examples: ragged on every axis with several tiles
# each, f32 and bf16, saving and recomputing.
GPU_EXAMPLES = [
    ("pallas_gpu", (2, 11, 150, 140), jnp.bfloat16, gpu.BlockSizes(16, 32, 32, 16, 32, 32),
     True, True, 7),
    ("pallas_gpu", (1, 13, 70, 50), jnp.float32, gpu.BlockSizes(16, 16, 32, 16, 32, 16),
     False, True, 3),
]


# The Mosaic kernels: two consumers, three F tiles and a ring of two wrapping over three D
# slices, saving; one consumer, recomputing. Where the interpreter exists, examples of the
# gradient test under race detection (MOSAIC_CASES).
MOSAIC_EXAMPLES = [
    ((1, 70, 150, 140), mgpu.BlockSizes(128, 64, 64, 16, 32, 32, buffers=2), True, 7),
    ((1, 13, 70, 50), mgpu.BlockSizes(64, 128, 64), False, 3),
]
MOSAIC_CASES = [("pallas_mosaic_gpu", shape, jnp.bfloat16, blocks, save,
                 plgpu.InterpretGPUParams(detect_races=True), seed)
                for shape, blocks, save, seed in MOSAIC_EXAMPLES] if MOSAIC_INTERPRETS else []


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


# Ragged on every axis with two tiles each, bf16, saving, under race detection.
@example(("pallas_tpu", (2, 11, 150, 140), jnp.bfloat16, ns.BlockSizes(16, 128, 128, 16, 128, 128),
          True, pltpu.InterpretParams(detect_races=True), 7))
@_gpu_examples
@given(cases(max_t=20, max_width=220))
def test_forward_with_stats_matches_reference(case):
    """The shared-LayerNorm interface (each backend module's): h, and the saved gate and up
    (rounded to x's dtype) when saving, from statistics the caller computed."""
    impl, (b, t, d, f), dtype, block_sizes, save_gate_up, interpret, seed = case
    module = MODULES[impl]
    args = _inputs(seed, b, t, d, f, dtype)
    settings = module.prepare(*args, eps=EPS, interpret=interpret, block_sizes=block_sizes,
                              save_gate_up=save_gate_up)

    def both(x, norm_scale, w_gate, w_up):
        mean, rstd = row_stats(x.reshape(b * t, d), EPS)
        got = module.forward_with_stats(settings, x, norm_scale, w_gate, w_up, mean, rstd)
        xn = layer_norm_f32(x, norm_scale, EPS).astype(dtype).reshape(b * t, d)  # [M, D]
        pre = (matmul_f32("MD,DF->MF", xn, w_gate), matmul_f32("MD,DF->MF", xn, w_up))
        return got, (_reference(x, norm_scale, w_gate, w_up), pre)

    with race_log(_detects_races(interpret)):
        (h, saved), (ref_h, ref_pre) = run(both, *args)
    assert h.shape == (b, t, f) and h.dtype == dtype
    assert_close(h, ref_h, dtype, what="h")
    if not save_gate_up:
        assert saved is None
        return
    for name, got, want in zip(("gate", "up"), saved, ref_pre):
        assert got.shape == (b * t, f) and got.dtype == dtype, name
        assert_close(got, want, dtype, what=name)


# The gradient cases run four kernels each (forward and three backward): smaller shapes than
# the forward test. The hand-written reference backward is checked in the same program. The
# example: ragged with two tiles per axis, bf16, saving (the in-place gates kernel) under race
# detection, which the drawn cases rarely combine.
@pytest.mark.long
@example(("pallas_tpu", (2, 11, 150, 140), jnp.bfloat16, ns.BlockSizes(16, 128, 128, 16, 128, 128),
          True, pltpu.InterpretParams(detect_races=True), 7))
@_gpu_and_mosaic_examples
@given(cases(max_t=12, max_width=160))
def test_vjp_forward_and_grads_match_reference(case):
    impl, (b, t, d, f), dtype, block_sizes, save_gate_up, interpret, seed = case
    args = _inputs(seed, b, t, d, f, dtype)
    ct = _cotangent(seed, (b, t, f))
    pallas = _pallas(interpret, block_sizes, save_gate_up, impl)

    def all_three(*a):
        hand = ns.norm_swiglu_reference_bwd(*a, ct.astype(dtype), eps=EPS)
        return (_value_and_grads(pallas, ct)(*a), _value_and_grads(_reference, ct)(*a), hand)

    with race_log(_detects_races(interpret)):  # all four kernels checked
        (h, grads), (ref_h, ref_grads), hand_grads = run(all_three, *args)
    assert_close(h, ref_h, dtype, what="h through vjp")
    for name, g, hand, r in zip(GRADS, grads, hand_grads, ref_grads):
        assert g.shape == hand.shape == r.shape and g.dtype == hand.dtype == r.dtype, name
        assert_close(g, r, dtype, what=name)
        assert_close(hand, r, dtype, what=f"{name} (norm_swiglu_reference_bwd)")


def test_two_cores_without_races():
    """Both modes' forward and backward kernels (five distinct ones) with their "parallel" axes
    split over two simulated TensorCores, batch 1 so the row (and F) tiles carry the split:
    each core must own its accumulators and output blocks. Two tiles per axis."""
    args = _inputs(5, 1, 13, 130, 200, jnp.float32)
    ct = _cotangent(5, (1, 13, 200))
    interpret = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
    block_sizes = ns.BlockSizes(8, 128, 128, 8, 128, 128)

    def runs(*a):
        return [_value_and_grads(_pallas(interpret, block_sizes, save), ct)(*a)
                for save in (False, True)] + [_value_and_grads(_reference, ct)(*a)]

    with RaceLog() as log:
        *modes, (ref_h, ref_grads) = run(runs, *args)
    assert log.kernels_checked == 8  # per mode: forward, gates, dx, dw
    for save, (h, grads) in zip((False, True), modes):
        assert_close(h, ref_h, jnp.float32, what=f"h save_gate_up={save}")
        for name, g, r in zip(GRADS, grads, ref_grads):
            assert_close(g, r, jnp.float32, what=f"{name} save_gate_up={save}")


def test_default_block_sizes():
    # PaLM shapes: every axis divides by 512, so padding is a no-op. v5p and up keep the 512
    # tiles; v4's smaller VMEM shrinks them (tests/test_tpu_rules.py).
    for d, f in [(4096, 16384), (18432, 73728)]:
        bs = ns.BlockSizes.get_default(2048, d, f, jnp.bfloat16, "TPU v5p")
        assert bs == ns.BlockSizes()
        assert max(ns.vmem_bytes(bs, jnp.bfloat16).values()) <= 16 * 2**20
    # Small shapes shrink to one aligned tile.
    bs = ns.BlockSizes.get_default(20, 40, 200, jnp.bfloat16)
    assert (bs.block_t, bs.block_d, bs.block_f, bs.block_t_bwd) == (32, 128, 256, 128)
    # Awkward large axes pick the tile that pads least.
    assert ns.BlockSizes.get_default(2048, 640, 1000).block_d == 128
    assert ns.BlockSizes.get_default(2048, 640, 1000).block_f == 512


@pytest.mark.parametrize("dtype", DTYPES)
def test_saving_tiles_fit_every_generation(dtype):
    """tests/test_tpu_rules.py checks the default mode; the saving kernels' defaults fit too."""
    for gen in TPU_GENERATIONS:
        for d, f in [(4096, 16384), (18432, 73728)]:
            bs = ns.BlockSizes.get_default(2048, d, f, dtype, gen, save_gate_up=True)
            used = ns.vmem_bytes(bs, dtype, save_gate_up=True)
            assert max(used.values()) <= vmem_budget(gen), (gen, bs, used)
    # The docstring's figures: bf16 at 512 tiles, 12.5 MiB forward (over v4's 12 MiB budget, so
    # its forward row tile halves) and 10 MiB for the saved gates backward.
    used = ns.vmem_bytes(ns.BlockSizes(), jnp.bfloat16, save_gate_up=True)
    assert (round(used["fwd"] / 2**20, 1), used["bwd_gates"] / 2**20) == (12.5, 10.0)
    assert ns.BlockSizes.get_default(2048, 4096, 16384, jnp.bfloat16, "TPU v4",
                                     save_gate_up=True).block_t == 256


def test_bad_input_raises():
    x, s, g, u = _inputs(0, 1, 8, 16, 24, jnp.float32)
    with pytest.raises(ValueError, match="multiple of 128"):
        ns.BlockSizes(block_f=100)
    with pytest.raises(ValueError, match="multiple of 8"):
        ns.BlockSizes(block_t=12)
    with pytest.raises(ValueError, match="multiples of 16"):
        ns.norm_swiglu(x.astype(jnp.bfloat16), s, g.astype(jnp.bfloat16), u.astype(jnp.bfloat16),
                       eps=EPS, impl="pallas_tpu", block_sizes=ns.BlockSizes(block_t=8))
    with pytest.raises(ValueError, match="x's dtype"):
        ns.norm_swiglu(x, s, g.astype(jnp.bfloat16), u, eps=EPS, impl="pallas_tpu")
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        ns.norm_swiglu(x.astype(jnp.float16), s, g, u, eps=EPS, impl="pallas_tpu")
    with pytest.raises(ValueError, match=r"\[D=16, F\]"):
        ns.norm_swiglu(x, s, g[:, :5], u, eps=EPS, impl="pallas_tpu")
    with pytest.raises(ValueError, match="BlockSizes"):
        ns.norm_swiglu(x, s, g, u, eps=EPS, impl="pallas_tpu", block_sizes=(8, 128))


def test_bad_gpu_block_sizes_raise():
    x, s, g, u = _inputs(0, 1, 8, 16, 24, jnp.float32)
    with pytest.raises(ValueError, match="block_d=24 must be a power of two"):
        gpu.BlockSizes(block_d=24)
    with pytest.raises(ValueError, match="block_t=8 must be a power of two >= 16"):
        gpu.BlockSizes(block_t=8)
    with pytest.raises(ValueError, match="num_warps=3"):
        gpu.BlockSizes(num_warps=3)
    with pytest.raises(ValueError, match="gpu.BlockSizes"):  # the TPU tiling on the GPU path
        ns.norm_swiglu(x, s, g, u, eps=EPS, impl="pallas_gpu", block_sizes=ns.BlockSizes())
    with pytest.raises(ValueError, match="shared memory"):  # 4 * (256*256 + 2*256*256) * 4 B
        ns.norm_swiglu(x, s, g, u, eps=EPS, impl="pallas_gpu",
                       block_sizes=gpu.BlockSizes(256, 256, 256, num_stages=4))
    with pytest.raises(ValueError, match="InterpretParams"):
        ns.norm_swiglu(x, s, g, u, eps=EPS, impl="pallas_gpu", interpret=pltpu.InterpretParams())


def test_gpu_default_block_sizes():
    """The docstring's H100 tiles and shared memory at PaLM-8B bf16; float32 and small shapes
    shrink until every kernel fits."""
    bs = gpu.BlockSizes.get_default(2048, 4096, 16384, jnp.bfloat16)
    assert bs == gpu.BlockSizes()
    used = {k: v // 1024 for k, v in gpu.shared_memory_bytes(bs, jnp.bfloat16).items()}
    assert used == {"fwd": 144, "bwd_gates": 96, "bwd_dx": 192, "bwd_dw": 160}
    for dtype in DTYPES:
        for save in (False, True):
            bs = gpu.BlockSizes.get_default(2048, 4096, 16384, dtype, save)
            assert max(gpu.shared_memory_bytes(bs, dtype, save).values()) <= 227 * 1024
    small = gpu.BlockSizes.get_default(20, 40, 200, jnp.float32)
    assert (small.block_t, small.block_d, small.block_f) == (32, 64, 128)


def test_mosaic_gpu_default_block_sizes():
    """The Mosaic forward's tiles at PaLM-8B: 128 x 128 over a ring of 4 slices (192 KiB, the
    docstring's figure), gpu.py's backward tiles; one consumer for 64 rows or fewer."""
    for save in (False, True):
        bs = mgpu.BlockSizes.get_default(2048, 4096, 16384, jnp.bfloat16, save)
        assert bs == mgpu.BlockSizes(block_d=64), bs
        assert mgpu.forward_shared_memory_bytes(bs, jnp.bfloat16, save) == 192 * 1024
    small = mgpu.BlockSizes.get_default(20, 40, 50, jnp.bfloat16)
    assert (small.block_t, small.block_f, small.block_t_bwd) == (64, 64, 32)


def test_bad_mosaic_gpu_settings_raise():
    x, s, g, u = _inputs(0, 1, 8, 16, 24, jnp.bfloat16)
    for kwargs, match in [(dict(block_t=32), "block_t=32 must be 64 or 128"),
                          (dict(block_f=256), "block_f=256 must be 64 or 128"),
                          (dict(block_d=128), "block_d=128 must be 64"),
                          (dict(buffers=1), "buffers=1")]:
        with pytest.raises(ValueError, match=match):
            mgpu.BlockSizes(**kwargs)
    with pytest.raises(ValueError, match="bfloat16 x .* use impl='pallas_gpu'"):
        ns.norm_swiglu(*(a.astype(jnp.float32) for a in (x, s, g, u)), eps=EPS,
                       impl="pallas_mosaic_gpu", interpret=False)
    with pytest.raises(ValueError, match="mgpu.BlockSizes"):
        ns.norm_swiglu(x, s, g, u, eps=EPS, impl="pallas_mosaic_gpu", interpret=False,
                       block_sizes=gpu.BlockSizes())
    with pytest.raises(ValueError, match="fwd .* shared memory"):  # 5 x 48 KiB slots
        ns.norm_swiglu(x, s, g, u, eps=EPS, impl="pallas_mosaic_gpu", interpret=False,
                       block_sizes=mgpu.BlockSizes(block_d=64, buffers=5))


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="native: needs a GPU")
@pytest.mark.parametrize("save_gate_up", [False, True])
@pytest.mark.parametrize("example", range(len(MOSAIC_EXAMPLES)))
def test_mosaic_gpu_native_matches_reference(example, save_gate_up):
    """The Mosaic examples compiled for the GPU, in both modes: the wgmmas from registers the
    interpreter runs as plain dots, the real barriers and TMA; forward and gradients."""
    shape, block_sizes, _, seed = MOSAIC_EXAMPLES[example]
    args = _inputs(seed, *shape, jnp.bfloat16)
    ct = _cotangent(seed, shape[:2] + shape[3:])
    pallas = _pallas(False, block_sizes, save_gate_up, "pallas_mosaic_gpu")
    (h, grads), (ref_h, ref_grads) = run(
        lambda *a: (_value_and_grads(pallas, ct)(*a), _value_and_grads(_reference, ct)(*a)),
        *args)
    assert_close(h, ref_h, jnp.bfloat16, what="h")
    for name, g, r in zip(GRADS, grads, ref_grads):
        assert_close(g, r, jnp.bfloat16, what=name)


# ---- What jax.checkpoint keeps (palm/model.py's remat policies), natively traced ----
# The interpreter's callbacks cannot go under jax.checkpoint (palm/model.py), so these trace the
# Mosaic kernels (interpret=False) and export them for TPU; nothing runs.
REMAT = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
M, D, F = 64, 256, 384


def _block_like(save_gate_up, remat):
    """x + norm_swiglu(x)·w_down, as palm/model.py's block uses h (block_out's backward needs h,
    as this dot's does), under the remat policy."""
    def block(x, s, wg, wu, w_down):
        h = ns.norm_swiglu(x, s, wg, wu, eps=EPS, impl="pallas_tpu", interpret=False,
                           save_gate_up=save_gate_up)  # [B, T, F]
        return x + jnp.einsum("BTF,FD->BTD", h, w_down)
    return block if REMAT[remat] is None else jax.checkpoint(block, policy=REMAT[remat])


def _saved_residuals(fn, *args) -> list[str]:
    """jax.ad_checkpoint.print_saved_residuals' lines: what the backward of fn keeps, and why."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(fn, *args)
    return out.getvalue().splitlines()


@pytest.mark.parametrize("remat", REMAT)
def test_remat_policy_decides_what_is_kept(remat):
    """Without remat, saving keeps gate and up ([M, F] bf16 each) for the backward. Under
    "full" and "dots" nothing of this kernel is kept (no pallas_call output is saveable): the
    forward reruns in the backward, and saving then spares the backward its own recompute of
    gate and up (the saved-gates kernel instead of a third matmul pass)."""
    bf16 = jnp.bfloat16
    shapes = ((1, M, D), (D,), (D, F), (D, F), (F, D))
    args = [jnp.zeros(shape, jnp.float32 if len(shape) == 1 else bf16) for shape in shapes]
    gate_up = f"bf16[{M},{F}]"
    for save in (False, True):
        block = _block_like(save, remat)
        kept = [line for line in _saved_residuals(block, *args) if "from the argument" not in line]
        n_gate_up = sum(line.startswith(gate_up + " ") for line in kept)
        if remat == "none":
            assert n_gate_up == (2 if save else 0), kept
        else:
            assert kept == [], kept

        def loss(*a):
            return jnp.sum(block(*a).astype(jnp.float32))

        structs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
        names = mosaic_kernel_names(export_for_tpu(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)),
                                                   *structs))
        forward = "palm_norm_swiglu_fwd_save" if save else "palm_norm_swiglu_fwd"
        gates = "palm_norm_swiglu_bwd_gates_saved" if save else "palm_norm_swiglu_bwd_gates"
        reruns = [] if remat == "none" else [forward]
        assert names == [forward, *reruns, gates, "palm_norm_swiglu_bwd_dx",
                         "palm_norm_swiglu_bwd_dw"]


# ---- Real-TPU lowering (Mosaic) at PaLM shapes, B=1, T=2048, bf16 ----
PALM = {"8B": (4096, 16384), "540B": (18432, 73728)}


def _structs(d, f):
    bf16 = jnp.bfloat16
    return (jax.ShapeDtypeStruct((1, 2048, d), bf16), jax.ShapeDtypeStruct((d,), bf16),
            jax.ShapeDtypeStruct((d, f), bf16), jax.ShapeDtypeStruct((d, f), bf16))


def _native(save_gate_up=False):
    return _pallas(False, None, save_gate_up)


@pytest.mark.parametrize("model", sorted(PALM))
def test_export_forward(model):
    for kind in TPU_GENERATIONS:
        text = export_for_tpu(_native(), *_structs(*PALM[model]), device_kind=kind)
        assert mosaic_kernel_names(text) == ["palm_norm_swiglu_fwd"]


@pytest.mark.parametrize("save_gate_up", [False, True])
@pytest.mark.parametrize("model", sorted(PALM))
def test_export_grad(model, save_gate_up):
    def loss(*a):
        return jnp.sum(_native(save_gate_up)(*a).astype(jnp.float32))

    if save_gate_up:
        kernels = ["palm_norm_swiglu_fwd_save", "palm_norm_swiglu_bwd_gates_saved"]
    else:
        kernels = ["palm_norm_swiglu_fwd", "palm_norm_swiglu_bwd_gates"]
    kernels += ["palm_norm_swiglu_bwd_dx", "palm_norm_swiglu_bwd_dw"]
    # value_and_grad: when recomputing, jax.grad alone drops the forward kernel, whose output it
    # never needs; saving, the backward needs its gate and up.
    for kind in TPU_GENERATIONS:
        text = export_for_tpu(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)),
                              *_structs(*PALM[model]), device_kind=kind)
        assert mosaic_kernel_names(text) == kernels
    text = export_for_tpu(jax.grad(loss, argnums=(0, 1, 2, 3)), *_structs(*PALM[model]))
    assert mosaic_kernel_names(text) == (kernels if save_gate_up else kernels[1:])


# ---- Triton lowering (Pallas GPU) at PaLM-8B, B=1, T=2048, bf16, exported from CPU ----


def test_export_gpu_forward_and_vjp():
    """Both modes' forward and backward through jax.vjp lower to the four Triton kernels."""
    structs = (*_structs(*PALM["8B"]), jax.ShapeDtypeStruct((1, 2048, PALM["8B"][1]), jnp.bfloat16))
    for save_gate_up in (False, True):
        def forward_and_vjp(x, s, wg, wu, ct):
            fn = _pallas(False, None, save_gate_up, "pallas_gpu")
            h, pullback = jax.vjp(fn, x, s, wg, wu)
            return h, pullback(ct)

        names = triton_kernel_names(export_for_gpu(forward_and_vjp, *structs))
        suffix = "_save" if save_gate_up else ""
        gates = "_saved" if save_gate_up else ""
        assert names == [f"palm_norm_swiglu_fwd{suffix}", f"palm_norm_swiglu_bwd_gates{gates}",
                         "palm_norm_swiglu_bwd_dx", "palm_norm_swiglu_bwd_dw"]



def test_export_mosaic_gpu_forward_and_vjp():
    """The Mosaic GPU kernels (both modes) lower at PaLM-8B: the forward, the recomputing gates
    kernel, dx and dw; only the elementwise saved-gates kernel is Triton's."""
    structs = (*_structs(*PALM["8B"]), jax.ShapeDtypeStruct((1, 2048, PALM["8B"][1]), jnp.bfloat16))
    for save_gate_up in (False, True):
        def forward_and_vjp(x, s, wg, wu, ct):
            fn = _pallas(False, None, save_gate_up, "pallas_mosaic_gpu")
            h, pullback = jax.vjp(fn, x, s, wg, wu)
            return h, pullback(ct)

        text = export_for_gpu(forward_and_vjp, *structs)
        assert mosaic_gpu_kernel_count(text) == (3 if save_gate_up else 4)
        assert triton_kernel_names(text) == (["palm_norm_swiglu_bwd_gates_saved"]
                                             if save_gate_up else [])


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_saved_gates_backward_writes_over_them(impl):
    """With save_gate_up, the backward's elementwise kernel writes d_gate and d_up over the
    saved gate and up (input_output_aliases), so saving them adds no peak memory there."""
    x, scale, w_gate, w_up = (jnp.ones(s, jnp.float32) for s in ((1, 16, 16), (16,), (16, 32), (16, 32)))

    def grads(x):
        return jax.grad(lambda x: ns.norm_swiglu(x, scale, w_gate, w_up, eps=1e-6, impl=impl,
                                                 interpret=True, save_gate_up=True).sum())(x)

    aliases = [e.params["input_output_aliases"] for e in jaxpr_eqns(jax.make_jaxpr(grads)(x).jaxpr)
               if e.primitive.name == "pallas_call"
               and e.params["name"] == "palm_norm_swiglu_bwd_gates_saved"]
    assert aliases == [((0, 0), (1, 1))], aliases
