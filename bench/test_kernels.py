"""One benchmark per kernel, implementation and pass; each also checks itself against the reference.

Test ids read `<impl>-<pass>-<shapes>`: `test_mq_flash_attention[xla-fwd-B2-T256-...]` times
the XLA forward. "fwdbwd" is jax.vjp's forward and backward (the output and the gradients of
every differentiable input), as a training step runs the layer. Attention is causal, as in
PaLM. Costs: bench/costs.py.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import pytest

import kernels
from bench import baselines, costs

EPS = 1e-6  # LayerNorm epsilon, palm.Config's default
GRAD_TOLERANCE = 2.0  # gradients go through more roundings than the forward


def _normal(key, shape, dtype, scale=1.0):
    return (jax.random.normal(key, shape, jnp.float32) * scale).astype(dtype)


def _positions(i: int, b: int, t: int) -> jax.Array:
    """int32 [B, T]: consecutive positions, starting further along for each input set."""
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32) + 17 * i, (b, t))


def _vjp_pass(f, argnums):
    """fn(*args, g) -> (f(*args), grads of f w.r.t. args[argnums] for cotangent g)."""

    def run(*args_and_g):
        *args, g = args_and_g

        def of_diff(*diff):
            full = list(args)
            for i, x in zip(argnums, diff):
                full[i] = x
            return f(*full)

        y, vjp = jax.vjp(of_diff, *(args[i] for i in argnums))
        return y, vjp(g)

    return run


def _kernel_pair(kernel, reference, impl, pass_, argnums, **kwargs):
    """(jitted kernel, jitted reference) for one pass; the kernel bound to impl."""
    f = functools.partial(kernel, impl=impl, **kwargs)
    r = functools.partial(reference, **kwargs)
    if pass_ == "fwdbwd":
        f, r = _vjp_pass(f, argnums), _vjp_pass(r, argnums)
    return jax.jit(f), jax.jit(r)


def _shapes(names, args):
    return {name: x.shape for name, x in zip(names, args)}


@pytest.mark.bench_cases(passes=costs.PASSES, dims="BTHK")
def test_rope(case, bench):
    s, dtype = case.sizes, case.sizes.dtype

    def make(i):
        key = jax.random.key(i)
        args = (_normal(key, (s.b, s.t, s.h, s.k), dtype), _positions(i, s.b, s.t))
        return args + ((_normal(jax.random.fold_in(key, 1), args[0].shape, dtype),) if case.pass_ == "fwdbwd" else ())

    fn, ref = _kernel_pair(kernels.rope, kernels.rope_reference, case.impl, case.pass_, (0,))
    inputs = bench.inputs(make)
    cost = costs.rope(s.b, s.t, s.h, s.k, jnp.dtype(dtype).itemsize, case.pass_)
    bench(fn, inputs, reference=ref, flops=cost.flops, nbytes=cost.bytes, dtype=dtype, impl=case.impl,
          shapes=_shapes(("x", "positions"), inputs[0]), extra={"pass": case.pass_},
          tolerance_factor=GRAD_TOLERANCE if case.pass_ == "fwdbwd" else 1.0)


@pytest.mark.bench_cases(passes=costs.PASSES, dims="BTDHK")
def test_norm_qkv_rope(case, bench):
    s, dtype = case.sizes, case.sizes.dtype

    def make(i):
        key = jax.random.split(jax.random.key(i), 8)
        args = (_normal(key[0], (s.b, s.t, s.d), dtype), 1.0 + _normal(key[1], (s.d,), dtype, 0.1),
                _normal(key[2], (s.d, s.h, s.k), dtype, s.d ** -0.5), _normal(key[3], (s.d, s.k), dtype, s.d ** -0.5),
                _normal(key[4], (s.d, s.k), dtype, s.d ** -0.5), _positions(i, s.b, s.t))
        if case.pass_ == "fwdbwd":
            args += ((_normal(key[5], (s.b, s.t, s.h, s.k), dtype), _normal(key[6], (s.b, s.t, s.k), dtype),
                      _normal(key[7], (s.b, s.t, s.k), dtype)),)
        return args

    fn, ref = _kernel_pair(kernels.norm_qkv_rope, kernels.norm_qkv_rope_reference, case.impl, case.pass_,
                           (0, 1, 2, 3, 4), eps=EPS)
    inputs = bench.inputs(make)
    cost = costs.norm_qkv_rope(s.b, s.t, s.d, s.h, s.k, jnp.dtype(dtype).itemsize, case.pass_)
    bench(fn, inputs, reference=ref, flops=cost.flops, nbytes=cost.bytes, dtype=dtype, impl=case.impl,
          shapes=_shapes(("x", "norm_scale", "wq", "wk", "wv", "positions"), inputs[0]),
          extra={"pass": case.pass_}, tolerance_factor=GRAD_TOLERANCE if case.pass_ == "fwdbwd" else 1.0)


@pytest.mark.bench_cases(passes=costs.PASSES, dims="BTDF")
def test_norm_swiglu(case, bench):
    s, dtype = case.sizes, case.sizes.dtype

    def make(i):
        key = jax.random.split(jax.random.key(i), 5)
        args = (_normal(key[0], (s.b, s.t, s.d), dtype), 1.0 + _normal(key[1], (s.d,), dtype, 0.1),
                _normal(key[2], (s.d, s.f), dtype, s.d ** -0.5), _normal(key[3], (s.d, s.f), dtype, s.d ** -0.5))
        return args + ((_normal(key[4], (s.b, s.t, s.f), dtype),) if case.pass_ == "fwdbwd" else ())

    fn, ref = _kernel_pair(kernels.norm_swiglu, kernels.norm_swiglu_reference, case.impl, case.pass_,
                           (0, 1, 2, 3), eps=EPS)
    inputs = bench.inputs(make)
    cost = costs.norm_swiglu(s.b, s.t, s.d, s.f, jnp.dtype(dtype).itemsize, case.pass_)
    bench(fn, inputs, reference=ref, flops=cost.flops, nbytes=cost.bytes, dtype=dtype, impl=case.impl,
          shapes=_shapes(("x", "norm_scale", "w_gate", "w_up"), inputs[0]), extra={"pass": case.pass_},
          tolerance_factor=GRAD_TOLERANCE if case.pass_ == "fwdbwd" else 1.0)


@pytest.mark.bench_cases(passes=costs.PASSES, dims="BTDHKF")
def test_block_in(case, bench):
    s, dtype = case.sizes, case.sizes.dtype

    def make(i):
        key = jax.random.split(jax.random.key(i), 11)
        w = s.d ** -0.5
        args = (_normal(key[0], (s.b, s.t, s.d), dtype), 1.0 + _normal(key[1], (s.d,), dtype, 0.1),
                _normal(key[2], (s.d, s.h, s.k), dtype, w), _normal(key[3], (s.d, s.k), dtype, w),
                _normal(key[4], (s.d, s.k), dtype, w), _normal(key[5], (s.d, s.f), dtype, w),
                _normal(key[6], (s.d, s.f), dtype, w), _positions(i, s.b, s.t))
        if case.pass_ == "fwdbwd":
            args += ((_normal(key[7], (s.b, s.t, s.h, s.k), dtype), _normal(key[8], (s.b, s.t, s.k), dtype),
                      _normal(key[9], (s.b, s.t, s.k), dtype), _normal(key[10], (s.b, s.t, s.f), dtype)),)
        return args

    fn, ref = _kernel_pair(kernels.block_in, kernels.block_in_reference, case.impl, case.pass_,
                           (0, 1, 2, 3, 4, 5, 6), eps=EPS)
    inputs = bench.inputs(make)
    cost = costs.block_in(s.b, s.t, s.d, s.h, s.k, s.f, jnp.dtype(dtype).itemsize, case.pass_)
    bench(fn, inputs, reference=ref, flops=cost.flops, nbytes=cost.bytes, dtype=dtype, impl=case.impl,
          shapes=_shapes(("x", "norm_scale", "wq", "wk", "wv", "w_gate", "w_up", "positions"), inputs[0]),
          extra={"pass": case.pass_}, tolerance_factor=GRAD_TOLERANCE if case.pass_ == "fwdbwd" else 1.0)


@pytest.mark.bench_cases(passes=costs.PASSES, dims="BTDHKF")
def test_block_out(case, bench):
    s, dtype = case.sizes, case.sizes.dtype

    def make(i):
        key = jax.random.split(jax.random.key(i), 6)
        args = (_normal(key[0], (s.b, s.t, s.d), dtype), _normal(key[1], (s.b, s.t, s.h, s.k), dtype),
                _normal(key[2], (s.h, s.k, s.d), dtype, (s.h * s.k) ** -0.5), _normal(key[3], (s.b, s.t, s.f), dtype),
                _normal(key[4], (s.f, s.d), dtype, s.f ** -0.5))
        return args + ((_normal(key[5], (s.b, s.t, s.d), dtype),) if case.pass_ == "fwdbwd" else ())

    fn, ref = _kernel_pair(kernels.block_out, kernels.block_out_reference, case.impl, case.pass_,
                           (0, 1, 2, 3, 4))
    inputs = bench.inputs(make)
    cost = costs.block_out(s.b, s.t, s.d, s.h, s.k, s.f, jnp.dtype(dtype).itemsize, case.pass_)
    bench(fn, inputs, reference=ref, flops=cost.flops, nbytes=cost.bytes, dtype=dtype, impl=case.impl,
          shapes=_shapes(("x", "o", "wo", "h", "w_down"), inputs[0]), extra={"pass": case.pass_},
          tolerance_factor=GRAD_TOLERANCE if case.pass_ == "fwdbwd" else 1.0)


@pytest.mark.bench_cases(passes=costs.PASSES, baselines=baselines.ATTENTION, dims="HK")
def test_mq_flash_attention(case, attention_bt, bench):
    """Causal MQA at each of the size's (B, T) (conftest's `attention_bt`), T = S."""
    dtype = case.sizes.dtype
    s = dataclasses.replace(case.sizes, b=attention_bt[0], t=attention_bt[1])
    scale = 1.0 / math.sqrt(s.k)
    fwdbwd = case.pass_ == "fwdbwd"

    def make_ours(i):
        key = jax.random.split(jax.random.key(i), 4)
        args = (_normal(key[0], (s.b, s.t, s.h, s.k), dtype), _normal(key[1], (s.b, s.t, s.k), dtype),
                _normal(key[2], (s.b, s.t, s.k), dtype))
        return args + ((_normal(key[3], (s.b, s.t, s.h, s.k), dtype),) if fwdbwd else ())

    # A baseline is checked against our reference too; it is timed in its own layout.
    fn, ref = _kernel_pair(kernels.mq_flash_attention, kernels.mq_flash_attention_reference,
                           "xla" if case.baseline else case.impl, case.pass_, (0, 1, 2), causal=True)
    select, skip_on, make = (lambda out: out), (), make_ours
    if case.baseline:
        base = baselines.attention(case.impl, heads=s.h, causal=True, sm_scale=scale)
        jitted = jax.jit(_vjp_pass(base.attend, (0, 1, 2)) if fwdbwd else base.attend)

        def fn(*args):
            with base.context():
                return jitted(*args)

        if fwdbwd:
            def select(out):
                return base.restore(out[0]), base.restore_grads(out[1])
        else:
            select = base.restore

        def make(i):  # the baseline's own layout, converted outside the timed region
            q, k, v, *do = make_ours(i)
            return base.layout(q, k, v) + tuple(base.layout_out(g) for g in do)

        ref_ours, originals = ref, make_ours(0)

        def ref(*_):  # the reference sees the same values in our layout
            return ref_ours(*originals)

        skip_on = (Exception,)  # external kernels may reject a shape or a device: skip, say why

    inputs = bench.inputs(make)
    cost = costs.mq_flash_attention(s.b, s.t, s.t, s.h, s.k, jnp.dtype(dtype).itemsize, causal=True,
                                    pass_=case.pass_)
    bench(fn, inputs, reference=ref, select=select, flops=cost.flops, nbytes=cost.bytes, dtype=dtype,
          impl=case.impl, shapes={"q": (s.b, s.t, s.h, s.k), "k": (s.b, s.t, s.k), "v": (s.b, s.t, s.k)},
          extra={"pass": case.pass_, "causal": True}, skip_on=skip_on,
          tolerance_factor=GRAD_TOLERANCE if fwdbwd else 1.0)


def _decode_id(case):
    s = case.sizes
    return f"{case.impl}-B{s.decode_b}-S{s.decode_s}-H{s.h}-K{s.k}-{s.dtype}"


@pytest.mark.bench_cases(baselines=baselines.DECODE, id=_decode_id)
def test_mq_decode_attention(case, bench):
    """One new token per sequence against a full cache (lengths = S), one layer's attention."""
    s, dtype = case.sizes, case.sizes.dtype
    b, cache = s.decode_b, s.decode_s

    def make(i):
        key = jax.random.split(jax.random.key(i), 3)
        return (_normal(key[0], (b, s.h, s.k), dtype), _normal(key[1], (b, cache, s.k), dtype),
                _normal(key[2], (b, cache, s.k), dtype), jnp.full((b,), cache, jnp.int32))

    skip_on = ()
    if case.baseline:
        fn = jax.jit(baselines.decode(case.impl, sm_scale=1.0 / math.sqrt(s.k)))
        skip_on = (Exception,)
    else:
        fn = jax.jit(functools.partial(kernels.mq_decode_attention, impl=case.impl))
    inputs = bench.inputs(make)
    cost = costs.mq_decode_attention(b, cache, s.h, s.k, jnp.dtype(dtype).itemsize)
    bench(fn, inputs, reference=jax.jit(kernels.mq_decode_attention_reference), flops=cost.flops,
          nbytes=cost.bytes, dtype=dtype, impl=case.impl, skip_on=skip_on,
          shapes=_shapes(("q", "k_cache", "v_cache", "lengths"), inputs[0]),
          derived=lambda median: {"ms_per_token": median * 1e3, "tokens_per_s": b / median})
