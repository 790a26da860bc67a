"""The training recipe: optimizer settings, resumption, the loss-spike remedy, bad input."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import palm
from palm import data as data_lib
from palm import tokenizer as tokenizer_lib
from palm.cli import main
from palm.optim import OptimizerConfig, learning_rate_schedule, make_optimizer
from palm.train import TrainConfig, TrainError, train

CONFIG = dataclasses.replace(palm.preset("tiny"), vocab_size=512)
FAST = TrainConfig(steps=4, batch_size=4, seq_len=32, log_every=1, eval_every=2, eval_batches=1,
                   checkpoint_every=2, optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=2,
                                                                 decay_start=10),
                   sample_tokens=4)


@pytest.fixture(scope="module")
def corpus_files():
    return data_lib.stdlib_corpus(limit=12)


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory, corpus_files):
    path = tmp_path_factory.mktemp("tok") / "tok.model"
    tokenizer_lib.train(corpus_files, CONFIG.vocab_size, path)
    return str(path)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def run(tmp, files, tokenizer, cache, tc=FAST, **kw):
    return train(CONFIG, tc, {"stdlib": files}, tmp, tokenizer_path=tokenizer, cache_dir=cache,
                 progress=False, **kw)


def read_metrics(run_dir):
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


# --- Optimizer. ---

def test_schedule_is_the_papers():
    lr = learning_rate_schedule(OptimizerConfig())
    # 1e-2 for the first 10k steps, then 1/sqrt(k) (k = count + 1).
    assert float(lr(0)) == pytest.approx(1e-2)
    assert float(lr(9_999)) == pytest.approx(1e-2)
    assert float(lr(39_999)) == pytest.approx(1 / np.sqrt(40_000), rel=1e-5)
    warm = learning_rate_schedule(OptimizerConfig(learning_rate=2e-3, warmup_steps=10, decay_start=100))
    assert float(warm(4)) == pytest.approx(1e-3)
    assert float(warm(399)) == pytest.approx(2e-3 * np.sqrt(100 / 400), rel=1e-5)


def test_weight_decay_is_lr_squared():
    # With a zero gradient only the decoupled decay remains: update = -lr^2 * param.
    tx = make_optimizer(OptimizerConfig(learning_rate=0.1))
    params = {"w": jnp.full((4, 4), 2.0)}
    updates, _ = tx.update({"w": jnp.zeros((4, 4))}, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.01 * 2.0, rtol=1e-6)


def test_update_is_parameter_scaled_and_clipped():
    # The first step of unfactored Adafactor normalises the gradient to RMS 1 (clipped to 1),
    # multiplies by lr and by the parameter's RMS; momentum without debiasing keeps (1-beta1).
    tx = make_optimizer(OptimizerConfig(learning_rate=0.1, weight_decay_power=20.0))
    params = {"w": jnp.full((8, 8), 3.0)}
    grads = {"w": jax.random.normal(jax.random.key(0), (8, 8)) * 1e-3}
    updates, _ = tx.update(grads, tx.init(params), params)
    rms = float(jnp.sqrt(jnp.mean(updates["w"] ** 2)))
    assert rms == pytest.approx(0.1 * 3.0 * (1 - 0.9), rel=1e-3)


# --- Runs. ---

def test_short_run_lowers_the_loss(tmp_path, corpus_files, tokenizer_path, cache_dir):
    tc = dataclasses.replace(FAST, steps=16, eval_every=16, checkpoint_every=16,
                             optimizer=OptimizerConfig(learning_rate=5e-2, warmup_steps=2))
    summary = run(tmp_path, corpus_files, tokenizer_path, cache_dir, tc=tc)
    losses = [r["loss"] for r in read_metrics(tmp_path) if "loss" in r]
    assert len(losses) == 16
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3, losses
    record = read_metrics(tmp_path)[-1]
    for key in ("step", "loss", "tokens_per_second", "mfu", "val_loss", "learning_rate", "grad_norm"):
        assert key in record
    assert record["mfu"] is None  # CPU: unknown peak, reported as n/a rather than invented
    assert isinstance(summary["sample"], str) and summary["sample"]


def test_resume_is_bitwise_identical(tmp_path, corpus_files, tokenizer_path, cache_dir):
    straight = run(tmp_path / "a", corpus_files, tokenizer_path, cache_dir)
    run(tmp_path / "b", corpus_files, tokenizer_path, cache_dir, tc=dataclasses.replace(FAST, steps=2))
    resumed = run(tmp_path / "b", corpus_files, tokenizer_path, cache_dir, resume=True)
    # Same machine, same program: parameters, optimizer state and data order restored exactly.
    a = [r for r in read_metrics(tmp_path / "a") if "loss" in r]
    b = [r for r in read_metrics(tmp_path / "b") if "loss" in r]
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert straight["sample"] == resumed["sample"]
    from palm.checkpoint import Checkpointer, abstract
    from palm.train import init_state
    template = abstract(init_state(CONFIG, FAST))
    sa, _ = Checkpointer(tmp_path / "a" / "checkpoints").restore(4, template)
    sb, _ = Checkpointer(tmp_path / "b" / "checkpoints").restore(4, template)
    for x, y in zip(jax.tree.leaves(sa), jax.tree.leaves(sb)):
        np.testing.assert_array_equal(x, y)


def test_loss_spike_rewinds_and_skips(tmp_path, corpus_files, tokenizer_path, cache_dir):
    # A factor of 1e-3 makes every step that has two steps of history a "spike": the run rewinds
    # to the last checkpoint (every 2 steps), skips batches, and gives up after max_rewinds.
    tc = dataclasses.replace(FAST, steps=8, spike_factor=1e-3, spike_window=2, spike_skip_batches=3,
                             max_rewinds=2)
    with pytest.raises(TrainError, match="after 2 rewinds; giving up"):
        run(tmp_path, corpus_files, tokenizer_path, cache_dir, tc=tc)
    events = [r for r in read_metrics(tmp_path) if r.get("event") == "loss_spike"]
    assert [(e["step"], e["rewound_to"], e["skipped_batches"]) for e in events] == [(3, 2, 3), (5, 4, 3)]


def test_non_finite_loss_is_a_spike():
    from palm.train import _is_spike
    assert _is_spike(float("nan"), [], dataclasses.replace(FAST, spike_factor=2.0))
    assert not _is_spike(1.0, [1.0] * 50, dataclasses.replace(FAST, spike_factor=2.0))
    assert _is_spike(3.0, [1.0] * 50, dataclasses.replace(FAST, spike_factor=2.0))


# --- Bad input through the command line: exit code 2 and a message. ---

def cli(args, capsys, preset="tiny"):
    code = main(["train", "--preset", preset, "--steps", "2", "--batch-size", "2", "--seq-len", "16",
                 "--no-progress", *args])
    return code, capsys.readouterr().err


def test_missing_data_path(tmp_path, capsys):
    code, err = cli(["--out", str(tmp_path), "--data", str(tmp_path / "nope/*.txt")], capsys)
    assert code == 2 and "nope" in err


def test_empty_data_file(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    code, err = cli(["--out", str(tmp_path / "run"), "--data", str(tmp_path / "empty.txt")], capsys)
    assert code == 2 and "no text" in err


def test_vocabulary_larger_than_corpus(tmp_path, capsys):
    (tmp_path / "small.txt").write_text("just a few words\n" * 5)
    code, err = cli(["--out", str(tmp_path / "run"), "--data", str(tmp_path / "small.txt")], capsys,
                    preset="demo")
    assert code == 2 and "vocab_size=4096 is larger than this corpus supports" in err


def test_resume_without_checkpoint(tmp_path, capsys):
    code, err = cli(["--out", str(tmp_path), "--resume"], capsys)
    assert code == 2 and "no checkpoint" in err


def test_checkpoints_from_other_runs_are_protected(tmp_path, corpus_files, tokenizer_path, cache_dir, capsys):
    run(tmp_path, corpus_files, tokenizer_path, cache_dir, tc=dataclasses.replace(FAST, steps=2))
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    # Without --resume the run refuses to write over them.
    with pytest.raises(TrainError, match="already holds checkpoints"):
        run(tmp_path, corpus_files, tokenizer_path, cache_dir)
    # A different model config refuses to restore them.
    other = dataclasses.replace(CONFIG, n_layers=3)
    with pytest.raises(Exception, match="was written with config="):
        train(other, FAST, {"stdlib": corpus_files}, tmp_path, tokenizer_path=tokenizer_path,
              cache_dir=cache_dir, resume=True, progress=False)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before


def test_corrupt_checkpoint(tmp_path, corpus_files, tokenizer_path, cache_dir):
    run(tmp_path, corpus_files, tokenizer_path, cache_dir, tc=dataclasses.replace(FAST, steps=2))
    for f in (tmp_path / "checkpoints" / "2" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
            f.write_bytes(b"\0garbage" * 4)
    from palm.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match="cannot restore checkpoint step 2"):
        run(tmp_path, corpus_files, tokenizer_path, cache_dir, resume=True)
