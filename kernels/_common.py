"""What every kernel package shares: the `impl`/`interpret` front door, the callable package
(`kernel_package`) and the f32 LayerNorm, whole and in pieces.

Dimension key used across `kernels/` and `palm/`: B batch, T query positions, S key positions,
D model width, H query heads, K head dim, F MLP hidden width, V vocabulary, L layers.

One rule every Pallas kernel body here follows: grid extents reach it as static keyword
arguments (`functools.partial(kernel, n_steps=...)`), never through `pl.num_programs`. With a
static grid, `pl.num_programs` is a Python int baked into the kernel's jaxpr at trace time, and
jax 0.11 caches that trace by kernel function and block shapes but not by grid: a second call
with the same tiles and a longer or shorter grid reused the first call's extent, so epilogues
keyed on "last step" never ran and outputs stayed uninitialised (NaN in the TPU interpreter).
`tests/test_kernel_rules.py` runs every kernel at two grids with one tiling to keep it so.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
import types
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

IMPLS = ("auto", "xla", "pallas_tpu", "pallas_gpu", "pallas_mosaic_gpu")

# `impl="pallas_mosaic_gpu"` asks for the Mosaic GPU (Hopper) kernels; a kernel that has none
# yet runs its Triton one, so a whole model can be asked for it.
_FALLBACK = {"pallas_mosaic_gpu": "pallas_gpu"}
# The input dtypes the Mosaic GPU kernels take (wgmma's 16-bit operands); `GPU_AUTO` has a
# second choice for the others.
MOSAIC_GPU_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))

_target = threading.local()


@contextlib.contextmanager
def target_backend(backend: str):
    """Resolves `impl="auto"` and `interpret=None` as if running on `backend` ("tpu", "gpu").

    For ahead-of-time export from another host: `jax.export.export(..., platforms=["tpu"])`
    on a CPU machine inside `with target_backend("tpu"):` lowers the Mosaic kernels natively
    instead of tracing them in interpret mode.
    """
    previous = getattr(_target, "backend", None)
    _target.backend = backend
    try:
        yield
    finally:
        _target.backend = previous


def current_backend() -> str:
    """The backend kernels are traced for: `target_backend`'s, else JAX's default."""
    return getattr(_target, "backend", None) or jax.default_backend()


# What `impl="auto"` runs on a GPU, per kernel: (for bf16/f16 inputs, for other dtypes), the
# implementation that measured fastest on an H200 in bench/results/h200-2026-11-27.json (jax
# 0.11.2, PaLM-8B widths, bf16). The Mosaic GPU kernels take 16-bit operands only (wgmma), so
# other dtypes get the second entry: Triton's kernel where it beat XLA's at bf16, else XLA's.
#   mq_flash_attention  Mosaic fwd 1.14x cuDNN at T = 2048 and 8192, fwd+bwd 1.08x / 1.01x;
#                       Triton 0.68x / 0.50x of Mosaic, XLA 0.15-0.22x (Triton beats XLA 4x).
#   norm_qkv_rope       Mosaic fwd+bwd 1.59x XLA (the training path; fwd alone 0.92x);
#                       Triton 0.22x XLA fwd, 0.07x fwd+bwd.
#   norm_swiglu         Mosaic 1.78x Triton fwd, 1.87x fwd+bwd. XLA's cases were cut by the
#                       run's deadline; Triton reached 0.39x the bare matmul alone, which XLA's
#                       version is (one matmul and one epilogue fusion), hence XLA for f32.
#   block_in            both halves' choices composed (Triton's composition: 12.4 ms fwd,
#                       against 6.1 ms for the halves' Mosaic kernels).
#   block_out           not reached by the run's kernel benchmarks; in the profiled 1b training
#                       step its Mosaic forward ran 86 GFLOP in 109 us (0.80 of peak).
#   rope                Triton fwd 0.97x XLA, fwd+bwd 0.56x: XLA.
#   mq_decode_attention not measured alone (cut by the deadline): XLA.
GPU_AUTO: dict[str, tuple[str, str]] = {
    "block_in": ("pallas_mosaic_gpu", "xla"),
    "block_out": ("pallas_mosaic_gpu", "xla"),
    "mq_decode_attention": ("xla", "xla"),
    "mq_flash_attention": ("pallas_mosaic_gpu", "pallas_gpu"),
    "norm_qkv_rope": ("pallas_mosaic_gpu", "xla"),
    "norm_swiglu": ("pallas_mosaic_gpu", "xla"),
    "rope": ("xla", "xla"),
}


def resolve_impl(impl: str, kernel: str | None = None, dtype: Any = None, *,
                 mosaic_takes: bool = True) -> str:
    """Maps `impl` to the implementation `kernel` (a kernel package's name) runs on inputs of
    `dtype` (None: any); `mosaic_takes` False says the kernel's Mosaic GPU version does not
    take these inputs' shapes (norm_qkv_rope's head dims other than 128 and 256).

    `auto` is `pallas_tpu` on TPU and `xla` on CPU: the Pallas kernels only pay off where they
    compile natively, and interpret mode is a correctness tool, not a path to speed. On a GPU
    it is the kernel's entry in `GPU_AUTO` (what measured fastest there): its first choice for
    16-bit inputs (and for `dtype` None), its second for inputs a Mosaic GPU kernel does not
    take (other dtypes, or `mosaic_takes` False); asked for a whole model (no kernel named) it
    stays `auto` on a GPU, so that each kernel resolves its own.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; valid: {', '.join(IMPLS)}")
    if impl != "auto":
        return impl
    backend = current_backend()
    if backend == "tpu":
        return "pallas_tpu"
    if backend != "gpu":
        return "xla"
    if kernel is None:
        return "auto"
    sixteen_bit, other = GPU_AUTO.get(kernel, ("xla", "xla"))
    if dtype is not None and jnp.dtype(dtype) not in MOSAIC_GPU_DTYPES:
        return other
    return sixteen_bit if mosaic_takes or sixteen_bit != "pallas_mosaic_gpu" else other


def pallas_impl(name: str, impl: str, table: Mapping[str, Callable[..., Any]]) -> Callable[..., Any]:
    """Looks a resolved Pallas `impl` up in a kernel's table, with an error naming what exists.

    The `xla` reference twins are called directly by each front door: they take no `interpret`
    or block sizes, which every Pallas entry in `table` does. `pallas_mosaic_gpu` runs the
    kernel's `pallas_gpu` entry where it has no Mosaic GPU one (`_FALLBACK`).
    """
    if impl not in table and _FALLBACK.get(impl) in table:
        return table[_FALLBACK[impl]]
    if impl not in table:
        have = ", ".join(["xla", *sorted(table)])
        raise NotImplementedError(f"{name}: impl={impl!r} is not implemented yet (have: {have})")
    return table[impl]


class KernelPackage(types.ModuleType):
    """A kernel's package that is also its kernel.

    `kernels.rope` is the package `kernels/rope/`, so `kernels.rope.BlockSizes`,
    `import kernels.rope as r` and `from kernels.rope import BlockSizes` all reach it; and
    `kernels.rope(x, positions)` calls its front door `kernels.rope.rope`. Python looks
    `__call__` up on an object's type, hence a module subclass rather than a module attribute.
    """

    def __call__(self, *args, **kwargs):
        return self.__wrapped__(*args, **kwargs)


def kernel_package(name: str, kernel: Callable[..., Any],
                   pallas: Mapping[str, Callable[..., Any]]) -> None:
    """Makes the package `name` (a kernel's `__init__` passes its `__name__`) call `kernel`,
    and records the implementations it has (`IMPLEMENTATIONS`: "xla" and the keys of its
    Pallas table `pallas`), for tools that run each one (the benchmarks, the device script).

    `__wrapped__` is what `inspect.signature` and `help` follow, so the package shows the
    kernel's signature.
    """
    module = sys.modules[name]
    module.__class__ = KernelPackage
    module.__wrapped__ = kernel
    module.IMPLEMENTATIONS = ("xla", *pallas)


def tpu_interpret(interpret: Any) -> Any:
    """What `pl.pallas_call(interpret=...)` gets for a Mosaic TPU kernel.

    None: native on TPU, interpreted elsewhere. True: always interpreted. False: always native
    (e.g. to export for TPU from a CPU machine). Interpretation uses the TPU interpreter
    (`pltpu.InterpretParams`), which simulates VMEM, DMAs and semaphores and so catches more
    than the generic one; pass an `InterpretParams(detect_races=True)` to also check races.
    """
    if interpret is None:
        interpret = current_backend() != "tpu"
    if interpret is True:
        return pltpu.InterpretParams()
    return interpret


def matmul_f32(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """`jnp.einsum(spec, a, b)` accumulated in float32.

    XLA:CPU runs some bf16 x bf16 -> f32 dots and rejects others at run time: the tiny model's
    bf16 forward at [2, 32] tokens fails with "Unsupported element type for DotThunk::Execute:
    BF16 x BF16 = F32" without the widening (rechecked on jax 0.10.2 for this issue), while the
    same einsums at [2, 8] pass. So on CPU the operands are widened first. That changes no
    value: a product of two bf16 numbers is exact in float32, so only the summation order can
    differ from the accelerator's result.

    Elsewhere two operands of one 16-bit dtype take their gradients in that dtype
    (`_matmul_16bit`), as every kernel's do.
    """
    if current_backend() == "cpu" and jnp.float32 not in (a.dtype, b.dtype):
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    if a.dtype == b.dtype and a.dtype.itemsize == 2:
        return _matmul_16bit(spec, a, b)
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _matmul_16bit(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """float32 `einsum(spec, a, b)` of two 16-bit operands whose backward runs on 16-bit
    operands too: the float32 cotangent is rounded to a's dtype first, and the two products
    accumulate in float32 and return in a's and b's dtype.

    Autodiff's own transpose would multiply the float32 cotangent by the other 16-bit operand,
    widened: float32 GEMMs, which cuBLAS ran in TF32 on an H200, 310 TFLOP/s against the bf16
    forward's 836 (the `1b` training step's unembedding backward took 14.2 ms, its forward
    2.6; bench/results/h200-2026-11-27.md).
    """
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _matmul_16bit_fwd(spec, a, b):
    return _matmul_16bit(spec, a, b), (a, b)


def _matmul_16bit_bwd(spec, residuals, g):
    a, b = residuals
    g = g.astype(a.dtype)
    # The product is linear in each operand: transposing each alone computes no forward.
    (da,) = jax.linear_transpose(lambda a_: jnp.einsum(spec, a_, b, preferred_element_type=a.dtype), a)(g)
    (db,) = jax.linear_transpose(lambda b_: jnp.einsum(spec, a, b_, preferred_element_type=b.dtype), b)(g)
    return da, db


_matmul_16bit.defvjp(_matmul_16bit_fwd, _matmul_16bit_bwd)


def layer_norm_f32(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis without bias (PaLM section 2), in float32.

    Statistics in float32 whatever the input dtype: bf16 has 8 mantissa bits, too few for a
    variance over thousands of features.
    """
    _, centered, rstd = _moments(x, eps)
    return centered * rstd * scale.astype(jnp.float32)


def _moments(x: jax.Array, eps: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """float32 mean, x - mean and 1/sqrt(var + eps) over the last axis.

    The variance is the mean of squared deviations from the mean (two passes), not
    E[x^2] - E[x]^2, which cancels catastrophically when |mean| >> std.
    """
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centered = x - mean
    var = jnp.mean(centered * centered, axis=-1, keepdims=True)
    return mean, centered, jax.lax.rsqrt(var + eps)


# The LayerNorm in pieces, for kernels that tile the model width D and so cannot see a whole
# row: the statistics come first (a cheap XLA pass, 8 bytes per row), each D tile is normalised
# from them, and the backward's full-row reductions run in XLA after the D-tiled matmuls. The
# statistics are `layer_norm_f32`'s, so the normalised values are too.


def row_stats(x: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
    """float32 mean and 1/sqrt(var + eps) over the last axis, [..., 1] each."""
    mean, _, rstd = _moments(x, eps)
    return mean, rstd


def layer_norm_rows(x: jax.Array, mean: jax.Array, rstd: jax.Array, scale: jax.Array) -> jax.Array:
    """(x - mean) * rstd * scale in float32, from `row_stats`; also on one tile of a row."""
    return (x.astype(jnp.float32) - mean) * rstd * scale.astype(jnp.float32)


def layer_norm_bwd(dh: jax.Array, x: jax.Array, scale: jax.Array, mean: jax.Array,
                   rstd: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The LayerNorm's VJP: dx [M, D] in x's dtype and dscale [D] in scale's dtype from dh, the
    cotangent of `layer_norm_rows(x [M, D], mean, rstd, scale)`, and the forward's statistics.

    With xhat = (x - mean) * rstd and g = dh * scale: dscale = sum over rows of dh * xhat,
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), means over D.
    """
    dh = dh.astype(jnp.float32)
    xhat = (x.astype(jnp.float32) - mean) * rstd
    dscale = jnp.sum(dh * xhat, axis=0)
    g = dh * scale.astype(jnp.float32)
    dx = rstd * (g - jnp.mean(g, axis=-1, keepdims=True)
                 - xhat * jnp.mean(g * xhat, axis=-1, keepdims=True))
    return dx.astype(x.dtype), dscale.astype(scale.dtype)


# dot_general dimension numbers for a·bᵀ (contract both operands' minor axes), in both backends'
# kernel bodies.
NT_DIMS = (((1,), (1,)), ((), ()))


# Padding to whole tiles, for both backends' wrappers.


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_to(a: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Zero-pads `a` at the end of each axis to `shape` (no copy when it already fits)."""
    if a.shape == tuple(shape):
        return a
    return jnp.pad(a, [(0, want - have) for have, want in zip(a.shape, shape)])


def pad2(a: jax.Array, rows: int, cols: int) -> jax.Array:
    """Zero-pads a 2-D array at the end to [rows, cols]."""
    return pad_to(a, (rows, cols))
