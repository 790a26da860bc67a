"""Shared test settings: hypothesis profiles and the one per-dtype tolerance table."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os

import hypothesis
import jax
import numpy as np
import pytest

import palm
from kernels._gpu import MOSAIC_INTERPRET_THREADS, mosaic_gpu_interpret
from palm import data as data_lib
from palm import tokenizer as tokenizer_lib
from palm.checkpoint import Checkpointer
from palm.settings import TrainConfig
from palm.train import init_state, write_run_config

# "ci": the same number of examples for every property (no per-test reductions); `make test`
# stays inside its budget (15 minutes on 2 quiet cores) by drawing small shapes, and by 10
# examples: the kernels' properties, each example a compile in interpret mode, are the largest
# share of the suite, and they draw the implementation too (TPU, Triton, and on jax 0.11 the
# Mosaic GPU kernels, whose interpreter is the slowest; explicit examples for each besides).
# 20 examples put the suite at 12.5 minutes before the Mosaic GPU kernels joined; 16 then put
# the jax 0.11 half at 16.5 minutes on a quiet machine, 17 in CI, and 12 still at 15.2. "dev"
# searches harder before a merge: HYPOTHESIS_PROFILE=dev make test.
hypothesis.settings.register_profile(
    "ci", max_examples=10, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow, hypothesis.HealthCheck.data_too_large])
hypothesis.settings.register_profile(
    "dev", max_examples=100, deadline=None, print_blob=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow, hypothesis.HealthCheck.data_too_large])
# Only the explicit @example cases (PaLM's K = 256 and other fixed shapes): a quick look.
hypothesis.settings.register_profile(
    "explicit", phases=[hypothesis.Phase.explicit], deadline=None, print_blob=True)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Test programs are small and run once or a few times, so XLA's compile (seconds) dwarfs running
# them: XLA:CPU's cheap settings halve it (2.3x on tests/test_model.py's property tests); they
# change code generation, not what is computed. They go into XLA_FLAGS, read when JAX creates its
# CPU client (after this conftest is imported, before any test computes), so every compile of
# the session and of the subprocesses it starts gets them; flags already in XLA_FLAGS come after
# ours and win. `pytest bench/ --benchmark-only` does not load this file: timed runs keep XLA's
# full optimisation. (`xla_cpu_use_fusion_emitters=False` would halve compiles again on jax
# 0.10.2, but jaxlib 0.11.2 rejects the option.)
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
FAST_COMPILE_FLAGS = " ".join(f"--{name}={str(value).lower()}" for name, value in FAST_COMPILE.items())
os.environ["XLA_FLAGS"] = f"{FAST_COMPILE_FLAGS} {os.environ.get('XLA_FLAGS', '')}".strip()

# The Mosaic GPU interpreter blocks one thread of XLA:CPU's pool per waiting warpgroup, and that
# pool has one thread per core unless NPROC (read when JAX creates its CPU client, as above)
# says more: on this 2-core machine the 3-warpgroup attention forward deadlocked in most runs,
# and ran every time with NPROC=4 (kernels/_gpu.py, MOSAIC_INTERPRET_THREADS).
os.environ["NPROC"] = str(max(int(os.environ.get("NPROC") or 0), MOSAIC_INTERPRET_THREADS))


def _mosaic_interprets() -> bool:
    try:
        mosaic_gpu_interpret(True)
    except NotImplementedError:
        return False
    return True


# The Mosaic GPU interpreter exists from jax 0.11 on; on 0.10 Mosaic GPU kernels are only
# exported (kernels/_gpu.py `mosaic_gpu_interpret` is the one place that knows).
MOSAIC_INTERPRETS = _mosaic_interprets()
needs_mosaic_interpreter = pytest.mark.skipif(not MOSAIC_INTERPRETS,
                                              reason="Mosaic GPU interpreter needs jax >= 0.11")


def run(fn, *args):
    """fn(*args) compiled once as one program with FAST_COMPILE: one compile per drawn shape
    for a kernel and its reference together."""
    return jax.jit(fn).lower(*args).compile(FAST_COMPILE)(*args)


# Relative error allowed between an implementation and its reference, measured as
# ||actual - expected|| / ||expected|| over the whole array (a norm, so one unlucky element
# near zero cannot fail a test and a systematic error cannot hide). float32: only summation
# order differs. bfloat16: 8 mantissa bits, so each rounding is up to 2^-8 = 0.4% and a few
# of them compound.
TOLERANCE = {
    "float32": 2e-5,
    "bfloat16": 2e-2,
}


def relative_error(actual, expected) -> float:
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape}"
    assert np.all(np.isfinite(actual)), "non-finite values in the result"
    scale = max(np.linalg.norm(expected), 1e-30)
    return float(np.linalg.norm(actual - expected) / scale)


def assert_close(actual, expected, dtype, *, factor: float = 1.0, what: str = "") -> None:
    """Asserts the relative norm error is within TOLERANCE[dtype] * factor."""
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    tol = TOLERANCE[name] * factor
    err = relative_error(actual, expected)
    assert err <= tol, f"{what} relative error {err:.3g} > {tol:.3g} ({name})"


class RaceLog:
    """Every race-detection state the TPU and Mosaic GPU interpreters create while it is
    entered.

    The interpreters (`pltpu.InterpretParams(detect_races=True)`,
    `plgpu.InterpretGPUParams(detect_races=True)`) keep their race state in a module global
    that each kernel call replaces, so looking at it after a test would judge only the last
    kernel run (a vjp runs three or four). This records each state as it is created instead.
    On a clean exit it asserts that race detection really ran (some kernel had its memory
    accesses checked: the interpreter creates a state for every call, checked or not, so a
    created state proves nothing) and found no race; `check=False` leaves the judging to the
    caller (the planted-race test).

    Private API (`jax._src.pallas.mosaic.interpret.interpret_pallas_call`, jax 0.10 and 0.11;
    `jax._src.pallas.mosaic_gpu.interpret.gpu_callbacks`, jax 0.11): if it moves, the recorded
    list stays empty and the exit check fails, on purpose, rather than every race case passing
    without a detector.

        with RaceLog():
            out = kernel(..., interpret=pltpu.InterpretParams(detect_races=True))
    """

    # (module, class name) of each interpreter's race-detection state.
    _STATES = (("jax._src.pallas.mosaic.interpret.interpret_pallas_call", "RaceDetectionState"),
               ("jax._src.pallas.mosaic_gpu.interpret.gpu_callbacks", "GPURaceDetectionState"))

    def __init__(self, *, check: bool = True):
        self.check = check
        self.states: list = []
        self._monkeypatch = pytest.MonkeyPatch()

    def __enter__(self) -> "RaceLog":
        for module_name, name in self._STATES:
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                continue
            original = getattr(module, name, None)
            if original is not None:
                self._monkeypatch.setattr(module, name, self._recording(original))
        return self

    def _recording(self, original):
        def recording(*args, **kwargs):
            state = original(*args, **kwargs)
            self.states.append(state)
            return state
        return recording

    def __exit__(self, exc_type, exc, tb) -> None:
        self._monkeypatch.undo()
        if exc_type is None and self.check:
            self.assert_clean()

    @property
    def kernels_checked(self) -> int:
        """Kernel calls whose memory accesses the detector saw (detection on)."""
        return sum(bool(s.reads or s.writes) for s in self.states)

    @property
    def races_found(self) -> bool:
        return any(s.races_found for s in self.states)

    def assert_clean(self) -> None:
        assert self.kernels_checked, (
            f"race detection was asked for but checked no kernel ({len(self.states)} "
            "interpreter states recorded; has jax's private race-detection API moved?)")
        assert not self.races_found, (
            f"the interpreter found a data race in one of {self.kernels_checked} kernel "
            "calls (its RACE DETECTED report is in the captured stdout)")


def race_log(enabled: bool) -> contextlib.AbstractContextManager:
    """A checking `RaceLog` when `enabled`, else a context that checks nothing."""
    return RaceLog() if enabled else contextlib.nullcontext()


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    # Tests marked `long` first: pytest-xdist hands each worker a run of the collected order and
    # a worker that runs dry steals from the other's end, so a minute-long test collected late
    # (test_train_sharded.py) ran alone at the end while the other core idled; started first,
    # the short tests fill in around the long ones.
    items.sort(key=lambda item: item.get_closest_marker("long") is None)  # stable
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: pass --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
    """A run directory as `python -m palm train` leaves it, without the training: config.json,
    tokenizer.model (512 pieces) and a checkpoint of the tiny preset's initial state (step 0)
    with the same record. Tests that damage it work on a copy."""
    path = tmp_path_factory.mktemp("run")
    tokenizer = tokenizer_lib.train(data_lib.stdlib_corpus(limit=4), 512, path / "tokenizer.model")
    config = dataclasses.replace(palm.preset("tiny"), vocab_size=tokenizer.vocab_size)
    tc = TrainConfig(steps=1, batch_size=2, seq_len=16)
    write_run_config(path, config, tc, {"stdlib": "none"}, None, 0.02)
    meta = {"config": config.to_dict(), "seq_len": tc.seq_len, "batch_size": tc.batch_size,
            "seed": tc.seed, "tokenizer_sha256": tokenizer.sha256}
    checkpointer = Checkpointer(path / "checkpoints")
    checkpointer.save(0, init_state(config, tc), meta)
    checkpointer.wait()
    checkpointer.close()
    return path
