"""The byte formulas of bench/costs.py against the arrays the kernels actually read and write.

"Minimum traffic" means every input read once and every output written once, so each formula
must equal the total size of the kernel's inputs and outputs (plus cotangents and gradients
for "fwdbwd"), which jax.eval_shape gives without running anything. Not benchmarks: skipped
under --benchmark-only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

import kernels
from bench import costs

B, T, D, H, K, F, S = 2, 24, 32, 3, 8, 48, 40


def _nbytes(tree) -> int:
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _traffic(fn, args, diff, pass_):
    """Bytes of inputs + outputs, and for fwdbwd also the cotangents read and gradients written."""
    out = jax.eval_shape(fn, *args)
    total = _nbytes(args) + _nbytes(out)
    if pass_ == "fwdbwd":
        total += _nbytes(out) + _nbytes([args[i] for i in diff])
    return total


def _s(shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype)


POS = _s((B, T), jnp.int32)
CASES = {
    "rope": (kernels.rope_reference, (_s((B, T, H, K)), POS), (0,),
             lambda p: costs.rope(B, T, H, K, 2, p)),
    "norm_qkv_rope": (functools.partial(kernels.norm_qkv_rope_reference, eps=1e-6),
                      (_s((B, T, D)), _s((D,)), _s((D, H, K)), _s((D, K)), _s((D, K)), POS), (0, 1, 2, 3, 4),
                      lambda p: costs.norm_qkv_rope(B, T, D, H, K, 2, p)),
    "norm_swiglu": (functools.partial(kernels.norm_swiglu_reference, eps=1e-6),
                    (_s((B, T, D)), _s((D,)), _s((D, F)), _s((D, F))), (0, 1, 2, 3),
                    lambda p: costs.norm_swiglu(B, T, D, F, 2, p)),
    "block_in": (functools.partial(kernels.block_in_reference, eps=1e-6),
                 (_s((B, T, D)), _s((D,)), _s((D, H, K)), _s((D, K)), _s((D, K)), _s((D, F)), _s((D, F)), POS),
                 (0, 1, 2, 3, 4, 5, 6), lambda p: costs.block_in(B, T, D, H, K, F, 2, p)),
    "block_out": (kernels.block_out_reference,
                  (_s((B, T, D)), _s((B, T, H, K)), _s((H, K, D)), _s((B, T, F)), _s((F, D))), (0, 1, 2, 3, 4),
                  lambda p: costs.block_out(B, T, D, H, K, F, 2, p)),
    "mq_flash_attention": (kernels.mq_flash_attention_reference, (_s((B, T, H, K)), _s((B, S, K)), _s((B, S, K))),
                           (0, 1, 2), lambda p: costs.mq_flash_attention(B, T, S, H, K, 2, causal=True, pass_=p)),
}


@pytest.mark.parametrize("pass_", costs.PASSES)
@pytest.mark.parametrize("name", sorted(CASES))
def test_bytes_are_inputs_and_outputs_once(name, pass_):
    fn, args, diff, cost = CASES[name]
    assert cost(pass_).bytes == _traffic(fn, args, diff, pass_)


def test_decode_bytes():
    args = (_s((B, H, K)), _s((B, S, K)), _s((B, S, K)), _s((B,), jnp.int32))
    assert costs.mq_decode_attention(B, S, H, K, 2).bytes == _traffic(
        kernels.mq_decode_attention_reference, args, (), "fwd")


def test_attention_flops():
    fwd = costs.mq_flash_attention(1, 2048, 2048, 16, 256, 2, causal=False).flops
    assert fwd == 4 * 2048 * 2048 * 16 * 256
    assert costs.mq_flash_attention(1, 2048, 2048, 16, 256, 2, causal=True).flops == fwd / 2
    assert costs.mq_flash_attention(1, 2048, 2048, 16, 256, 2, causal=False, pass_="fwdbwd").flops == 3.5 * fwd


def test_matmul_layers_count_three_passes():
    assert costs.norm_swiglu(1, 2048, 4096, 16384, 2, "fwd").flops == 2 * 2 * 2048 * 4096 * 16384
    assert costs.norm_swiglu(1, 2048, 4096, 16384, 2, "fwdbwd").flops == 3 * 2 * 2 * 2048 * 4096 * 16384
    with pytest.raises(ValueError, match="unknown pass"):
        costs.block_out(1, 1, 1, 1, 1, 1, 2, "bwd")
