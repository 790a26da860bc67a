"""Rules every Pallas kernel must keep whatever its shape, checked across all six kernels.

- One tiling, several grids: a kernel called with the same block sizes at a shape with several
  grid steps per axis and then at a shape with one step (B*T = 1, a single tile) gives the
  reference's values both times, forward and gradient. jax 0.11 caches a kernel's trace by
  function and block shapes, not by grid, so a kernel body that read its grid extent through
  `pl.num_programs` kept the first call's value and left the second call's outputs unwritten
  (NaN); see kernels/_common.py. Both backends' kernels: the TPU (Mosaic) and the GPU (Triton).
- Edge blocks: the interpreters (TPU and generic) fill the part of a partial edge block that lies
  past an array's end with NaN, as undefined as real memory there (Triton's masked loads leave
  it undefined too), so the ragged shapes the kernels' property tests draw check that nothing
  from past the end reaches a result.
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

import kernels
from conftest import FAST_COMPILE, assert_close
from kernels._common import tpu_interpret

F32 = jnp.float32


def _normal(rng, shape, scale=1.0):
    return jnp.asarray(rng.standard_normal(shape) * scale, F32)


def _positions(rng, b, t):
    return jnp.asarray(rng.integers(0, 4096, size=(b, t)), jnp.int32)


def _rope_args(rng, b, t):
    return (_normal(rng, (b, t, 2, 16)), _positions(rng, b, t))


def _norm_qkv_rope_args(rng, b, t):
    d, h, k = (200, 2, 16) if t > 1 else (5, 1, 4)
    return (_normal(rng, (b, t, d)), 1.0 + _normal(rng, (d,), 0.2),
            _normal(rng, (d, h, k), d ** -0.5), _normal(rng, (d, k), d ** -0.5),
            _normal(rng, (d, k), d ** -0.5), _positions(rng, b, t))


def _norm_swiglu_args(rng, b, t):
    d, f = (200, 200) if t > 1 else (3, 1)
    return (_normal(rng, (b, t, d)), 1.0 + _normal(rng, (d,), 0.2),
            _normal(rng, (d, f), d ** -0.5), _normal(rng, (d, f), d ** -0.5))


def _block_out_args(rng, b, t):
    d, h, k, f = (200, 2, 80, 200) if t > 1 else (3, 1, 2, 1)
    return (_normal(rng, (b, t, d)), _normal(rng, (b, t, h, k)),
            _normal(rng, (h, k, d), (h * k) ** -0.5), _normal(rng, (b, t, f)),
            _normal(rng, (f, d), f ** -0.5))


def _flash_args(rng, b, t):
    # S >= 2 in both: over a single key the softmax is constant and dq is exactly 0.
    h, k, s = (2, 16, 140) if t > 1 else (1, 8, 3)
    return (_normal(rng, (b, t, h, k)), _normal(rng, (b, s, k)), _normal(rng, (b, s, k)))


def _decode_args(rng, b, t):
    s = 40 if t > 1 else 8  # t only picks the size here: decoding has one query position
    lengths = jnp.asarray([s - 3, s][:b], jnp.int32)
    return (_normal(rng, (b, 2, 16)), _normal(rng, (b, s, 16)), _normal(rng, (b, s, 16)), lengths)


# name: (inputs, TPU block sizes, keyword arguments, how many leading arguments are
# differentiable). The tiles give the multi-step shape (B*T = 70 rows) at least two steps on
# every grid axis; GPU_BLOCKS does the same for the Triton kernels (powers of two, dots >= 16).
KERNELS = {
    "rope": (_rope_args, lambda m: m.BlockSizes(8, 2, 8, 2), {}, 1),
    "norm_qkv_rope": (_norm_qkv_rope_args, lambda m: m.BlockSizes(8, 1, 128, 8, 1, 128),
                      {"eps": 1e-6}, 5),
    "norm_swiglu": (_norm_swiglu_args, lambda m: m.BlockSizes(8, 128, 128, 8, 128, 128),
                    {"eps": 1e-6}, 4),
    "block_out": (_block_out_args, lambda m: m.BlockSizes(8, 128, 128, 8, 128, 128), {}, 5),
    "mq_flash_attention": (_flash_args, lambda m: m.BlockSizes(*[128] * 6), {"causal": False}, 3),
    "mq_decode_attention": (_decode_args, lambda m: m.BlockSizes(block_s=8, num_splits=2), {}, 0),
}


GPU_BLOCKS = {
    "rope": lambda g: g.BlockSizes(16, 2, 16, 2),
    "norm_qkv_rope": lambda g: g.BlockSizes(16, 64, 16, 64),
    "norm_swiglu": lambda g: g.BlockSizes(16, 64, 64, 16, 64, 64),
    "block_out": lambda g: g.BlockSizes(16, 64, 64, 16, 64, 64),
    "mq_flash_attention": lambda g: g.BlockSizes(16, 64, 16, 64, 16, 64),
    "mq_decode_attention": lambda g: g.BlockSizes(block_k=16, num_splits=2),
}


def _weighted_sum(out):
    """A scalar whose gradient reaches every output element with a different weight."""
    leaves = jax.tree.leaves(out)
    return sum(jnp.sum(x.astype(F32) * jnp.cos(jnp.arange(x.size, dtype=F32).reshape(x.shape)))
               for x in leaves)


def _output_and_grads(fn, n_diff):
    """One compiled program: fn's outputs and the gradients of their weighted sum."""
    def both(*args):
        if not n_diff:
            return fn(*args), ()
        return fn(*args), jax.grad(lambda *a: _weighted_sum(fn(*a)), tuple(range(n_diff)))(*args)

    return lambda *args: jax.jit(both).lower(*args).compile(FAST_COMPILE)(*args)


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
@pytest.mark.parametrize("name", sorted(KERNELS))
def test_one_tiling_at_two_grids(name, impl):
    module = getattr(kernels, name)  # the kernel's package
    make_args, make_blocks, kwargs, n_diff = KERNELS[name]
    if impl == "pallas_gpu":
        make_blocks = lambda m: GPU_BLOCKS[name](importlib.import_module(f"{m.__name__}.gpu"))  # noqa: E731
    blocks = make_blocks(module)
    kernel, reference = getattr(module, name), getattr(module, f"{name}_reference")
    pallas = _output_and_grads(lambda *a: kernel(*a, impl=impl, interpret=True,
                                                 block_sizes=blocks, **kwargs), n_diff)
    ref = _output_and_grads(lambda *a: reference(*a, **kwargs), n_diff)
    rng = np.random.default_rng(0)
    # Several grid steps first, then one: the order in which a stale extent did harm.
    for b, t in [(2, 35), (1, 1)]:
        args = make_args(rng, b, t)
        (out, grads), (ref_out, ref_grads) = pallas(*args), ref(*args)
        for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(ref_out)):
            assert_close(got, want, F32, what=f"{name} output at B={b}, T={t}")
        for i, (got, want) in enumerate(zip(grads, ref_grads)):
            assert_close(got, want, F32, what=f"{name} gradient {i} at B={b}, T={t}")


@pytest.mark.parametrize("interpreter", ["tpu", "generic"])
def test_interpreter_fills_edge_blocks_with_nan(interpreter):
    """The premise of the ragged-shape property tests: a kernel that sums a partial edge block
    without masking it gets NaN, so a kernel that forgot a mask would fail them; in the TPU
    interpreter (pallas_tpu) and the generic one (pallas_gpu's Triton kernels) alike."""

    def row_sum(x_ref, o_ref):
        o_ref[...] = jnp.sum(x_ref[...], axis=0, keepdims=True)

    x = jnp.ones((12, 128), F32)  # the second 8-row block has 4 rows past the end
    out = pl.pallas_call(row_sum, grid=(2,), in_specs=[pl.BlockSpec((8, 128), lambda i: (i, 0))],
                         out_specs=pl.BlockSpec((None, 1, 128), lambda i: (i, 0, 0)),
                         out_shape=jax.ShapeDtypeStruct((2, 1, 128), F32),
                         interpret=tpu_interpret(True) if interpreter == "tpu" else True)(x)
    out = np.asarray(out)
    assert np.all(out[0] == 8.0)
    assert np.all(np.isnan(out[1])), "the interpreter no longer poisons edge blocks"


def test_auto_resolves_per_kernel_on_gpu():
    """`impl="auto"`: Mosaic kernels on TPU, XLA on CPU; on a GPU each kernel its GPU_AUTO entry
    (what measured fastest there), and a whole model passes `auto` on for its kernels to
    resolve. The table names every kernel package, each with an implementation that exists."""
    from kernels._common import GPU_AUTO, resolve_impl
    assert set(GPU_AUTO) == set(KERNELS) | {"block_in"}
    for name, (sixteen_bit, other) in GPU_AUTO.items():
        assert {sixteen_bit, other} <= set(getattr(kernels, name).IMPLEMENTATIONS), name
        assert other != "pallas_mosaic_gpu", f"{name}: Mosaic GPU kernels take 16-bit inputs only"
    assert resolve_impl("auto", "rope") == "xla"  # CPU
    with kernels.target_backend("tpu"):
        assert resolve_impl("auto", "rope") == resolve_impl("auto") == "pallas_tpu"
    with kernels.target_backend("gpu"):
        for name, (sixteen_bit, other) in GPU_AUTO.items():
            assert resolve_impl("auto", name) == resolve_impl("auto", name, jnp.bfloat16) == sixteen_bit
            assert resolve_impl("auto", name, F32) == other
        assert resolve_impl("auto") == "auto"
        assert resolve_impl("pallas_gpu", "rope") == "pallas_gpu"


def test_auto_takes_mosaic_gpu_only_for_dtypes_it_takes(monkeypatch):
    """Where GPU_AUTO picks a Mosaic GPU kernel (bf16/f16 wgmma operands), `auto` on other
    inputs runs the table's second choice instead of raising; an explicit impl is left alone."""
    from kernels import _common
    monkeypatch.setitem(_common.GPU_AUTO, "mq_flash_attention", ("pallas_mosaic_gpu", "pallas_gpu"))
    with kernels.target_backend("gpu"):
        for dtype, chosen in [(jnp.bfloat16, "pallas_mosaic_gpu"),
                              (jnp.float16, "pallas_mosaic_gpu"), (F32, "pallas_gpu"),
                              (None, "pallas_mosaic_gpu")]:
            assert _common.resolve_impl("auto", "mq_flash_attention", dtype) == chosen
        assert _common.resolve_impl("pallas_mosaic_gpu", "mq_flash_attention",
                                    F32) == "pallas_mosaic_gpu"
        q = jnp.zeros((1, 8, 2, 16), F32)
        k = jnp.zeros((1, 8, 16), F32)
        # f32 through `auto`: the Triton kernels, interpreted here (interpret=True).
        np.testing.assert_allclose(
            kernels.mq_flash_attention(q, k, k, interpret=True),
            kernels.mq_flash_attention(q, k, k, impl="pallas_gpu", interpret=True))


def test_auto_takes_the_second_choice_for_head_dims_mosaic_lacks():
    """norm_qkv_rope's and block_in's Mosaic GPU kernels take head dims 128 and 256: for
    others `auto` on a GPU runs GPU_AUTO's second choice (XLA's), not an error; bf16 inputs
    at K = 64 run (the reference, here) and equal it."""
    from kernels import _common
    with kernels.target_backend("gpu"):
        assert _common.resolve_impl("auto", "norm_qkv_rope", jnp.bfloat16,
                                    mosaic_takes=False) == _common.GPU_AUTO["norm_qkv_rope"][1]
        assert _common.resolve_impl("auto", "rope", jnp.bfloat16, mosaic_takes=False) == "xla"
        key = jax.random.split(jax.random.key(5), 6)
        d, h, k = 32, 2, 64
        x = jax.random.normal(key[0], (1, 8, d), jnp.bfloat16)
        scale = jnp.ones((d,), jnp.bfloat16)
        wq = jax.random.normal(key[1], (d, h, k), jnp.bfloat16)
        wk, wv = (jax.random.normal(kk, (d, k), jnp.bfloat16) for kk in key[2:4])
        wg, wu = (jax.random.normal(kk, (d, 48), jnp.bfloat16) for kk in key[4:6])
        pos = jnp.arange(8, dtype=jnp.int32)[None]
        got = kernels.norm_qkv_rope(x, scale, wq, wk, wv, pos, eps=1e-6)
        want = kernels.norm_qkv_rope_reference(x, scale, wq, wk, wv, pos, eps=1e-6)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
        got = kernels.block_in(x, scale, wq, wk, wv, wg, wu, pos, eps=1e-6)
        want = kernels.block_in_reference(x, scale, wq, wk, wv, wg, wu, pos, eps=1e-6)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)


def test_mosaic_gpu_falls_back_to_triton_where_a_kernel_has_none():
    """`impl="pallas_mosaic_gpu"` on a kernel without a Mosaic GPU version runs its Triton
    one (so a whole model can be asked for it); an impl with no fallback still says what
    exists."""
    from kernels._common import pallas_impl
    table = {"pallas_tpu": "tpu", "pallas_gpu": "triton"}
    assert pallas_impl("k", "pallas_mosaic_gpu", table) == "triton"
    assert pallas_impl("k", "pallas_mosaic_gpu", {**table, "pallas_mosaic_gpu": "m"}) == "m"
    with pytest.raises(NotImplementedError, match="have: xla, pallas_tpu"):
        pallas_impl("k", "pallas_gpu", {"pallas_tpu": "tpu"})
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 12, 2, 16)), F32)
    positions = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), (1, 12))
    np.testing.assert_array_equal(
        kernels.rope(x, positions, impl="pallas_mosaic_gpu", interpret=True),
        kernels.rope(x, positions, impl="pallas_gpu", interpret=True))


def test_16bit_matmul_takes_its_gradients_in_16_bits():
    """`matmul_f32` of two bf16 operands off CPU: float32 out, and its backward's products on
    bf16 operands (no float32 GEMM), equal to autodiff's on the widened operands within bf16
    rounding."""
    from gpu_export import jaxpr_eqns
    from kernels._common import _matmul_16bit, matmul_f32

    spec = "BTD,VD->BTV"
    key = jax.random.split(jax.random.key(3), 3)
    a = jax.random.normal(key[0], (2, 24, 64), jnp.bfloat16)
    b = jax.random.normal(key[1], (200, 64), jnp.bfloat16)
    w = jax.random.normal(key[2], (2, 24, 200), F32)  # a float32 cotangent for the logits

    def loss(matmul):
        return lambda a, b: (matmul(spec, a, b) * w).sum()

    with kernels.target_backend("gpu"):
        jaxpr = jax.make_jaxpr(jax.value_and_grad(loss(matmul_f32), argnums=(0, 1)))(a, b)
    dots = [e for e in jaxpr_eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
    assert len(dots) == 3, dots
    assert all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)
    assert jaxpr.out_avals[0].dtype == F32
    grads = jax.grad(loss(_matmul_16bit), argnums=(0, 1))(a, b)
    assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.bfloat16]
    widened = jax.grad(loss(lambda s, a, b: jnp.einsum(s, a.astype(F32), b.astype(F32))),
                       argnums=(0, 1))(a, b)
    for got, expected in zip(grads, widened):
        assert_close(got, expected, "bfloat16")
