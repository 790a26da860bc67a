"""The model on Pallas kernels: `palm.forward(impl="pallas_tpu" | "pallas_gpu" |
"pallas_mosaic_gpu")` against `impl="xla"`, the whole PaLM layer lowered for real TPUs (Mosaic)
and NVIDIA GPUs (Triton, and Mosaic GPU attention) at
PaLM-8B and PaLM-540B shapes, and a PaLM-8B layer's loss and gradient under shard_map on a 4x2
TPU mesh."""

from __future__ import annotations

import dataclasses
import functools

import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

import palm
from conftest import assert_close, needs_mosaic_interpreter
from kernels import target_backend
from palm.model import _block, loss
from gpu_export import export_for_gpu, mosaic_gpu_kernel_count, triton_kernel_names
from tpu_export import export_for_tpu, mosaic_kernel_names

# Small but not toy: two layers, several heads, T not a multiple of any block size.
CONFIG = dataclasses.replace(palm.preset("tiny"), d_model=128, n_heads=2, head_dim=64, d_ff=256)


@pytest.fixture(scope="module")
def params():
    return palm.init(CONFIG, jax.random.key(0))


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_forward_pallas_equals_xla(params, dtype, impl):
    config = dataclasses.replace(CONFIG, dtype=dtype)
    tokens = jax.random.randint(jax.random.key(1), (2, 37), 0, config.vocab_size, dtype=jnp.int32)
    pallas = palm.forward(params, tokens, config, impl=impl)
    xla = palm.forward(params, tokens, config, impl="xla")
    # Logits sit after L layers, each of which rounds its outputs in `dtype`.
    assert_close(pallas, xla, dtype, factor=5, what=f"logits {dtype}")


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_loss_gradients_pallas_equal_xla(params, impl):
    tokens = jax.random.randint(jax.random.key(2), (2, 30), 0, CONFIG.vocab_size, dtype=jnp.int32)
    grad = lambda impl: jax.jit(jax.grad(lambda p: palm.loss(p, tokens, CONFIG, impl=impl)[0]))(params)  # noqa: E731
    g_pallas, g_xla = grad(impl), grad("xla")
    for path, a in jax.tree_util.tree_flatten_with_path(g_pallas)[0]:
        b = functools.reduce(lambda t, k: t[k.key], path, g_xla)
        # A gradient sums over every position and layer: allow more reordering than one op.
        assert_close(a, b, "float32", factor=20, what=jax.tree_util.keystr(path))


def test_remat_with_interpreted_kernels_says_why(params):
    config = dataclasses.replace(CONFIG, remat="full")
    with pytest.raises(ValueError, match="remat='full' needs natively compiled kernels"):
        palm.loss(params, jnp.zeros((1, 9), jnp.int32), config, impl="pallas_tpu")


LAYER_SHAPES = {"8b": palm.preset("8b"), "540b": palm.preset("540b")}
KERNELS = ("palm_norm_qkv_rope", "palm_mq_flash_attention", "palm_norm_swiglu", "palm_block_out")


def _layer_structs(config: palm.Config, batch: int = 1, seq: int = 2048):
    shapes = {k: s[1:] for k, s in palm.param_shapes(config)["blocks"].items()}  # one layer
    p = {k: jax.ShapeDtypeStruct(s, jnp.bfloat16) for k, s in shapes.items()}
    x = jax.ShapeDtypeStruct((batch, seq, config.d_model), jnp.bfloat16)
    return p, x


# impl: (export, kernel names in the exported module, the target backend).
NATIVE = {"pallas_tpu": (export_for_tpu, mosaic_kernel_names, "tpu"),
          "pallas_gpu": (export_for_gpu, triton_kernel_names, "gpu")}


@pytest.mark.parametrize("impl", sorted(NATIVE))
@pytest.mark.parametrize("name", sorted(LAYER_SHAPES))
def test_layer_lowers_natively(name, impl):
    config = dataclasses.replace(LAYER_SHAPES[name], dtype="bfloat16")
    p, x = _layer_structs(config)
    export, kernel_names, backend = NATIVE[impl]

    def layer(p, x):
        positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
        return _block(x, p, positions, config, impl)

    def layer_grad(p, x):
        return jax.grad(lambda p, x: layer(p, x).astype(jnp.float32).sum(), argnums=(0, 1))(p, x)

    with target_backend(backend):
        forward = kernel_names(export(layer, p, x))
        backward = kernel_names(export(layer_grad, p, x))
    for kernel in KERNELS:
        assert any(n.startswith(kernel) for n in forward), (kernel, forward)
    # The backward runs the forward kernels again (residuals) and the Pallas backward kernels.
    assert any("bwd" in n for n in backward), backward


def test_sharded_layer_lowers_for_tpu_on_a_4x2_mesh():
    """One PaLM-8B layer (D 4096, H 16, K 256, F 16384, V 256,000), its loss and gradient under
    shard_map on an abstract 4x2 ("data", "model") mesh of TPU v5p chips, exported for TPU:
    the Pallas kernels lower natively at their local shapes (8 heads, 8192 MLP columns and one
    sequence of 2048 per chip), and the module holds the layout's collectives (the FSDP
    all-gathers, the psums over "model", and in the gradient the reduce-scatters)."""
    config = dataclasses.replace(palm.preset("8b"), n_layers=1, dtype="bfloat16")
    device = AbstractDevice(device_kind="TPU v5p", num_cores=1, platform="tpu")
    mesh = AbstractMesh((4, 2), ("data", "model"), (AxisType.Auto,) * 2, abstract_device=device)
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), palm.param_shapes(config),
                          is_leaf=lambda s: isinstance(s, tuple))
    tokens = jax.ShapeDtypeStruct((4, 2049), jnp.int32)  # B = 4 over data = 4, T = 2048

    def value(p, t):
        return loss(p, t, config, impl="pallas_tpu", mesh=mesh)[0]

    modules = {}
    for name, fn in [("loss", value), ("gradient", jax.grad(value))]:
        with target_backend("tpu"), jax.sharding.use_abstract_mesh(mesh):
            modules[name] = jax.export.export(jax.jit(fn), platforms=["tpu"])(params, tokens).mlir_module()
    collectives = {name: set(re.findall(r"stablehlo\.(all_gather|all_reduce|reduce_scatter)", text))
                   for name, text in modules.items()}
    assert collectives == {"loss": {"all_gather", "all_reduce"},
                           "gradient": {"all_gather", "all_reduce", "reduce_scatter"}}
    forward, gradient = (mosaic_kernel_names(modules[n]) for n in ("loss", "gradient"))
    for kernel in KERNELS:
        assert any(n.startswith(kernel) for n in forward), (kernel, forward)
    assert {"palm_mq_flash_attention_bwd_dq", "palm_norm_qkv_rope_bwd_dx",
            "palm_norm_swiglu_bwd_dx"} <= set(gradient), gradient
    # Local shapes: the flash kernel's q block is one chip's 8 of the 16 heads.
    assert "tensor<1x2048x8x256xbf16>" in modules["loss"]


@needs_mosaic_interpreter
def test_forward_mosaic_gpu_equals_xla(params):
    """impl="pallas_mosaic_gpu" for a whole model: the Mosaic GPU attention and the norm_swiglu
    and block_out forwards (interpreted; K = 64 here, so norm_qkv_rope's Triton kernels), the
    other kernels' Triton versions, bf16 (wgmma's operands)."""
    config = dataclasses.replace(CONFIG, dtype="bfloat16")
    tokens = jax.random.randint(jax.random.key(1), (2, 37), 0, config.vocab_size, dtype=jnp.int32)
    mosaic = palm.forward(params, tokens, config, impl="pallas_mosaic_gpu")
    xla = palm.forward(params, tokens, config, impl="xla")
    assert_close(mosaic, xla, "bfloat16", factor=5, what="logits bfloat16")


def test_layer_lowers_for_gpu_with_mosaic_kernels():
    """A PaLM-8B layer with impl="pallas_mosaic_gpu" exported for CUDA: every kernel's forward
    (attention, both input projections, block_out) and every backward kernel but
    norm_swiglu's elementwise saved-gates one are Mosaic GPU kernels. (Each kernel's own tests
    export it at 540B's widths too.)"""
    config = dataclasses.replace(LAYER_SHAPES["8b"], dtype="bfloat16")
    p, x = _layer_structs(config)

    def layer(p, x):
        positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
        return _block(x, p, positions, config, "pallas_mosaic_gpu")

    def layer_grad(p, x):
        return jax.grad(lambda p, x: layer(p, x).astype(jnp.float32).sum(), argnums=(0, 1))(p, x)

    with target_backend("gpu"):
        forward, backward = export_for_gpu(layer, p, x), export_for_gpu(layer_grad, p, x)
    # The gradient: attention's forward, dk/dv and dq, both input projections' forwards
    # (block_out's is not needed: its backward reads only o, h and the weights), norm_swiglu's
    # dx and dw, norm_qkv_rope's dh and dW, block_out's activation gradients.
    assert mosaic_gpu_kernel_count(forward) == 4 and mosaic_gpu_kernel_count(backward) == 10
    assert not triton_kernel_names(forward)
    assert triton_kernel_names(backward) == ["palm_norm_swiglu_bwd_gates_saved"]
