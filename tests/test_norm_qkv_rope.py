"""kernels.norm_qkv_rope: the Pallas TPU kernels (TPU interpret mode) and the Pallas GPU
(Triton) kernels (generic interpret mode) against the reference; both exported for their
hardware from CPU.

Each hypothesis example compiles one jitted program holding the kernels (forward through
jax.vjp, both backward kernels) and the reference: compiling dominates interpret-mode cost,
so the plain forward (the custom_vjp's primal path) is checked once, in the two-core test.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.pallas import tpu as pltpu

from conftest import MOSAIC_INTERPRETS, RaceLog, assert_close, race_log, run
from kernels._common import layer_norm_bwd, layer_norm_f32, row_stats
from kernels._tpu import sublane, vmem_budget
from kernels.norm_qkv_rope import (BlockSizes, hbm_bytes, norm_qkv_rope, norm_qkv_rope_reference,
                                   vmem_bytes)
from kernels.norm_qkv_rope import gpu as nqr_gpu
from kernels.norm_qkv_rope import mgpu as nqr_mgpu
from kernels.norm_qkv_rope import tpu as nqr_tpu
from gpu_export import export_for_gpu, mosaic_gpu_kernel_count, triton_kernel_names
from gpu_export import unmasked_accesses
from tpu_export import TPU_GENERATIONS, export_for_tpu, mosaic_kernel_names

EPS = 1e-6
# (D, H, K) of PaLM-8B and PaLM-540B; B=1, T=2048 per chip.
PALM = {"8b": (4096, 16, 256), "540b": (18432, 48, 256)}
# The Mosaic GPU kernels are drawn where jax's Mosaic GPU interpreter exists (jax >= 0.11),
# one time in seven (their fixed examples run every time): that interpreter costs several
# seconds a case, the CI's time.
IMPLS = ("pallas_tpu", "pallas_gpu") * 3 + (("pallas_mosaic_gpu",) if MOSAIC_INTERPRETS else ())



def _inputs(seed, b, t, d, h, k, dtype):
    """LayerNorm-worthy x (offset and spread per row), fan-in scaled weights, any positions.

    numpy draws them: eager jax.random would compile per shape, as slow as the kernels here.
    """
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(b, t, d)) * rng.uniform(0.5, 3.0, size=(b, t, 1)) + 0.7
    scale = 1.0 + 0.2 * rng.normal(size=(d,))
    weights = [rng.normal(size=s) / np.sqrt(d) for s in ((d, h, k), (d, k), (d, k))]
    positions = jnp.asarray(rng.integers(0, 4096, size=(b, t)), jnp.int32)
    return [jnp.asarray(a, dtype) for a in (x, scale, *weights)] + [positions]


@st.composite
def cases(draw):
    """Shapes of at most two tiles per grid axis but the column axis (each grid step costs
    interpret time), none of them required to divide. pallas_tpu: M <= 16 rows in tiles of 8 or
    16, D <= 16 in tiles of 8 or 16 (D-resident where the tile covers D), H <= 3 heads in tiles
    of 1 or 2 plus the k/v tile. pallas_gpu (tiles are powers of two of at least 16, Triton's
    dots): M <= 32 rows and D <= 32 in tiles of 16 (two tiles or loop steps where M or D
    exceeds 16), one program per head. pallas_mosaic_gpu (jax >= 0.11): bf16, K = 128, its
    64/128-row tiles over slices of 64 (a ring of 2 to 4), the backward Mosaic's or (a third)
    Triton's on tiles of 16, a third under race detection."""
    impl = draw(st.sampled_from(IMPLS))
    if impl == "pallas_mosaic_gpu":
        blocks = nqr_mgpu.BlockSizes(draw(st.sampled_from([64, 128])), 64, 16, 16,
                                     buffers=draw(st.integers(2, 4)),
                                     mosaic_bwd=draw(st.sampled_from([True, True, False])))
        # Small: every thread block of the Mosaic GPU interpreter costs ~0.1 s; K = 256 and
        # two row tiles are the fixed examples'.
        return dict(b=draw(st.integers(1, 2)), t=draw(st.integers(1, 24)),
                    d=draw(st.integers(4, 100)), h=draw(st.integers(1, 2)), k=128,
                    dtype=jnp.bfloat16, impl=impl,
                    blocks=draw(st.sampled_from([None, blocks])),
                    races=draw(st.sampled_from([False, False, True])),
                    seed=draw(st.integers(0, 2**16)))
    if impl == "pallas_tpu":
        blocks = BlockSizes(
            block_rows=draw(st.sampled_from([8, 16])), block_heads=draw(st.integers(1, 2)),
            block_d=draw(st.sampled_from([8, 16])),
            block_rows_bwd=draw(st.sampled_from([8, 16])),
            block_heads_bwd=draw(st.integers(1, 2)), block_d_bwd=draw(st.sampled_from([8, 16])))
        t, d = draw(st.integers(1, 8)), draw(st.integers(4, 16))
    else:
        blocks = nqr_gpu.BlockSizes(16, 16, 16, 16)
        t, d = draw(st.integers(1, 16)), draw(st.integers(4, 32))
    return dict(
        b=draw(st.integers(1, 2)), t=t, d=d,
        h=draw(st.integers(1, 3)), k=2 * draw(st.integers(1, 32)),  # every even K to 64
        dtype=draw(st.sampled_from([jnp.float32, jnp.bfloat16])),
        impl=impl,
        blocks=draw(st.sampled_from([None, blocks, blocks])),  # mostly several grid steps
        # race detection (TPU interpret mode only) for a third of the TPU cases
        races=impl == "pallas_tpu" and draw(st.sampled_from([False, False, True])),
        seed=draw(st.integers(0, 2**16)),
    )


def _interpret(case):
    """What a drawn case's kernels get: race detection by the TPU or the Mosaic GPU
    interpreter, or the plain interpreters."""
    if not case["races"]:
        return True
    if case["impl"] == "pallas_mosaic_gpu":
        return plgpu.InterpretGPUParams(detect_races=True)
    return pltpu.InterpretParams(detect_races=True)


# The Mosaic kernels: two consumers (70 rows of a 128-row tile), three D slices through a ring
# of two, PaLM's K = 256 (dh: 16 slices of the heads through it, dW: 8 column tiles, the
# first four dwq's); one consumer at K = 128 with padded rows and D, three query heads.
MOSAIC_EXAMPLES = [
    dict(b=1, t=70, d=150, h=2, k=256, dtype=jnp.bfloat16, impl="pallas_mosaic_gpu",
         blocks=nqr_mgpu.BlockSizes(128, 64, 16, 16, buffers=2), races=True, seed=70),
    dict(b=1, t=13, d=40, h=3, k=128, dtype=jnp.bfloat16, impl="pallas_mosaic_gpu",
         blocks=nqr_mgpu.BlockSizes(64, 64, 16, 16), races=True, seed=13),
]


def _mosaic_examples(test):
    for case in MOSAIC_EXAMPLES if MOSAIC_INTERPRETS else ():
        test = example(case)(test)
    return test


def _palm_head_dim(dtype, h, impl="pallas_tpu", blocks=None):
    """PaLM's K = 256 (hypothesis draws K <= 64): two lane tiles, small T and D."""
    return dict(b=1, t=11, d=48, h=h, k=256, dtype=dtype, impl=impl, blocks=blocks, races=False,
                seed=256)


@pytest.mark.long
@example(_palm_head_dim(jnp.float32, 2))
@example(_palm_head_dim(jnp.bfloat16, 3))
@example(_palm_head_dim(jnp.float32, 2, "pallas_gpu", nqr_gpu.BlockSizes(16, 32, 16, 32)))
@example(_palm_head_dim(jnp.bfloat16, 3, "pallas_gpu"))
@example(dict(b=2, t=9, d=20, h=3, k=6, dtype=jnp.float32, impl="pallas_gpu",  # K/2 = 3, ragged
              blocks=nqr_gpu.BlockSizes(16, 16, 16, 16), races=False, seed=6))
@_mosaic_examples
@given(cases())
def test_matches_reference(case):
    """Forward through jax.vjp and all five gradients against the reference."""
    dtype = case["dtype"]
    b, t, d, h, k = (case[n] for n in "btdhk")
    *args, positions = _inputs(case["seed"], b, t, d, h, k, dtype)
    rng = np.random.default_rng(case["seed"] + 1)
    cotangents = [jnp.asarray(rng.normal(size=s), dtype) for s in ((b, t, h, k), (b, t, k),
                                                                     (b, t, k))]
    interpret = _interpret(case)

    def kernel(*args):
        return norm_qkv_rope(*args, positions, eps=EPS, impl=case["impl"], interpret=interpret,
                             block_sizes=case["blocks"])

    def reference(*args):
        return norm_qkv_rope_reference(*args, positions, eps=EPS)

    @jax.jit  # one compile for kernels and reference: compiling dominates the test's time
    def run(*args):
        out_vjp, vjp = jax.vjp(kernel, *args)
        expected, reference_vjp = jax.vjp(reference, *args)
        return out_vjp, vjp(tuple(cotangents)), expected, reference_vjp(tuple(cotangents))

    with race_log(case["races"]):  # all three kernels checked, not just the last
        out, grads, expected, expected_grads = run(*args)
    for name, a, e in zip("qkv", out, expected):
        assert a.dtype == dtype and a.shape == e.shape, name
        assert_close(a, e, dtype, what=f"{name} through vjp")
    for name, g, e, arg in zip(("dx", "dscale", "dwq", "dwk", "dwv"), grads, expected_grads, args):
        assert g.dtype == arg.dtype and g.shape == arg.shape, name
        assert_close(g, e, dtype, what=name)


def test_two_cores_without_races():
    """The plain forward (custom_vjp primal path) and both backward kernels (jax.grad), with
    the "parallel" axis split over two simulated TensorCores and batch 1, so row tiles carry
    the split: the cos/sin scratch must stay valid per core and row tile. 21 rows in tiles of
    16, so the second core's tile overhangs the array (few grid steps: two simulated cores are
    slow to interpret)."""
    *args, positions = _inputs(3, 1, 21, 24, 2, 8, jnp.bfloat16)
    interpret = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
    cts = [jnp.asarray(np.random.default_rng(4).normal(size=s), jnp.float32)
           for s in ((1, 21, 2, 8), (1, 21, 8), (1, 21, 8))]

    def loss(fn):
        def weighted(*a):
            return sum(jnp.sum(o.astype(jnp.float32) * c) for o, c in zip(fn(*a), cts))
        return jax.grad(weighted, argnums=tuple(range(5)))

    def kernel(*a):
        return norm_qkv_rope(*a, positions, eps=EPS, impl="pallas_tpu", interpret=interpret,
                             block_sizes=BlockSizes(16, 2, 24, 16, 2, 24))

    def reference(*a):
        return norm_qkv_rope_reference(*a, positions, eps=EPS)

    with RaceLog() as log:
        out, grads = kernel(*args), loss(kernel)(*args)
    assert log.kernels_checked == 4  # forward, again inside grad, 2 backward
    for name, a, e in zip("qkv", out, reference(*args)):
        assert_close(a, e, jnp.bfloat16, what=name)
    for name, g, e in zip(("dx", "dscale", "dwq", "dwk", "dwv"), grads,
                          jax.jit(loss(reference))(*args)):
        assert_close(g, e, jnp.bfloat16, what=name)


def test_layer_norm_backward_matches_autodiff():
    """The hand-written jnp LayerNorm backward the kernels' VJP ends with, against jax.vjp."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(37, 96)) * 3 + 1, jnp.float32)
    scale = jnp.asarray(1 + 0.3 * rng.normal(size=(96,)), jnp.float32)
    dh = jnp.asarray(rng.normal(size=(37, 96)), jnp.float32)

    @jax.jit
    def run(x, scale, dh):
        mean, rstd = row_stats(x, EPS)
        _, vjp = jax.vjp(lambda x, s: layer_norm_f32(x, s, EPS), x, scale)
        return layer_norm_bwd(dh, x, scale, mean, rstd), vjp(dh)

    (dx, dscale), (expected_dx, expected_dscale) = run(x, scale, dh)
    assert_close(dx, expected_dx, jnp.float32, what="dx")
    assert_close(dscale, expected_dscale, jnp.float32, what="dscale")


def test_default_tiles_per_generation():
    """PaLM-8B in bf16: D-resident tiles (block_d = D: x and dq read once) on the 128 MiB parts
    (v5e, v6e), D-tiled on v4 (12 MiB budget); PaLM-540B D-tiled everywhere (the weights
    dominate its traffic: module docstring). Every default fits its generation's budget, rows a
    multiple of the dtype's sublanes (float32 D=4096, H=16, K=512, 300 rows used to raise)."""
    shapes = {**{name: ((1, 2048, d), (d, h, k)) for name, (d, h, k) in PALM.items()},
              "300 rows": ((1, 300, 4096), (4096, 16, 512))}
    for name, (x_shape, wq_shape) in shapes.items():
        d = x_shape[2]
        for gen in TPU_GENERATIONS:
            for dtype in (jnp.float32, jnp.bfloat16):
                blocks = BlockSizes.get_default(x_shape, wq_shape, dtype, gen)
                what = (name, gen, jnp.dtype(dtype).name, blocks)
                assert vmem_bytes(x_shape, wq_shape, dtype, blocks)["max"] <= vmem_budget(gen), what
                assert blocks.block_rows % sublane(dtype) == 0, what
                assert blocks.block_rows_bwd % sublane(dtype) == 0, what
                resident = (blocks.block_d == d, blocks.block_d_bwd == d)
                if name == "8b" and dtype == jnp.bfloat16 and gen in ("TPU v5 lite", "TPU v6 lite"):
                    assert resident == (True, True), what
                if gen == "TPU v4" or name == "540b":
                    assert resident == (False, False), what
    small = BlockSizes.get_default((1, 1, 24), (24, 3, 8), jnp.float32)  # one decoding step
    assert (small.block_rows, small.block_heads, small.block_d) == (8, 3, 24)
    hash(small)  # static argument
    with pytest.raises(ValueError, match="multiple of 8"):
        BlockSizes(12, 1, 128, 8, 1, 128)
    with pytest.raises(ValueError, match="positive int"):
        BlockSizes(8, 0, 128, 8, 1, 128)


def test_traffic_table_in_docstring():
    """The module docstring's HBM table is `hbm_bytes` at the former and the default tiles."""
    before = {"TPU v4": BlockSizes(128, 4, 512, 256, 2, 512),
              "TPU v5p": BlockSizes(512, 4, 512, 512, 2, 512)}
    before["TPU v6 lite"] = before["TPU v5p"]
    for d, h, k in PALM.values():
        x_shape, wq_shape = (1, 2048, d), (d, h, k)
        for gen, old in before.items():
            new = BlockSizes.get_default(x_shape, wq_shape, jnp.bfloat16, gen)
            row = []
            for blocks in (old, new):
                moved = {n: round(v / 2**20)
                         for n, v in hbm_bytes(x_shape, wq_shape, jnp.bfloat16, blocks).items()}
                row.append(f"{moved['forward']} | {moved['bwd_dx']} + {moved['bwd_dw']}")
            assert re.search(r"\s+".join(map(re.escape, "  ".join(row).split())),
                             nqr_tpu.__doc__), (d, gen, row)


def test_bad_inputs_raise():
    x, scale, wq, wk, wv, pos = _inputs(0, 1, 4, 16, 2, 8, jnp.float32)
    call = lambda *a, **kw: norm_qkv_rope(*a, eps=EPS, impl="pallas_tpu", interpret=True, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="wk must be"):
        call(x, scale, wq, wk[:, :4], wv, pos)
    with pytest.raises(ValueError, match="even"):
        call(x, scale, wq[..., :7], wk[:, :7], wv[:, :7], pos)
    with pytest.raises(ValueError, match="dtype"):
        call(x, scale, wq.astype(jnp.bfloat16), wk, wv, pos)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        call(x.astype(jnp.float16), scale, *(w.astype(jnp.float16) for w in (wq, wk, wv)), pos)
    with pytest.raises(ValueError, match="integers"):
        call(x, scale, wq, wk, wv, pos.astype(jnp.float32))
    with pytest.raises(ValueError, match="positions"):
        call(x, scale, wq, wk, wv, pos[:, :3])
    with pytest.raises(ValueError, match="BlockSizes"):
        call(x, scale, wq, wk, wv, pos, block_sizes=(8,) * 6)
    # Natively, blocks must be whole (8, 128) tiles: 96 of D=256 is not.
    args = _inputs(0, 1, 8, 256, 2, 128, jnp.bfloat16)
    with pytest.raises(ValueError, match="block_d=96"):
        norm_qkv_rope(*args, eps=EPS, impl="pallas_tpu", interpret=False,
                      block_sizes=BlockSizes(16, 1, 96, 16, 1, 128))


def _palm_args(model: str, b: int = 1, t: int = 2048):
    d, h, k = PALM[model]
    bf = jnp.bfloat16
    return [jax.ShapeDtypeStruct(s, dt) for s, dt in (
        ((b, t, d), bf), ((d,), bf), ((d, h, k), bf), ((d, k), bf), ((d, k), bf),
        ((b, t), jnp.int32))]


def _forward(*args):
    return norm_qkv_rope(*args, eps=EPS, impl="pallas_tpu", interpret=False)


@pytest.mark.parametrize("model", sorted(PALM))
def test_forward_exports_for_tpu(model):
    names = mosaic_kernel_names(export_for_tpu(_forward, *_palm_args(model)))
    assert names == ["palm_norm_qkv_rope_fwd"]


def _gradient(x, norm_scale, wq, wk, wv, positions):
    def loss(*params):  # squares, so the backward needs the forward's outputs
        return sum(jnp.sum(jnp.square(o.astype(jnp.float32))) for o in _forward(*params, positions))
    return jax.grad(loss, argnums=tuple(range(5)))(x, norm_scale, wq, wk, wv)


@pytest.mark.parametrize("model", sorted(PALM))
def test_gradient_exports_for_tpu(model):
    names = mosaic_kernel_names(export_for_tpu(_gradient, *_palm_args(model)))
    assert names == ["palm_norm_qkv_rope_fwd", "palm_norm_qkv_rope_bwd_dx",
                     "palm_norm_qkv_rope_bwd_dw"]


@pytest.mark.parametrize("device_kind", TPU_GENERATIONS)
def test_exports_for_every_tpu_generation(device_kind):
    text = export_for_tpu(_forward, *_palm_args("8b"), device_kind=device_kind)
    assert mosaic_kernel_names(text) == ["palm_norm_qkv_rope_fwd"]
    text = export_for_tpu(_gradient, *_palm_args("8b"), device_kind=device_kind)
    assert len(mosaic_kernel_names(text)) == 3


@pytest.mark.parametrize("model", sorted(PALM))
def test_d_resident_tiles_export_for_tpu(model):
    """block_d = D, forward and both backward kernels, at PaLM widths (rows a multiple of 16).
    At 540B this lowers but does not fit (bwd_dw's [D, 2K] float32 accumulator and weight
    blocks alone exceed 96 MiB), so the defaults there stay D-tiled."""
    d = PALM[model][0]
    blocks = BlockSizes(208, 1, d, 64, 1, d)

    def forward(*args):
        return norm_qkv_rope(*args, eps=EPS, impl="pallas_tpu", interpret=False,
                             block_sizes=blocks)

    def gradient(x, norm_scale, wq, wk, wv, positions):
        def loss(*params):
            return sum(jnp.sum(o.astype(jnp.float32)) for o in forward(*params, positions))
        return jax.value_and_grad(loss, argnums=tuple(range(5)))(x, norm_scale, wq, wk, wv)

    text = export_for_tpu(gradient, *_palm_args(model), device_kind="TPU v6 lite")
    assert mosaic_kernel_names(text) == ["palm_norm_qkv_rope_fwd", "palm_norm_qkv_rope_bwd_dx",
                                         "palm_norm_qkv_rope_bwd_dw"]
    assert f"{d}x" in text


def test_head_dim_128_exports():
    """K = 128 (H = 32 at D = 4096): four or eight heads per column tile, forward and grad."""
    bf = jnp.bfloat16
    args = [jax.ShapeDtypeStruct(s, dt) for s, dt in (
        ((1, 2048, 4096), bf), ((4096,), bf), ((4096, 32, 128), bf), ((4096, 128), bf),
        ((4096, 128), bf), ((1, 2048), jnp.int32))]
    assert len(mosaic_kernel_names(export_for_tpu(_gradient, *args))) == 3


def test_decode_step_exports():
    """T = 1: the row block covers the B rows; no padding, no partial tile at the edge."""
    names = mosaic_kernel_names(export_for_tpu(_forward, *_palm_args("8b", b=8, t=1)))
    assert names == ["palm_norm_qkv_rope_fwd"]


def test_gpu_exports_for_cuda_at_palm_8b():
    """The three Triton kernels lower for an H100 at PaLM-8B (the forward and its vjp), with
    the default tiles."""
    def forward_and_vjp(x, norm_scale, wq, wk, wv, positions):
        def forward(*params):
            return norm_qkv_rope(*params, positions, eps=EPS, impl="pallas_gpu")
        out, vjp = jax.vjp(forward, x, norm_scale, wq, wk, wv)
        return out, vjp(out)

    names = triton_kernel_names(export_for_gpu(forward_and_vjp, *_palm_args("8b")))
    assert names == ["palm_norm_qkv_rope_fwd", "palm_norm_qkv_rope_bwd_dx",
                     "palm_norm_qkv_rope_bwd_dw"]


@pytest.mark.parametrize("model", sorted(PALM))
def test_mosaic_gpu_exports_for_cuda(model):
    """The Mosaic GPU kernels lower at PaLM-8B and 540B: the forward, dh and dW; no Triton."""
    def forward_and_vjp(x, norm_scale, wq, wk, wv, positions):
        def forward(*params):
            return norm_qkv_rope(*params, positions, eps=EPS, impl="pallas_mosaic_gpu",
                                 interpret=False)
        out, vjp = jax.vjp(forward, x, norm_scale, wq, wk, wv)
        return out, vjp(out)

    text = export_for_gpu(forward_and_vjp, *_palm_args(model))
    assert mosaic_gpu_kernel_count(text) == 3
    assert triton_kernel_names(text) == []


def test_mosaic_gpu_block_sizes_default_and_validation():
    """PaLM shapes: 128 rows over a ring of 4 (192 KiB), gpu.py's backward
    tiles; a short M takes one consumer; bad tiles, dtypes and head dims are refused."""
    for d, h, k in PALM.values():
        blocks = nqr_mgpu.BlockSizes.get_default((1, 2048, d), (d, h, k), jnp.bfloat16)
        assert (blocks.block_rows, blocks.block_d, blocks.buffers) == (128, 64, 4)
        assert nqr_mgpu.forward_shared_memory_bytes(blocks, k, jnp.bfloat16) == 192 * 1024
    assert nqr_mgpu.BlockSizes.get_default((1, 20, 40), (40, 2, 128),
                                           jnp.bfloat16).block_rows == 64
    for kwargs, match in [(dict(block_rows=32), "block_rows=32 must be 64 or 128"),
                          (dict(block_d=32), "block_d=32 must be 64"),
                          (dict(buffers=1), "buffers=1"),
                          (dict(mosaic_bwd=1), "mosaic_bwd=1 must be a bool")]:
        with pytest.raises(ValueError, match=match):
            nqr_mgpu.BlockSizes(**kwargs)
    for dtype, k, match in [(jnp.float32, 128, "bfloat16 x"), (jnp.bfloat16, 64, "128 or 256")]:
        args = _inputs(0, 1, 4, 16, 2, k, dtype)
        with pytest.raises(ValueError, match=match):
            norm_qkv_rope(*args, eps=EPS, impl="pallas_mosaic_gpu", interpret=False)
    args = _inputs(0, 1, 4, 16, 2, 128, jnp.bfloat16)
    with pytest.raises(ValueError, match="mgpu.BlockSizes"):
        norm_qkv_rope(*args, eps=EPS, impl="pallas_mosaic_gpu", interpret=False,
                      block_sizes=nqr_gpu.BlockSizes())
    with pytest.raises(ValueError, match="forward .* shared memory"):  # 5 x 48 KiB at K = 256
        norm_qkv_rope(*_inputs(0, 1, 4, 16, 2, 256, jnp.bfloat16), eps=EPS,
                      impl="pallas_mosaic_gpu", interpret=False,
                      block_sizes=nqr_mgpu.BlockSizes(block_d=64, buffers=5))


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="native: needs a GPU")
@pytest.mark.parametrize("example", range(len(MOSAIC_EXAMPLES)))
def test_mosaic_gpu_native_matches_reference(example):
    """The Mosaic examples compiled for the GPU (the wgmmas from registers, the real barriers
    and TMA), forward and gradients."""
    case = MOSAIC_EXAMPLES[example]
    *args, positions = _inputs(case["seed"], *(case[n] for n in "btdhk"), case["dtype"])

    def loss(fn):
        return lambda *a: sum(jnp.sum(o.astype(jnp.float32) ** 2) for o in fn(*a, positions,
                                                                               eps=EPS))

    def kernel(*a, **kw):
        return norm_qkv_rope(*a, impl="pallas_mosaic_gpu", interpret=False,
                             block_sizes=case["blocks"], **kw)

    grads = jax.value_and_grad(loss(kernel), argnums=tuple(range(5)))
    expected = jax.value_and_grad(loss(norm_qkv_rope_reference), argnums=tuple(range(5)))
    (value, got), (want_value, want) = run(lambda *a: (grads(*a), expected(*a)), *args)
    assert_close(value, want_value, case["dtype"], what="loss")
    for name, g, e in zip(("dx", "dscale", "dwq", "dwk", "dwv"), got, want):
        assert_close(g, e, case["dtype"], what=name)


def test_gpu_block_sizes_default_and_validation():
    """H100 defaults at PaLM shapes fit the shared memory (float32 by fewer stages); tiles
    shrink to small shapes; a tile that is not a power of two of at least 16 is refused."""
    for d, h, k in PALM.values():
        for dtype in (jnp.bfloat16, jnp.float32):
            blocks = nqr_gpu.BlockSizes.get_default((1, 2048, d), (d, h, k), dtype)
            sizes = nqr_gpu.shared_memory_bytes((1, 2048, d), (d, h, k), dtype, blocks)
            assert sizes["max"] <= 227 * 1024, (d, dtype, blocks)
    assert nqr_gpu.BlockSizes.get_default((1, 2048, 4096), (4096, 16, 256), jnp.bfloat16) == \
        nqr_gpu.BlockSizes(128, 64, 64, 64, 8, 3, 8, 3)
    assert nqr_gpu.BlockSizes.get_default((1, 3, 20), (20, 2, 6), jnp.float32).block_rows == 16
    hash(nqr_gpu.BlockSizes())  # static argument
    with pytest.raises(ValueError, match="block_rows=48 must be a power of two"):
        nqr_gpu.BlockSizes(block_rows=48)
    with pytest.raises(ValueError, match="block_d=8 must be a power of two >= 16"):
        nqr_gpu.BlockSizes(block_d=8)
    with pytest.raises(ValueError, match="num_warps=0 must be a power of two"):
        nqr_gpu.BlockSizes(num_warps=0)
    with pytest.raises(ValueError, match="num_stages_bwd=0 must be a positive int"):
        nqr_gpu.BlockSizes(num_stages_bwd=0)
    args = _inputs(0, 1, 4, 16, 2, 8, jnp.float32)
    with pytest.raises(ValueError, match="gpu.BlockSizes"):  # a TPU tiling for the GPU kernels
        norm_qkv_rope(*args, eps=EPS, impl="pallas_gpu", interpret=True,
                      block_sizes=BlockSizes(8, 1, 16, 8, 1, 16))
    with pytest.raises(ValueError, match="shared memory"):  # 4 stages of 256-row slices
        norm_qkv_rope(*args, eps=EPS, impl="pallas_gpu", interpret=True,
                      block_sizes=nqr_gpu.BlockSizes(256, 256, 16, 16, num_stages=4))


def test_gpu_kernels_mask_every_access():
    """Ragged rows and D, H = 3 heads (4 in the backward's head-spanning blocks), K/2 = 3 lanes
    per half (16 in the blocks): every access is masked but the frequency row's (a whole [Kh]
    array), in the forward and both backward kernels."""
    *args, positions = _inputs(0, 1, 5, 20, 3, 6, jnp.bfloat16)
    cotangents = (jnp.zeros((1, 5, 3, 6), jnp.bfloat16), jnp.zeros((1, 5, 6), jnp.bfloat16),
                  jnp.zeros((1, 5, 6), jnp.bfloat16))

    def forward_and_vjp(*args):
        def forward(*params):
            return norm_qkv_rope(*params, positions, eps=EPS, impl="pallas_gpu", interpret=False)
        out, vjp = jax.vjp(forward, *args)
        return out, vjp(cotangents)

    plain = ["get Ref<default>{float32[16]}"]
    assert unmasked_accesses(forward_and_vjp, *args) == {
        "palm_norm_qkv_rope_fwd": plain, "palm_norm_qkv_rope_bwd_dx": plain,
        "palm_norm_qkv_rope_bwd_dw": []}
