"""palm.generate: the KV-cache decoder against the argmax loop over full forward passes."""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import palm
from kernels import target_backend
from palm.cli import main
from palm.decoding import _generate_jit, generate, load_run
from tpu_export import export_for_tpu, mosaic_kernel_names

ROOT = Path(__file__).resolve().parent.parent

TINY = palm.preset("tiny")
NEW = 6  # new tokens per row
PROMPTS = np.array([[252, 175, 224, 105, 160],
                    [172, 22, 1, 223, 9],
                    [32, 65, 2, 98, 1]], np.int32)  # [B, P]
RAGGED = np.array([5, 2, 4], np.int32)


def scaled_params(config):
    # At init the residual stream is mostly the token's own embedding, so greedy decoding just
    # repeats the last token, which would hide a wrong position or cache slot. Doubling the
    # blocks' weights lets attention and the MLP steer it: sequences then rarely repeat.
    params = palm.init(config, jax.random.key(0))
    blocks = {name: w if name == "norm_scale" else 2 * w for name, w in params["blocks"].items()}
    return {**params, "blocks": blocks}


@pytest.fixture(scope="module")
def params():
    return scaled_params(TINY)


def forward_loop(params, prompts, lengths, new, config, impl):
    """Each row alone, extended by argmax over full forward passes at a fixed width (one
    compile); padding after each row's tokens is 0, as generate writes without eos_id."""
    b, p = prompts.shape
    out = np.zeros((b, p + new), np.int32)
    for row, length in enumerate(lengths):
        seq = np.zeros((1, p + new), np.int32)
        seq[0, :length] = prompts[row, :length]
        for t in range(length, length + new):
            logits = palm.forward(params, jnp.asarray(seq), config, impl=impl)
            seq[0, t] = int(jnp.argmax(logits[0, t - 1]))
        out[row] = seq[0]
    return out


@pytest.mark.parametrize("lengths", [None, RAGGED], ids=["equal", "ragged"])
def test_greedy_matches_forward_loop(params, lengths):
    out = generate(params, jnp.asarray(PROMPTS), TINY, max_new_tokens=NEW, prompt_lengths=lengths,
                   impl="xla")
    assert out.dtype == jnp.int32 and out.shape == (3, 5 + NEW)
    full = np.full(3, 5) if lengths is None else lengths
    expected = forward_loop(params, PROMPTS, full, NEW, TINY, "xla")
    np.testing.assert_array_equal(np.asarray(out), expected)
    assert len(set(expected[0, 5:])) > 2, "degenerate model: the test would not see position bugs"


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_greedy_pallas_interpreted(impl):
    # The Mosaic kernels in the TPU interpreter (any K works there; natively RoPE needs
    # K % 128 == 0), the Triton kernels in the generic one: flash prefill, decode kernel,
    # block_in/block_out on one-token rows.
    config = dataclasses.replace(TINY, n_layers=1)
    params = scaled_params(config)
    prompts, lengths = PROMPTS[:2, :4], np.array([4, 2], np.int32)
    out = generate(params, jnp.asarray(prompts), config, max_new_tokens=3, prompt_lengths=lengths,
                   impl=impl)
    expected = forward_loop(params, prompts, lengths, 3, config, "xla")
    np.testing.assert_array_equal(np.asarray(out), expected)


def test_one_compile_per_bucket(params):
    # Prompt lengths 3..5 share the 16-position prompt bucket, 2..6 new tokens the 128-slot cache.
    generate(params, jnp.asarray(PROMPTS), TINY, max_new_tokens=2, impl="xla")
    before = _generate_jit._cache_size()
    generate(params, jnp.asarray(PROMPTS[:, :3]), TINY, max_new_tokens=6, impl="xla")
    generate(params, jnp.asarray(PROMPTS[:, :4]), TINY, max_new_tokens=4, prompt_lengths=RAGGED - 1,
             impl="xla")
    assert _generate_jit._cache_size() == before


def test_eos_stops_each_row(params):
    greedy = np.asarray(generate(params, jnp.asarray(PROMPTS), TINY, max_new_tokens=NEW,
                                 prompt_lengths=RAGGED, impl="xla"))
    eos = int(greedy[0, 5 + 2])  # row 0's third new token
    out = np.asarray(generate(params, jnp.asarray(PROMPTS), TINY, max_new_tokens=NEW,
                              prompt_lengths=RAGGED, eos_id=eos, impl="xla"))
    for row, length in enumerate(RAGGED):
        new = list(greedy[row, length:length + NEW])
        stop = new.index(eos) + 1 if eos in new else NEW
        expected = [*greedy[row, :length], *new[:stop]]
        expected += [eos] * (5 + NEW - len(expected))  # padding is eos_id when given
        np.testing.assert_array_equal(out[row], expected, err_msg=f"row {row}")
    assert list(out[0, 5 + 3:]) == [eos] * (NEW - 3)


def test_no_new_tokens(params):
    out = generate(params, jnp.asarray(PROMPTS), TINY, max_new_tokens=0, prompt_lengths=RAGGED,
                   eos_id=3)
    expected = np.where(np.arange(5) < RAGGED[:, None], PROMPTS, 3)
    np.testing.assert_array_equal(np.asarray(out), expected)


def test_sampling(params):
    run = lambda **kw: np.asarray(generate(params, jnp.asarray(PROMPTS), TINY,  # noqa: E731
                                           max_new_tokens=NEW, prompt_lengths=RAGGED, impl="xla",
                                           **kw))
    greedy = run()
    key = jax.random.key(7)
    first = run(temperature=1.0, key=key)
    np.testing.assert_array_equal(run(temperature=1.0, key=key), first)  # reproducible
    assert not np.array_equal(run(temperature=1.0, key=jax.random.key(8)), first)
    np.testing.assert_array_equal(run(temperature=0.7, top_k=1, key=key), greedy)
    np.testing.assert_array_equal(run(temperature=1.3, top_p=1e-6, key=key), greedy)
    # Only sampled tokens change: the prompts stay.
    for row, length in enumerate(RAGGED):
        np.testing.assert_array_equal(first[row, :length], PROMPTS[row, :length])


def test_callback_streams_the_generated_tokens_in_order(params):
    # Ragged rows and an EOS that stops row 0 early: step i's tokens are column len_b + i of
    # the result (padding once a row is done), and the loop ends when every row is done.
    greedy = np.asarray(generate(params, jnp.asarray(PROMPTS), TINY, max_new_tokens=NEW,
                                 prompt_lengths=RAGGED, impl="xla"))
    eos = int(greedy[0, 5 + 1])
    steps = []
    out = np.asarray(generate(params, jnp.asarray(PROMPTS), TINY, max_new_tokens=NEW,
                              prompt_lengths=RAGGED, eos_id=eos, impl="xla",
                              callback=lambda tokens: steps.append(tokens.copy())))
    assert all(t.dtype == np.int32 and t.shape == (3,) for t in steps)
    rows = np.arange(3)[:, None]
    np.testing.assert_array_equal(np.stack(steps, axis=1),
                                  out[rows, RAGGED[:, None] + np.arange(len(steps))])
    news = [list(row[length:length + NEW]) for row, length in zip(out, RAGGED)]
    assert len(steps) == max(new.index(eos) + 1 if eos in new else NEW for new in news)
    np.testing.assert_array_equal(out, np.asarray(generate(
        params, jnp.asarray(PROMPTS), TINY, max_new_tokens=NEW, prompt_lengths=RAGGED, eos_id=eos,
        impl="xla")))  # streaming changes nothing in the result


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompts=np.zeros((2, 0), np.int32)), "prompts is empty"),
    (dict(max_new_tokens=60), "max_seq_len"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(prompt_lengths=np.array([5, 0, 2])), "prompt_lengths"),
    (dict(prompt_lengths=np.array([5, 6, 2])), "prompt_lengths"),
    (dict(prompt_lengths=np.array([5, 2])), "prompt_lengths"),
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=1.0), "key"),
    (dict(temperature=1.0, top_k=0, key=jax.random.key(0)), "top_k"),
    (dict(temperature=1.0, top_p=0.0, key=jax.random.key(0)), "top_p"),
    (dict(temperature=1.0, top_p=1.5, key=jax.random.key(0)), "top_p"),
    (dict(eos_id=TINY.vocab_size), "eos_id"),
    (dict(prompts=np.full((3, 5), TINY.vocab_size, np.int32)), "token id"),
])
def test_bad_input(params, kwargs, match):
    args = {"prompts": PROMPTS, "max_new_tokens": NEW, **kwargs}
    prompts = jnp.asarray(args.pop("prompts"))
    with pytest.raises(ValueError, match=match):
        generate(params, prompts, TINY, impl="xla", **args)


def test_lowers_for_tpu():
    # Natively (K = 128 for RoPE's lane rule, bf16): the prefill's flash kernel and the decode
    # loop's kernel both lower to Mosaic inside the one jitted program.
    config = dataclasses.replace(TINY, d_model=128, n_layers=1, n_heads=2, head_dim=128,
                                 dtype="bfloat16")
    shapes = palm.param_shapes(config)
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), shapes,
                          is_leaf=lambda s: isinstance(s, tuple))
    args = (params, jnp.zeros((2, 16), jnp.int32), jnp.array([16, 3], jnp.int32), jnp.int32(8),
            jnp.float32(0), jnp.int32(1), jnp.float32(1), jax.random.key(0), jnp.int32(-1),
            jnp.int32(0), jnp.int32(-1))
    fn = functools.partial(_generate_jit, config=config, impl="pallas_tpu", sample=False,
                           cache_len=128, stream=False)
    with target_backend("tpu"):
        names = mosaic_kernel_names(export_for_tpu(fn, *args))
    for kernel in ("palm_mq_flash_attention", "palm_mq_decode", "palm_block_out"):
        assert any(n.startswith(kernel) for n in names), (kernel, names)


# --- A training run's model from the command line: `python -m palm generate` (conftest.run_dir). ---

def test_generate_command_streams_a_runs_text(run_dir):
    command = [sys.executable, "-m", "palm", "generate", "--run", str(run_dir), "--prompt", "def",
               "--max-new-tokens", "8", "--seed", "0"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    # The same tokens as generate with the flags' values (temperature 0.8, key 0, stop at EOS).
    params, config, tokenizer = load_run(run_dir)
    prompt = tokenizer.encode("def")
    out = generate(params, jnp.asarray([prompt]), config, max_new_tokens=8, temperature=0.8,
                   key=jax.random.key(0), eos_id=tokenizer.eos_id, impl="xla")
    assert result.stdout == tokenizer.decode([int(t) for t in out[0]]) + "\n"
    assert result.stdout.startswith("def")


def _broken(run_dir, tmp_path, damage):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    damage(copy)
    return copy


def _edit_config(path, **model):
    record = json.loads((path / "config.json").read_text())
    record["model"].update(model)
    (path / "config.json").write_text(json.dumps(record))


@pytest.mark.parametrize("damage, args, message", [
    (None, ["--max-new-tokens", "70"], "--max-new-tokens 70 must be in [0, 63]"),
    (None, ["--temperature", "-1"], "temperature must be >= 0"),
    (None, ["--top-p", "2"], "top_p must lie in (0, 1]"),
    (lambda p: shutil.rmtree(p), [], "not found"),
    (lambda p: (p / "config.json").unlink(), [], "config.json not found"),
    (lambda p: (p / "tokenizer.model").unlink(), [], "tokenizer.model"),
    (lambda p: shutil.rmtree(p / "checkpoints"), [], "no checkpoint in"),
    (lambda p: _edit_config(p, n_layers=3), [], "was written with config="),
], ids=["too-many-tokens", "temperature", "top-p", "no-dir", "no-config", "no-tokenizer",
        "no-checkpoint", "other-config"])
def test_generate_command_bad_input_is_one_line(run_dir, tmp_path, capsys, damage, args, message):
    path = run_dir if damage is None else _broken(run_dir, tmp_path, damage)
    assert main(["generate", "--run", str(path), "--prompt", "def", *args]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.err.count("\n") == 1, captured.err
    assert captured.out == ""
    if damage is not None and message != "not found":
        assert str(path) in captured.err  # names what is wrong where
