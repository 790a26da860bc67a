"""norm_swiglu: the Pallas TPU kernels (interpret mode) against the jnp reference, and the
real-TPU lowering at PaLM shapes."""

from __future__ import annotations

import importlib

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from jax.experimental.pallas import tpu as pltpu

from conftest import assert_close
from tpu_export import TPU_GENERATIONS, export_for_tpu, mosaic_kernel_names
# The module, not the function `kernels.norm_swiglu` that the package re-exports.
ns = importlib.import_module("kernels.norm_swiglu")

EPS = 1e-6
DTYPES = (jnp.float32, jnp.bfloat16)


def _inputs(seed, b, t, d, f, dtype):
    kx, ko, ks, kg, ku = jax.random.split(jax.random.key(seed), 5)
    # An offset and a spread per row, so the LayerNorm really has a mean and scale to remove.
    x = (jax.random.normal(kx, (b, t, d)) * 2.0 + jax.random.normal(ko, (b, t, 1))).astype(dtype)
    norm_scale = (1.0 + 0.2 * jax.random.normal(ks, (d,))).astype(dtype)
    w_gate = (jax.random.normal(kg, (d, f)) / np.sqrt(d)).astype(dtype)
    w_up = (jax.random.normal(ku, (d, f)) / np.sqrt(d)).astype(dtype)
    return x, norm_scale, w_gate, w_up


@st.composite
def cases(draw):
    """Small shapes (often not multiples of the tiles) with small tiles: several grid steps."""
    dtype = draw(st.sampled_from(DTYPES))
    rows = 8 if dtype == jnp.float32 else 16
    b = draw(st.integers(1, 2))
    t = draw(st.integers(1, 40))
    d = draw(st.integers(1, 300))
    f = draw(st.integers(1, 300))
    bt = draw(st.sampled_from([rows, 2 * rows]))
    bf, bd = draw(st.sampled_from([128, 256])), draw(st.sampled_from([128, 256]))
    bt2 = draw(st.sampled_from([rows, 2 * rows]))
    bf2, bd2 = draw(st.sampled_from([128, 256])), draw(st.sampled_from([128, 256]))
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
    out = ns.norm_swiglu(*args, eps=EPS, impl="pallas_tpu", interpret=interpret,
                         block_sizes=block_sizes)
    assert out.shape == (b, t, f) and out.dtype == dtype
    assert_close(out, ns.norm_swiglu_reference(*args, eps=EPS), dtype, what="h")


def test_default_block_sizes():
    # PaLM shapes: every axis divides by 512, so padding is a no-op.
    for d, f in [(4096, 16384), (18432, 73728)]:
        bs = ns.BlockSizes.get_default(2048, d, f, jnp.bfloat16)
        assert bs == ns.BlockSizes()
        assert max(ns.vmem_bytes(bs, jnp.bfloat16).values()) <= 16 * 2**20
    # Small shapes shrink to one aligned tile.
    bs = ns.BlockSizes.get_default(20, 40, 200, jnp.bfloat16)
    assert (bs.block_t, bs.block_d, bs.block_f) == (32, 128, 256)
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
