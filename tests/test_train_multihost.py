"""`python -m palm train` across processes: two processes of 2 CPU devices each meet through
jax.distributed (gloo collectives, coordinator on 127.0.0.1) and train one data=2,model=2 mesh
over their 4 devices, each process reading its half of every global batch; their losses
equal those of one process with 4 devices on the same mesh and global batch. Only process 0
writes the run's files and prints; both restore the checkpoint to resume and continue as the
uninterrupted run does, and a SIGTERM to one stops both at the same step with a checkpoint. A process whose coordinator never answers
exits within --coordinator-timeout with a one-line error, and so do one told to detect a
cluster (--coordinator auto) where there is none and a pair of processes without a --mesh to
share. About 75 s on 2 busy cores, nearly all of it compiling in the five training processes.

Tolerance: conftest.TOLERANCE["float32"] = 2e-5 relative on every logged loss, gradient norm
and validation loss (float32 throughout): the two jobs run the same program on the same mesh,
only the collectives between the two halves go through gloo instead of one process's memory
(seen: bitwise identical).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from palm import data as data_lib
from palm.cli import main
from conftest import FAST_COMPILE_FLAGS, assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    # conftest's cheap compile settings: compiles are nearly all of these runs' time.
    return dict(os.environ, JAX_PLATFORMS="cpu",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE_FLAGS}")


def _launch(jobs: list[tuple[list[str], dict]], logs, timeout: float, during=None) -> list[int]:
    """Runs `python -m palm ...` processes side by side (output to files: a pipe nobody reads
    can stall one process and, through the collectives, the other), calls during(procs,
    deadline) if given, and returns their exit codes. On a timeout or any error every process
    still running is killed."""
    procs = []
    try:
        deadline = time.monotonic() + timeout
        for (args, env), log in zip(jobs, logs):
            with open(log, "w") as out:
                procs.append(subprocess.Popen([sys.executable, "-m", "palm", *args], env=env,
                                              cwd=ROOT, stdout=out, stderr=subprocess.STDOUT))
        if during is not None:
            during(procs, deadline)
        return [p.wait(timeout=max(0.0, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _losses(run_dir) -> list[dict]:
    return [r for r in map(json.loads, open(os.path.join(run_dir, "metrics.jsonl"))) if "loss" in r]


@pytest.mark.long
def test_two_processes_train_as_one_with_four_devices(tmp_path):
    files = [str(p) for p in data_lib.stdlib_corpus(limit=12)]
    # --tokenizer and --cache-dir shared: the first run trains and tokenises, the second reuses.
    common = ["train", "--preset", "tiny", "--vocab-size", "512", "--steps", "3", "--batch-size",
              "8", "--seq-len", "16", "--log-every", "1", "--eval-every", "3", "--eval-batches",
              "1", "--checkpoint-every", "2", "--mesh", "data=2,model=2", "--no-progress",
              "--tokenizer", str(tmp_path / "tok.model"), "--cache-dir", str(tmp_path / "cache"),
              "--data", *files]
    one, two = tmp_path / "one", tmp_path / "two"
    logs = [tmp_path / "one.log", tmp_path / "p0.log", tmp_path / "p1.log"]
    # One step further than the pair: the pair's resumed run must continue as this one did.
    codes = _launch([([*common, "--steps", "4", "--out", str(one)], _env(4))], logs[:1], timeout=150)
    assert codes == [0], logs[0].read_text()[-3000:]

    address = f"127.0.0.1:{_free_port()}"
    jobs = [([*common, "--out", str(two), "--coordinator", address, "--num-processes", "2",
              "--process-id", str(i), "--coordinator-timeout", "60"], _env(2)) for i in range(2)]
    codes = _launch(jobs, logs[1:], timeout=200)
    assert codes == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs[1:])

    want, got = _losses(one), _losses(two)
    assert [r["step"] for r in got] == [1, 2, 3]
    for w, g in zip(want, got):
        for name in ("loss", "grad_norm", "val_loss"):
            if name in w:
                assert_close(g[name], w[name], "float32", what=f"step {w['step']} {name}")
    assert sorted(os.listdir(two / "checkpoints")) == ["2", "3"]
    # Process 0 prints the summary and the sample; process 1 says nothing of the run.
    out0, out1 = logs[1].read_text(), logs[2].read_text()
    assert "step 3: loss" in out0 and "sample:" in out0, out0[-2000:]
    assert "step 3" not in out1 and "sample:" not in out1, out1[-2000:]

    # Resumed by two processes (each restores its own shards), then a SIGTERM to process 1
    # alone stops both at the same step, where they write the checkpoint together. The signal
    # comes once the first step after the restore (step 4) has run and been logged.
    def terminate_process_1_once_training(procs, deadline):
        while "compiled the train step" not in logs[1].read_text():
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
                logs[1].read_text()[-3000:]
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGTERM)

    address = f"127.0.0.1:{_free_port()}"
    jobs = [(["train", "--resume", "--steps", "100000", "--out", str(two), "--no-progress",
              "--coordinator", address, "--num-processes", "2", "--process-id", str(i)], _env(2))
            for i in range(2)]
    codes = _launch(jobs, logs[1:], timeout=150, during=terminate_process_1_once_training)
    out0, out1 = logs[1].read_text(), logs[2].read_text()
    assert codes == [128 + signal.SIGTERM] * 2, out0[-2000:] + out1[-2000:]
    records = list(map(json.loads, open(two / "metrics.jsonl")))
    stopped = records[-1]["step"]
    assert {"event": "resume", "step": 3} in records and stopped > 3
    assert str(stopped) in os.listdir(two / "checkpoints")
    # The step after the restore equals the uninterrupted run's step 4.
    [resumed] = [r for r in records if r.get("step") == 4 and "loss" in r]
    for name in ("loss", "grad_norm"):
        assert_close(resumed[name], want[3][name], "float32", what=f"resumed step 4 {name}")
    assert f"SIGTERM: stopped at step {stopped}" in out0 and "stopped at" not in out1
    assert "SIGTERM: finishing this step" in out1


def test_unreachable_coordinator_fails_within_the_timeout(tmp_path):
    # Side by side: a process whose coordinator never answers, one told to detect a cluster on
    # a machine that is none, and a pair that meets but has no --mesh to share.
    address, pair = (f"127.0.0.1:{_free_port()}" for _ in range(2))  # nothing listens at address
    flags = ["train", "--out", str(tmp_path / "run"), "--coordinator-timeout", "3"]
    logs = [tmp_path / name for name in ("p1.log", "auto.log", "pair0.log", "pair1.log")]
    start = time.monotonic()
    codes = _launch([([*flags, "--coordinator", address, "--num-processes", "2", "--process-id", "1"],
                      _env(2)),
                     ([*flags, "--coordinator", "auto"], _env(2))]
                    + [([*flags, "--coordinator-timeout", "60", "--coordinator", pair,
                         "--num-processes", "2", "--process-id", str(i)], _env(2)) for i in range(2)],
                    logs, timeout=90)
    seconds = time.monotonic() - start
    lines, auto, *pairs = [[line for line in log.read_text().strip().splitlines()
                            if not line.startswith("[Gloo]")] for log in logs]
    assert codes == [2, 2, 2, 2], (lines, auto, pairs)
    assert lines == [f"error: process 1 of 2 could not join the job at --coordinator {address} "
                     "within --coordinator-timeout 3 s (no answer)"]
    assert len(auto) == 1 and auto[0].startswith("error: --coordinator auto: cannot start the job: "), auto
    assert pairs == [["error: 2 processes need --mesh over their 4 devices"]] * 2
    assert seconds < 3 + 30  # the timeout, plus starting Python and importing JAX on a busy machine
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, message", [
    (["--coordinator", "127.0.0.1:1234"], "--num-processes, --process-id missing: a multi-process "
                                          "run needs --coordinator, --num-processes and --process-id"),
    (["--coordinator", "127.0.0.1", "--num-processes", "2", "--process-id", "0"],
     "--coordinator '127.0.0.1': expected HOST:PORT, e.g. 10.0.0.1:1234, or auto"),
    (["--coordinator", "auto", "--process-id", "0"],
     "--coordinator auto detects the processes: drop --num-processes and --process-id"),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"],
     "--process-id 2 must be in [0, 2) (--num-processes 2)"),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "0", "--coordinator-timeout", "0"],
     "--coordinator-timeout 0.0 must be > 0 seconds"),
])
def test_process_flag_errors_are_one_line(tmp_path, capsys, flags, message):
    # Refused before jax.distributed is touched, so this runs in the test's own process.
    code = main(["train", "--out", str(tmp_path / "run"), "--no-progress", *flags])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.strip() == f"error: {message}"
    assert not (tmp_path / "run").exists()
