"""The benchmark harness: sizes per backend, the roofline, and one way to time a jitted function.

`pytest bench/ --benchmark-only` times every case; without it (`make test`, `pytest bench/`)
each case runs once and its output is checked against the kernel's `<name>_reference`, so the
suite doubles as a test. Each benchmark test takes the `case` fixture (which implementation, which pass, which
shapes; parametrized here so the test id says what is measured) and the `bench` fixture.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
import pytest

import kernels
from bench import baselines as baselines_lib
from bench.accuracy import relative_error
from palm.flops import device_peak_flops, lookup_device_kind

# HBM bandwidth per chip from the datasheets (../shared/ANCHORS.md), matched like
# palm.flops.PEAK_FLOPS: substrings of `device.device_kind`, first match wins.
HBM_BANDWIDTH = (
    ("TPU v4", 1.2e12),
    ("TPU v5 lite", 0.8e12),
    ("TPU v5e", 0.8e12),
    ("TPU v5p", 2.8e12),
    ("TPU v5", 2.8e12),  # v5p reports itself as "TPU v5"
    ("TPU v6 lite", 1.6e12),
    ("TPU v6e", 1.6e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),
    ("H200", 4.8e12),
    ("A100", 2.0e12),
)

# The datasheet peaks are dense bf16 (fp16 is the same on these chips); no other dtype gets a
# compute roof, so its roofline is reported as None rather than measured against a wrong one.
_ROOFED_DTYPES = ("bfloat16", "float16")

# Relative error ||actual - expected|| / ||expected|| allowed against the reference, per dtype
# (as tests/conftest.py). float32 on CPU differs only in summation order; accelerators run
# float32 matmuls with reduced-precision passes by default (TF32 on GPUs, bf16 passes on TPUs),
# so there float32 gets a bf16-like tolerance. bfloat16: 8 mantissa bits, 2^-8 per rounding.
TOLERANCE = {
    ("cpu", "float32"): 2e-5,
    ("any", "float32"): 1e-2,
    ("any", "bfloat16"): 2e-2,
    ("any", "float16"): 5e-3,
}

# Implementations a backend runs natively, in the order they run, the baselines (below)
# just before XLA: a group cut short by its deadline (PALM_BENCH_DEADLINE) loses the last.
# `--bench-impls` overrides (e.g. pallas_tpu on CPU runs in interpret mode: a check of the
# harness, not a measurement). On a GPU both lowerings run, Mosaic GPU (pallas_mosaic_gpu,
# what `auto` runs) first, for the kernels that have one (`_implemented`), and Triton
# (pallas_gpu) last: the fallback, and the slowest of ours (norm_qkv_rope's fwd+bwd took 55 ms
# on the H200, XLA's 3.7).
NATIVE_IMPLS = {"cpu": ("xla",), "gpu": ("pallas_mosaic_gpu", "xla", "pallas_gpu"),
                "tpu": ("pallas_tpu", "xla")}
OUR_IMPLS = tuple(i for i in kernels.IMPLS if i != "auto")


def pytest_addoption(parser):
    group = parser.getgroup("palm bench")
    group.addoption("--bench-size", choices=("auto", "tiny", "small", "paper"), default="auto",
                    help="benchmark shapes: tiny (rehearsing the device script on CPU), small "
                         "(CPU), paper (PaLM-8B widths per chip) or auto (small on CPU, paper on "
                         "GPU/TPU)")
    group.addoption("--bench-impls", default=None,
                    help="comma-separated implementations to run instead of the backend's native "
                         "ones plus its baselines, e.g. xla,pallas_tpu")
    group.addoption("--bench-batch", type=int, default=None,
                    help="batch size B of the kernel benchmarks (default: 2 small, 4 paper)")
    group.addoption("--bench-model-batch", type=int, default=None,
                    help="batch size of the model benchmarks (default: 4 small, 1 paper)")


# A wall-clock budget for a whole run (tools/gpu_check.sh sets it): tests that would start
# after this Unix time are skipped instead, so that the run ends and pytest-benchmark still
# writes its JSON (a run killed from outside writes none). With it set, SIGTERM (the script's
# `timeout`) also ends the run as Ctrl-C would, JSON written: SIGINT may be ignored in a
# script's background jobs (../shared/JAX_NOTES.md), SIGTERM is not.
DEADLINE_ENV = "PALM_BENCH_DEADLINE"


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_runtest_setup(item):
    deadline = os.environ.get(DEADLINE_ENV)
    if deadline and time.time() > float(deadline):
        pytest.skip(f"time budget: past {DEADLINE_ENV}")


@pytest.hookimpl(tryfirst=True)  # before pytest-benchmark reads its options
def pytest_configure(config):
    # Timed only when asked for: --benchmark-only, --benchmark-enable or a benchmark output
    # (--benchmark-json, --benchmark-save, --benchmark-autosave). Otherwise (`make test`,
    # plain `pytest`) each case runs once and is checked against its reference. A
    # --benchmark-disable in pyproject's addopts would do the same but makes the documented
    # `pytest bench/ --benchmark-only` a usage error.
    timed = ("benchmark_only", "benchmark_enable", "benchmark_json", "benchmark_save",
             "benchmark_autosave")
    if not any(config.getoption(name, None) for name in timed):
        config.option.benchmark_disable = True
    if os.environ.get(DEADLINE_ENV):
        signal.signal(signal.SIGTERM, _interrupt)
    config.addinivalue_line(
        "markers", "bench_cases(passes=..., baselines={backend: names}, dims='BTHK', id=fn(case)): "
                   "parametrize `case` with the backend's implementations, these passes and baselines")


# ------------------------------------------------------------------------------------------
# Sizes.

@dataclasses.dataclass(frozen=True)
class Sizes:
    """Every shape the suite uses at one size. Kernel shapes follow the dimension key."""

    name: str
    b: int  # kernel batch
    t: int  # query (and key) positions of the kernels
    d: int
    h: int
    k: int
    f: int
    dtype: str
    decode_b: int  # decode: sequences, each with a cache of decode_s slots
    decode_s: int
    model: str  # palm preset of the forward/train benchmarks, "8b-L2" = 8b with 2 layers
    model_b: int
    model_t: int
    # (B, T) of the attention benchmarks (T = S, causal); the kernels' b and t otherwise.
    attention_bt: tuple[tuple[int, int], ...]
    decode_models: tuple[str, ...]  # presets that bench/test_decode.py times
    matmul_square: int  # the card's matmul ceiling: an N x N x N product (bench/test_ceilings.py)
    copy_bytes: int  # size of the array the copy-bandwidth benchmark copies

    def kernel_id(self, dims: str = "BTDHKF") -> str:
        """The shape part of a test id, e.g. "B1-T2048-H16-K256-bfloat16" for dims "BTHK"."""
        return "-".join([*(f"{dim}{getattr(self, dim.lower())}" for dim in dims), self.dtype])


SIZES = {
    # Rehearsing tools/gpu_check.sh on CPU: every code path of the device run, at shapes where
    # the pallas_gpu kernels' interpret mode takes seconds; the tiny model.
    "tiny": Sizes("tiny", b=1, t=64, d=64, h=2, k=32, f=128, dtype="float32", decode_b=2, decode_s=256,
                  model="tiny", model_b=2, model_t=32, attention_bt=((1, 64),), decode_models=("tiny",),
                  matmul_square=128, copy_bytes=2**20),
    # 2 CPU cores: the whole --benchmark-only run in about two minutes; demo-model widths.
    "small": Sizes("small", b=2, t=256, d=256, h=4, k=64, f=1024, dtype="float32",
                   decode_b=4, decode_s=1024, model="demo", model_b=4, model_t=128,
                   attention_bt=((2, 256),), decode_models=("demo", "8b-L2"), matmul_square=1024,
                   copy_bytes=32 * 2**20),
    # PaLM-8B widths (Table 1), bf16: the fused projections at M = B*T = 8192 tokens (issue 9's
    # goals), attention at T = 2048 and 8192 with H = 16. The model benchmarks run the one-GPU
    # "1b" preset (PaLM's head dim and vocabulary, D = 2048, 16 layers) at B = 1, T = 2048: a
    # training step with float32 master weights and Adafactor moments takes ~47 GB, B = 2 ~67
    # GB, too near an 80 GB H100's limit (--bench-model-batch 2 on an H200).
    "paper": Sizes("paper", b=4, t=2048, d=4096, h=16, k=256, f=16384, dtype="bfloat16",
                   decode_b=8, decode_s=2048, model="1b", model_b=1, model_t=2048,
                   attention_bt=((4, 2048), (1, 8192)), decode_models=("demo", "1b"), matmul_square=8192,
                   copy_bytes=2**30),
}


def bench_sizes(config) -> Sizes:
    size = config.getoption("--bench-size")
    if size == "auto":
        size = "small" if jax.default_backend() == "cpu" else "paper"
    sizes = SIZES[size]
    batch, model_batch = config.getoption("--bench-batch"), config.getoption("--bench-model-batch")
    if batch is not None:
        sizes = dataclasses.replace(sizes, b=batch)
    return sizes if model_batch is None else dataclasses.replace(sizes, model_b=model_batch)


@pytest.fixture(scope="session")
def sizes(request) -> Sizes:
    return bench_sizes(request.config)


# ------------------------------------------------------------------------------------------
# Cases: (implementation, pass) per test, with ids that say what is measured.

@dataclasses.dataclass(frozen=True)
class Case:
    impl: str  # one of OUR_IMPLS or a baseline's name
    pass_: str | None  # "fwd" | "fwdbwd" | None for single-pass benchmarks
    sizes: Sizes

    @property
    def baseline(self) -> bool:
        return self.impl not in OUR_IMPLS


def _impls_for(config, baselines: dict[str, Sequence[str]]) -> list[str]:
    backend = jax.default_backend()
    chosen = config.getoption("--bench-impls")
    if chosen is None:
        native = NATIVE_IMPLS.get(backend, ("xla",))
        cut = native.index("xla")
        return [*native[:cut], *baselines.get(backend, ()), *native[cut:]]
    candidates = [*OUR_IMPLS, *(name for names in baselines.values() for name in names)]
    names = [name.strip() for name in chosen.split(",") if name.strip()]
    unknown = [name for name in names if name not in OUR_IMPLS and name not in baselines_lib.ALL]
    if unknown:
        raise pytest.UsageError(f"--bench-impls: unknown {unknown}; ours: {', '.join(OUR_IMPLS)}, "
                                f"baselines: {', '.join(sorted(baselines_lib.ALL))}")
    return [name for name in names if name in candidates]


def _implemented(metafunc, impl: str, explicit: str | None) -> bool:
    """Whether a benchmark runs `impl`: a kernel's benchmark (`test_<kernel>`) skips
    implementations its kernel only reaches by falling back to another (pallas_mosaic_gpu
    where it has no Mosaic GPU version: the same Triton kernel timed twice); any other
    benchmark runs pallas_mosaic_gpu only when `--bench-impls` names it."""
    if impl == "xla" or impl not in OUR_IMPLS:
        return True
    package = getattr(kernels, metafunc.function.__name__.removeprefix("test_"), None)
    if package is not None:
        return impl in package.IMPLEMENTATIONS
    return impl != "pallas_mosaic_gpu" or explicit is not None


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        _parametrize_cases(metafunc)
    if "attention_bt" in metafunc.fixturenames:  # after `case`, so ids read <impl>-<pass>-...-B-T
        bts = bench_sizes(metafunc.config).attention_bt
        metafunc.parametrize("attention_bt", bts, ids=[f"B{b}-T{t}" for b, t in bts])


def _parametrize_cases(metafunc):
    marker = metafunc.definition.get_closest_marker("bench_cases")
    options = marker.kwargs if marker else {}
    passes = options.get("passes", (None,))
    baselines = options.get("baselines", {})
    dims = options.get("dims", "BTDHKF")
    name = options.get("id", lambda c: "-".join(p for p in (c.impl, c.pass_, c.sizes.kernel_id(dims)) if p))
    s = bench_sizes(metafunc.config)
    impls = [impl for impl in _impls_for(metafunc.config, baselines)
             if _implemented(metafunc, impl, explicit=metafunc.config.getoption("--bench-impls"))]
    cases = [Case(impl, pass_, s) for impl in impls for pass_ in passes]
    ids = [name(c) for c in cases]
    metafunc.parametrize("case", cases, ids=ids)


# ------------------------------------------------------------------------------------------
# The device and its roofline.

@dataclasses.dataclass(frozen=True)
class Device:
    kind: str
    backend: str
    jax_version: str
    peak_flops: float | None  # dense bf16 FLOP/s; None when unknown
    hbm_bandwidth: float | None  # bytes/s; None when unknown

    def roofline_seconds(self, flops: float, nbytes: float, dtype: str) -> float | None:
        """max(flops / peak, bytes / bandwidth): the shortest time the device allows; None when
        either ceiling is unknown for this device and dtype."""
        peak = self.peak_flops if dtype in _ROOFED_DTYPES else None
        if peak is None or self.hbm_bandwidth is None:
            return None
        return max(flops / peak, nbytes / self.hbm_bandwidth)


def hbm_bandwidth(device: jax.Device | None = None) -> float | None:
    """Datasheet HBM bytes/s of one chip, or None when the device kind is not in the table."""
    return lookup_device_kind(HBM_BANDWIDTH, device)


@pytest.fixture(scope="session")
def device() -> Device:
    dev = jax.devices()[0]
    return Device(kind=dev.device_kind, backend=jax.default_backend(), jax_version=jax.__version__,
                  peak_flops=device_peak_flops(dev), hbm_bandwidth=hbm_bandwidth(dev))


# ------------------------------------------------------------------------------------------
# Checking against the reference.

def tolerance(dtype: str, backend: str | None = None) -> float:
    backend = backend or jax.default_backend()
    key = (backend, dtype) if (backend, dtype) in TOLERANCE else ("any", dtype)
    return TOLERANCE[key]


def assert_close(actual, expected, dtype: str, *, factor: float = 1.0, what: str = "") -> None:
    """Relative norm error of every leaf within tolerance(dtype) * factor."""
    actual_leaves, expected_leaves = jax.tree.leaves(actual), jax.tree.leaves(expected)
    assert len(actual_leaves) == len(expected_leaves), (
        f"{what}: {len(actual_leaves)} outputs, reference has {len(expected_leaves)}")
    tol = tolerance(dtype) * factor
    for i, (a, e) in enumerate(zip(actual_leaves, expected_leaves)):
        assert np.shape(a) == np.shape(e), f"{what} output {i}: shape {np.shape(a)} != reference {np.shape(e)}"
        err = relative_error(a, e)  # on the device: the host's float64 copy took tens of seconds
        assert math.isfinite(err), f"{what} output {i}: non-finite values"
        assert err <= tol, f"{what} output {i}: relative error {err:.3g} > {tol:.3g} ({dtype})"


# ------------------------------------------------------------------------------------------
# Timing.

# Input sets are rotated until they exceed this many bytes together: more than the largest
# on-chip cache we run on (H100/H200 L2 50 MB, TPU v4 CMEM 128 MiB, server CPU L3).
ROTATION_BYTES = 256 * 2**20
MAX_SETS = 32
# A timed round lasts at least this long: shorter calls are repeated within a round.
MIN_ROUND_SECONDS = 1e-3
MAX_ITERATIONS = 1000


def _block(tree):
    return jax.block_until_ready(tree)


class Bench:
    """Times `fn(*inputs[i])` under pytest-benchmark; see `__call__`."""

    def __init__(self, benchmark, request, device: Device):
        self._benchmark = benchmark
        self._request = request
        self.device = device
        self.enabled = not benchmark.disabled

    def inputs(self, make: Callable[[int], tuple], *, min_sets: int = 3,
               max_sets: int | None = None) -> list[tuple]:
        """make(0), make(1), ...: enough input sets that, cycled between rounds, together they
        exceed any last-level cache (ROTATION_BYTES), so no round finds the previous round's
        operands cached; at least min_sets, at most max_sets (MAX_SETS). One set when not
        timing."""
        first = make(0)
        if not self.enabled:
            return [first]
        set_bytes = sum(x.nbytes for x in jax.tree.leaves(first))
        cap = MAX_SETS if max_sets is None else max_sets
        n = max(min(min_sets, cap), min(cap, math.ceil(ROTATION_BYTES / max(set_bytes, 1))))
        return [first, *(make(i) for i in range(1, n))]

    def __call__(self, fn: Callable[..., Any], inputs: Sequence[tuple], *,
                 reference: Callable[..., Any] | None = None,
                 select: Callable[[Any], Any] = lambda out: out,
                 tolerance_factor: float = 1.0,
                 flops: float, nbytes: float, dtype: str, impl: str,
                 shapes: dict[str, Sequence[int]], skip_on: tuple[type[BaseException], ...] = (),
                 extra: dict[str, Any] | None = None,
                 derived: Callable[[float], dict[str, Any]] | None = None) -> Any:
        """Checks, warms up and times fn; returns the checked first output.

        1. expected = reference(*inputs[0]) (before fn, which may donate its arguments);
        2. out = fn(*inputs[0]): compiles; NotImplementedError (an impl not written yet) or any
           of `skip_on` (a baseline that rejects the shape or device) skips the test;
        3. select(out) is compared with expected at tolerance(dtype) * tolerance_factor;
        4. with benchmarking enabled: one timed call per input set (warm-up, and the time that
           sizes the run), then benchmark.pedantic with the sets rotated between calls, each
           round ending in block_until_ready (calls under MIN_ROUND_SECONDS run k to a round,
           dispatched back to back, and count as 1/k of it); rounds fill
           --benchmark-max-time (at least --benchmark-min-rounds);
        5. extra_info: device, shapes, dtype, impl, flops, bytes, achieved TFLOP/s and GB/s,
           the roofline bound and the fraction of it reached, plus `extra` and
           derived(median seconds) (tokens/s, MFU, ms/token).
        """
        info = self._benchmark.extra_info
        info.update(device_kind=self.device.kind, backend=self.device.backend,
                    jax_version=self.device.jax_version, impl=impl, dtype=dtype,
                    shapes={name: list(shape) for name, shape in shapes.items()},
                    flops=flops, bytes=nbytes, peak_flops=self.device.peak_flops,
                    hbm_bandwidth=self.device.hbm_bandwidth, input_sets=len(inputs))
        info.update(extra or {})

        expected = _block(reference(*inputs[0])) if reference is not None else None

        def first():
            return _block(fn(*inputs[0]))

        try:
            # Disabled, pedantic just makes the one call (and pytest-benchmark sees it used).
            out = first() if self.enabled else self._benchmark.pedantic(first)
        except NotImplementedError as e:
            pytest.skip(f"{impl}: {e}")
        except skip_on as e:  # noqa: B030 -- skip_on is a tuple of exception types
            pytest.skip(f"{impl} baseline unavailable here: {type(e).__name__}: {str(e)[:300]}")
        if expected is not None:
            assert_close(select(out), expected, dtype, factor=tolerance_factor,
                         what=self._request.node.name)
        if not self.enabled:
            return out

        seconds = []
        for args in inputs:
            start = time.perf_counter()
            _block(fn(*args))
            seconds.append(time.perf_counter() - start)
        call_s = max(min(seconds), 1e-7)
        config = self._request.config
        max_time = float(config.getoption("benchmark_max_time"))
        min_rounds = int(config.getoption("benchmark_min_rounds"))
        turn = iter(range(1 << 62))
        if call_s >= MIN_ROUND_SECONDS:
            # One call per round, synchronised; setup hands each round the next input set.
            iterations = 1

            def setup():
                return inputs[next(turn) % len(inputs)], {}

            def target(*args):
                return _block(fn(*args))

            run = dict(setup=setup)
        else:
            # Calls too short to time one by one (Python dispatch and the device sync would
            # dominate): k calls per round, dispatched back to back on rotating inputs as a
            # training loop would, synchronised after the last; pytest-benchmark divides by k.
            iterations = min(MAX_ITERATIONS, math.ceil(MIN_ROUND_SECONDS / call_s))
            pending = []

            def target():
                i = next(turn)
                out = fn(*inputs[i % len(inputs)])
                if (i + 1) % iterations == 0:
                    _block(out)
                pending[:] = [out]

            run = dict(iterations=iterations)
        rounds = max(min_rounds, min(10_000, math.ceil(max_time / (call_s * iterations))))
        self._benchmark.pedantic(target, rounds=rounds, warmup_rounds=1, **run)
        if iterations > 1:
            _block(pending)
        info.update(iterations=iterations)
        median = self._benchmark.stats.stats.median
        bound = self.device.roofline_seconds(flops, nbytes, dtype)
        info.update(median_s=median, rounds=rounds, tflops=flops / median / 1e12,
                    gbps=nbytes / median / 1e9, roofline_s=bound,
                    roofline_fraction=None if bound is None else bound / median)
        if derived is not None:
            info.update(derived(median))
        return out


@pytest.fixture
def bench(benchmark, request, device) -> Bench:
    return Bench(benchmark, request, device)
