"""Greedy decoding by re-running the full forward pass: the simplest correct sampler.

Every step recomputes all positions (O(T^2) work per token); the sequence is kept at a fixed
padded length so one compilation serves every step. Causality makes the padding harmless:
position t's logits never see positions after t.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

import kernels
from palm.config import Config
from palm.model import _logits, check_params, check_tokens


@functools.partial(jax.jit, static_argnames=("config", "impl"))
def _next_token(params, tokens, position, config, impl):
    logits = _logits(params, tokens, config, impl)  # [B, T, V]
    return jnp.argmax(logits[:, position - 1], axis=-1).astype(tokens.dtype)  # [B]


def greedy(params: dict, prompt: jax.Array, config: Config, *, max_new_tokens: int,
           impl: str = "auto") -> jax.Array:
    """Extends prompt int [B, P] by max_new_tokens greedy tokens; returns [B, P + max_new_tokens]."""
    b, p = prompt.shape
    total = p + max_new_tokens
    if p < 1:
        raise ValueError("the prompt needs at least one token")
    if total > config.max_seq_len:
        raise ValueError(f"prompt {p} + {max_new_tokens} new tokens exceeds max_seq_len={config.max_seq_len}")
    check_tokens(prompt, config, max_len=config.max_seq_len)
    check_params(params, config)
    impl = kernels.resolve_impl(impl)
    tokens = jnp.zeros((b, total), prompt.dtype).at[:, :p].set(prompt)
    for position in range(p, total):
        nxt = _next_token(params, tokens, jnp.int32(position), config, impl)
        tokens = tokens.at[:, position].set(nxt)
    return tokens
