"""The model on Pallas kernels: `palm.forward(impl="pallas_tpu")` against `impl="xla"`, and the
whole PaLM layer lowered for real TPUs at PaLM-8B and PaLM-540B shapes."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import pytest

import palm
from conftest import assert_close
from kernels import target_backend
from palm.model import _block
from tpu_export import export_for_tpu, mosaic_kernel_names

# Small but not toy: two layers, several heads, T not a multiple of any block size.
CONFIG = dataclasses.replace(palm.preset("tiny"), d_model=128, n_heads=2, head_dim=64, d_ff=256)


@pytest.fixture(scope="module")
def params():
    return palm.init(CONFIG, jax.random.key(0))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_forward_pallas_tpu_equals_xla(params, dtype):
    config = dataclasses.replace(CONFIG, dtype=dtype)
    tokens = jax.random.randint(jax.random.key(1), (2, 37), 0, config.vocab_size, dtype=jnp.int32)
    pallas = palm.forward(params, tokens, config, impl="pallas_tpu")
    xla = palm.forward(params, tokens, config, impl="xla")
    # Logits sit after L layers, each of which rounds its outputs in `dtype`.
    assert_close(pallas, xla, dtype, factor=5, what=f"logits {dtype}")


def test_loss_gradients_pallas_tpu_equal_xla(params):
    tokens = jax.random.randint(jax.random.key(2), (2, 30), 0, CONFIG.vocab_size, dtype=jnp.int32)
    grad = lambda impl: jax.jit(jax.grad(lambda p: palm.loss(p, tokens, CONFIG, impl=impl)[0]))(params)  # noqa: E731
    g_pallas, g_xla = grad("pallas_tpu"), grad("xla")
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


@pytest.mark.parametrize("name", sorted(LAYER_SHAPES))
def test_layer_lowers_for_tpu(name):
    config = dataclasses.replace(LAYER_SHAPES[name], dtype="bfloat16")
    p, x = _layer_structs(config)

    def layer(p, x):
        positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
        return _block(x, p, positions, config, "pallas_tpu")

    def layer_grad(p, x):
        return jax.grad(lambda p, x: layer(p, x).astype(jnp.float32).sum(), argnums=(0, 1))(p, x)

    with target_backend("tpu"):
        forward = mosaic_kernel_names(export_for_tpu(layer, p, x))
        backward = mosaic_kernel_names(export_for_tpu(layer_grad, p, x))
    for kernel in KERNELS:
        assert any(n.startswith(kernel) for n in forward), (kernel, forward)
    # The backward runs the forward kernels again (residuals) and the Pallas backward kernels.
    assert any("bwd" in n for n in backward), backward

