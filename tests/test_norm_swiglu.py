"""norm_swiglu: the Pallas TPU kernels (interpret mode) against the jnp reference, and the
real-TPU lowering at PaLM shapes."""

from __future__ import annotations

import functools

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from jax.experimental.pallas import tpu as pltpu

import kernels.norm_swiglu as ns
from conftest import RaceLog, assert_close, race_log
from tpu_export import TPU_GENERATIONS, export_for_tpu, mosaic_kernel_names

EPS = 1e-6
# LayerNorm over D <= 2 features is constant (0 or +-scale), so its true dx is 0 and a computed
# one is pure rounding noise, which a relative error cannot judge.
MIN_D = 3
DTYPES = (jnp.float32, jnp.bfloat16)


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


# Jitted: eager jnp compiles every small op anew for each drawn shape.
_reference = jax.jit(functools.partial(ns.norm_swiglu_reference, eps=EPS))


@st.composite
def cases(draw, max_t=20, max_width=220):
    """Small shapes (often not multiples of the tiles) with small tiles: several grid steps."""
    dtype = draw(st.sampled_from(DTYPES))
    rows = 8 if dtype == jnp.float32 else 16
    b, t = draw(st.integers(1, 2)), draw(st.integers(1, max_t))
    d, f = draw(st.integers(MIN_D, max_width)), draw(st.integers(1, max_width))
    # Up to 2 tiles per axis: the TPU interpreter costs ~0.1 s per grid step.
    bt, bt2 = draw(st.sampled_from([rows, 2 * rows])), draw(st.sampled_from([rows, 2 * rows]))
    bf, bd, bf2, bd2 = (draw(st.sampled_from([128, 256])) for _ in range(4))
    block_sizes = ns.BlockSizes(bt, bf, bd, bt2, bf2, bd2)
    # A quarter of the cases run the TPU interpreter's race detector.
    races = draw(st.integers(0, 3)) == 0
    interpret = pltpu.InterpretParams(detect_races=True) if races else True
    seed = draw(st.integers(0, 2**16))
    return (b, t, d, f), dtype, block_sizes, interpret, seed


@given(cases())
def test_forward_matches_reference(case):
    (b, t, d, f), dtype, block_sizes, interpret, seed = case
    args = _inputs(seed, b, t, d, f, dtype)
    with race_log(isinstance(interpret, pltpu.InterpretParams)):
        out = ns.norm_swiglu(*args, eps=EPS, impl="pallas_tpu", interpret=interpret,
                             block_sizes=block_sizes)
    assert out.shape == (b, t, f) and out.dtype == dtype
    assert_close(out, _reference(*args), dtype, what="h")


# The gradient cases run four kernels each (forward and three backward): smaller shapes than
# the forward test (at most 2 tiles per axis, fewer grid steps), the full profile's examples.
@given(cases(max_t=12, max_width=160))
def test_vjp_forward_and_grads_match_reference(case):
    (b, t, d, f), dtype, block_sizes, interpret, seed = case
    args = _inputs(seed, b, t, d, f, dtype)
    ct = _cotangent(seed, (b, t, f))

    def weighted(fn):
        def loss(*a):
            h = fn(*a)
            return jnp.sum(h.astype(jnp.float32) * ct), h
        return jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)

    pallas = lambda *a: ns.norm_swiglu(*a, eps=EPS, impl="pallas_tpu", interpret=interpret,  # noqa: E731
                                       block_sizes=block_sizes)
    with race_log(isinstance(interpret, pltpu.InterpretParams)):  # all four kernels checked
        grads, h = weighted(pallas)(*args)
    ref_grads, ref_h = jax.jit(weighted(_reference))(*args)
    assert_close(h, ref_h, dtype, what="h through vjp")
    for name, g, r in zip(("dx", "d_norm_scale", "d_w_gate", "d_w_up"), grads, ref_grads):
        assert g.shape == r.shape and g.dtype == r.dtype, name
        assert_close(g, r, dtype, what=name)


def test_two_cores_without_races():
    """The forward and the three backward kernels (jax.grad) with their "parallel" axes split
    over two simulated TensorCores, batch 1 so the row (and F) tiles carry the split: each
    core must own its accumulators and output blocks. Two tiles per axis, few grid steps."""
    args = _inputs(5, 1, 13, 130, 200, jnp.float32)
    ct = _cotangent(5, (1, 13, 200))
    interpret = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
    block_sizes = ns.BlockSizes(8, 128, 128, 8, 128, 128)

    def loss(fn):
        return jax.grad(lambda *a: jnp.sum(fn(*a) * ct), argnums=(0, 1, 2, 3))

    pallas = lambda *a: ns.norm_swiglu(*a, eps=EPS, impl="pallas_tpu", interpret=interpret,  # noqa: E731
                                       block_sizes=block_sizes)
    with RaceLog() as log:
        out, grads = pallas(*args), loss(pallas)(*args)
    assert log.kernels_checked == 5  # forward, again inside grad, 3 backward
    assert_close(out, _reference(*args), jnp.float32, what="h")
    for name, g, r in zip(("dx", "d_norm_scale", "d_w_gate", "d_w_up"), grads,
                          jax.jit(loss(_reference))(*args)):
        assert_close(g, r, jnp.float32, what=name)


@given(st.sampled_from(DTYPES), st.integers(1, 2), st.integers(1, 24), st.integers(MIN_D, 96),
       st.integers(1, 96), st.integers(0, 2**16))
def test_reference_bwd_matches_autodiff(dtype, b, t, d, f, seed):
    args = _inputs(seed, b, t, d, f, dtype)
    dh = _cotangent(seed, (b, t, f), dtype)
    both = jax.jit(lambda a, dh: (ns.norm_swiglu_reference_bwd(*a, dh, eps=EPS),
                                  jax.vjp(_reference, *a)[1](dh)))  # one compile per shape
    got, expected = both(args, dh)
    for name, g, r in zip(("dx", "d_norm_scale", "d_w_gate", "d_w_up"), got, expected):
        assert g.shape == r.shape and g.dtype == r.dtype, name
        assert_close(g, r, dtype, what=name)


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


# ---- Real-TPU lowering (Mosaic) at PaLM shapes, B=1, T=2048, bf16 ----
PALM = {"8B": (4096, 16384), "540B": (18432, 73728)}


def _structs(d, f):
    bf16 = jnp.bfloat16
    return (jax.ShapeDtypeStruct((1, 2048, d), bf16), jax.ShapeDtypeStruct((d,), bf16),
            jax.ShapeDtypeStruct((d, f), bf16), jax.ShapeDtypeStruct((d, f), bf16))


def _native(x, s, g, u):
    return ns.norm_swiglu(x, s, g, u, eps=EPS, impl="pallas_tpu", interpret=False)


@pytest.mark.parametrize("model", sorted(PALM))
def test_export_forward(model):
    for kind in TPU_GENERATIONS:
        text = export_for_tpu(_native, *_structs(*PALM[model]), device_kind=kind)
        assert mosaic_kernel_names(text) == ["palm_norm_swiglu_fwd"]


@pytest.mark.parametrize("model", sorted(PALM))
def test_export_grad(model):
    def loss(x, s, g, u):
        return jnp.sum(_native(x, s, g, u).astype(jnp.float32))

    # value_and_grad: jax.grad alone drops the forward kernel, whose output it never needs
    # (the backward recomputes gate and up from x and the statistics).
    for kind in TPU_GENERATIONS:
        text = export_for_tpu(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)),
                              *_structs(*PALM[model]), device_kind=kind)
        assert mosaic_kernel_names(text) == ["palm_norm_swiglu_fwd", "palm_norm_swiglu_bwd_gates",
                                             "palm_norm_swiglu_bwd_dx", "palm_norm_swiglu_bwd_dw"]
    text = export_for_tpu(jax.grad(loss, argnums=(0, 1, 2, 3)), *_structs(*PALM[model]))
    assert mosaic_kernel_names(text) == ["palm_norm_swiglu_bwd_gates", "palm_norm_swiglu_bwd_dx",
                                         "palm_norm_swiglu_bwd_dw"]
