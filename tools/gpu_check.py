"""The device script's Python half (tools/gpu_check.sh runs it): kernel checks, merging, summary.

    python tools/gpu_check.py env
    python tools/gpu_check.py check --out DIR/kernels_check.json [--shapes paper|tiny] [--dtype D]
                                    [--impls pallas_mosaic_gpu,pallas_gpu]
    python tools/gpu_check.py profile DIR SCRATCH [--impls pallas_mosaic_gpu,pallas_gpu,xla] -- PROFILE_ARGS...
    python tools/gpu_check.py merge DIR/bench.json part1.json part2.json ...
    python tools/gpu_check.py summary DIR

`check` runs every kernel's GPU implementations (`impl="pallas_mosaic_gpu"` for the kernels
that have a Mosaic GPU version, then every kernel's `"pallas_gpu"`; natively on a GPU, in
interpret mode elsewhere) against its `<name>_reference` on the same inputs upcast to float32
at the highest matmul precision: the forward and, where the kernel is differentiable, the gradients of every
differentiable input for a random cotangent (jax.vjp), each as the relative error
||out - ref|| / ||ref||, printed and written as JSON. A kernel whose pallas_gpu raises
NotImplementedError is reported "missing"; any other exception "error" (with its message);
neither stops the others. Tolerances: bf16 operands 2e-2 (gradients 4e-2); float32 1e-2
(Triton's float32 dots use TF32 on a GPU), as bench/conftest.py's table.

`env` prints the card (nvidia-smi), Python, jax and triton versions. `profile` runs
tools/profile.py's training step with impl pallas_mosaic_gpu, falling back to pallas_gpu, then
xla, when one fails (`--impls`: others, in turn), and copies its summary (profile.json, the report inside), the
compiled HLO (compiled_hlo.txt.gz) and the Perfetto trace (when under 16 MiB, the device
tool's limit) into DIR.

`merge` concatenates pytest-benchmark JSON files (one per group of benchmarks, so that a group
cut short loses only itself) into one, with bench_report's ratios (vs_cudnn, vs_matmul,
mfu_vs_matmul, vs_copy_bound, ...) added to each extra_info: the file to commit as
bench/results/<device>-<date>.json.

`summary` writes DIR/summary.md from what the script left in DIR: the stages' times
(stages.tsv), the kernel checks, issue 9's goals and every benchmark (bench.json), and the
profiled training step (profile.json).
"""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(_ROOT)  # the checkout, not tools/ (whose profile.py shadows the stdlib's)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import zlib  # noqa: E402
from typing import Any, Callable  # noqa: E402

TOLERANCE = {"bfloat16": (2e-2, 4e-2), "float16": (5e-3, 1e-2), "float32": (1e-2, 1e-2)}


# ------------------------------------------------------------------------------------------
# check

@dataclasses.dataclass(frozen=True)
class Shapes:
    b: int
    t: int
    d: int
    h: int
    k: int
    f: int
    decode_b: int
    decode_s: int


SHAPES = {
    # PaLM-8B widths, one 2048-token sequence (M = 2048): the shapes the kernels run at in
    # training, at a fraction of the benchmarks' cost.
    "paper": Shapes(b=1, t=2048, d=4096, h=16, k=256, f=16384, decode_b=8, decode_s=2048),
    # Rehearsal on CPU: interpret mode takes seconds here. T = 96 is not a power of two, so
    # boundary blocks are exercised.
    "tiny": Shapes(b=1, t=96, d=64, h=2, k=32, f=128, decode_b=2, decode_s=96),
}


@dataclasses.dataclass(frozen=True)
class Spec:
    """One kernel: fn(*args, **kwargs) for impl in kwargs, args from make(key, shapes, dtype)."""

    name: str
    make: Callable[..., tuple]
    diff: tuple[int, ...]  # differentiable argument positions (() for forward-only kernels)
    kwargs: dict


def _specs():
    import jax
    import jax.numpy as jnp

    def normal(key, shape, dtype, scale=1.0):
        return (jax.random.normal(key, shape, jnp.float32) * scale).astype(dtype)

    def positions(s):
        return jnp.broadcast_to(jnp.arange(s.t, dtype=jnp.int32) + 5, (s.b, s.t))

    def rope(key, s, dtype):
        return normal(key, (s.b, s.t, s.h, s.k), dtype), positions(s)

    def norm_qkv_rope(key, s, dtype):
        k = jax.random.split(key, 5)
        w = s.d ** -0.5
        return (normal(k[0], (s.b, s.t, s.d), dtype), 1.0 + normal(k[1], (s.d,), dtype, 0.1),
                normal(k[2], (s.d, s.h, s.k), dtype, w), normal(k[3], (s.d, s.k), dtype, w),
                normal(k[4], (s.d, s.k), dtype, w), positions(s))

    def norm_swiglu(key, s, dtype):
        k = jax.random.split(key, 4)
        w = s.d ** -0.5
        return (normal(k[0], (s.b, s.t, s.d), dtype), 1.0 + normal(k[1], (s.d,), dtype, 0.1),
                normal(k[2], (s.d, s.f), dtype, w), normal(k[3], (s.d, s.f), dtype, w))

    def block_in(key, s, dtype):
        x, scale, wq, wk, wv, pos = norm_qkv_rope(key, s, dtype)
        _, _, w_gate, w_up = norm_swiglu(jax.random.fold_in(key, 1), s, dtype)
        return x, scale, wq, wk, wv, w_gate, w_up, pos

    def block_out(key, s, dtype):
        k = jax.random.split(key, 5)
        return (normal(k[0], (s.b, s.t, s.d), dtype), normal(k[1], (s.b, s.t, s.h, s.k), dtype),
                normal(k[2], (s.h, s.k, s.d), dtype, (s.h * s.k) ** -0.5), normal(k[3], (s.b, s.t, s.f), dtype),
                normal(k[4], (s.f, s.d), dtype, s.f ** -0.5))

    def attention(key, s, dtype):
        k = jax.random.split(key, 3)
        return (normal(k[0], (s.b, s.t, s.h, s.k), dtype), normal(k[1], (s.b, s.t, s.k), dtype),
                normal(k[2], (s.b, s.t, s.k), dtype))

    def decode(key, s, dtype):
        k = jax.random.split(key, 3)
        # Ragged lengths: a full cache and a part-filled one.
        lengths = jnp.asarray([s.decode_s if i % 2 == 0 else max(1, s.decode_s // 3 + i)
                               for i in range(s.decode_b)], jnp.int32)
        return (normal(k[0], (s.decode_b, s.h, s.k), dtype), normal(k[1], (s.decode_b, s.decode_s, s.k), dtype),
                normal(k[2], (s.decode_b, s.decode_s, s.k), dtype), lengths)

    eps = {"eps": 1e-6}
    return [
        Spec("rope", rope, (0,), {}),
        Spec("norm_qkv_rope", norm_qkv_rope, (0, 1, 2, 3, 4), eps),
        Spec("norm_swiglu", norm_swiglu, (0, 1, 2, 3), eps),
        Spec("block_in", block_in, (0, 1, 2, 3, 4, 5, 6), eps),
        Spec("block_out", block_out, (0, 1, 2, 3, 4), {}),
        Spec("mq_flash_attention", attention, (0, 1, 2), {"causal": True}),
        Spec("mq_decode_attention", decode, (), {}),
    ]


def _rel_errors(actual, expected) -> list[float]:
    import jax

    from bench.accuracy import relative_error

    return [relative_error(a, e) for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected))]


def check_kernel(spec: Spec, shapes: Shapes, dtype: str, interpret: bool | None,
                 impl: str = "pallas_gpu") -> dict:
    """{"kernel", "impl", "status": ok|fail|missing|error, "fwd": [errors], "grad": [errors],
    ...}."""
    import jax
    import jax.numpy as jnp

    import kernels

    kernel = getattr(kernels, spec.name)
    reference = getattr(kernels, f"{spec.name}_reference")
    fwd_tol, grad_tol = TOLERANCE[dtype]
    result: dict[str, Any] = {"kernel": spec.name, "impl": impl, "dtype": dtype,
                              "fwd_tolerance": fwd_tol,
                              "grad_tolerance": grad_tol if spec.diff else None}
    start = time.perf_counter()
    key = jax.random.key(zlib.crc32(spec.name.encode()))
    args = spec.make(key, shapes, dtype)
    result["shapes"] = {str(i): list(a.shape) for i, a in enumerate(args)}
    ours = functools.partial(kernel, impl=impl, interpret=interpret, **spec.kwargs)
    ref = functools.partial(reference, **spec.kwargs)
    f32 = [a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a for a in args]

    def with_diff(fn, full):
        def of_diff(*diff):
            call = list(full)
            for i, x in zip(spec.diff, diff):
                call[i] = x
            return fn(*call)
        return of_diff

    try:
        out = jax.block_until_ready(jax.jit(ours)(*args))
    except NotImplementedError as e:
        result.update(status="missing", message=str(e)[:300], seconds=time.perf_counter() - start)
        return result
    except Exception as e:  # noqa: BLE001 -- reported, and the other kernels still run
        result.update(status="error", message=f"{type(e).__name__}: {str(e)[:600]}",
                      seconds=time.perf_counter() - start)
        traceback.print_exc()
        return result
    try:
        with jax.default_matmul_precision("highest"):
            expected = jax.jit(ref)(*f32)
        result["fwd"] = _rel_errors(out, expected)
        result["grad"] = []
        if spec.diff:
            leaves, tree = jax.tree.flatten(out)
            gkeys = jax.random.split(jax.random.fold_in(key, 7), len(leaves))
            g = jax.tree.unflatten(tree, [jax.random.normal(k, x.shape, jnp.float32).astype(x.dtype)
                                          for k, x in zip(gkeys, leaves)])
            g32 = jax.tree.map(lambda x: x.astype(jnp.float32), g)

            def vjp(fn, full, cot):
                _, pullback = jax.vjp(with_diff(fn, full), *(full[i] for i in spec.diff))
                return pullback(cot)

            grads = jax.jit(lambda *a: vjp(ours, a[:-1], a[-1]))(*args, g)
            with jax.default_matmul_precision("highest"):
                expected_grads = jax.jit(lambda *a: vjp(ref, a[:-1], a[-1]))(*f32, g32)
            result["grad"] = _rel_errors(grads, expected_grads)
        ok = all(e <= fwd_tol for e in result["fwd"]) and all(e <= grad_tol for e in result["grad"])
        result["status"] = "ok" if ok else "fail"
    except Exception as e:  # noqa: BLE001
        result.update(status="error", message=f"{type(e).__name__}: {str(e)[:600]}")
        traceback.print_exc()
    result["seconds"] = time.perf_counter() - start
    return result


def _fmt_errors(errors) -> str:
    return "-" if not errors else " ".join(f"{e:.2e}" for e in errors)


def check(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check.py check")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="paper")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(TOLERANCE))
    parser.add_argument("--kernels", default=None, help="comma-separated subset (default: all)")
    parser.add_argument("--impls", default="pallas_mosaic_gpu,pallas_gpu",
                        help="comma-separated GPU implementations, each run for the kernels "
                             "that have it, in this order (auto's first: a stage cut short "
                             "loses the fallbacks)")
    parser.add_argument("--interpret", action="store_true",
                        help="force interpret mode (default: native on a GPU, interpreted elsewhere)")
    args = parser.parse_args(argv)

    import jax

    shapes = SHAPES[args.shapes]
    specs = _specs()
    if args.kernels:
        wanted = set(args.kernels.split(","))
        specs = [s for s in specs if s.name in wanted]
    device = jax.devices()[0]
    print(f"{args.impls} against the float32 reference on {device.device_kind} ({jax.default_backend()}), "
          f"jax {jax.__version__}, {args.dtype}, shapes {args.shapes} {dataclasses.asdict(shapes)}", flush=True)
    results: list[dict] = []
    summary = {"device_kind": device.device_kind, "backend": jax.default_backend(), "jax_version": jax.__version__,
               "dtype": args.dtype, "shapes": dataclasses.asdict(shapes),
               "datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "kernels": results}
    import kernels

    runs = [(spec, impl) for impl in args.impls.split(",") for spec in specs
            if impl in getattr(kernels, spec.name).IMPLEMENTATIONS]
    for spec, impl in runs:
        r = check_kernel(spec, shapes, args.dtype, True if args.interpret else None, impl)
        results.append(r)
        print(f"{spec.name:20s} {impl:18s} {r['status']:8s} fwd {_fmt_errors(r.get('fwd'))}  grad {_fmt_errors(r.get('grad'))}"
              f"  ({r['seconds']:.1f} s){'  ' + r['message'][:200] if r.get('message') else ''}", flush=True)
        # Written after every kernel: a stage stopped at its time limit keeps what it checked.
        Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    counts = {s: sum(r["status"] == s for r in results) for s in ("ok", "fail", "missing", "error")}
    print(", ".join(f"{n} {s}" for s, n in counts.items()), flush=True)
    return 0


# ------------------------------------------------------------------------------------------
# env, profile

def env(argv: list[str]) -> int:
    if shutil.which("nvidia-smi"):
        subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm",
                        "--format=csv"], check=False)
    import jax

    print(f"python {sys.version.split()[0]}, jax {jax.__version__}, backend {jax.default_backend()}, "
          f"devices {jax.devices()}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    return 0


PROFILE_MAX_BYTES = 16 * 2**20  # the device tool returns files up to 16 MiB


def profile(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check.py profile")
    parser.add_argument("outdir")
    parser.add_argument("scratch")
    parser.add_argument("--impls", default="pallas_mosaic_gpu,pallas_gpu,xla",
                        help="the implementations to try in turn, until one profiles")
    # tools/profile.py's arguments come after `--`, split off here: argparse would hand the
    # options among them to this parser.
    cut = argv.index("--") if "--" in argv else len(argv)
    args, profile_args = parser.parse_args(argv[:cut]), argv[cut + 1:]
    out, scratch = Path(args.outdir), Path(args.scratch)
    for impl in args.impls.split(","):
        shutil.rmtree(scratch, ignore_errors=True)
        command = [sys.executable, str(Path(__file__).resolve().parent / "profile.py"), "--what", "train",
                   "--impl", impl, "--out", str(scratch), *profile_args]
        print("profile:", " ".join(command[1:]), flush=True)
        if subprocess.run(command, check=False).returncode == 0:
            shutil.copy(scratch / "summary.json", out / "profile.json")  # the report under "report"
            with open(scratch / "compiled_hlo.txt", "rb") as src, gzip.open(out / "compiled_hlo.txt.gz", "wb") as dst:
                shutil.copyfileobj(src, dst)
            traces = [p for p in scratch.rglob("perfetto_trace.json.gz") if p.stat().st_size < PROFILE_MAX_BYTES]
            if traces:
                shutil.copy(traces[0], out / "perfetto_trace.json.gz")
            return 0
        print(f"profile: impl={impl} failed", flush=True)
    return 1


# ------------------------------------------------------------------------------------------
# merge

def merge(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check.py merge")
    parser.add_argument("out")
    parser.add_argument("parts", nargs="+", help="pytest-benchmark JSON files; missing ones are noted and skipped")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_report

    merged: dict[str, Any] | None = None
    for part in args.parts:
        path = Path(part)
        if not path.exists():
            print(f"merge: {part} was not written (its group was cut short or failed)", file=sys.stderr)
            continue
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            print(f"merge: {part} is not JSON ({e}); skipped", file=sys.stderr)
            continue
        if merged is None:
            merged = data
            merged.setdefault("parts", [])
        else:
            merged["benchmarks"].extend(data.get("benchmarks", []))
        merged["parts"].append({"file": path.name, "benchmarks": len(data.get("benchmarks", [])),
                                "datetime": data.get("datetime")})
    if merged is None:
        print("merge: no benchmark JSON to merge", file=sys.stderr)
        return 1
    bench_report.annotate(merged["benchmarks"])
    Path(args.out).write_text(json.dumps(merged, indent=1) + "\n")
    print(f"merge: {len(merged['benchmarks'])} benchmarks from {len(merged['parts'])} files -> {args.out}")
    return 0


# ------------------------------------------------------------------------------------------
# summary

def _stages(out: Path) -> list[list[str]]:
    path = out / "stages.tsv"
    if not path.exists():
        return []
    return [line.split("\t") for line in path.read_text().splitlines() if line.strip()]


def summary(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check.py summary")
    parser.add_argument("outdir")
    args = parser.parse_args(argv)
    out = Path(args.outdir)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_report

    lines = ["# GPU check: pallas_gpu and pallas_mosaic_gpu kernels, benchmarks, profile", ""]
    check_path = out / "kernels_check.json"
    if check_path.exists():
        c = json.loads(check_path.read_text())
        lines += [f"{c['device_kind']} ({c['backend']}), jax {c['jax_version']}, {c['datetime']}.", ""]
    stages = _stages(out)
    if stages:
        lines += ["## Stages", "", bench_report._md_table(["stage", "exit", "seconds"], stages), ""]
    lines += ["## Kernels: the GPU implementations against the float32 reference", ""]
    if check_path.exists():
        rows = [[r["kernel"], r["impl"], r["status"], _fmt_errors(r.get("fwd")), _fmt_errors(r.get("grad")),
                 f"{r['fwd_tolerance']:g} / {r['grad_tolerance'] or '-'}", f"{r.get('seconds', 0):.1f}",
                 (r.get("message") or "")[:160]] for r in c["kernels"]]
        lines += [f"{c['dtype']}, shapes {c['shapes']}; relative error ||out - ref|| / ||ref|| per output.", "",
                  bench_report._md_table(["kernel", "impl", "status", "fwd error", "grad errors", "tolerance",
                                          "s", "note"], rows), ""]
    else:
        lines += ["not run (no kernels_check.json)", ""]
    bench_path = out / "bench.json"
    lines += ["## Benchmarks", ""]
    if bench_path.exists():
        run, rows = bench_report.load(bench_path)
        lines += [bench_report.markdown(run, rows), ""]
    else:
        lines += ["not run (no bench.json)", ""]
    lines += ["## Profile of one training step", ""]
    if (out / "profile.json").exists():
        p = json.loads((out / "profile.json").read_text())
        lines += [f"{p['what']} of `{p['preset']}` at B={p['batch_size']}, T={p['seq_len']}, impl={p['impl']}, "
                  f"on {p['device_kind']}: {p['step_ms']:.1f} ms per step, {p['tokens_per_s']:,.0f} tokens/s, "
                  f"MFU {'n/a' if p.get('mfu') is None else format(p['mfu'], '.1%')}.", "",
                  "```", p["report"].rstrip(), "```"]
    else:
        lines += ["not run (no profile.json)"]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print(f"summary: {out / 'summary.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"env": env, "check": check, "profile": profile, "merge": merge, "summary": summary}
    if not argv or argv[0] not in commands:
        print(__doc__.split("\n\n")[0] + "\n\nusage: gpu_check.py {env,check,profile,merge,summary} ...", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
