"""kernels.rope: the Pallas TPU kernel (TPU interpret mode) and the Pallas GPU (Triton) kernel
(generic interpret mode) against rope_reference; both exported for their hardware from CPU.

Each hypothesis example compiles one program (XLA's cheap settings, `run`) holding the
kernel's forward through jax.vjp, its backward and the reference: compiling dominates
interpret-mode cost, so the plain forward (the custom_vjp's primal path) is checked once, in
the two-core test. Shapes are drawn small (T <= 24, up to three row tiles; K <= 32) so that
race-detection cases, which pay per grid step, stay cheap.
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
from gpu_export import export_for_gpu, triton_kernel_names, unmasked_accesses
from kernels.rope import BlockSizes, rope, rope_reference, vmem_bytes
from kernels.rope import gpu as rope_gpu
from tpu_export import TPU_GENERATIONS, export_for_tpu, mosaic_kernel_names

# PaLM-8B and PaLM-540B per-chip shapes: queries [B, T, H, K] and the shared key head [B, T, K].
PALM_SHAPES = {
    "8b_q": (1, 2048, 16, 256),
    "8b_k": (1, 2048, 256),
    "540b_q": (1, 2048, 48, 256),
    "540b_k": (1, 2048, 256),
}


@st.composite
def rope_cases(draw):
    b = draw(st.integers(1, 2))
    t = draw(st.integers(1, 24))
    k = 2 * draw(st.integers(1, 16))  # every even K from 2 to 32
    four_d = draw(st.booleans())
    shape = (b, t, draw(st.integers(1, 3)), k) if four_d else (b, t, k)
    impl = draw(st.sampled_from(["pallas_tpu", "pallas_gpu"]))
    # Up to three row tiles and two head blocks, mostly ragged: T and H rarely divide them.
    # GPU tiles are powers of two over the B*T rows (up to 48): 4 to 16 rows.
    if impl == "pallas_tpu":
        blocks = BlockSizes(
            block_t=draw(st.sampled_from([8, 16])), block_h=draw(st.integers(1, 2)),
            block_t_bwd=draw(st.sampled_from([8, 16])), block_h_bwd=draw(st.integers(1, 2)))
    else:
        blocks = rope_gpu.BlockSizes(
            block_t=draw(st.sampled_from([4, 8, 16])), block_h=draw(st.sampled_from([1, 2])),
            block_t_bwd=draw(st.sampled_from([4, 8, 16])),
            block_h_bwd=draw(st.sampled_from([1, 2])))
    return dict(
        shape=shape,
        dtype=draw(st.sampled_from([jnp.float32, jnp.bfloat16])),
        impl=impl,
        blocks=draw(st.sampled_from([None, blocks, blocks])),  # mostly several grid steps
        max_pos=draw(st.sampled_from([8, 2048, 40000])),
        base=draw(st.sampled_from([10000.0, 500.0])),
        # race detection (TPU interpret mode only) for a third of the TPU cases
        races=impl == "pallas_tpu" and draw(st.sampled_from([False, False, True])),
        seed=draw(st.integers(0, 2**16)),
    )


def _palm_head_dim(dtype, shape, impl="pallas_tpu", blocks=None):
    """PaLM's K = 256 (hypothesis draws K <= 32): two lane tiles, small T."""
    return dict(shape=shape, dtype=dtype, impl=impl, blocks=blocks, max_pos=2048, base=10000.0,
                races=False, seed=256)


@example(_palm_head_dim(jnp.float32, (1, 12, 3, 256)))
@example(_palm_head_dim(jnp.bfloat16, (2, 9, 256)))
@example(_palm_head_dim(jnp.float32, (1, 12, 3, 256), "pallas_gpu",
                        rope_gpu.BlockSizes(8, 2, 4, 1)))  # ragged rows and heads
@example(_palm_head_dim(jnp.bfloat16, (2, 9, 256), "pallas_gpu"))
@example(_palm_head_dim(jnp.float32, (2, 5, 3, 6), "pallas_gpu",
                        rope_gpu.BlockSizes(4, 2, 8, 4)))  # K/2 = 3: padded, masked halves
@given(rope_cases())
def test_rope_matches_reference(case):
    shape, dtype = case["shape"], case["dtype"]
    rng = np.random.default_rng(case["seed"])  # numpy: eager jax.random compiles per shape
    x = jnp.asarray(rng.normal(size=shape), dtype)
    positions = jnp.asarray(rng.integers(0, case["max_pos"], size=shape[:2]), jnp.int32)
    cotangent = jnp.asarray(rng.normal(size=shape), dtype)
    interpret = pltpu.InterpretParams(detect_races=True) if case["races"] else True
    base = case["base"]

    def kernel(x):
        return rope(x, positions, base=base, impl=case["impl"], interpret=interpret,
                    block_sizes=case["blocks"])

    def weighted(x, g):  # the reference's gradient target: a cotangent-weighted sum
        out = rope_reference(x, positions, base=base)
        return jnp.sum(out.astype(jnp.float32) * g.astype(jnp.float32))

    def both(x, g):  # one compile for kernel and reference: compiling dominates the test's time
        out, vjp = jax.vjp(kernel, x)
        return out, vjp(g)[0], rope_reference(x, positions, base=base), jax.grad(weighted)(x, g)

    with race_log(case["races"]):  # the forward and backward kernels both checked
        out, dx, expected, expected_dx = run(both, x, cotangent)
    assert out.dtype == dtype and dx.dtype == dtype
    assert_close(out, expected, dtype, what="forward through vjp")
    assert_close(dx, expected_dx, dtype, what="dx")


def test_two_cores_without_races():
    """The plain forward (custom_vjp primal path) and the backward kernel (jax.grad) with the
    "parallel" grid axes split over two simulated TensorCores, batch 1 so the row tiles carry
    the split: the cos/sin scratch must not leak between cores or head blocks."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(1, 17, 5, 16)), jnp.bfloat16)
    g = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    positions = jnp.arange(17, dtype=jnp.int32)[None] * 97
    blocks = BlockSizes(block_t=8, block_h=2, block_t_bwd=8, block_h_bwd=2)
    interpret = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)

    def loss(fn):
        return jax.grad(lambda x: jnp.sum(fn(x).astype(jnp.float32) * g))

    kernel = lambda x: rope(x, positions, impl="pallas_tpu", block_sizes=blocks,  # noqa: E731
                            interpret=interpret)
    reference = lambda x: rope_reference(x, positions)  # noqa: E731

    def both(x):  # one compile
        return kernel(x), loss(kernel)(x), reference(x), loss(reference)(x)

    with RaceLog() as log:
        out, dx, expected, expected_dx = run(both, x)
    assert log.kernels_checked == 3  # forward, again inside grad, backward
    assert_close(out, expected, jnp.bfloat16, what="forward")
    assert_close(dx, expected_dx, jnp.bfloat16, what="dx")


def test_block_sizes_default_and_validation():
    q8 = BlockSizes.get_default(PALM_SHAPES["8b_q"], jnp.bfloat16)
    assert (q8.block_t, q8.block_h) == (128, 16)
    q540 = BlockSizes.get_default(PALM_SHAPES["540b_q"], jnp.bfloat16)
    assert (q540.block_t, q540.block_h) == (32, 48)
    assert BlockSizes.get_default((3, 1, 5, 4), jnp.float32).block_t == 8  # T=1 (decoding)
    hash(q8)  # static argument
    for name, shape in PALM_SHAPES.items():
        blocks = BlockSizes.get_default(shape, jnp.bfloat16)
        assert vmem_bytes(shape, jnp.bfloat16, blocks) <= 16 * 2**20, name
    with pytest.raises(ValueError, match="multiple of 8"):
        BlockSizes(block_t=12, block_h=1, block_t_bwd=8, block_h_bwd=1)
    with pytest.raises(ValueError, match="positive int"):
        BlockSizes(block_t=8, block_h=0, block_t_bwd=8, block_h_bwd=1)
    with pytest.raises(ValueError, match="positive int"):
        BlockSizes(block_t=8, block_h=True, block_t_bwd=8, block_h_bwd=1)


def test_bad_inputs_raise():
    x = jnp.zeros((1, 8, 2, 6), jnp.float32)
    pos = jnp.zeros((1, 8), jnp.int32)
    call = lambda x, p, **kw: rope(x, p, impl="pallas_tpu", interpret=True, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="even"):
        call(jnp.zeros((1, 8, 2, 5)), pos)
    with pytest.raises(ValueError, match="positions"):
        call(x, jnp.zeros((1, 7), jnp.int32))
    with pytest.raises(ValueError, match="integers"):
        call(x, pos.astype(jnp.float32))
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        call(x.astype(jnp.float16), pos)
    with pytest.raises(ValueError, match=r"\[B, T, H, K\]"):
        call(jnp.zeros((8, 6)), pos)
    with pytest.raises(ValueError, match="rope.tpu.BlockSizes"):
        call(x, pos, block_sizes=(8, 8, 8, 8))
    # Native lowering needs whole (8, 128) tiles: 3 of 16 heads is not one.
    bad = BlockSizes(block_t=8, block_h=3, block_t_bwd=8, block_h_bwd=3)
    with pytest.raises(ValueError, match="block_h=3"):
        rope(jnp.zeros((1, 8, 16, 128)), pos, impl="pallas_tpu", interpret=False, block_sizes=bad)


def _export(shape, *, grad: bool, device_kind: str = "TPU v5p") -> list[str]:
    x = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    positions = jax.ShapeDtypeStruct(shape[:2], jnp.int32)

    def forward(x, positions):
        return rope(x, positions, impl="pallas_tpu", interpret=False)

    def gradient(x, positions):  # a square, so the backward needs the forward's output
        return jax.grad(lambda x: jnp.sum(jnp.square(forward(x, positions).astype(jnp.float32))))(x)

    return mosaic_kernel_names(
        export_for_tpu(gradient if grad else forward, x, positions, device_kind=device_kind))


@pytest.mark.parametrize("name", sorted(PALM_SHAPES))
def test_exports_for_tpu_at_palm_shapes(name):
    shape = PALM_SHAPES[name]
    assert _export(shape, grad=False) == ["palm_rope_fwd"]
    assert sorted(_export(shape, grad=True)) == ["palm_rope_bwd", "palm_rope_fwd"]


@pytest.mark.parametrize("device_kind", TPU_GENERATIONS)
def test_exports_for_every_tpu_generation(device_kind):
    assert _export(PALM_SHAPES["8b_q"], grad=False, device_kind=device_kind) == ["palm_rope_fwd"]


def test_head_dim_128_exports():
    """K = 128: the rotate-half roll by 64 lanes stays inside one vector register."""
    assert sorted(_export((1, 2048, 32, 128), grad=True)) == ["palm_rope_bwd", "palm_rope_fwd"]


def test_decode_shape_exports():
    """T = 1 (one new token per sequence) lowers natively: the block then covers all of T."""
    assert _export((8, 1, 16, 256), grad=False) == ["palm_rope_fwd"]
    np.testing.assert_equal(BlockSizes.get_default((8, 1, 16, 256), jnp.bfloat16).block_t, 8)


def test_gpu_exports_for_cuda_at_palm_8b():
    """The Triton kernels lower for an H100 (forward and the vjp's backward), q and k heads."""
    for shape in (PALM_SHAPES["8b_q"], PALM_SHAPES["8b_k"]):
        x = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
        positions = jax.ShapeDtypeStruct(shape[:2], jnp.int32)

        def forward_and_vjp(x, positions):
            out, vjp = jax.vjp(lambda x: rope(x, positions, impl="pallas_gpu"), x)
            return out, vjp(out)[0]

        names = triton_kernel_names(export_for_gpu(forward_and_vjp, x, positions))
        assert names == ["palm_rope_fwd", "palm_rope_bwd"], shape


def test_gpu_block_sizes_default_and_validation():
    q8 = rope_gpu.BlockSizes.get_default(PALM_SHAPES["8b_q"], jnp.bfloat16)
    assert (q8.block_t, q8.block_h) == (2, 16)
    assert rope_gpu.BlockSizes.get_default(PALM_SHAPES["8b_k"], jnp.bfloat16).block_t == 32
    for shape in PALM_SHAPES.values():
        blocks = rope_gpu.BlockSizes.get_default(shape, jnp.bfloat16)
        assert rope_gpu.shared_memory_bytes(shape, jnp.bfloat16, blocks) <= 227 * 1024
    hash(q8)  # static argument
    with pytest.raises(ValueError, match="power of two"):
        rope_gpu.BlockSizes(block_t=12, block_h=1, block_t_bwd=8, block_h_bwd=1)
    with pytest.raises(ValueError, match="positive int"):
        rope_gpu.BlockSizes(block_t=8, block_h=0, block_t_bwd=8, block_h_bwd=1)
    x = jnp.zeros((1, 8, 2, 6), jnp.float32)
    pos = jnp.zeros((1, 8), jnp.int32)
    with pytest.raises(ValueError, match="gpu.BlockSizes"):  # a TPU tiling for the GPU kernel
        rope(x, pos, impl="pallas_gpu", interpret=True,
             block_sizes=BlockSizes(block_t=8, block_h=1, block_t_bwd=8, block_h_bwd=1))
    with pytest.raises(ValueError, match="interpret"):
        rope(x, pos, impl="pallas_gpu", interpret=pltpu.InterpretParams())


def test_gpu_kernels_mask_every_access():
    """Ragged rows, heads and K/2 = 3 (halves padded to 4 lanes): every access of the x and
    out blocks is masked; only the frequency row (a whole [Kh] array) is read plainly."""
    x = jnp.zeros((1, 5, 3, 6), jnp.bfloat16)
    positions = jnp.zeros((1, 5), jnp.int32)

    def forward_and_vjp(x):
        out, vjp = jax.vjp(lambda x: rope(x, positions, impl="pallas_gpu", interpret=False), x)
        return out, vjp(out)

    plain = ["get Ref<default>{float32[4]}"]
    assert unmasked_accesses(forward_and_vjp, x) == {"palm_rope_fwd": plain,
                                                        "palm_rope_bwd": plain}
