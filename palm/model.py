"""PaLM (Chowdhery et al. 2022, arXiv 2204.02311) as plain functions over a nested-dict of params.

One layer is the paper's parallel block (section 2): LayerNorm once, multi-query attention with
RoPE and a SwiGLU MLP side by side, `x + attn(LN(x)) + mlp(LN(x))`; no biases; the input
embedding is shared with the output projection. Layers are stacked on a leading axis L and run
with `lax.scan`. Each half of the block is a kernel from `kernels/`, chosen by `impl`. Given a
("data", "model") mesh, `forward` and `loss` run the model under `jax.shard_map` (FSDP over
"data", tensor parallelism over "model"; `_sharded_logits`).

Dimension key: B batch, T positions, D model, H heads, K head dim, F MLP hidden, V vocab, L layers.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

import kernels
from kernels._common import current_backend, layer_norm_f32, matmul_f32
from palm import collective
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


def _attention_and_mlp(x: jax.Array, p: dict, positions: jax.Array, config: Config,
                       impl: str) -> tuple[jax.Array, jax.Array, tuple[jax.Array, jax.Array]]:
    """The block's two halves on x [B, T, D]: attention output o [B, T, H, K] and SwiGLU
    activations h [B, T, F], for `kernels.block_out` to project and sum, and the layer's
    (k, v) [B, T, K] each, which generation's prefill keeps as its cache."""
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
    return o, h, (k, v)


def _block(x: jax.Array, p: dict, positions: jax.Array, config: Config, impl: str) -> jax.Array:
    """One parallel block on x [B, T, D]; p holds this layer's slice of params["blocks"]."""
    o, h, _ = _attention_and_mlp(x, p, positions, config, impl)
    return kernels.block_out(x, o, p["wo"], h, p["w_down"], impl=impl)  # x + o·wo + h·w_down


_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _scan_blocks(x: jax.Array, blocks: dict, block, config: Config, impl: str) -> jax.Array:
    """Runs `block(x, p)` over the stacked layers of `blocks` under config.remat's policy."""
    if config.remat != "none" and impl == "pallas_tpu" and current_backend() != "tpu":
        # JAX's TPU interpreter runs kernels through ordered io_callbacks, and jax.checkpoint
        # cannot partially evaluate effects; fail here rather than deep inside autodiff.
        raise ValueError(f"remat={config.remat!r} needs natively compiled kernels: impl='pallas_tpu' "
                         f"on {current_backend()} runs in the TPU interpreter, which jax.checkpoint "
                         "does not support; use remat='none' there")
    if config.remat != "none":
        block = jax.checkpoint(block, policy=_REMAT[config.remat])
    x, _ = jax.lax.scan(lambda carry, p: (block(carry, p), None), x, blocks)
    return x


def _unembed(x: jax.Array, final_norm_scale: jax.Array, embed, config: Config,
             matmul=matmul_f32) -> jax.Array:
    """Logits [B, T, V] float32 of x [B, T, D] against the shared embedding [V, D], multiplied
    by `matmul` (the sharded model's collective matmul passes its own, and its shard)."""
    # PaLM scales the pre-softmax logits by 1/sqrt(D): here the float32 LN(x) [B, T, D] before
    # its one rounding, not the logits [B, T, V] after. Dividing the logits cost two passes
    # over float32 [B, T, 256k] in the backward of the `1b` step on the H200 (0.97 ms each).
    h = layer_norm_f32(x, final_norm_scale, config.norm_eps) / math.sqrt(config.d_model)
    return matmul("BTD,VD->BTV", h.astype(x.dtype), embed)


def _positions(b: int, t: int) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))  # int [B, T]


def _logits(params: dict, tokens: jax.Array, config: Config, impl: str, *, mesh=None,
            collective_matmul: bool = False) -> jax.Array:
    """The forward pass without input checks, for callers that already checked (loss, jit).

    With a mesh, `_sharded_logits`: the same logits, computed across the mesh's devices."""
    if mesh is not None:
        return _sharded_logits(params, tokens, config, impl, mesh, collective_matmul)
    if collective_matmul:
        raise ValueError("collective_matmul=True needs a mesh: it replaces all-gathers over its "
                         "'data' axis")
    dtype = jnp.dtype(config.dtype)
    params = jax.tree.map(lambda p: p.astype(dtype), params)
    x = jnp.take(params["embed"], tokens, axis=0)  # [B, T, D], no input scaling (section 2)
    block = functools.partial(_block, positions=_positions(*tokens.shape), config=config, impl=impl)
    x = _scan_blocks(x, params["blocks"], block, config, impl)
    return _unembed(x, params["final_norm_scale"], params["embed"], config)  # [B, T, V]


def check_mesh(mesh, config: Config, batch: int) -> None:
    """Raises ValueError when `mesh` is not a ("data", "model") mesh whose axes divide the batch
    and every sharded dimension of the params (heads, F and V over "model", D over "data")."""
    from palm import sharding  # palm.sharding imports this module for param_shapes

    if set(mesh.axis_names) != {sharding.DATA, sharding.MODEL}:
        raise ValueError(f"mesh axes must be ('data', 'model') (palm.sharding.make_mesh), got "
                         f"{mesh.axis_names}")
    if batch % mesh.shape[sharding.DATA]:
        raise ValueError(f"batch {batch} does not divide over the mesh axis 'data' of size "
                         f"{mesh.shape[sharding.DATA]}")
    sharding.check_specs(config, mesh)


def _sharded_logits(params: dict, tokens: jax.Array, config: Config, impl: str, mesh,
                    collective_matmul: bool = False) -> jax.Array:
    """`_logits` under `jax.shard_map` over a ("data", "model") mesh, with explicit collectives.

    Params enter as `palm.sharding.param_specs` places them (wherever they are, shard_map
    moves them there), tokens split over "data". On one device's shards, with b = B/data:

    - FSDP: each weight is all-gathered over "data" (its D dimension) just before use, inside
      the layer scan, so the forward holds one layer's gathered weights at a time (autodiff
      under remat "none" keeps them for the backward; "dots" and "full" gather again); the
      transpose of the all-gather reduce-scatters the gradients.
    - Tensor parallelism: the block computes its H/model heads and F/model MLP columns (wk and
      wv replicated), so o·wo and h·w_down are partial sums over "model"; the parallel block
      adds them before reducing, ONE psum over "model" per layer (PaLM section 2). x [b, T, D]
      is whole on every model shard; `block_out` adds the residual, so only model shard 0
      passes x to it (the others zeros): the psum then adds x exactly once.
    - Embedding and logits stay vocab-parallel, on the table's [V/model, D] rows gathered over
      "data": the lookup takes the rows this shard holds, zeros elsewhere, and one psum over
      "model" assembles x (exact: one nonzero term per element); the logits come out
      [b, T, V/model] and leave shard_map split over "data" and "model", so neither the table
      nor [M, V] logits are ever all-reduced. The softmax glue of `loss` runs on them under
      the compiler's sharding propagation.

    collective_matmul=True replaces the all-gathers of the weights whose D meets a matmul
    outside our fused kernels' LayerNorm with rings of ppermutes over "data"
    (`palm.collective`), so those weights are never assembled whole (under remat "none"
    autodiff keeps the shards it used for the backward, as it keeps the gathered weights):
    - wo and w_down (`block_out`): D is their output dimension, so each ring step runs the
      `block_out` kernel itself on the shard in hand, for the residual's matching D/data
      columns, and the steps' columns are placed side by side.
    - the embedding [V/model, D/data], twice: the lookup (output columns, as above) and the
      logits, whose contraction over D is split across the ring (each step multiplies the
      final LayerNorm's D-slice matching the shard in hand; partial logits summed). XLA's CSE
      merges the two rings' permutes of the same table, so it travels round once.
    The input projections wq, wk, wv, w_gate and w_up (65% of a layer's weight bytes at
    PaLM-8B, 62B and 540B alike) and the norm scales stay all-gathered: `kernels.block_in`
    fuses the LayerNorm, which needs all of D per row, with those projections and their RoPE
    and SwiGLU epilogues, so splitting their contraction over D would need a kernel that
    takes and returns partial sums. In the compiled HLO (tests/test_model_sharded.py) the
    all-gathers of wo's, w_down's and the table's D disappear, collective-permutes of their
    shards take their place, and in the backward the ring's transpose replaces their
    reduce-scatters. A CPU run shows that much: equal logits, loss and gradients (impl "xla";
    interpreted Pallas TPU kernels inside the ring did not finish in 10 minutes on a 2x2 CPU
    mesh, their simulated devices waiting on each other), and which collectives run. Whether
    a permute overlaps its step's matmul, and what that saves, is the GPU/TPU scheduler's to
    decide and a device's profile to show; no CPU run measures it.

    check_vma=False: with it on, an interpreted pallas_call (impl="pallas_tpu" off TPU) fails
    even for a trivial body ("requires varying manual axes to match"), and the kernels must
    run here under every impl. Nothing relies on the check: the out_specs split over both
    axes, so no output claims an invariance the collectives do not give, and
    tests/test_model_sharded.py checks gradients through the psums and all-gathers against
    one device.
    """
    from palm import sharding  # palm.sharding imports this module for param_shapes

    check_mesh(mesh, config, tokens.shape[0])
    data, model = sharding.DATA, sharding.MODEL
    specs = sharding.param_specs(config)
    dtype = jnp.dtype(config.dtype)

    def weight(w, spec, ring=False):  # FSDP: w gathered over "data", or its shard for a ring
        if ring and collective_matmul:
            return w.astype(dtype)
        return jax.lax.all_gather(w.astype(dtype), data, axis=tuple(spec).index(data), tiled=True)

    def by_columns(fn, w, *xs):
        """fn(w, *xs), whose output's last dimension is D, as are those of xs and w (from
        `weight(ring=True)`, a pytree): at once, or shard by shard round the ring, each shard
        with the columns of xs it meets."""
        if not collective_matmul:
            return fn(w, *xs)
        return collective.ring_concat(
            lambda j, shard: fn(shard, *(collective.shard_of(x, j, data) for x in xs)), w, axis=data)

    def ring_matmul(subscripts, x, w):  # x [..., D] contracted with w's D/data shards
        return collective.ring_sum(
            lambda j, shard: matmul_f32(subscripts, collective.shard_of(x, j, data), shard), w,
            axis=data)

    def block(x, p, positions):  # x [b, T, D]; p this layer's shards
        p = {name: weight(w, specs["blocks"][name][1:], ring=name in ("wo", "w_down"))
             for name, w in p.items()}
        o, h, _ = _attention_and_mlp(x, p, positions, config, impl)  # [b, T, H/model, K], [b, T, F/model]
        residual = jnp.where(jax.lax.axis_index(model) == 0, x, jnp.zeros_like(x))
        out = by_columns(lambda w, r: kernels.block_out(r, o, w["wo"], h, w["w_down"], impl=impl),
                         {"wo": p["wo"], "w_down": p["w_down"]}, residual)
        return jax.lax.psum(out, model)

    def local(params, tokens):  # tokens [b, T]
        embed = weight(params["embed"], specs["embed"], ring=True)  # [V/model, D] (ring: D/data)
        rows = embed.shape[0]
        ids = tokens - jax.lax.axis_index(model) * rows  # into this shard's rows
        mine = ((ids >= 0) & (ids < rows))[..., None]  # [b, T, 1]

        def lookup(table):  # table [V/model, C] -> [b, T, C]
            return jnp.where(mine, jnp.take(table, jnp.where(mine[..., 0], ids, 0), axis=0), 0)

        x = jax.lax.psum(by_columns(lookup, embed), model)  # [b, T, D]
        step = functools.partial(block, positions=_positions(*tokens.shape))
        x = _scan_blocks(x, params["blocks"], step, config, impl)
        scale = weight(params["final_norm_scale"], specs["final_norm_scale"])
        matmul = ring_matmul if collective_matmul else matmul_f32
        return _unembed(x, scale, embed, config, matmul)  # [b, T, V/model]

    return jax.shard_map(local, mesh=mesh, in_specs=(specs, P(data, None)),
                         out_specs=P(data, None, model), check_vma=False)(params, tokens)


@functools.partial(jax.jit, static_argnames=("config", "impl", "mesh", "collective_matmul"))
def _forward_jit(params, tokens, config, impl, mesh, collective_matmul):
    return _logits(params, tokens, config, impl, mesh=mesh, collective_matmul=collective_matmul)


def forward(params: dict, tokens: jax.Array, config: Config, *, impl: str = "auto",
            mesh=None, collective_matmul: bool = False) -> jax.Array:
    """PaLM's logits for a batch of token ids.

    Args:
      params: the nested dict from `init` (any float dtype; cast to `config.dtype` inside).
      tokens: int [B, T] token ids, T <= config.max_seq_len.
      config: the model configuration.
      impl: kernel implementation, "auto" | "xla" | "pallas_tpu" | "pallas_gpu" |
        "pallas_mosaic_gpu" (kernels.IMPLS).
      mesh: None (one device), or a ("data", "model") mesh from `palm.sharding.make_mesh`:
        the layers then run under `jax.shard_map`, batch over "data", heads and F over
        "model", weights FSDP over "data" (see `_sharded_logits`).
      collective_matmul: with a mesh, compute with wo, w_down and the embedding shard by
        shard round a ring of ppermutes over "data" instead of all-gathering them
        (`palm.collective`; which weights and why: `_sharded_logits`). Same results.

    Returns:
      float32 logits [B, T, V]; with a mesh, split over its "data" (B) and "model" (V) axes.

    Raises:
      ValueError: on tokens of the wrong dtype, rank, length or range, params whose tree or
        shapes don't match config (checked before tracing; ranges only for concrete tokens),
        or a mesh that does not divide the batch or a sharded dimension (`check_mesh`), or
        collective_matmul without a mesh.
    """
    impl = kernels.resolve_impl(impl)
    check_tokens(tokens, config, max_len=config.max_seq_len)
    check_params(params, config)
    return _forward_jit(params, tokens, config, impl, mesh, collective_matmul)


def loss(params: dict, tokens: jax.Array, config: Config, *, mask: jax.Array | None = None,
         impl: str = "auto", mesh=None, collective_matmul: bool = False) -> tuple[jax.Array, dict]:
    """Next-token cross-entropy plus PaLM's z-loss (section 5).

    Predicts tokens[:, 1:] from tokens[:, :-1]. Logits and softmax are float32 whatever the
    compute dtype.

    Args:
      params: the nested params dict.
      tokens: int [B, T + 1] windows; T <= config.max_seq_len.
      config: the model configuration.
      mask: optional [B, T] weights (bool or float) of the targets tokens[:, 1:]; 0 drops one.
      impl: kernel implementation, as in `forward`.
      mesh: None, or a ("data", "model") mesh, as in `forward`: the logits come from
        `shard_map`, the softmax and means over them follow their sharding.
      collective_matmul: with a mesh, rings of ppermutes instead of some FSDP all-gathers,
        as in `forward`.

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

    logits = _logits(params, tokens[:, :-1], config, impl, mesh=mesh,
                     collective_matmul=collective_matmul)  # [B, T, V] float32
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
