"""Autoregressive decoding with PaLM's multi-query KV cache: `generate` (and `greedy`), and
`python -m palm generate` (`run`), which streams a trained run's text (`load_run`).

Two phases, both jitted. The prefill runs the model's layers once over the padded prompts
[B, P] with the causal flash kernel and keeps every layer's k, v (RoPE applied) in a cache
k, v [L, B, S, K] in the compute dtype: one key/value head, so the cache is H times smaller than
multi-head attention's (PaLM section 2; Pope et al. 2022). The decode loop (`lax.while_loop`)
then feeds one token per row: `block_in` on [B, 1, D] at the row's own position, the new k, v
written into the cache, `mq_decode_attention` over the row's first position + 1 slots,
`block_out`, the logits head, a sample. Each step costs O(S) per layer instead of re-running
the whole sequence.

Rows are left-aligned: row b's prompt is prompts[b, :prompt_lengths[b]] at positions
0 .. len_b - 1, its new tokens go at positions len_b, len_b + 1, ... and it attends only to
its own positions, so each row decodes as if it were alone in the batch. Prompt padding
after len_b is harmless: causal attention never lets a real position see it, and decoding
overwrites its cache slots before any row's attention reaches them.

Compiles are shared by buckets: the prompt is padded to a power of two (at least 16) and the
cache to a multiple of 128 slots (the TPU decode kernel's tile), and the number of new
tokens, the sampling values and the prompt lengths are traced, so one compile serves every
prompt length and every max_new_tokens within a bucket.

Dimension key: B batch, P prompt positions, S cache slots, D model, H heads, K head dim,
V vocab, L layers.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import kernels
from kernels._tpu import round_up
from palm.checkpoint import CheckpointError, Checkpointer
from palm.config import Config
from palm.model import _attention_and_mlp, _positions, _unembed, check_params, check_tokens
from palm.settings import OptimizerConfig, TrainConfig, TrainError
from palm.tokenizer import Tokenizer

# Prompts pad to a power of two no shorter than this: few prefill compiles, little waste.
_MIN_PROMPT_BUCKET = 16
# Cache slots round up to this: the TPU decode kernel's lane-dense tile.
_CACHE_BUCKET = 128

# `python -m palm generate` without --max-new-tokens: at most this many (see palm.cli).
_DEFAULT_NEW_TOKENS = 64

# Streaming callbacks of the generate calls in flight, by id. The jitted program passes its
# call's id (a traced int) to the host with each step's tokens, so one compile serves every
# callback, and concurrent calls each reach their own.
_STREAMS: dict[int, Callable[[np.ndarray], None]] = {}
_STREAM_IDS = itertools.count()


def generate(params: dict, prompts: jax.Array, config: Config, *, max_new_tokens: int,
             prompt_lengths: jax.Array | None = None, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, key: jax.Array | None = None,
             eos_id: int | None = None, impl: str = "auto",
             callback: Callable[[np.ndarray], None] | None = None) -> jax.Array:
    """Extends each prompt by up to max_new_tokens sampled tokens, using a KV cache.

    Streaming: `callback` is called on the host with each step's new tokens, in step order,
    while the loop runs, through an ordered `jax.debug.callback` inside the jitted loop. The
    whole decode stays one program with one compile: decoding in chunks would instead return
    to Python every chunk and trade latency (chunk length) against dispatch overhead. The
    price is a device-to-host transfer of B ints per step, paid only when a callback is given
    (without one the program has no callback in it).

    Args:
      params: the nested params dict from `palm.init` (cast to `config.dtype` inside).
      prompts: int [B, P] left-aligned prompts; row b's prompt is prompts[b, :prompt_lengths[b]].
      config: the model configuration.
      max_new_tokens: new tokens per row, >= 0; P + max_new_tokens <= config.max_seq_len.
      prompt_lengths: int [B] with 1 <= prompt_lengths[b] <= P (concrete values); None means
        every row is P tokens long.
      temperature: 0 picks the argmax (greedy; top_k, top_p and key are then unused); > 0
        divides the logits before sampling.
      top_k: sample only among the k most likely tokens (k >= 1; None: all V).
      top_p: nucleus sampling (Holtzman et al. 2019): after top_k, keep the most likely tokens
        until their probability reaches top_p, in (0, 1] (None: 1, all).
      key: a PRNG key, required when temperature > 0; step i samples with fold_in(key, i), so
        a key gives the same tokens on every call with the same inputs.
      eos_id: a row stops after emitting this token (the EOS itself is kept).
      impl: kernel implementation, as in `palm.forward`.
      callback: called with int32 numpy [B] once per generated position: step i's tokens
        are column prompt_lengths[b] + i of the result; rows already finished get the padding
        id. generate returns after its last call. An exception it raises surfaces from
        generate as a JAX runtime error.

    Returns:
      int32 [B, P + max_new_tokens]: row b holds its prompt, then its new tokens from column
      prompt_lengths[b]; every column after a row's last new token (after its EOS, or past
      prompt_lengths[b] + max_new_tokens) holds the padding id, eos_id if given, else 0.

    Raises:
      ValueError: on empty or malformed prompts or prompt_lengths, P + max_new_tokens beyond
        config.max_seq_len, temperature < 0, top_k < 1, top_p outside (0, 1], sampling
        without a key, an eos_id outside the vocabulary, or params that don't match config.
    """
    impl = kernels.resolve_impl(impl)
    check_tokens(prompts, config, max_len=config.max_seq_len)
    b, p = prompts.shape
    if b < 1 or p < 1:
        raise ValueError(f"prompts is empty: {prompts.shape=}; generate needs at least one token per row")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if p + max_new_tokens > config.max_seq_len:
        raise ValueError(f"prompt length {p} + max_new_tokens {max_new_tokens} exceeds "
                         f"config.max_seq_len={config.max_seq_len}")
    lengths = _check_lengths(prompt_lengths, b, p)
    if not temperature >= 0:  # also rejects NaN
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an int >= 1 or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1] or be None, got {top_p!r}")
    sample = temperature > 0
    if sample and key is None:
        raise ValueError(f"sampling (temperature={temperature}) needs a PRNG key: pass key=")
    if eos_id is not None and not 0 <= eos_id < config.vocab_size:
        raise ValueError(f"eos_id {eos_id} outside [0, vocab_size={config.vocab_size})")
    check_params(params, config)
    pad_id = 0 if eos_id is None else eos_id
    if max_new_tokens == 0:  # e.g. a training sample whose prompt already fills max_seq_len
        return jnp.where(jnp.arange(p) < lengths[:, None], prompts.astype(jnp.int32), pad_id)

    p_pad = length_bucket(p)
    cache_len = round_up(max(p_pad, p + max_new_tokens), _CACHE_BUCKET)
    padded = jnp.zeros((b, p_pad), jnp.int32).at[:, :p].set(prompts.astype(jnp.int32))
    stream_id = -1
    if callback is not None:
        stream_id = next(_STREAM_IDS)
        _STREAMS[stream_id] = callback
    try:
        out = _generate_jit(
            params, padded, lengths, jnp.int32(max_new_tokens), jnp.float32(temperature),
            jnp.int32(min(top_k or config.vocab_size, config.vocab_size)),
            jnp.float32(1.0 if top_p is None else top_p),
            jax.random.key(0) if key is None else key,  # unused when greedy
            jnp.int32(-1 if eos_id is None else eos_id), jnp.int32(pad_id), jnp.int32(stream_id),
            config=config, impl=impl, sample=sample, cache_len=cache_len,
            stream=callback is not None)
        if callback is not None:
            out.block_until_ready()
            jax.effects_barrier()  # the last callbacks may still be in flight after the result
    finally:
        _STREAMS.pop(stream_id, None)
    return out[:, :p + max_new_tokens]


def length_bucket(length: int) -> int:
    """The padded length that sequences of `length` tokens share a compile at: the next power
    of two, at least _MIN_PROMPT_BUCKET."""
    return max(_MIN_PROMPT_BUCKET, 1 << (length - 1).bit_length())


def greedy(params: dict, prompt: jax.Array, config: Config, *, max_new_tokens: int,
           impl: str = "auto") -> jax.Array:
    """Greedy decoding of equal-length prompts int [B, P]: `generate` at temperature 0."""
    return generate(params, prompt, config, max_new_tokens=max_new_tokens, impl=impl)


def load_run(run_dir: str | Path) -> tuple[dict, Config, Tokenizer]:
    """(params, config, tokenizer) of a run directory written by `python -m palm train`.

    The config comes from its config.json, the tokenizer from its tokenizer.model, the params
    from its newest checkpoint, on one device even when the run was trained sharded over a
    mesh. The checkpoint holds the whole train state and is restored as such (`Checkpointer`
    restores whole states); only the params are kept.

    Raises:
        TrainError: no such directory, or a config.json that is missing or unreadable.
        FileNotFoundError: no tokenizer.model.
        CheckpointError: no checkpoint, or one that does not match config.json or the
            tokenizer (written by another configuration, or damaged); the message names it.
    """
    # palm.train imports this module (for `greedy`), so it can only be imported here.
    from palm.train import RUN_TOKENIZER, abstract_state, check_meta, read_run_config

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise TrainError(f"run directory {run_dir} not found")
    record = read_run_config(run_dir)
    try:
        config = Config(**record["model"])
        train = dict(record["train"], optimizer=OptimizerConfig(**record["train"]["optimizer"]))
        train_config = TrainConfig(**train)
    except (KeyError, TypeError, ValueError) as e:
        raise TrainError(f"{run_dir / 'config.json'} does not describe a run: {e}") from None
    tokenizer = Tokenizer.load(run_dir / RUN_TOKENIZER)
    directory = run_dir / "checkpoints"
    if not directory.is_dir():  # Checkpointer would create it
        raise CheckpointError(f"no checkpoint in {directory}: train the run first")
    checkpointer = Checkpointer(directory)
    try:
        step = checkpointer.latest_step()
        if step is None:
            raise CheckpointError(f"no checkpoint in {directory}: train the run first")
        check_meta(checkpointer, step, {"config": config.to_dict(),
                                        "tokenizer_sha256": tokenizer.sha256})
        # Onto this process's first device, whatever mesh the run was trained on.
        state, _ = checkpointer.restore(step, abstract_state(config, train_config))
    finally:
        checkpointer.close()
    return state["params"], config, tokenizer


class _TextStream:
    """A streaming callback that prints text as tokens arrive: the prompt, then each new text.

    SentencePiece pieces do not map one to one onto characters (byte-fallback pieces carry
    one UTF-8 byte each), so each call decodes all the ids so far and prints what the text
    gained; a text that ends in U+FFFD, a character still missing bytes, waits for them.
    """

    def __init__(self, tokenizer: Tokenizer, prompt: list[int], file):
        self._tokenizer, self._ids, self._file = tokenizer, list(prompt), file
        self._printed = ""

    def __call__(self, tokens: np.ndarray) -> None:  # tokens [1]
        self._ids.append(int(tokens[0]))
        text = self._tokenizer.decode(self._ids)
        if not text.endswith("\ufffd"):
            self._write(text)

    def finish(self) -> None:
        self._write(self._tokenizer.decode(self._ids))
        self._file.write("\n")
        self._file.flush()

    def _write(self, text: str) -> None:
        self._file.write(text[len(self._printed):])
        self._file.flush()
        self._printed = text


def run(args: argparse.Namespace) -> int:
    """`python -m palm generate`: prints the prompt, then the continuation as it is generated,
    until --max-new-tokens or the end-of-document token; bad input exits with code 2 and a
    one-line message. The prompt shows with the first new token, once the inputs have passed
    every check."""
    try:
        impl = kernels.resolve_impl(args.impl)
        params, config, tokenizer = load_run(args.run_dir)
        prompt = tokenizer.encode(args.prompt) or [tokenizer.bos_id]
        room = config.max_seq_len - len(prompt)
        new = min(_DEFAULT_NEW_TOKENS, room) if args.max_new_tokens is None else args.max_new_tokens
        if not 0 <= new <= room:
            raise ValueError(f"--max-new-tokens {new} must be in [0, {room}]: the prompt is "
                             f"{len(prompt)} tokens of the model's max_seq_len {config.max_seq_len}")
        stream = _TextStream(tokenizer, prompt, sys.stdout)
        generate(params, jnp.asarray([prompt], jnp.int32), config, max_new_tokens=new,
                 temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                 key=jax.random.key(args.seed), eos_id=tokenizer.eos_id, impl=impl,
                 callback=stream)
    except (TrainError, CheckpointError, ValueError, FileNotFoundError, UnicodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stream.finish()
    return 0


def _check_lengths(prompt_lengths, b: int, p: int) -> jax.Array:
    """prompt_lengths as int32 [B], checked against [1, P]; ValueError naming what is wrong."""
    if prompt_lengths is None:
        return jnp.full((b,), p, jnp.int32)
    try:
        values = np.asarray(prompt_lengths)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError) as e:
        raise ValueError("prompt_lengths must be concrete (it sets where each row's tokens go)") from e
    if values.shape != (b,) or not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"prompt_lengths must be int [B={b}], got shape {values.shape} dtype {values.dtype}")
    if values.min() < 1 or values.max() > p:
        raise ValueError(f"prompt_lengths must lie in [1, P={p}], got {values.tolist()}")
    return jnp.asarray(values, jnp.int32)


def _emit(stream_id, tokens) -> None:
    """Host side of streaming: hands one step's tokens [B] to its call's callback."""
    _STREAMS[int(stream_id)](np.asarray(tokens))


@functools.partial(jax.jit, static_argnames=("config", "impl", "sample", "cache_len", "stream"))
def _generate_jit(params, prompts, lengths, max_new_tokens, temperature, top_k, top_p, key,
                  eos_id, pad_id, stream_id, *, config, impl, sample, cache_len, stream):
    """prompts int32 [B, P] (padded) -> int32 [B, S]: prompts, new tokens, padding.

    eos_id -1 means none (no token matches it). With `stream`, each step's tokens [B] go to
    `_emit` with stream_id.
    """
    def emit(tokens):
        if stream:
            jax.debug.callback(_emit, stream_id, tokens, ordered=True)

    dtype = jnp.dtype(config.dtype)
    params = jax.tree.map(lambda a: a.astype(dtype), params)
    b, p = prompts.shape
    rows = jnp.arange(b)
    choose = functools.partial(_choose, temperature=temperature, top_k=top_k, top_p=top_p,
                               sample=sample)
    block_in = functools.partial(kernels.block_in, eps=config.norm_eps, base=config.rope_base,
                                 impl=impl)

    # Prefill: the model's block over the whole padded prompt, keeping each layer's k, v.
    positions = _positions(b, p)

    def prefill_layer(x, w):
        o, h, kv = _attention_and_mlp(x, w, positions, config, impl)  # kv: k, v [B, P, K]
        return kernels.block_out(x, o, w["wo"], h, w["w_down"], impl=impl), kv

    x = jnp.take(params["embed"], prompts, axis=0)  # [B, P, D]
    x, (k_new, v_new) = jax.lax.scan(prefill_layer, x, params["blocks"])  # k, v [L, B, P, K]
    slots = ((0, 0), (0, 0), (0, cache_len - p), (0, 0))
    k_cache, v_cache = jnp.pad(k_new, slots), jnp.pad(v_new, slots)  # [L, B, S, K]
    first = choose(_head(params, x[rows, lengths - 1], config), jax.random.fold_in(key, 0))
    prompt_slots = jnp.arange(cache_len)[None, :] < lengths[:, None]  # [B, S]
    out = jnp.where(prompt_slots, jnp.pad(prompts, ((0, 0), (0, cache_len - p))), pad_id)
    out = out.at[rows, lengths].set(first)
    emit(first)
    done = first == eos_id

    # Decode: step i feeds token i - 1, at position lengths + i - 1, and samples token i.
    def decode_layer(carry, w_l):
        x, k_cache, v_cache, position = carry
        w, layer = w_l
        q, k, v, h = block_in(x, w["norm_scale"], w["wq"], w["wk"], w["wv"], w["w_gate"],
                              w["w_up"], position[:, None])  # q [B, 1, H, K]; k, v [B, 1, K]
        k_cache = k_cache.at[layer, rows, position].set(k[:, 0])
        v_cache = v_cache.at[layer, rows, position].set(v[:, 0])
        o = kernels.mq_decode_attention(q[:, 0], k_cache[layer], v_cache[layer], position + 1,
                                        impl=impl)  # [B, H, K]
        x = kernels.block_out(x, o[:, None], w["wo"], h, w["w_down"], impl=impl)
        return (x, k_cache, v_cache, position), None

    def step(state):
        i, last, done, out, k_cache, v_cache = state
        position = lengths + i - 1
        x = jnp.take(params["embed"], last, axis=0)[:, None]  # [B, 1, D]
        layers = (params["blocks"], jnp.arange(config.n_layers))
        (x, k_cache, v_cache, _), _ = jax.lax.scan(decode_layer, (x, k_cache, v_cache, position),
                                                   layers)
        token = choose(_head(params, x[:, 0], config), jax.random.fold_in(key, i))
        token = jnp.where(done, pad_id, token)  # finished rows keep writing padding
        out = out.at[rows, position + 1].set(token)
        emit(token)
        return i + 1, token, done | (token == eos_id), out, k_cache, v_cache

    def more(state):
        i, _, done, *_ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    state = (jnp.int32(1), first, done, out, k_cache, v_cache)
    return jax.lax.while_loop(more, step, state)[3]


def _head(params: dict, x: jax.Array, config: Config) -> jax.Array:
    """float32 logits [B, V] of x [B, D]: the model's own head (final LayerNorm, shared
    embedding, 1/sqrt(D)) on one position per row."""
    return _unembed(x[:, None], params["final_norm_scale"], params["embed"], config)[:, 0]


def _choose(logits, key, *, temperature, top_k, top_p, sample):
    """The next token int32 [B] from logits [B, V]: argmax, or a top-k/top-p filtered sample."""
    if not sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    # One descending sort serves both filters; each becomes a per-row threshold logit, so
    # top_k and top_p stay traced (no recompile per value). Ties at a threshold are all kept.
    ranked = -jnp.sort(-logits, axis=-1)  # [B, V]
    kth = jnp.take(ranked, top_k - 1, axis=-1)  # [B]
    ranked = jnp.where(ranked >= kth[:, None], ranked, -jnp.inf)
    probs = jax.nn.softmax(ranked, axis=-1)
    # A token stays while the tokens ranked above it hold less than top_p: the top one always.
    keep = jnp.cumsum(probs, axis=-1) - probs < top_p
    cutoff = jnp.min(jnp.where(keep, ranked, jnp.inf), axis=-1)  # [B]
    logits = jnp.where(logits >= cutoff[:, None], logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
