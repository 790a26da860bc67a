"""tools/profile.py and tools/bench_report.py: run as users run them, on CPU."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

import kernels

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / "tools"


def _run(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """The command as a user runs it. Without the pytest-xdist worker's variables: a child
    pytest that inherits PYTEST_XDIST_WORKER (`make test` runs workers) takes itself for one,
    and pytest-benchmark then refuses --benchmark-only."""
    env = {k: v for k, v in (os.environ if env is None else env).items()
           if not k.startswith("PYTEST_XDIST")}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=env)


def _load_profile_module():
    """tools/profile.py as a module; not as `profile`, which is the standard library's."""
    spec = importlib.util.spec_from_file_location("palm_tools_profile", TOOLS / "profile.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------
# profile.py

def test_profile_train_tiny_writes_trace_and_summary(tmp_path):
    out = tmp_path / "trace"
    result = _run(str(TOOLS / "profile.py"), "--preset", "tiny", "--what", "train", "--steps", "2",
                  "--warmup", "1", "--batch-size", "2", "--seq-len", "32", "--out", str(out))
    assert result.returncode == 0, result.stderr
    traces = list(out.glob("plugins/profile/*/*.trace.json.gz"))
    assert traces, f"no trace under {out}"
    with gzip.open(traces[0], "rt") as f:
        assert json.load(f)["traceEvents"]
    assert list(out.glob("plugins/profile/*/perfetto_trace.json.gz"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ops"] and summary["ops"][0]["ms_per_step"] > 0
    assert summary["ops"][0]["op"] in result.stdout
    assert summary["step_ms"] > 0 and summary["mfu"] is None  # CPU: no known peak
    assert f"tensorboard --logdir {out}" in result.stdout
    assert "MFU n/a" in result.stdout
    assert summary["report"] == (out / "summary.txt").read_text().rstrip("\n")
    assert (out / "compiled_hlo.txt").read_text().startswith("HloModule")


def test_profile_train_on_a_mesh_of_2_cpu_devices(tmp_path):
    """--mesh data=2,model=1 on 2 host devices (XLA_FLAGS must be set before JAX starts, hence
    the subprocess): the sharded train step is traced and summarised, the FSDP collectives of
    `_sharded_logits` among its ops; a mesh the devices cannot fill is a one-line error."""
    env = dict(os.environ, XLA_FLAGS=f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count=2")
    args = [str(TOOLS / "profile.py"), "--preset", "tiny", "--what", "train", "--steps", "1", "--warmup", "1",
            "--batch-size", "2", "--seq-len", "16", "--out", str(tmp_path / "trace")]
    result = _run(*args, "--mesh", "data=2,model=1", env=env)
    assert result.returncode == 0, result.stderr
    assert list((tmp_path / "trace").glob("plugins/profile/*/*.trace.json.gz"))
    summary = json.loads((tmp_path / "trace" / "summary.json").read_text())
    assert summary["mesh"] == "data=2,model=1" and "mesh data=2,model=1" in result.stdout
    assert any("_sharded_logits" in o["where"] for o in summary["ops"]), summary["ops"]
    bad = _run(*args, "--mesh", "data=2,model=2", env=env)
    assert bad.returncode == 2 and bad.stderr == "error: mesh data=2 x model=2 needs 4 devices; 2 given\n", bad.stderr


def test_profile_rejects_bad_input(tmp_path):
    result = _run(str(TOOLS / "profile.py"), "--preset", "tiny", "--seq-len", "65", "--out", str(tmp_path))
    assert result.returncode == 2 and "max_seq_len" in result.stderr


def _has_impl(kernel: str, impl: str) -> bool:
    return impl in getattr(kernels, kernel)._PALLAS  # the kernel package's Pallas table


def _block_kernels_missing(impl: str) -> list[str]:
    """The kernels palm.forward calls that lack impl."""
    return [k for k in ("norm_qkv_rope", "mq_flash_attention", "norm_swiglu", "block_out") if not _has_impl(k, impl)]


def test_profile_names_our_kernels_with_pallas_tpu(tmp_path):
    """The whole model in TPU interpret mode: the summary must name palm_* kernels."""
    missing = _block_kernels_missing("pallas_tpu")
    if missing:
        pytest.skip(f"pallas_tpu not implemented yet in {', '.join(missing)}")
    out = tmp_path / "trace"
    result = _run(str(TOOLS / "profile.py"), "--preset", "tiny", "--what", "forward", "--impl", "pallas_tpu",
                  "--steps", "1", "--warmup", "1", "--batch-size", "1", "--seq-len", "16", "--out", str(out),
                  timeout=600)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kernels"], result.stdout
    assert any(k["kernel"].startswith("palm_") for k in summary["kernels"])
    assert "palm_" in result.stdout


def test_profile_summary_names_a_pallas_kernel(tmp_path):
    """One kernel, forward and backward, in interpret mode: each pallas_call is recognisable."""
    if not _has_impl("norm_swiglu", "pallas_tpu"):
        pytest.skip("norm_swiglu has no pallas_tpu implementation")
    profile = _load_profile_module()
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (1, 16, 128))
    scale = jnp.ones((128,))
    w = jax.random.normal(keys[1], (128, 128)) * 0.1
    fn = jax.jit(jax.grad(lambda x, w: kernels.norm_swiglu(x, scale, w, w, eps=1e-6, impl="pallas_tpu").sum(),
                          argnums=(0, 1)))
    jax.block_until_ready(fn(x, w))
    run_dir = profile.capture(fn, lambda i: (x, w), 1, tmp_path)
    summary = profile.summarize(run_dir, [fn.lower(x, w).compile().as_text()], 1)
    names = {k["kernel"] for k in summary["kernels"]}
    assert "palm_norm_swiglu_fwd" in names, names
    assert any(name.startswith("palm_norm_swiglu_bwd") for name in names), names
    assert "palm_norm_swiglu_fwd" in profile.format_summary(summary)


def test_self_times_charge_nested_ops_to_themselves():
    profile = _load_profile_module()
    events = [
        {"pid": 1, "tid": 1, "ts": 0.0, "dur": 10.0, "name": "while"},
        {"pid": 1, "tid": 1, "ts": 1.0, "dur": 3.0, "name": "a"},
        {"pid": 1, "tid": 1, "ts": 5.0, "dur": 4.0, "name": "b"},
        {"pid": 1, "tid": 1, "ts": 6.0, "dur": 1.0, "name": "c"},
        {"pid": 1, "tid": 2, "ts": 2.0, "dur": 5.0, "name": "other thread"},
    ]
    self_time = {e["name"]: t for e, t in profile._self_times(events)}
    assert self_time == {"while": 3.0, "a": 3.0, "b": 3.0, "c": 1.0, "other thread": 5.0}


def test_hlo_ops_resolve_names_scopes_and_source_lines():
    profile = _load_profile_module()
    hlo = "\n".join([
        "HloModule jit_step, is_scheduled=true",
        "",
        "FileNames",
        '1 "/work/palm/model.py"',
        '2 "/work/kernels/_common.py"',
        "",
        "FunctionNames",
        '1 "_block"',
        '2 "matmul_f32"',
        "",
        "FileLocations",
        "1 {file_name_id=1 function_name_id=1 line=87 end_line=87 column=1 end_column=2}",
        "2 {file_name_id=2 function_name_id=2 line=93 end_line=93 column=1 end_column=2}",
        "",
        "StackFrames",
        "1 {file_location_id=1 parent_frame_id=1}",
        "2 {file_location_id=2 parent_frame_id=2}",
        "",
        "ENTRY %main (p: f32[4]) -> f32[4] {",
        '  %fusion.3 = f32[4]{0} fusion(%p), kind=kLoop, metadata={op_name="jit(step)/palm_rope_fwd bt=8/'
        'palm_rope_fwd/mul" stack_frame_id=2}',
        '  ROOT %dot.1 = f32[4]{0} dot(%fusion.3), metadata={op_name="jit(step)/dot_general"}',
        "}",
    ])
    ops = profile.hlo_ops([hlo])
    fusion = ops[("jit_step", "fusion.3")]
    assert profile.kernel_of(fusion.op_name) == "palm_rope_fwd"
    assert fusion.location == "model.py:87 _block"  # past the _common.py helper to its caller
    assert ops[("jit_step", "dot.1")].op_name == "jit(step)/dot_general"
    assert profile.kernel_of(ops[("jit_step", "dot.1")].op_name) is None


# ------------------------------------------------------------------------------------------
# bench_report.py

def _benchmark(name, median, **extra_info):
    return {"name": name, "stats": {"median": median}, "extra_info": extra_info}


def _results(path: Path, benchmarks: list[dict]) -> Path:
    path.write_text(json.dumps({"datetime": "2026-01-01T00:00:00", "benchmarks": benchmarks}))
    return path


def test_bench_report_table(tmp_path):
    results = _results(tmp_path / "a.json", [
        _benchmark("test_mq_flash_attention[xla-fwd-B1-T2048-H16-K256-bfloat16]", 0.002,
                   device_kind="NVIDIA H100 80GB HBM3", jax_version="0.11.2", flops=2.2e11, bytes=3.4e7,
                   tflops=110.0, gbps=17.0, roofline_fraction=0.28),
        _benchmark("test_train_step[demo-xla-B4-T128-float32]", 0.5, device_kind="NVIDIA H100 80GB HBM3",
                   flops=1e10, bytes=1e8, roofline_fraction=None, tokens_per_s=1024.0, mfu=None),
        _benchmark("test_mq_decode_attention[xla-B8-S2048-H16-K256-bfloat16]", 0.0001, ms_per_token=0.1),
    ])
    result = _run(str(TOOLS / "bench_report.py"), str(results))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "NVIDIA H100 80GB HBM3" in lines[0] and "0.11.2" in lines[0]
    row = next(line for line in lines if "mq_flash_attention" in line).split()
    assert row[1:5] == ["2", "110", "17", "28.0%"]
    train = next(line for line in lines if "train_step" in line)
    assert "n/a" in train and "1,024 tok/s" in train and "MFU n/a" in train
    assert train.split()[1:4] == ["500", "0.02", "0.2"]  # TFLOP/s, GB/s computed from flops / median when not stored
    assert "0.1 ms/token" in next(line for line in lines if "decode" in line)


def test_bench_report_compares_two_runs(tmp_path):
    a = _results(tmp_path / "a.json", [_benchmark("test_x[xla]", 0.004, tflops=1.0, roofline_fraction=0.1),
                                       _benchmark("test_only_a", 0.001)])
    b = _results(tmp_path / "b.json", [_benchmark("test_x[xla]", 0.002, tflops=2.0, roofline_fraction=0.2),
                                       _benchmark("test_only_b", 0.003)])
    result = _run(str(TOOLS / "bench_report.py"), str(a), str(b))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("A = ") and lines[1].startswith("B = ")
    both = next(line for line in lines if line.startswith("test_x[xla]")).split()
    assert both[1:] == ["4", "2", "2.00x", "1", "2", "10.0%", "20.0%"]
    assert next(line for line in lines if line.startswith("test_only_a")).split()[2] == "-"
    assert next(line for line in lines if line.startswith("test_only_b")).split()[1] == "-"


def test_bench_report_ratios_to_the_alternatives_of_the_same_run(tmp_path):
    gpu = dict(device_kind="NVIDIA H100 80GB HBM3", jax_version="0.11.2", dtype="bfloat16")
    attention = "test_mq_flash_attention[{}-fwd-H16-K256-bfloat16-B4-T2048]"
    results = _results(tmp_path / "run.json", [
        _benchmark(attention.format("pallas_gpu"), 0.002, impl="pallas_gpu", flops=4e11, tflops=200.0, **gpu),
        _benchmark(attention.format("cudnn"), 0.001, impl="cudnn", flops=4e11, tflops=400.0, **gpu),
        _benchmark(attention.format("xla"), 0.004, impl="xla", flops=4e11, tflops=100.0, **gpu),
        _benchmark(attention.format("pallas_mosaic_gpu"), 0.0008, impl="pallas_mosaic_gpu", flops=4e11,
                   tflops=500.0, **gpu),
        _benchmark("test_norm_swiglu[pallas_gpu-fwd-B4-T2048-D4096-F16384-bfloat16]", 0.002, impl="pallas_gpu",
                   tflops=550.0, **{"pass": "fwd"}, **gpu),
        _benchmark("test_norm_swiglu[pallas_mosaic_gpu-fwd-B4-T2048-D4096-F16384-bfloat16]", 0.0018,
                   impl="pallas_mosaic_gpu", tflops=570.0, **{"pass": "fwd"}, **gpu),
        _benchmark("test_matmul[norm_swiglu-fwd-M8192-N32768-K4096-bfloat16]", 0.002, impl="xla", tflops=600.0,
                   ceiling="matmul", matmul_of="norm_swiglu", **{"pass": "fwd"}, **gpu),
        _benchmark("test_matmul[square-fwd-M8192-N8192-K8192-bfloat16]", 0.0014, impl="xla", tflops=800.0,
                   ceiling="matmul", matmul_of="square", **{"pass": "fwd"}, **gpu),
        _benchmark("test_copy_bandwidth", 0.001, impl="xla", ceiling="copy", copy_bandwidth=3e12, **gpu),
        _benchmark("test_train_step[1b-pallas_gpu-B2-T2048-bfloat16]", 0.1, impl="pallas_gpu", tflops=480.0,
                   mfu=0.485, **gpu),
        _benchmark("test_train_step[1b-xla-B2-T2048-bfloat16]", 0.12, impl="xla", tflops=400.0, mfu=0.40, **gpu),
        _benchmark("test_train_step[1b-pallas_mosaic_gpu-B2-T2048-bfloat16]", 0.08, impl="pallas_mosaic_gpu",
                   tflops=600.0, mfu=0.606, **gpu),
        _benchmark("test_train_step[1b-pallas_mosaic_gpu-B4-T2048-bfloat16]", 0.15, impl="pallas_mosaic_gpu",
                   tflops=640.0, mfu=0.647, **gpu),
        _benchmark("test_generate[1b-kv_cache-xla-B1-N256]", 0.9, impl="xla", bytes=6e11, new_tokens=256,
                   ms_per_token=0.9 / 256 * 1e3, **gpu),
    ])
    annotated = tmp_path / "annotated.json"
    result = _run(str(TOOLS / "bench_report.py"), str(results), "--annotate", str(annotated), "--markdown")
    assert result.returncode == 0, result.stderr
    info = {b["name"]: b["extra_info"] for b in json.loads(annotated.read_text())["benchmarks"]}
    ours = info[attention.format("pallas_gpu")]
    assert ours["vs_cudnn"] == pytest.approx(0.5) and ours["vs_xla"] == pytest.approx(2.0)
    assert ours["alternatives"]["cudnn"]["tflops"] == 400.0
    assert info[attention.format("cudnn")]["vs_pallas_gpu"] == pytest.approx(2.0)
    mosaic = info[attention.format("pallas_mosaic_gpu")]
    assert mosaic["vs_cudnn"] == pytest.approx(1.25) and mosaic["vs_pallas_gpu"] == pytest.approx(2.5)
    swiglu = info["test_norm_swiglu[pallas_gpu-fwd-B4-T2048-D4096-F16384-bfloat16]"]
    assert swiglu["vs_matmul"] == pytest.approx(550 / 600) and swiglu["matmul_tflops"] == 600.0
    train = info["test_train_step[1b-pallas_gpu-B2-T2048-bfloat16]"]
    assert train["mfu_vs_matmul"] == pytest.approx(0.6) and train["vs_xla"] == pytest.approx(1.2)
    decode = info["test_generate[1b-kv_cache-xla-B1-N256]"]
    assert decode["copy_bound_s"] == pytest.approx(0.2) and decode["vs_copy_bound"] == pytest.approx(4.5)
    assert decode["copy_bound_ms_per_token"] == pytest.approx(0.2 / 256 * 1e3)
    goals = result.stdout[result.stdout.index("### Goals"):result.stdout.index("### Every")]
    assert "| attention fwd B4-T2048: pallas_gpu / cuDNN TFLOP/s | 200 / 400 = 0.50x | >= 1.0x | no |" in goals
    assert ("| attention fwd B4-T2048: pallas_mosaic_gpu / cuDNN TFLOP/s | 500 / 400 = 1.25x | >= 1.0x | yes |"
            in goals)
    assert "| norm_swiglu fwd: pallas_gpu / bare matmul TFLOP/s | 550 / 600 = 0.92x | >= 0.9x | yes |" in goals
    assert ("| norm_swiglu fwd: pallas_mosaic_gpu / bare matmul TFLOP/s | 570 / 600 = 0.95x | >= 0.9x | yes |"
            in goals)
    assert "norm_qkv_rope fwd: pallas_mosaic_gpu" not in goals  # none measured
    assert "48.5% (60.0%) | >= 45% | yes |" in goals and "1.20x | > 1x | yes |" in goals
    assert "| training step B2: pallas_mosaic_gpu speed-up over xla | 1.50x | > 1x | yes |" in goals
    # One pair of rows per batch measured: B4 has no XLA step to compare with.
    assert "| training step B4 (pallas_mosaic_gpu): MFU of 989 TFLOP/s (of bare matmul) | 64.7% (80.0%) |" in goals
    assert "| training step B4: pallas_mosaic_gpu speed-up over xla | not run | > 1x | - |" in goals
    assert "= 4.50x | <= 1.3x | no |" in goals
    assert "| norm_qkv_rope fwd: pallas_gpu / bare matmul TFLOP/s | not run |" in goals
    assert "bare matmul 800 TFLOP/s" in result.stdout and "copy 3e+03 GB/s" in result.stdout


def test_gpu_check_merges_groups_and_writes_the_summary(tmp_path):
    """tools/gpu_check.sh's bookkeeping on what its stages leave behind (the whole script is
    rehearsed by hand: `bash tools/gpu_check.sh /tmp/reh --rehearse`, about 7 minutes here)."""
    gpu = dict(device_kind="NVIDIA H100 80GB HBM3", jax_version="0.11.2", dtype="bfloat16")
    part1 = _results(tmp_path / "bench-ceilings.json", [
        _benchmark("test_matmul[square-fwd-M8192-N8192-K8192-bfloat16]", 0.0014, impl="xla", tflops=800.0,
                   ceiling="matmul", matmul_of="square", **{"pass": "fwd"}, **gpu)])
    part2 = _results(tmp_path / "bench-train.json", [
        _benchmark("test_train_step[1b-xla-B2-T2048-bfloat16]", 0.12, impl="xla", tflops=400.0, mfu=0.40, **gpu)])
    out = tmp_path / "out"
    out.mkdir()
    result = _run(str(TOOLS / "gpu_check.py"), "merge", str(out / "bench.json"), str(part1),
                  str(tmp_path / "bench-decode.json"), str(part2))
    assert result.returncode == 0, result.stderr
    assert "bench-decode.json was not written" in result.stderr
    merged = json.loads((out / "bench.json").read_text())
    assert [p["file"] for p in merged["parts"]] == ["bench-ceilings.json", "bench-train.json"]
    assert merged["benchmarks"][1]["extra_info"]["mfu_vs_matmul"] == pytest.approx(0.5)
    (out / "stages.tsv").write_text("check\t0\t40\nbench-train\t0\t95\nbench-decode\tskipped (budget)\t0\n")
    (out / "kernels_check.json").write_text(json.dumps({
        "device_kind": gpu["device_kind"], "backend": "gpu", "jax_version": "0.11.2", "dtype": "bfloat16",
        "datetime": "2026-12-01T00:00:00+00:00", "shapes": {"t": 2048},
        "kernels": [{"kernel": "rope", "impl": "pallas_gpu", "status": "ok", "fwd": [1e-3], "grad": [2e-3], "fwd_tolerance": 2e-2,
                     "grad_tolerance": 4e-2, "seconds": 1.0},
                    {"kernel": "block_in", "impl": "pallas_gpu", "status": "missing", "fwd_tolerance": 2e-2, "grad_tolerance": 4e-2,
                     "seconds": 0.0, "message": "block_in: impl='pallas_gpu' is not implemented yet"}]}))
    result = _run(str(TOOLS / "gpu_check.py"), "summary", str(out))
    assert result.returncode == 0, result.stderr
    summary = (out / "summary.md").read_text()
    assert "| bench-decode | skipped (budget) | 0 |" in summary
    assert "| rope | pallas_gpu | ok | 1.00e-03 | 2.00e-03 |" in summary
    assert "| block_in | pallas_gpu | missing |" in summary
    assert "| training step B2 (pallas_gpu): MFU of 989 TFLOP/s (of bare matmul) | not run |" in summary
    assert "bare matmul 800 TFLOP/s" in summary and "not run (no profile.json)" in summary
    (out / "profile.json").write_text(json.dumps({
        "what": "train", "preset": "1b", "batch_size": 1, "seq_len": 2048, "impl": "pallas_mosaic_gpu",
        "device_kind": gpu["device_kind"], "step_ms": 75.5, "tokens_per_s": 27116.0, "mfu": 0.266,
        "report": "top operations by self time\nstep time 75.528 ms"}))
    assert _run(str(TOOLS / "gpu_check.py"), "summary", str(out)).returncode == 0
    summary = (out / "summary.md").read_text()
    assert "impl=pallas_mosaic_gpu, on NVIDIA H100 80GB HBM3: 75.5 ms per step" in summary
    assert "```\ntop operations by self time\nstep time 75.528 ms\n```" in summary


def test_gpu_check_profile_tries_each_impl_with_profile_py_arguments(tmp_path):
    """`gpu_check.py profile OUT SCRATCH --impls A,B -- ARGS` (as gpu_check.sh calls it) hands
    ARGS to tools/profile.py and tries each impl in turn: two that profile.py refuses fail fast,
    each with the arguments after `--`."""
    result = _run(str(TOOLS / "gpu_check.py"), "profile", str(tmp_path), str(tmp_path / "scratch"),
                  "--impls", "nothing,none", "--", "--preset", "tiny", "--steps", "1", timeout=120)
    assert result.returncode == 1, result.stderr
    for impl in ("nothing", "none"):
        assert f"--impl {impl} --out {tmp_path / 'scratch'} --preset tiny --steps 1" in result.stdout
        assert f"profile: impl={impl} failed" in result.stdout
    assert not (tmp_path / "profile.json").exists()


def test_gpu_check_script_prints_the_second_call_for_what_its_budget_skipped(tmp_path):
    """tools/gpu_check.sh on a budget under the 15 s a stage needs to start: every stage is
    skipped for the budget, the bookkeeping still runs, and the last line is the second call
    that would run them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    env.update(PYTHON=sys.executable, GPU_CHECK_BUDGET_S="14")
    result = subprocess.run(["bash", str(TOOLS / "gpu_check.sh"), str(tmp_path), "--rehearse"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    stages = dict(line.split("\t")[:2] for line in (tmp_path / "stages.tsv").read_text().splitlines())
    assert stages["env"] == stages["check"] == stages["bench-others"] == "skipped (budget)", stages
    assert stages["merge"] == "1" and stages["summary"] == "0"  # no benchmark JSON to merge
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("gpu_check: second call: GPU_CHECK_STAGES=env,check,bench-ceilings,bench-train,"
                           "profile,bench-norm_swiglu,"), last
    assert ",bench-others bash tools/gpu_check.sh $OUT" in last


def test_bench_report_rejects_other_json(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("{}")
    result = _run(str(TOOLS / "bench_report.py"), str(path))
    assert result.returncode != 0 and "not pytest-benchmark JSON" in result.stderr


# ------------------------------------------------------------------------------------------
# The benchmark command as BUILD.md documents it.

def test_documented_benchmark_command_collects():
    # The exact documented line; --collect-only keeps it cheap. Option conflicts (e.g. with
    # pyproject's addopts) surface here as a usage error, exit 4.
    result = _run("-m", "pytest", "bench/", "--benchmark-only", "--collect-only", "-q")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "test_train_step" in result.stdout


def test_documented_benchmark_command_times_and_writes_json(tmp_path):
    out = tmp_path / "results.json"
    # The documented line, narrowed to one cheap case with few rounds.
    result = _run("-m", "pytest", "bench/", "--benchmark-only", f"--benchmark-json={out}",
                  "-k", "test_rope and xla-fwd-", "--benchmark-max-time=0.05", "-q")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "benchmark: 1 tests" in result.stdout  # pytest-benchmark's timing table
    benchmarks = json.loads(out.read_text())["benchmarks"]
    assert [b["name"] for b in benchmarks] == ["test_rope[xla-fwd-B2-T256-H4-K64-float32]"]
    stats = benchmarks[0]["stats"]
    assert stats["rounds"] >= 1 and stats["median"] > 0
    assert benchmarks[0]["extra_info"]["jax_version"] == jax.__version__


def test_plain_pytest_runs_benchmarks_once_as_checks():
    result = _run("-m", "pytest", "bench/test_kernels.py", "-k", "test_rope and xla-fwd-", "-q")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout
    assert "benchmark: 1 tests" not in result.stdout  # pytest-benchmark's timing table
