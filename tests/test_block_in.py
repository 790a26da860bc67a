"""kernels.block_in: both halves' Pallas kernels, TPU and GPU, on one LayerNorm (interpret mode)
against the reference, the LayerNorm computed once per layer, and the native lowerings (Mosaic
for TPU, Triton for CUDA) at PaLM-8B.

Each half's kernels are tested tile by tile in test_norm_qkv_rope.py and test_norm_swiglu.py;
here the shapes are small and the tiles default (one grid step per axis): what is new is the
composition, one set of row statistics and one LayerNorm backward of the summed cotangent.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels.block_in.compose as block_in_compose
from conftest import assert_close, needs_mosaic_interpreter
from kernels.block_in import BlockSizes, block_in, block_in_reference
from gpu_export import export_for_gpu, mosaic_gpu_kernel_count, triton_kernel_names
from tpu_export import export_for_tpu, mosaic_kernel_names

EPS = 1e-6
NAMES = ("x", "norm_scale", "wq", "wk", "wv", "w_gate", "w_up")


def _inputs(seed, b, t, d, h, k, f, dtype):
    """LayerNorm-worthy x (offset and spread per row), fan-in scaled weights, any positions;
    drawn by numpy (eager jax.random compiles per shape)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(b, t, d)) * rng.uniform(0.5, 3.0, size=(b, t, 1)) + 0.7
    scale = 1.0 + 0.2 * rng.normal(size=(d,))
    weights = [rng.normal(size=s) / np.sqrt(d) for s in ((d, h, k), (d, k), (d, k), (d, f), (d, f))]
    positions = jnp.asarray(rng.integers(0, 4096, size=(b, t)), jnp.int32)
    return [jnp.asarray(a, dtype) for a in (x, scale, *weights)], positions


def _check(seed, b, t, d, h, k, f, dtype, save_gate_up, impl):
    args, positions = _inputs(seed, b, t, d, h, k, f, dtype)
    rng = np.random.default_rng(seed + 1)
    cotangents = tuple(jnp.asarray(rng.normal(size=s), dtype)
                       for s in ((b, t, h, k), (b, t, k), (b, t, k), (b, t, f)))

    def kernel(*a):
        return block_in(*a, positions, eps=EPS, impl=impl, interpret=True,
                        save_gate_up=save_gate_up)

    def reference(*a):
        return block_in_reference(*a, positions, eps=EPS)

    @jax.jit  # one compile for kernels and reference: compiling dominates the test's time
    def run(*a):
        out, vjp = jax.vjp(kernel, *a)
        expected, vjp_ref = jax.vjp(reference, *a)
        return out, vjp(cotangents), expected, vjp_ref(cotangents)

    out, grads, expected, expected_grads = run(*args)
    for name, a, e in zip(("q", "k", "v", "h"), out, expected):
        assert a.dtype == dtype and a.shape == e.shape, name
        assert_close(a, e, dtype, what=name)
    for name, g, e, arg in zip(NAMES, grads, expected_grads, args):
        assert g.dtype == arg.dtype and g.shape == arg.shape, name
        assert_close(g, e, dtype, what=f"d{name}")


# Fixed ragged cases rather than a hypothesis property: each example compiles both halves'
# kernels, forward and backward (~7 CPU-seconds in interpret mode), and their shape space is
# searched by the halves' own properties. Nothing here divides another dimension (nor is a
# power of two, which the GPU kernels pad to).
@pytest.mark.parametrize("impl, dtype, save_gate_up, shape", [
    ("pallas_tpu", jnp.float32, False, (2, 7, 20, 2, 6, 13)),
    ("pallas_tpu", jnp.float32, True, (1, 9, 12, 3, 4, 24)),
    ("pallas_tpu", jnp.bfloat16, False, (1, 5, 18, 1, 16, 9)),
    ("pallas_tpu", jnp.bfloat16, True, (2, 3, 10, 2, 10, 17)),
    ("pallas_gpu", jnp.float32, True, (2, 7, 20, 3, 6, 13)),
    ("pallas_gpu", jnp.bfloat16, False, (1, 9, 18, 2, 10, 24)),
    # The MLP half's Mosaic GPU kernels (its interpreter: jax >= 0.11) beside the attention
    # half's Triton kernels (K < 128), gate and up recomputed.
    pytest.param("pallas_mosaic_gpu", jnp.bfloat16, False, (1, 9, 18, 2, 10, 70),
                 marks=needs_mosaic_interpreter),
    # K = 128: the attention half's Mosaic kernels too, gate and up saved.
    pytest.param("pallas_mosaic_gpu", jnp.bfloat16, True, (1, 9, 70, 2, 128, 40),
                 marks=needs_mosaic_interpreter),
])
def test_matches_reference(impl, dtype, save_gate_up, shape):
    """Forward and all seven gradients (x's is the sum of both halves' paths) against the
    reference; shape is (B, T, D, H, K, F)."""
    _check(sum(shape), *shape, dtype, save_gate_up, impl)


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_layer_norm_once_per_layer(monkeypatch, impl):
    """One call's forward and backward compute the row statistics once and run one LayerNorm
    backward (on the summed cotangent), not one of each per half."""
    calls = {"row_stats": 0, "layer_norm_bwd": 0}

    def counting(name):
        real = getattr(block_in_compose, name)

        def wrapper(*a, **kw):
            calls[name] += 1
            return real(*a, **kw)
        return wrapper

    for name in calls:
        monkeypatch.setattr(block_in_compose, name, counting(name))
    args, positions = _inputs(0, 1, 8, 16, 2, 8, 24, jnp.float32)

    def loss(*a):
        out = block_in(*a, positions, eps=EPS, impl=impl, interpret=True)
        return sum(jnp.sum(o) for o in out)

    jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=tuple(range(len(NAMES)))))(*args))
    assert calls == {"row_stats": 1, "layer_norm_bwd": 1}
    # And neither half computes statistics of its own (one rsqrt in the whole program).
    assert jaxpr.count("rsqrt") == 1, "LayerNorm statistics computed more than once"


def test_bad_inputs_raise():
    args, positions = _inputs(0, 1, 4, 16, 2, 8, 24, jnp.float32)
    call = lambda *a, **kw: block_in(*a, eps=EPS, impl="pallas_tpu", interpret=True, **kw)  # noqa: E731
    x, scale, wq, wk, wv, wg, wu = args
    with pytest.raises(ValueError, match="norm_swiglu: w_gate and w_up"):
        call(x, scale, wq, wk, wv, wg, wu[:, :5], positions)
    with pytest.raises(ValueError, match="norm_qkv_rope: wk must be"):
        call(x, scale, wq, wk[:, :4], wv, wg, wu, positions)
    with pytest.raises(ValueError, match="block_in.BlockSizes"):
        call(*args, positions, block_sizes=(8,) * 6)


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu", "pallas_mosaic_gpu"])
def test_gradient_exports_natively(impl):
    """jax.value_and_grad through block_in lowers natively at PaLM-8B (B=1, T=2048), for TPU
    (Mosaic) and for CUDA (Triton, or with pallas_mosaic_gpu all Mosaic GPU): both halves'
    forward and backward kernels, one program."""
    d, h, k, f = 4096, 16, 256, 16384
    bf = jnp.bfloat16
    shapes = [jax.ShapeDtypeStruct(s, bf) for s in
              ((1, 2048, d), (d,), (d, h, k), (d, k), (d, k), (d, f), (d, f))]
    positions = jax.ShapeDtypeStruct((1, 2048), jnp.int32)

    def loss(*a):
        out = block_in(*a[:-1], a[-1], eps=EPS, impl=impl, interpret=False)
        return sum(jnp.sum(o.astype(jnp.float32)) for o in out)

    export, kernel_names = ((export_for_tpu, mosaic_kernel_names) if impl == "pallas_tpu"
                            else (export_for_gpu, triton_kernel_names))
    text = export(jax.value_and_grad(loss, argnums=tuple(range(len(NAMES)))), *shapes,
                  positions)
    names = set(kernel_names(text))
    if impl == "pallas_mosaic_gpu":  # both forwards and both backwards (gates, dx, dw; dh, dW)
        assert mosaic_gpu_kernel_count(text) == 7
        assert not names, names
        return
    assert any("norm_qkv_rope" in n for n in names) and any("norm_swiglu" in n for n in names), names


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_inference_does_not_write_gate_and_up(impl):
    """Without differentiation the forward runs the plain norm_swiglu kernel even with
    save_gate_up (nothing would read the saved gate and up); under jax.vjp it saves them."""
    args, positions = _inputs(0, 1, 8, 16, 2, 8, 24, jnp.float32)

    def kernel(*a):
        return block_in(*a, positions, eps=EPS, impl=impl, interpret=True, save_gate_up=True)

    forward = str(jax.make_jaxpr(kernel)(*args))
    with_vjp = str(jax.make_jaxpr(lambda *a: jax.vjp(kernel, *a)[0])(*args))
    assert "palm_norm_swiglu_fwd_save" not in forward and "palm_norm_swiglu_fwd" in forward
    assert "palm_norm_swiglu_fwd_save" in with_vjp
