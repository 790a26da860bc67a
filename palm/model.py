"""PaLM (Chowdhery et al. 2022, arXiv 2204.02311) as plain functions over a nested-dict of params.

One layer is the paper's parallel block (section 2): LayerNorm once, multi-query attention with
RoPE and a SwiGLU MLP side by side, `x + attn(LN(x)) + mlp(LN(x))`; no biases; the input
embedding is shared with the output projection. Layers are stacked on a leading axis L and run
with `lax.scan`. Each half of the block is a kernel from `kernels/`, chosen by `impl`.

Dimension key: B batch, T positions, D model, H heads, K head dim, F MLP hidden, V vocab, L layers.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

import kernels
from kernels._common import current_backend, layer_norm_f32, matmul_f32
from palm.config import Config


def param_shapes(config: Config) -> dict:
    """The params tree with shape tuples as leaves (no allocation: works for 540B)."""
    v, d, n, h, k, f = (config.vocab_size, config.d_model, config.n_layers, config.n_heads,
                        config.head_dim, config.d_ff)
    return {
        "embed": (v, d),
        "blocks": {
            "norm_scale": (n, d),
            "wq": (n, d, h, k),
            "wk": (n, d, k),
            "wv": (n, d, k),
            "wo": (n, h, k, d),
            "w_gate": (n, d, f),
            "w_up": (n, d, f),
            "w_down": (n, f, d),
        },
        "final_norm_scale": (d,),
    }


def _fan_in(config: Config) -> dict:
    """Input dimension of every block kernel: PaLM section 5 draws them from N(0, 1/n_in)."""
    d, hk, f = config.d_model, config.n_heads * config.head_dim, config.d_ff
    return {"wq": d, "wk": d, "wv": d, "wo": hk, "w_gate": d, "w_up": d, "w_down": f}


@functools.partial(jax.jit, static_argnums=0)
def init(config: Config, key: jax.Array) -> dict:
    """Draws parameters as in PaLM section 5: embedding ~ N(0, 1), kernels ~ N(0, 1/fan_in),
    norm scales 1. Every leaf and every layer gets its own key (a shared key would start all
    layers identical).

    Args:
      config: the model configuration.
      key: a PRNG key.

    Returns:
      The nested params dict described by `param_shapes`, in `config.param_dtype`.
    """
    shapes = param_shapes(config)
    dtype = jnp.dtype(config.param_dtype)
    fan_in = _fan_in(config)
    embed_key, *leaf_keys = jax.random.split(key, 1 + len(fan_in))
    blocks = {"norm_scale": jnp.ones(shapes["blocks"]["norm_scale"], dtype)}
    for leaf_key, (name, n_in) in zip(leaf_keys, fan_in.items()):
        layer_keys = jax.random.split(leaf_key, config.n_layers)
        per_layer = shapes["blocks"][name][1:]
        draw = lambda k: jax.random.normal(k, per_layer, jnp.float32)  # noqa: E731
        blocks[name] = (jax.vmap(draw)(layer_keys) / math.sqrt(n_in)).astype(dtype)
    return {
        "embed": jax.random.normal(embed_key, shapes["embed"], jnp.float32).astype(dtype),
        "blocks": blocks,
        "final_norm_scale": jnp.ones(shapes["final_norm_scale"], dtype),
    }


def _block(x: jax.Array, p: dict, positions: jax.Array, config: Config, impl: str) -> jax.Array:
    """One parallel block on x [B, T, D]; p holds this layer's slice of params["blocks"]."""
    # One LayerNorm of x feeds both halves: q [B, T, H, K] with RoPE; k, v [B, T, K], one
    # key/value head shared by all query heads; h [B, T, F] the SwiGLU activations.
    # save_gate_up under every remat policy: it spares the backward a third pass of the MLP's
    # input matmuls (4*M*D*F FLOPs, ~15% of a layer). "none" keeps activations anyway (XLA's
    # autodiff of the reference keeps these two too); "dots" and "full" keep no kernel output,
    # so the block's forward reruns inside the backward and gate and up live only during that
    # layer's backward. tests/test_norm_swiglu.py shows what each policy keeps.
    q, k, v, h = kernels.block_in(x, p["norm_scale"], p["wq"], p["wk"], p["wv"], p["w_gate"],
                                  p["w_up"], positions, eps=config.norm_eps,
                                  base=config.rope_base, impl=impl,
                                  save_gate_up=True)
    o = kernels.mq_flash_attention(q, k, v, causal=True, impl=impl)  # [B, T, H, K]
    return kernels.block_out(x, o, p["wo"], h, p["w_down"], impl=impl)  # x + o·wo + h·w_down


_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _logits(params: dict, tokens: jax.Array, config: Config, impl: str) -> jax.Array:
    """The forward pass without input checks, for callers that already checked (loss, jit)."""
    dtype = jnp.dtype(config.dtype)
    params = jax.tree.map(lambda p: p.astype(dtype), params)
    b, t = tokens.shape
    x = jnp.take(params["embed"], tokens, axis=0)  # [B, T, D], no input scaling (section 2)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))

    block = functools.partial(_block, positions=positions, config=config, impl=impl)
    if config.remat != "none" and impl == "pallas_tpu" and current_backend() != "tpu":
        # JAX's TPU interpreter runs kernels through ordered io_callbacks, and jax.checkpoint
        # cannot partially evaluate effects; fail here rather than deep inside autodiff.
        raise ValueError(f"remat={config.remat!r} needs natively compiled kernels: impl='pallas_tpu' "
                         f"on {current_backend()} runs in the TPU interpreter, which jax.checkpoint "
                         "does not support; use remat='none' there")
    if config.remat != "none":
        block = jax.checkpoint(block, policy=_REMAT[config.remat])
    x, _ = jax.lax.scan(lambda carry, p: (block(carry, p), None), x, params["blocks"])

    h = layer_norm_f32(x, params["final_norm_scale"], config.norm_eps).astype(dtype)
    logits = matmul_f32("BTD,VD->BTV", h, params["embed"])
    return logits / math.sqrt(config.d_model)  # [B, T, V]; PaLM scales pre-softmax logits


@functools.partial(jax.jit, static_argnames=("config", "impl"))
def _forward_jit(params, tokens, config, impl):
    return _logits(params, tokens, config, impl)


def forward(params: dict, tokens: jax.Array, config: Config, *, impl: str = "auto") -> jax.Array:
    """PaLM's logits for a batch of token ids.

    Args:
      params: the nested dict from `init` (any float dtype; cast to `config.dtype` inside).
      tokens: int [B, T] token ids, T <= config.max_seq_len.
      config: the model configuration.
      impl: kernel implementation, "auto" | "xla" | "pallas_tpu" | "pallas_gpu".

    Returns:
      float32 logits [B, T, V].

    Raises:
      ValueError: on tokens of the wrong dtype, rank, length or range, or params whose tree or
        shapes don't match config (checked before tracing; ranges only for concrete tokens).
    """
    impl = kernels.resolve_impl(impl)
    check_tokens(tokens, config, max_len=config.max_seq_len)
    check_params(params, config)
    return _forward_jit(params, tokens, config, impl)


def loss(params: dict, tokens: jax.Array, config: Config, *, mask: jax.Array | None = None,
         impl: str = "auto") -> tuple[jax.Array, dict]:
    """Next-token cross-entropy plus PaLM's z-loss (section 5).

    Predicts tokens[:, 1:] from tokens[:, :-1]. Logits and softmax are float32 whatever the
    compute dtype.

    Args:
      params: the nested params dict.
      tokens: int [B, T + 1] windows; T <= config.max_seq_len.
      config: the model configuration.
      mask: optional [B, T] weights (bool or float) of the targets tokens[:, 1:]; 0 drops one.
      impl: kernel implementation, as in `forward`.

    Returns:
      (loss, metrics): loss = cross_entropy + z_loss_weight * mean(logsumexp(logits)^2) over
      unmasked targets; metrics holds "loss", "cross_entropy", "z_loss" (the weighted term) and
      "accuracy" (top-1), all float32 scalars.
    """
    impl = kernels.resolve_impl(impl)
    check_tokens(tokens, config, max_len=config.max_seq_len + 1)
    if tokens.shape[1] < 2:
        raise ValueError(f"loss needs at least 2 tokens per row (inputs and targets), got {tokens.shape=}")
    check_params(params, config)
    targets = tokens[:, 1:]  # [B, T]
    if mask is None:
        weights = jnp.ones(targets.shape, jnp.float32)
    else:
        if mask.shape != targets.shape:
            raise ValueError(f"mask must be [B, T] = {targets.shape} (one per target), got {mask.shape=}")
        weights = mask.astype(jnp.float32)

    logits = _logits(params, tokens[:, :-1], config, impl)  # [B, T, V] float32
    lse = jax.nn.logsumexp(logits, axis=-1)  # [B, T]
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    count = jnp.maximum(weights.sum(), 1.0)
    mean = lambda a: (a * weights).sum() / count  # noqa: E731
    cross_entropy = mean(lse - target_logit)
    z_loss = config.z_loss_weight * mean(lse**2)
    accuracy = mean((jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32))
    total = cross_entropy + z_loss
    return total, {"loss": total, "cross_entropy": cross_entropy, "z_loss": z_loss, "accuracy": accuracy}


def check_tokens(tokens, config: Config, *, max_len: int) -> None:
    """Raises ValueError naming what is wrong with a token batch; ranges only when concrete."""
    dtype = getattr(tokens, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"tokens must be an integer array, got dtype {dtype}")
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [B, T], got shape {tokens.shape}")
    if tokens.shape[1] > max_len:
        raise ValueError(f"sequence length {tokens.shape[1]} exceeds the maximum {max_len} "
                         f"(config.max_seq_len={config.max_seq_len})")
    if isinstance(tokens, jax.core.Tracer) or tokens.size == 0:
        return
    ids = np.asarray(tokens)
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= config.vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"token id {bad} outside [0, vocab_size={config.vocab_size})")


def check_params(params: dict, config: Config) -> None:
    """Raises ValueError naming the first leaf missing, unexpected or of the wrong shape."""
    expected = jax.tree_util.tree_flatten_with_path(param_shapes(config), is_leaf=lambda s: isinstance(s, tuple))[0]
    want = {jax.tree_util.keystr(path): shape for path, shape in expected}
    try:
        actual = jax.tree_util.tree_flatten_with_path(params)[0]
    except Exception as e:  # noqa: BLE001 -- anything unflattenable is a malformed params tree
        raise ValueError(f"params is not a nested dict of arrays: {e}") from e
    have = {jax.tree_util.keystr(path): tuple(np.shape(leaf)) for path, leaf in actual}
    for name in want.keys() - have.keys():
        raise ValueError(f"params is missing leaf params{name} of shape {want[name]}")
    for name in have.keys() - want.keys():
        raise ValueError(f"params has unexpected leaf params{name}")
    for name, shape in want.items():
        if have[name] != shape:
            raise ValueError(f"params{name} has shape {have[name]}, config expects {shape}")
