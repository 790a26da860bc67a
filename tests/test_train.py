"""The training recipe: optimizer settings, resumption, the loss-spike remedy, bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

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
def corpus_glob(tmp_path_factory, corpus_files):
    """The same files as one --data source: a glob over copies in one directory."""
    root = tmp_path_factory.mktemp("corpus")
    for i, path in enumerate(corpus_files):
        (root / f"{i:02d}.py").write_bytes(open(path, "rb").read())
    return str(root / "*.py")


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
    # The first step compiles: its time is logged apart and kept out of tokens/s.
    compiled = [r for r in read_metrics(tmp_path) if r.get("event") == "compiled"]
    assert len(compiled) == 1 and compiled[0]["step"] == 1 and compiled[0]["seconds"] > 0
    steps = [r for r in read_metrics(tmp_path) if "loss" in r]
    assert steps[0]["tokens_per_second"] is None and steps[1]["tokens_per_second"] > 0
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
    code, err = cli(["--out", str(tmp_path / "run"), "--data", str(tmp_path / "small.txt"),
                     "--vocab-size", "4096"], capsys, preset="demo")
    assert code == 2 and "vocab_size=4096 is larger than this corpus supports" in err
    assert "try --vocab-size 2" in err  # the size the trainer can make, e.g. 294
    assert not (tmp_path / "run").exists()  # a run that never started leaves no directory


@pytest.mark.parametrize("preset_name", ["tiny", "demo"])
def test_vocabulary_fits_a_small_corpus(tmp_path, capsys, preset_name):
    # tiny's 256 pieces are fewer than a byte-fallback vocabulary needs, demo's 4096 more than
    # a few lines hold: without --vocab-size the workable size is picked, with a note, and the
    # model's vocabulary follows the tokenizer's.
    (tmp_path / "small.txt").write_text("just a few words, with some punctuation!\n" * 5)
    from palm.train import build_data
    tokenizer, _, config = build_data({"mine": str(tmp_path / "small.txt")}, None,
                                      palm.preset(preset_name), tmp_path, None, None, 0.02,
                                      fit_vocab=True)
    assert "note: this corpus supports" in capsys.readouterr().out
    assert config.vocab_size == tokenizer.vocab_size != palm.preset(preset_name).vocab_size
    assert (tmp_path / "tokenizer.model").exists()


def test_resume_without_checkpoint(tmp_path, corpus_files, tokenizer_path, cache_dir):
    with pytest.raises(TrainError, match="no checkpoint"):
        run(tmp_path, corpus_files, tokenizer_path, cache_dir, resume=True)


def test_checkpoints_from_other_runs_are_protected(tmp_path, corpus_files, tokenizer_path, cache_dir, capsys):
    run(tmp_path, corpus_files, tokenizer_path, cache_dir, tc=dataclasses.replace(FAST, steps=2))
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    # Without --resume the run refuses to write over them.
    with pytest.raises(TrainError, match="already holds a run"):
        run(tmp_path, corpus_files, tokenizer_path, cache_dir)
    # A different model config refuses to restore them.
    other = dataclasses.replace(CONFIG, n_layers=3)
    with pytest.raises(Exception, match="was written with config="):
        train(other, FAST, {"stdlib": corpus_files}, tmp_path, tokenizer_path=tokenizer_path,
              cache_dir=cache_dir, resume=True, progress=False)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before


def test_damaged_newest_checkpoint_is_skipped(tmp_path, corpus_files, tokenizer_path, cache_dir,
                                              capsys):
    run(tmp_path, corpus_files, tokenizer_path, cache_dir)  # checkpoints at steps 2 and 4
    _damage(tmp_path / "checkpoints" / "4")
    summary = run(tmp_path, corpus_files, tokenizer_path, cache_dir, resume=True,
                  tc=dataclasses.replace(FAST, steps=6))
    assert summary["step"] == 6
    warning = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert len(warning) == 1 and "checkpoint step 4" in warning[0] and len(warning[0]) < 400
    assert {"event": "resume", "step": 2} in read_metrics(tmp_path)


def test_no_intact_checkpoint_is_one_line(tmp_path, corpus_files, tokenizer_path, cache_dir):
    run(tmp_path, corpus_files, tokenizer_path, cache_dir, tc=dataclasses.replace(FAST, steps=2))
    _damage(tmp_path / "checkpoints" / "2")
    from palm.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match="no intact checkpoint") as error:
        run(tmp_path, corpus_files, tokenizer_path, cache_dir, resume=True)
    assert "\n" not in str(error.value) and "steps 2" in str(error.value)


def _damage(step_dir):
    for f in (step_dir / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
            f.write_bytes(b"\0garbage" * 4)


# --- The command line as a user drives it: self-contained runs, resuming, signals. ---

def _train_args(out, files, tokenizer, cache, *extra):
    return ["train", "--preset", "tiny", "--data", *files, "--tokenizer", tokenizer,
            "--cache-dir", cache, "--batch-size", "4", "--seq-len", "32", "--lr", "0.01",
            "--warmup-steps", "2", "--log-every", "1", "--eval-every", "2", "--eval-batches", "1",
            "--checkpoint-every", "2", "--no-progress", "--out", str(out), *extra]


def test_run_directory_is_self_contained_and_resumes_from_out_alone(
        tmp_path, corpus_glob, tokenizer_path, cache_dir, capsys):
    out = tmp_path / "run"
    assert main(_train_args(out, [corpus_glob], tokenizer_path, cache_dir, "--steps", "2")) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["model"]["vocab_size"] == 512 and saved["train"]["steps"] == 2
    assert saved["data"]["sources"] == {"data": corpus_glob}
    assert saved["command"]["lr"] == 0.01 and saved["command"]["preset"] == "tiny"
    assert (out / "tokenizer.model").read_bytes() == open(tokenizer_path, "rb").read()
    capsys.readouterr()
    # --out and --resume alone (and a new end point, which may change) continue the run.
    assert main(["train", "--out", str(out), "--resume", "--steps", "4", "--no-progress"]) == 0
    steps = [r["step"] for r in read_metrics(out) if "loss" in r]
    assert steps == [1, 2, 3, 4]
    assert "note: --steps 4 (was 2)" in capsys.readouterr().err
    # A setting that defines the run is refused, naming it; so is an end point already reached.
    code = main(["train", "--out", str(out), "--resume", "--steps", "6", "--lr", "0.02",
                 "--seed", "3", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "--lr 0.02 (the run has 0.01)" in err and "--seed 3 (the run has 0)" in err
    code = main(["train", "--out", str(out), "--resume", "--steps", "4", "--no-progress"])
    assert code == 2 and "--steps 4 is not above step 4" in capsys.readouterr().err
    # A fresh run into the same directory would mix two runs' metrics: refused.
    code = main(_train_args(out, [corpus_glob], tokenizer_path, cache_dir, "--steps", "2"))
    assert code == 2 and "already holds a run" in capsys.readouterr().err


def test_bad_data_flags_fail_before_anything_is_written(tmp_path, corpus_files, capsys):
    out, tok = tmp_path / "run", tmp_path / "tok.model"
    code = main(_train_args(out, [str(tmp_path / "nothing-*.txt")], str(tok), str(tmp_path / "c")))
    assert code == 2 and "matches no file" in capsys.readouterr().err
    code = main(_train_args(out, [f"a={corpus_files[0]}", f"b={corpus_files[1]}"], str(tok),
                            str(tmp_path / "c"), "--weights", "a=1", "b=x"))
    assert code == 2 and "--weights b=x: 'x' is not a number" in capsys.readouterr().err
    code = main(_train_args(out, [f"a={corpus_files[0]}"], str(tok), str(tmp_path / "c"),
                            "--weights", "c=1"))
    assert code == 2 and "--weights names c" in capsys.readouterr().err
    assert not out.exists() and not tok.exists()


def test_resume_of_a_missing_run_is_one_line(tmp_path, capsys):
    code = main(["train", "--out", str(tmp_path / "none"), "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and "not a run directory" in err and err.count("\n") == 1


@pytest.mark.long
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_checkpoints_and_the_run_resumes(tmp_path, corpus_glob, tokenizer_path, cache_dir,
                                                  signum):
    # A real process and a real signal. Two CPU devices are visible but the step runs on one,
    # and MFU must say so (with a given peak).
    out = tmp_path / "run"
    args = _train_args(out, [corpus_glob], tokenizer_path, cache_dir, "--steps", "100000",
                       "--checkpoint-every", "100000", "--eval-every", "100000",
                       "--peak-flops", "1e12")
    env = dict(os.environ, XLA_FLAGS=f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count=2")
    process = subprocess.Popen([sys.executable, "-m", "palm", *args], env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while len([r for r in _lines(out) if "loss" in r]) < 3:
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no training steps within 240 s"
            time.sleep(0.2)
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 128 + signum, stderr  # 130 for SIGINT, 143 for SIGTERM
    assert "Traceback" not in stderr and f"--out {out} --resume" in stderr
    records = [r for r in read_metrics(out) if "loss" in r]
    step = records[-1]["step"]
    assert (out / "checkpoints" / str(step)).is_dir()
    flops = records[-1]["model_flops_per_token"]
    assert records[-1]["mfu"] == pytest.approx(records[-1]["tokens_per_second"] * flops / 1e12)
    if signum == signal.SIGINT:  # the resume path does not depend on the signal: run it once
        assert main(["train", "--out", str(out), "--resume", "--steps", str(step + 1),
                     "--no-progress"]) == 0
        assert [r["step"] for r in read_metrics(out) if "loss" in r][-1] == step + 1


def _lines(out):
    try:
        text = (out / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines()[:-1]]  # the last may be half-written


def test_a_second_signal_aborts():
    from palm.train import _Interrupts
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN where the shell started us in background
    with _Interrupts() as interrupts:
        interrupts._handle(signal.SIGTERM, None)
        assert interrupts.received == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt, match="second SIGINT: aborted"):
            interrupts._handle(signal.SIGINT, None)
    assert signal.getsignal(signal.SIGINT) is before  # restored on exit


def test_metrics_fragment_of_a_killed_process_is_not_glued_to(tmp_path):
    from palm.train import _MetricsLog
    (tmp_path / "m.jsonl").write_text('{"step": 1}\n{"ste')
    log = _MetricsLog(tmp_path / "m.jsonl")
    log.write({"step": 2})
    log.close()
    assert (tmp_path / "m.jsonl").read_text().splitlines()[-1] == '{"step": 2}'
