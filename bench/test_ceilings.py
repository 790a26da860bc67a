"""The card's own ceilings, measured in the same run as our kernels: bare matmuls and a copy.

A fused projection (norm_swiglu, norm_qkv_rope, block_in, block_out) does one matmul plus an
epilogue, so a bare matmul of the same M, N, K through XLA (cuBLAS on GPUs) is the fastest it
can hope to be; `tools/bench_report.py` divides the kernel's TFLOP/s by this one's
(`vs_matmul`). The square N x N x N product is the card's matmul ceiling, against which the
whole model's MFU is also stated (`mfu_vs_matmul`), beside the datasheet peak. The copy is
the memory ceiling (bytes read plus bytes written per second), against which decoding is
judged: the time to read the weights and the cache once at this bandwidth
(`vs_copy_bound`).

Test ids: `test_matmul[<what>-<pass>-M..-N..-K..-<dtype>]`, where <what> names the kernel
whose shape it is: [M, K] x [K, N] with M = B*T and
  norm_swiglu    N = 2F (gate and up as one product), K = D
  norm_qkv_rope  N = (H+2)*K_head (q, k, v), K = D
  block_in       N = (H+2)*K_head + 2F, K = D
  block_out      N = D, K = H*K_head + F (o·wo + h·w_down as one product)
  square         M = N = K = the size's matmul_square
"fwdbwd" is jax.vjp of the product: y, dA and dB (three matmuls, 3x the FLOPs), the
ceiling of a layer's training pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from bench import costs
from bench.conftest import bench_sizes

COPY = "copy"


def matmul_shapes(s) -> dict[str, tuple[int, int, int]]:
    """{what: (M, N, K)} for the fused projections at sizes s, and the square ceiling."""
    m, head = s.b * s.t, (s.h + 2) * s.k
    return {
        "norm_swiglu": (m, 2 * s.f, s.d),
        "norm_qkv_rope": (m, head, s.d),
        "block_in": (m, head + 2 * s.f, s.d),
        "block_out": (m, s.d, s.h * s.k + s.f),
        "square": (s.matmul_square,) * 3,
    }


def pytest_generate_tests(metafunc):
    if "matmul_case" in metafunc.fixturenames:
        s = bench_sizes(metafunc.config)
        shapes = matmul_shapes(s)
        if metafunc.config.getoption("benchmark_disable", False):
            # Untimed (`make test`): the products differ only in shape; one checks the wiring.
            shapes = {"square": shapes["square"]}
        cases = [(what, mnk, pass_) for what, mnk in shapes.items() for pass_ in costs.PASSES]
        ids = [f"{what}-{pass_}-M{m}-N{n}-K{k}-{s.dtype}" for what, (m, n, k), pass_ in cases]
        metafunc.parametrize("matmul_case", cases, ids=ids)


def _normal(key, shape, dtype, scale=1.0):
    return (jax.random.normal(key, shape, jnp.float32) * scale).astype(dtype)


def test_matmul(matmul_case, sizes, bench):
    what, (m, n, k), pass_ = matmul_case
    dtype = sizes.dtype

    def make(i):
        key = jax.random.split(jax.random.key(2000 + i), 3)
        args = (_normal(key[0], (m, k), dtype), _normal(key[1], (k, n), dtype, k ** -0.5))
        return args + ((_normal(key[2], (m, n), dtype),) if pass_ == "fwdbwd" else ())

    def product(a, b, precision=None):
        return jnp.dot(a, b, precision=precision, preferred_element_type=jnp.float32).astype(a.dtype)

    def reference(a, b, *g):  # float32 operands at full precision
        f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
        y, vjp = jax.vjp(lambda a, b: product(a, b, jax.lax.Precision.HIGHEST), f32(a), f32(b))
        return (y, vjp(f32(g[0]))) if g else y

    if pass_ == "fwd":
        fn = jax.jit(product)
    else:
        def fn(a, b, g):
            y, vjp = jax.vjp(product, a, b)
            return y, vjp(g)

        fn = jax.jit(fn)
    inputs = bench.inputs(make)
    itemsize = jnp.dtype(dtype).itemsize
    once = (m * k + k * n + m * n) * itemsize
    flops = costs.matmul_flops(m, n, k)
    bench(fn, inputs, reference=jax.jit(reference), flops=flops if pass_ == "fwd" else 3 * flops,
          nbytes=once if pass_ == "fwd" else 2 * once, dtype=dtype, impl="xla",
          shapes={"a": (m, k), "b": (k, n)},
          extra={"pass": pass_, "ceiling": "matmul", "matmul_of": what, "mnk": [m, n, k]},
          tolerance_factor=2.0 if pass_ == "fwdbwd" else 1.0)


def test_copy_bandwidth(sizes, bench):
    """y = -x over copy_bytes of the size's dtype: one read and one write per element, the
    device-to-device copy of ../shared/ANCHORS.md (a jitted identity may return its input
    without copying). `gbps` counts bytes read plus bytes written."""
    dtype = sizes.dtype
    n = (sizes.copy_bytes if bench.enabled else 2**16) // jnp.dtype(dtype).itemsize
    # Varied, non-zero data (never time zeros), cheaper to make than random normals.
    inputs = bench.inputs(lambda i: ((jnp.arange(n, dtype=jnp.int32) % (251 + i) - 125).astype(dtype),))
    fn = jax.jit(lambda x: -x)
    nbytes = 2 * n * jnp.dtype(dtype).itemsize
    bench(fn, inputs, reference=fn, flops=0.0, nbytes=nbytes, dtype=dtype, impl="xla",
          shapes={"x": (n,)}, extra={"ceiling": COPY},
          derived=lambda median: {"copy_bandwidth": nbytes / median})
