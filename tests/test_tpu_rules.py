"""TPU rules that libtpu would enforce and an export from CPU does not (../shared/JAX_NOTES.md):
every kernel's default tiles fit the VMEM budget of every generation we claim, at PaLM-8B and
PaLM-540B widths, in float32 and bfloat16; every pallas_call asks for its VMEM with
`vmem_limit_bytes`, visible in the exported module.
"""

from __future__ import annotations

import re

import jax
import jax.extend
import jax.numpy as jnp
import pytest

import kernels
from kernels import _tpu
from kernels.block_out import tpu as block_out_tpu
from kernels.mq_decode_attention import tpu as decode_tpu
from kernels.mq_flash_attention import tpu as flash_tpu
from kernels.norm_qkv_rope import tpu as nqr_tpu
from kernels.norm_swiglu import tpu as swiglu_tpu
from kernels.rope import tpu as rope_tpu
from tpu_export import TPU_GENERATIONS, export_for_tpu, mosaic_kernel_names, targeting

MiB = 2**20
T, B = 2048, 1
PALM = {
    "8b": dict(d=4096, h=16, k=256, f=16384),
    "540b": dict(d=18432, h=48, k=256, f=73728),
}
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}


def _estimates(name: str, p: dict, dtype, gen: str) -> dict[str, int]:
    """VMEM estimate of each kernel (forward and every backward kernel) at the default tiles."""
    d, h, k, f, m = p["d"], p["h"], p["k"], p["f"], B * T
    if name == "rope":
        out = {}
        for shape in ((B, T, h, k), (B, T, k)):
            blocks = rope_tpu.BlockSizes.get_default(shape, dtype, gen)
            out[f"{len(shape)}d"] = rope_tpu.vmem_bytes(shape, dtype, blocks)
        return out
    if name == "norm_qkv_rope":
        x_shape, wq_shape = (B, T, d), (d, h, k)
        blocks = nqr_tpu.BlockSizes.get_default(x_shape, wq_shape, dtype, gen)
        used = nqr_tpu.vmem_bytes(x_shape, wq_shape, dtype, blocks)
        return {n: used[n] for n in ("forward", "bwd_dx", "bwd_dw")}
    if name == "norm_swiglu":  # both modes: recomputing gate and up, and saving them
        out = {}
        for save in (False, True):
            blocks = swiglu_tpu.BlockSizes.get_default(m, d, f, dtype, gen, save_gate_up=save)
            used = swiglu_tpu.vmem_bytes(blocks, dtype, save_gate_up=save)
            out.update({f"{n} save_gate_up={save}": v for n, v in used.items()})
        return out
    if name == "block_out":
        blocks = block_out_tpu.BlockSizes.get_default(m, d, h * k, f, dtype, gen)
        return block_out_tpu.vmem_bytes(blocks, dtype)
    if name == "mq_flash_attention":
        blocks = flash_tpu.BlockSizes.get_default(q_len=T, kv_len=T, num_heads=h, head_dim=k,
                                                  dtype=dtype, generation=gen)
        return flash_tpu.vmem_bytes(blocks, k, dtype)
    if name == "mq_decode_attention":
        blocks = decode_tpu.BlockSizes.get_default(T, h, k, dtype=dtype, batch=B, generation=gen)
        return {"fwd": decode_tpu.vmem_bytes(blocks, h, k, dtype)}
    raise AssertionError(name)


KERNEL_NAMES = ("rope", "norm_qkv_rope", "norm_swiglu", "block_out", "mq_flash_attention",
                "mq_decode_attention")


def test_vmem_table_matches_jax_tpu_info():
    from jax._src.pallas.mosaic import tpu_info
    for kind, capacity in _tpu.VMEM_CAPACITY.items():
        chip = tpu_info.chip_version_from_device_kind(kind)
        assert tpu_info.get_tpu_info_for_chip(chip, 1).vmem_capacity_bytes == capacity, kind
    assert _tpu.vmem_budget("TPU v4") == 12 * MiB
    assert _tpu.vmem_budget("TPU v5") == _tpu.vmem_budget("TPU v5p") == 48 * MiB
    assert _tpu.vmem_budget("TPU v5 lite") == _tpu.vmem_budget("TPU v6 lite") == 96 * MiB


def test_target_generation_from_abstract_mesh_else_smallest():
    assert _tpu.target_generation() == _tpu.SMALLEST_GENERATION == "TPU v4"  # CPU, no mesh
    for gen in TPU_GENERATIONS:
        with targeting(gen):
            assert _tpu.target_generation() == gen
            assert _tpu.vmem_budget() == _tpu.vmem_budget(gen)


def test_vmem_limit_between_scoped_default_and_capacity():
    assert _tpu.vmem_limit(1 * MiB, "TPU v4") == 16 * MiB
    assert _tpu.vmem_limit(11 * MiB, "TPU v5p") == (11 + 16) * MiB  # + a quarter of 64 MiB
    assert _tpu.vmem_limit(200 * MiB, "TPU v6 lite") == 128 * MiB


@pytest.mark.parametrize("gen", TPU_GENERATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model", PALM)
@pytest.mark.parametrize("name", KERNEL_NAMES)
def test_default_tiles_fit_vmem_budget(name, model, dtype, gen):
    budget = _tpu.vmem_budget(gen)
    for kernel, size in _estimates(name, PALM[model], DTYPES[dtype], gen).items():
        assert size <= budget, f"{name} {kernel} {model} {dtype} on {gen}: {size / MiB:.2f} MiB"


def test_norm_swiglu_gate_backward_counts_temporaries():
    # The figure: at PaLM-8B f32 with 512 tiles the gate backward needs ~15 MiB of
    # blocks plus ~4 MiB of float32 temporaries, over v4's capacity; the default shrinks.
    big = swiglu_tpu.BlockSizes()
    assert swiglu_tpu.vmem_bytes(big, jnp.float32)["bwd_gates"] >= 19 * MiB
    small = swiglu_tpu.BlockSizes.get_default(T, 4096, 16384, jnp.float32, "TPU v4")
    assert small != swiglu_tpu.BlockSizes.get_default(T, 4096, 16384, jnp.float32, "TPU v6 lite")


# ---- vmem_limit_bytes in the exported module --------------------------------------------------

def _sds(shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype)


def _grad(fn, n):
    """jit-able: sum(fn) and its gradient in the first n arguments (the value keeps the
    forward kernel in the module)."""
    def run(*args):
        def loss(*diff):
            out = fn(*diff, *args[n:])
            return sum(jnp.sum(o.astype(jnp.float32)) for o in jax.tree.leaves(out))
        return jax.value_and_grad(loss, argnums=tuple(range(n)))(*args[:n])
    return run


# Small shapes, lane-aligned (K = 128): the module text only has to show the settings.
EXPORTS = {
    "rope": (_grad(lambda x, p: kernels.rope(x, p, impl="pallas_tpu", interpret=False), 1),
             (_sds((1, 64, 8, 128)), _sds((1, 64), jnp.int32)), 2),
    "norm_qkv_rope": (_grad(lambda x, s, wq, wk, wv, p: kernels.norm_qkv_rope(
        x, s, wq, wk, wv, p, eps=1e-6, impl="pallas_tpu", interpret=False), 5),
        (_sds((1, 64, 256)), _sds((256,), jnp.float32), _sds((256, 2, 128)), _sds((256, 128)),
         _sds((256, 128)), _sds((1, 64), jnp.int32)), 3),
    "norm_swiglu": (_grad(lambda x, s, wg, wu: kernels.norm_swiglu(
        x, s, wg, wu, eps=1e-6, impl="pallas_tpu", interpret=False), 4),
        (_sds((1, 64, 256)), _sds((256,), jnp.float32), _sds((256, 512)), _sds((256, 512))), 4),
    "block_out": (_grad(lambda x, o, wo, h, wd: kernels.block_out(
        x, o, wo, h, wd, impl="pallas_tpu", interpret=False), 5),
        (_sds((1, 64, 256)), _sds((1, 64, 2, 128)), _sds((2, 128, 256)), _sds((1, 64, 512)),
         _sds((512, 256))), 2),
    "mq_flash_attention": (_grad(lambda q, k, v: kernels.mq_flash_attention(
        q, k, v, causal=True, impl="pallas_tpu", interpret=False), 3),
        (_sds((1, 128, 2, 128)), _sds((1, 128, 128)), _sds((1, 128, 128))), 3),
    "mq_decode_attention": (lambda q, k, v, n: kernels.mq_decode_attention(
        q, k, v, n, impl="pallas_tpu", interpret=False),
        (_sds((2, 8, 128)), _sds((2, 256, 128)), _sds((2, 256, 128)), _sds((2,), jnp.int32)), 1),
}


@pytest.mark.parametrize("name", EXPORTS)
def test_export_sets_vmem_limit(name):
    fn, args, n_calls = EXPORTS[name]
    for gen in ("TPU v4", "TPU v6 lite"):
        text = export_for_tpu(fn, *args, device_kind=gen)
        assert len(mosaic_kernel_names(text)) == n_calls, mosaic_kernel_names(text)
        # backend config: "scoped_memory_configs": [{"memory_space":1, "offset": 0, "size": N}]
        sizes = [int(v) for v in re.findall(r"scoped_memory_configs[^}]*?size\\22: (\d+)", text)]
        assert len(sizes) == n_calls, (name, gen, sizes)
        assert all(16 * MiB <= v <= _tpu.vmem_capacity(gen) for v in sizes), (name, gen, sizes)


# ---- block shapes ------------------------------------------------------------------------------

@pytest.mark.parametrize("block, shape, dtype", [
    ((8, 128), (64, 256), jnp.float32),
    ((16, 128), (64, 256), jnp.bfloat16),
    ((64, 256), (64, 256), jnp.bfloat16),  # whole dimensions
    ((None, 8, 3, 16), (2, 40, 3, 16), jnp.bfloat16),  # leading axes free; last two whole
    ((1, 5, 384), (2, 5, 384), jnp.int32),
    ((None, 16, 1), (1, 64, 1), jnp.int32),
])
def test_check_block_shape_legal(block, shape, dtype):
    _tpu.check_block_shape(block, shape, dtype, "k x")


@pytest.mark.parametrize("block, shape, dtype, match", [
    ((8, 128), (64, 256), jnp.bfloat16, "multiple of 16"),  # bf16 packs 16 rows per tile
    ((8, 64), (64, 256), jnp.float32, "multiple of 128"),
    ((4, 128), (64, 256), jnp.float32, "multiple of 8"),
    ((None, 8, 128), (2, 64, 256), jnp.bfloat16, "dimension 1 is 8"),
    ((8,), (64, 2), jnp.float32, "rank"),
])
def test_check_block_shape_illegal(block, shape, dtype, match):
    with pytest.raises(ValueError, match=match) as info:
        _tpu.check_block_shape(block, shape, dtype, "palm_kernel x")
    assert "palm_kernel x" in str(info.value)


def _export(fn, *args):
    return export_for_tpu(fn, *args, device_kind="TPU v4")


def test_bf16_row_tiles_of_8_refused_natively():
    """Tiles legal for float32 but not for bf16 (8 rows) fail at trace time, naming the kernel;
    the same tiles run in interpret mode."""
    x3 = _sds((1, 64, 128))
    pos = _sds((1, 64), jnp.int32)
    rope_blocks = kernels.rope.BlockSizes(8, 1, 8, 1)
    with pytest.raises(ValueError, match="palm_rope_fwd input 2.*multiple of 16"):
        _export(lambda x, p: kernels.rope(x, p, impl="pallas_tpu", interpret=False,
                                          block_sizes=rope_blocks), x3, pos)
    _export(lambda x, p: kernels.rope(x, p, impl="pallas_tpu", interpret=False,
                                      block_sizes=kernels.rope.BlockSizes(16, 1, 16, 1)), x3, pos)

    nqr_blocks = kernels.norm_qkv_rope.BlockSizes(8, 1, 128, 8, 1, 128)
    nqr_args = (_sds((1, 64, 256)), _sds((256,), jnp.float32), _sds((256, 2, 128)),
                _sds((256, 128)), _sds((256, 128)), pos)
    with pytest.raises(ValueError, match="palm_norm_qkv_rope.*multiple of 16"):
        _export(lambda *a: kernels.norm_qkv_rope(*a, eps=1e-6, impl="pallas_tpu",
                                                 interpret=False, block_sizes=nqr_blocks),
                *nqr_args)

    dec_args = (_sds((1, 8, 128)), _sds((1, 64, 128)), _sds((1, 64, 128)), _sds((1,), jnp.int32))
    with pytest.raises(ValueError, match="palm_mq_decode_fwd input 1.*multiple of 16"):
        _export(lambda q, k, v, n: kernels.mq_decode_attention(
            q, k, v, n, impl="pallas_tpu", interpret=False,
            block_sizes=kernels.mq_decode_attention.BlockSizes(8)), *dec_args)

    import numpy as np
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 64, 128)), jnp.bfloat16)
    p = jnp.arange(64, dtype=jnp.int32)[None]
    got = kernels.rope(x, p, impl="pallas_tpu", interpret=True, block_sizes=rope_blocks)
    want = kernels.rope(x, p, impl="xla")
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=2e-2, atol=2e-2)


# ---- lanes: head dims under 128 ----------------------------------------------------------------

def test_small_head_dim_natively():
    """K = 64 (the demo preset): rope and norm_qkv_rope refuse natively with a clear error (a
    roll over 64 lanes and per-head lane slices are no legal Mosaic layout) and still run
    interpreted; mq_decode_attention pads K to 128 lanes natively and exports."""
    pos = _sds((1, 64), jnp.int32)
    with pytest.raises(ValueError, match="rope: head dim K=64 must be a multiple of 128"):
        _export(lambda x, p: kernels.rope(x, p, impl="pallas_tpu", interpret=False),
                _sds((1, 64, 4, 64)), pos)
    nqr_args = (_sds((1, 64, 256)), _sds((256,), jnp.float32), _sds((256, 4, 64)),
                _sds((256, 64)), _sds((256, 64)), pos)
    with pytest.raises(ValueError, match="norm_qkv_rope: head dim K=64 must be a multiple"):
        _export(lambda *a: kernels.norm_qkv_rope(*a, eps=1e-6, impl="pallas_tpu",
                                                 interpret=False), *nqr_args)
    text = _export(lambda q, k, v, n: kernels.mq_decode_attention(
        q, k, v, n, impl="pallas_tpu", interpret=False),
        _sds((1, 8, 64)), _sds((1, 256, 64)), _sds((1, 256, 64)), _sds((1,), jnp.int32))
    assert mosaic_kernel_names(text) == ["palm_mq_decode_fwd"]
    assert "tensor<1x256x128xbf16>" in text  # the padded cache reaches the kernel

    import numpy as np
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(1, 24, 4, 64)), jnp.float32)
    p = jnp.arange(24, dtype=jnp.int32)[None]
    np.testing.assert_allclose(kernels.rope(x, p, impl="pallas_tpu", interpret=True),
                               kernels.rope(x, p, impl="xla"), rtol=1e-5, atol=1e-5)


def test_decode_padded_head_dim_matches_reference():
    """The native path's padding, run through the interpreter: same result as unpadded."""
    import numpy as np
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.normal(size=(2, 4, 64)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 40, 64)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(2, 40, 64)), jnp.float32)
    n = jnp.asarray([40, 17], jnp.int32)
    kp = [jnp.pad(a, ((0, 0), (0, 0), (0, 64))) for a in (q, k, v)]
    padded = kernels.mq_decode_attention(*kp, n, sm_scale=64 ** -0.5, impl="pallas_tpu",
                                         interpret=True)[..., :64]
    want = kernels.mq_decode_attention(q, k, v, n, impl="xla")
    np.testing.assert_allclose(padded, want, rtol=1e-5, atol=1e-5)


# ---- megacore: the tile axis first -------------------------------------------------------------

def _pallas_grids(fn, *args):
    """(name, grid, dimension_semantics) of every pallas_call in fn's jaxpr at args."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                params = eqn.params
                semantics = params["compiler_params"].dimension_semantics
                found.append((params["name"], params["grid_mapping"].grid,
                              tuple(str(s) for s in semantics)))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def _tiles(module, *sizes):
    return {"block_sizes": getattr(kernels, module).BlockSizes(*sizes)}


# Batch 1 and tiles small enough for two or more steps on every kernel's first grid axis.
GRID_CASES = {
    "rope": (lambda x, p: kernels.rope(x, p, impl="pallas_tpu", interpret=False,
                                       **_tiles("rope", 16, 8, 16, 8)),
             (_sds((1, 64, 8, 128)), _sds((1, 64), jnp.int32)), 1),
    "norm_qkv_rope": (_grad(lambda *a: kernels.norm_qkv_rope(
        *a, eps=1e-6, impl="pallas_tpu", interpret=False,
        **_tiles("norm_qkv_rope", 16, 1, 128, 16, 1, 128)), 5), EXPORTS["norm_qkv_rope"][1], 3),
    "norm_swiglu": (_grad(lambda *a: kernels.norm_swiglu(
        *a, eps=1e-6, impl="pallas_tpu", interpret=False,
        **_tiles("norm_swiglu", 16, 128, 128, 16, 128, 128)), 4), EXPORTS["norm_swiglu"][1], 4),
    "block_out": (_grad(lambda *a: kernels.block_out(
        *a, impl="pallas_tpu", interpret=False,
        **_tiles("block_out", 16, 128, 128, 16, 128, 128)), 5), EXPORTS["block_out"][1], 2),
    "mq_flash_attention": (_grad(lambda q, k, v: kernels.mq_flash_attention(
        q, k, v, causal=True, impl="pallas_tpu", interpret=False,
        **_tiles("mq_flash_attention", 128, 128, 128, 128, 128, 128)), 3),
        (_sds((1, 128, 2, 128)), _sds((1, 256, 128)), _sds((1, 256, 128))), 3),
    "mq_decode_attention": (lambda q, k, v, n: kernels.mq_decode_attention(
        q, k, v, n, impl="pallas_tpu", interpret=False,
        **_tiles("mq_decode_attention", 128, 2)),
        (_sds((1, 8, 128)), _sds((1, 256, 128)), _sds((1, 256, 128)), _sds((1,), jnp.int32)), 1),
}


@pytest.mark.parametrize("name", GRID_CASES)
def test_batch_one_grids_lead_with_a_split_axis(name):
    """At batch 1 (one sequence per chip) the first grid axis is parallel and has several
    steps, so a two-core chip shares the work whichever parallel axis Mosaic divides."""
    fn, args, n_calls = GRID_CASES[name]
    grids = _pallas_grids(fn, *args)
    assert len(grids) == n_calls, grids
    for kernel, grid, semantics in grids:
        assert "parallel" in semantics[0].lower() and grid[0] > 1, (kernel, grid, semantics)
