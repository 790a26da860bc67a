"""Shared test settings: hypothesis profiles and the one per-dtype tolerance table."""

from __future__ import annotations

import os

import hypothesis
import numpy as np
import pytest

# "ci" keeps `make test` inside its budget on 2 cores; "dev" searches harder before a merge:
# HYPOTHESIS_PROFILE=dev make test.
hypothesis.settings.register_profile(
    "ci", max_examples=8, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow, hypothesis.HealthCheck.data_too_large])
hypothesis.settings.register_profile(
    "dev", max_examples=100, deadline=None, print_blob=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow, hypothesis.HealthCheck.data_too_large])
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

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


def races_found() -> bool:
    """Whether the TPU interpreter's race detector flagged the last kernel run with
    `pltpu.InterpretParams(detect_races=True)`.

    The flag lives in a private module (jax 0.10/0.11); if it moves, this returns False and the
    race cases degrade to plain interpret-mode checks rather than failing spuriously.
    """
    try:
        from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc
    except ImportError:
        return False
    races = getattr(ipc, "races", None)
    return bool(races is not None and races.races_found)


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: pass --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
