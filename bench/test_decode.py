"""Decoding: `palm.generate` with the multi-query KV cache against the full-recompute loop.

Test ids read `<model>-<method>-<impl>-B<batch>-N<new tokens>`. Each case generates N greedy
tokens after a 16-token prompt: "kv_cache" is `palm.generate` (a prefill, then one token per
step reading the cache); "recompute" reruns the whole forward pass over the sequence for every
new token, the way generation worked before the cache (kept here as the baseline, on the
first, small model only: on the large one it would take minutes). The models are the size's
`decode_models` (bench/conftest.py): "demo" (the CPU training demo) and, timed runs only,
"8b-L2" on CPU (PaLM-8B's widths and vocabulary, 2 layers) or "1b" on accelerators (the
one-GPU PaLM-shaped preset). Parameters are cast to the model's compute dtype first, as a
server keeps them, so each step reads bf16 weights.

extra_info per case: tokens_per_s (B*N over the call) and ms_per_token (the call over N steps:
the latency a user sees per new token, prefill included), the KV cache's bytes per token of
context against a multi-head cache of the same model (`kv_cache_bytes_per_token`,
`mha_cache_bytes_per_token`: H times more), and on the kv_cache cases the speed-up over the
recompute case of the same model, batch and N measured earlier in the same run
(`speedup_vs_recompute`). The roofline of a kv_cache case is the time to read the weights and
the cache once per step (bench/costs.py `decode`) at the datasheet bandwidth;
tools/bench_report.py also states it at the copy bandwidth measured in the same run
(bench/test_ceilings.py, `vs_copy_bound`).

Without timing (`make test`) only the first model's kv_cache case at batch 1 runs: it decodes N = 8
tokens once, which must equal the recompute loop's tokens exactly.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import palm
from bench import costs
from bench.conftest import _impls_for, bench_sizes
from bench.test_model import model_config
from palm.model import _logits

PROMPT = 16
TIMED_NEW_TOKENS = 256
CHECKED_NEW_TOKENS = 8
BATCHES = (1, 64)
# Medians of the recompute cases, for the kv_cache cases of the same shape that follow them.
_RECOMPUTE_SECONDS: dict[tuple, float] = {}


@functools.partial(jax.jit, static_argnames=("config", "impl", "new"))
def recompute(params, prompts, *, config, impl, new):
    """Greedy decoding without a cache: step i runs the whole forward pass over [B, P + new]
    (one width, one compile) and takes the argmax at position P + i - 1."""
    b, p = prompts.shape
    tokens = jnp.zeros((b, p + new), jnp.int32).at[:, :p].set(prompts)

    def step(i, tokens):
        logits = _logits(params, tokens, config, impl)  # [B, P + new, V]
        next_token = jnp.argmax(logits[:, p + i - 1], axis=-1).astype(jnp.int32)
        return tokens.at[:, p + i].set(next_token)

    return jax.lax.fori_loop(0, new, step, tokens)


def _cases(config):
    timed = not config.getoption("benchmark_disable", False)
    cpu = jax.default_backend() == "cpu"
    models = bench_sizes(config).decode_models
    # kv_cache decoding with each implementation the backend runs (--bench-impls overrides):
    # xla and pallas_gpu on a GPU; the recompute baseline with the first only.
    impls = _impls_for(config, {}) if timed else ["xla"]
    cases = []
    for model in models if timed else models[:1]:
        # Untimed, batch 1 only: tests/test_generate.py checks batches, ragged ones included.
        for batch in BATCHES if timed else BATCHES[:1]:
            new = TIMED_NEW_TOKENS if timed else CHECKED_NEW_TOKENS
            if model == "8b-L2" and cpu:
                new = 32  # ~1.5e9 parameters read per token from CPU memory
            # The recompute baseline first: its median is the kv_cache case's yardstick. Untimed,
            # the kv_cache case checks itself against it.
            if timed and model == models[0] and not (cpu and batch > 1):
                cases.append((model, "recompute", impls[0], batch, new))
            cases.extend((model, "kv_cache", impl, batch, new) for impl in impls)
    return cases


def pytest_generate_tests(metafunc):
    if "decode_case" in metafunc.fixturenames:
        cases = _cases(metafunc.config)
        metafunc.parametrize("decode_case", cases, ids=[f"{m}-{w}-{i}-B{b}-N{n}" for m, w, i, b, n in cases])


def _setup(model: str, new: int):
    config = model_config(model)
    # RoPE has no learned positions: only the limit moves so that P + 256 new tokens fit.
    config = dataclasses.replace(config, max_seq_len=max(config.max_seq_len, PROMPT + new))
    if model == "demo":
        params = palm.init(config, jax.random.key(0))
        # At init greedy decoding repeats the last token; doubled block weights let attention
        # steer it, so that a wrong cache slot would change the tokens (as tests/test_generate).
        params["blocks"] = {k: w if k == "norm_scale" else 2 * w for k, w in params["blocks"].items()}
    else:
        params = jax.jit(palm.init, static_argnums=0)(config, jax.random.key(0))
    params = jax.tree.map(lambda w: w.astype(config.dtype), params)
    return config, params


def test_generate(decode_case, bench):
    model, method, impl, batch, new = decode_case
    config, params = _setup(model, new)
    prompts = jax.random.randint(jax.random.key(1), (batch, PROMPT), 0, config.vocab_size, jnp.int32)
    check = functools.partial(recompute, config=config, impl="xla", new=new)
    if method == "recompute":
        fn = functools.partial(recompute, config=config, impl=impl, new=new)
    else:
        def fn(params, prompts):
            return palm.generate(params, prompts, config, max_new_tokens=new, impl=impl)
    dtype = jnp.dtype(config.dtype)
    matmul_params = palm.num_params(config) - config.d_model * (2 * config.n_layers + 1)  # less norm scales
    cost = costs.decode(batch, PROMPT, new, matmul_params=matmul_params,
                        param_bytes=matmul_params * dtype.itemsize, layers=config.n_layers,
                        heads=config.n_heads, head_dim=config.head_dim, itemsize=dtype.itemsize)
    mqa = 2 * config.n_layers * config.head_dim * dtype.itemsize
    key = (model, batch, new)  # the recompute case's, whatever the kv_cache case's impl

    def derived(median):
        figures = {"tokens_per_s": batch * new / median, "ms_per_token": median / new * 1e3}
        if method == "recompute":
            _RECOMPUTE_SECONDS[key] = median
        elif key in _RECOMPUTE_SECONDS:
            figures["speedup_vs_recompute"] = _RECOMPUTE_SECONDS[key] / median
        return figures

    out = bench(fn, [(params, prompts)], flops=cost.flops, nbytes=cost.bytes, dtype=config.dtype,
                impl=impl, shapes={"prompts": (batch, PROMPT)},
                extra={"model": model, "method": method, "new_tokens": new,
                       "kv_cache_bytes_per_token": mqa, "mha_cache_bytes_per_token": mqa * config.n_heads},
                derived=derived)
    if not bench.enabled:  # exact tokens, not a tolerance: one flipped argmax is a wrong decoder
        np.testing.assert_array_equal(np.asarray(out), np.asarray(check(params, prompts)))
