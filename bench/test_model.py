"""The whole model: `palm.forward` and one training step (`palm.train.make_train_step`).

Test ids read `<preset>-<impl>-B<batch>-T<positions>-<dtype>`. At paper size the model is the
"1b" preset (PaLM's head dim 256, 8 heads and 256k vocabulary at D = 2048, 16 layers), whose
training step (float32 master weights and Adafactor moments) fits one GPU; "<preset>-L<n>"
names a preset cut to n layers (e.g. "8b-L2"); "demo" is the CPU training demo's model.
tools/bench_report.py adds the MFU against the bare matmul measured in the same run
(`mfu_vs_matmul`, bench/test_ceilings.py) beside the datasheet-peak MFU stored here.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest

import palm
from bench import costs
from palm.train import TrainConfig, init_state, make_train_step


def model_config(name: str) -> palm.Config:
    """A preset, or "<preset>-L<n>": the preset with n layers."""
    base, _, layers = name.partition("-L")
    config = palm.preset(base)
    return dataclasses.replace(config, n_layers=int(layers)) if layers else config


def _model_id(case):
    s = case.sizes
    return f"{s.model}-{case.impl}-B{s.model_b}-T{s.model_t}-{model_config(s.model).dtype}"


def _tokens(i: int, shape, vocab: int) -> jax.Array:
    return jax.random.randint(jax.random.key(1000 + i), shape, 0, vocab, jnp.int32)


def _nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def _mfu(tokens_per_s: float, config: palm.Config, seq_len: int, device) -> float | None:
    """PaLM Appendix B MFU against the bf16 peak; None on unknown devices or other dtypes."""
    if device.peak_flops is None or config.dtype not in ("bfloat16", "float16"):
        return None
    return palm.mfu(tokens_per_s, config, seq_len, device.peak_flops, num_devices=1)


@pytest.mark.bench_cases(id=_model_id)
def test_forward(case, bench):
    s = case.sizes
    config = model_config(s.model)
    # The key matches init_state's, so test_train_step's init hits palm.init's jit cache.
    params = palm.init(config, jax.random.split(jax.random.PRNGKey(0))[1])
    # Tokens rotate; the parameters stay (at paper size they are 100x any cache).
    inputs = bench.inputs(lambda i: (params, _tokens(i, (s.model_b, s.model_t), config.vocab_size)), max_sets=3)
    fn = jax.jit(lambda p, t: palm.forward(p, t, config, impl=case.impl))
    # With impl="xla" the forward is the reference path itself: reuse its compiled function.
    ref = fn if case.impl == "xla" else jax.jit(lambda p, t: palm.forward(p, t, config, impl="xla"))
    tokens = s.model_b * s.model_t
    per_token = palm.flops_per_token(config, s.model_t)
    cost = costs.forward(tokens, per_token, _nbytes(params), tokens * config.vocab_size * 4)
    bench(fn, inputs, reference=ref, flops=cost.flops, nbytes=cost.bytes, dtype=config.dtype, impl=case.impl,
          shapes={"tokens": (s.model_b, s.model_t)}, tolerance_factor=2.0,
          extra={"model": s.model, "num_params": palm.num_params(config)},
          derived=lambda median: {"tokens_per_s": tokens / median,
                                  "forward_mfu": _forward_mfu(tokens / median, per_token, config, bench.device)})


def _forward_mfu(tokens_per_s, per_token, config, device):
    """Forward-only model FLOPs (a third of Appendix B's per-token count) over the bf16 peak."""
    if device.peak_flops is None or config.dtype not in ("bfloat16", "float16"):
        return None
    return tokens_per_s * per_token / 3.0 / device.peak_flops


@pytest.mark.bench_cases(id=_model_id)
def test_train_step(case, bench):
    s = case.sizes
    config = model_config(s.model)
    train_config = TrainConfig(batch_size=s.model_b, seq_len=s.model_t, impl=case.impl)
    # The state carries from step to step as in training (make_train_step donates it); the
    # batches rotate.
    carry = {"state": init_state(config, train_config)}
    state_bytes = _nbytes(carry["state"])
    step = make_train_step(config, train_config)

    def train_step(batch):
        carry["state"], metrics = step(carry["state"], batch)
        return carry["state"], metrics

    loss = jax.jit(lambda p, b: palm.loss(p, b, config, impl="xla")[0])
    inputs = bench.inputs(lambda i: (_tokens(i, (s.model_b, s.model_t + 1), config.vocab_size),), max_sets=3)
    tokens = s.model_b * s.model_t
    cost = costs.train_step(tokens, palm.flops_per_token(config, s.model_t), state_bytes,
                            _nbytes(inputs[0]))
    bench(train_step, inputs, reference=lambda batch: loss(carry["state"]["params"], batch),
          select=lambda out: out[1]["loss"], tolerance_factor=2.0, flops=cost.flops, nbytes=cost.bytes,
          dtype=config.dtype, impl=case.impl, shapes={"batch": (s.model_b, s.model_t + 1)},
          extra={"model": s.model, "num_params": palm.num_params(config), "state_bytes": state_bytes},
          derived=lambda median: {"tokens_per_s": tokens / median,
                                  "mfu": _mfu(tokens / median, config, s.model_t, bench.device)})
