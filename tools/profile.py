"""Capture a jax.profiler trace of PaLM training steps or forward passes, and summarise it.

    python tools/profile.py --preset demo --what train --steps 5 --out runs/profile
    python tools/profile.py --preset tiny --what forward --impl pallas_tpu --steps 2 --out /tmp/p
    python tools/profile.py --preset demo --what train --mesh data=2,model=4 --out runs/p-2x4

Runs `--warmup` untimed calls (compilation), times `--steps` calls, then traces `--steps`
more on the current backend (TPU, GPU or CPU) into OUT, where TensorBoard/XProf and Perfetto
open it (the commands are printed). The summary lists the operations taking the most time
per step, by self time (time inside nested ops is charged to them, not to their parent), and
the time per kernel of ours: Pallas kernels are named `palm_<op>_fwd`/`_bwd...` and run under
a `jax.named_scope` of the same name, so whether they compile natively or run in interpret
mode on CPU, every operation they lower to is recognisable through its HLO metadata. With
`--impl xla` the plain-jnp references run instead and XLA's fusion names appear. With
`--mesh data=D,model=M` the step runs sharded over all D*M devices as `python -m palm train
--mesh` runs it (palm.train's init_state, make_train_step and place_batch; the forward under
`palm.forward(mesh=)`), and the summary's op times add up every device's. Also written:
OUT/summary.txt, OUT/summary.json (the same report under "report") and OUT/compiled_hlo.txt
(the profiled program after XLA's passes, to see what it made of ours). Batches are random
tokens: the data pipeline is not what is being profiled.

On a GPU, XLA would group kernels into CUDA graphs (command buffers), which a trace shows as
one op each: a `1b` training step on an H200 came out as five `command_buffer_N` rows and
none of our kernels. So this script turns them off (`--xla_gpu_enable_command_buffer=`,
added to XLA_FLAGS unless that flag is already there; ignored off GPUs). The step took 75.5
ms without them and 76.2 ms with them there.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as `python tools/profile.py` from a checkout: put the checkout (not tools/) on the path,
# so `palm` and `kernels` come from it and this file does not shadow the standard library's
# `profile` module (which cProfile imports).
_ROOT = Path(__file__).resolve().parent.parent
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(_ROOT)

import os  # noqa: E402

# Before jax starts, and only as the program (importing this module changes nothing).
if __name__ == "__main__" and "xla_gpu_enable_command_buffer" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=").strip()

import argparse  # noqa: E402
import collections  # noqa: E402
import dataclasses  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable, Iterable  # noqa: E402

import jax  # noqa: E402

# Trace threads on a device that repeat what another thread already shows (step markers,
# whole modules, framework-level scopes); only the threads with individual ops are counted.
_SUMMARY_THREADS = ("Steps", "XLA Modules", "Framework Ops", "Framework Name Scope", "Source code",
                    "TensorFlow Ops", "TensorFlow Name Scope", "XLA TraceMe")
_KERNEL = re.compile(r"palm_[A-Za-z0-9_]+")
_HLO_OP = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{[^}]*?op_name="((?:[^"\\]|\\.)*)"')
_HLO_MODULE = re.compile(r"^HloModule\s+([\w.\-]+)")


# ------------------------------------------------------------------------------------------
# Capturing.

def capture(fn: Callable[..., Any], inputs: Callable[[int], tuple], steps: int, out_dir: str | Path) -> Path:
    """Traces fn(*inputs(i)) for i < steps, each followed by block_until_ready; returns the
    run directory that jax.profiler created under out_dir/plugins/profile/."""
    out_dir = Path(out_dir)
    profile_root = out_dir / "plugins" / "profile"
    before = set(profile_root.iterdir()) if profile_root.exists() else set()
    options = jax.profiler.ProfileOptions()
    if hasattr(options, "python_tracer_level"):
        options.python_tracer_level = 0  # Python frames would dwarf the ops in interpret mode
    with jax.profiler.trace(str(out_dir), create_perfetto_trace=True, profiler_options=options):
        for i in range(steps):
            with jax.profiler.StepTraceAnnotation("step", step_num=i):
                jax.block_until_ready(fn(*inputs(i)))
    runs = sorted(set(profile_root.iterdir()) - before, key=lambda p: p.stat().st_mtime)
    if not runs:
        raise RuntimeError(f"jax.profiler wrote no run under {profile_root}")
    return runs[-1]


def trace_file(run_dir: Path) -> Path:
    """The Chrome-trace JSON that jax.profiler writes next to the XPlane protobuf."""
    found = sorted(p for p in run_dir.glob("*.trace.json.gz"))
    if not found:
        raise FileNotFoundError(f"no *.trace.json.gz in {run_dir} (have: {sorted(p.name for p in run_dir.iterdir())})")
    return found[0]


# ------------------------------------------------------------------------------------------
# Naming: HLO instruction -> the op_name metadata JAX attached (named scopes included).

@dataclasses.dataclass(frozen=True)
class HloOp:
    op_name: str  # JAX's op_name metadata: jit/transform/named-scope path, primitive last
    location: str  # "file.py:line function" of the innermost traced Python frame, or ""


def hlo_ops(hlo_texts: Iterable[str]) -> dict[tuple[str, str], HloOp]:
    """{(module, instruction): HloOp} from compiled HLO text (`Compiled.as_text()`).

    The op_name comes from each instruction's metadata; the source location from its
    stack_frame_id, resolved through the FileNames / FunctionNames / FileLocations /
    StackFrames tables that XLA prints ahead of the computations (JAX keeps only user frames
    in them, so the innermost frame is our code).
    """
    ops = {}
    for text in hlo_texts:
        module = ""
        tables: dict[str, dict[int, str]] = collections.defaultdict(dict)
        section = None
        for line in text.splitlines():
            header = _HLO_MODULE.match(line)
            if header:
                module, section = header.group(1), None
                continue
            if line in _HLO_TABLES:
                section = line
                continue
            if section:
                entry = _HLO_ENTRY.match(line)
                if entry:
                    tables[section][int(entry.group(1))] = entry.group(2)
                    continue
                section = None
            match = _HLO_OP.match(line)
            if match:
                frame = _STACK_FRAME.search(line)
                where = _location(tables, int(frame.group(1))) if frame else ""
                ops[(module, match.group(1))] = HloOp(match.group(2), where)
    return ops


_HLO_TABLES = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")
_HLO_ENTRY = re.compile(r"^(\d+) (.*)$")
_STACK_FRAME = re.compile(r"stack_frame_id=(\d+)")


def _field(entry: str, name: str) -> int | None:
    found = re.search(rf"\b{name}=(\d+)", entry)
    return int(found.group(1)) if found else None


def _location(tables: dict[str, dict[int, str]], frame_id: int) -> str:
    """"file.py:line function" of the innermost frame outside shared helper modules (files
    named `_*.py`, e.g. kernels/_common.py's matmul_f32, which every matmul goes through).

    XLA prints each frame's parent as its id + 1 (0: no parent), as the chain
    _forward_jit <- _logits <- _block <- block_in <- norm_swiglu_reference shows.
    """
    first, seen = "", set()
    while frame_id > 0 and frame_id not in seen and len(seen) < 64:
        seen.add(frame_id)
        frame = tables["StackFrames"].get(frame_id, "")
        location = tables["FileLocations"].get(_field(frame, "file_location_id") or -1, "")
        file_name = tables["FileNames"].get(_field(location, "file_name_id") or -1, "").strip('"')
        if not file_name:
            break
        function = tables["FunctionNames"].get(_field(location, "function_name_id") or -1, "").strip('"')
        here = f"{Path(file_name).name}:{_field(location, 'line')} {function}".rstrip()
        first = first or here
        if not Path(file_name).name.startswith("_"):
            return here
        frame_id = (_field(frame, "parent_frame_id") or 0) - 1
    return first


def kernel_of(*names: str) -> str | None:
    """Our kernel's name (`palm_...`) in an op_name or event name, innermost first; else None."""
    for name in names:
        found = _KERNEL.findall(name or "")
        if found:
            return found[-1]
    return None


def _where(op: HloOp | None, fallback: str) -> str:
    """The primitive (last op_name component) and the source line it was traced from."""
    if op is None:
        return fallback.split("/")[-1] if fallback else ""
    primitive = op.op_name.split("/")[-1]
    return f"{primitive} @ {op.location}" if op.location else primitive


# ------------------------------------------------------------------------------------------
# Summarising.

@dataclasses.dataclass
class OpTime:
    op: str
    where: str  # primitive @ source line, or "" when unknown
    kernel: str | None
    self_us: float = 0.0
    calls: int = 0


def _op_events(trace: dict) -> list[dict]:
    """Complete events of individual operations, from device threads where there are any.

    On GPU/TPU the ops run on /device:... processes; on CPU, XLA's thunks are host events
    that carry an `hlo_op` argument. Device threads that only repeat other threads' time
    (_SUMMARY_THREADS) are left out; an "XLA Ops" thread, where present, is used alone.
    """
    events = trace.get("traceEvents", [])
    process, thread = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            process[e["pid"]] = e.get("args", {}).get("name", "")
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            thread[(e["pid"], e.get("tid"))] = e.get("args", {}).get("name", "")
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
    devices = {pid for pid, name in process.items() if name.startswith("/device:")}
    on_device = [e for e in complete if e["pid"] in devices]
    if on_device:
        xla_ops = {key for key, name in thread.items() if key[0] in devices and name == "XLA Ops"}
        if xla_ops:
            return [e for e in on_device if (e["pid"], e.get("tid")) in xla_ops]
        return [e for e in on_device if thread.get((e["pid"], e.get("tid")), "") not in _SUMMARY_THREADS]
    return [e for e in complete if "hlo_op" in e.get("args", {})]


def _self_times(events: list[dict]) -> list[tuple[dict, float]]:
    """(event, self time in us) per event: its duration less that of events nested in it on
    the same thread."""
    by_thread = collections.defaultdict(list)
    for e in events:
        by_thread[(e["pid"], e.get("tid"))].append(e)
    result = []
    for thread_events in by_thread.values():
        thread_events.sort(key=lambda e: (float(e["ts"]), -float(e["dur"])))
        stack: list[list] = []  # [event, end, self]
        for e in thread_events:
            start, dur = float(e["ts"]), float(e["dur"])
            while stack and start >= stack[-1][1]:
                result.append((stack[-1][0], stack.pop()[2]))
            if stack:
                stack[-1][2] -= min(dur, stack[-1][1] - start)
            stack.append([e, start + dur, dur])
        result.extend((entry[0], entry[2]) for entry in stack)
    return result


def summarize(run_dir: Path, hlo_texts: Iterable[str], steps: int, *, top: int = 20) -> dict:
    """Per-step op and kernel times from the trace in run_dir.

    Returns a dict with "ops" (the `top` operations by self time: op, where, kernel, calls and
    ms per step, share of the op time), "kernels" (ms per step per `palm_...` kernel), the op
    time per step and the trace file.
    """
    path = trace_file(run_dir)
    with gzip.open(path, "rt") as f:
        trace = json.load(f)
    names = hlo_ops(hlo_texts)
    ops: dict[tuple[str, str], OpTime] = {}
    for event, self_us in _self_times(_op_events(trace)):
        args = event.get("args", {})
        op = str(args.get("hlo_op") or event.get("name", "?"))
        if op.startswith("end: "):  # CPU thunk executor's completion markers
            continue
        module = str(args.get("hlo_module", ""))
        hlo = names.get((module, op))
        fallback = str(args.get("long_name", "") or args.get("tf_op", ""))
        key = (module, op)
        if key not in ops:
            ops[key] = OpTime(op=op, where=_where(hlo, fallback),
                              kernel=kernel_of(hlo.op_name if hlo else fallback, event.get("name", "")))
        ops[key].self_us += max(self_us, 0.0)
        ops[key].calls += 1
    total_us = sum(o.self_us for o in ops.values())
    ranked = sorted(ops.values(), key=lambda o: -o.self_us)
    kernels: dict[str, float] = collections.defaultdict(float)
    for o in ops.values():
        if o.kernel:
            kernels[o.kernel] += o.self_us
    share = (lambda us: us / total_us) if total_us else (lambda us: 0.0)
    return {
        "trace": str(path),
        "op_ms_per_step": total_us / steps / 1e3,
        "ops": [{"op": o.op, "where": o.where, "kernel": o.kernel, "calls_per_step": o.calls / steps,
                 "ms_per_step": o.self_us / steps / 1e3, "share": share(o.self_us)} for o in ranked[:top]],
        "kernels": [{"kernel": k, "ms_per_step": us / steps / 1e3, "share": share(us)}
                    for k, us in sorted(kernels.items(), key=lambda kv: -kv[1])],
    }


def _table(header: list[str], rows: list[list[str]], align: str) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(f"{c:{a}{w}}" for c, a, w in zip(cells, align, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def format_summary(summary: dict) -> str:
    ops = [[o["op"][:40], o["kernel"] or "-", o["where"][:72], f"{o['calls_per_step']:g}",
            f"{o['ms_per_step']:.3f}", f"{o['share']:.1%}"] for o in summary["ops"]]
    lines = [f"top operations by self time (of {summary['op_ms_per_step']:.3f} ms op time per step):",
             _table(["op", "kernel", "where", "calls", "ms/step", "share"], ops, "<<<>>>")]
    if summary["kernels"]:
        rows = [[k["kernel"], f"{k['ms_per_step']:.3f}", f"{k['share']:.1%}"] for k in summary["kernels"]]
        lines += ["", "our kernels (palm_*):", _table(["kernel", "ms/step", "share"], rows, "<>>")]
    else:
        lines += ["", "our kernels (palm_*): none in this trace (impl xla runs the plain-jnp references)"]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# The command.

def _build(args):
    """(fn, inputs(i), hlo_text(), tokens per step, model FLOPs per step, config, devices)."""
    import numpy as np

    import palm
    from palm.model import check_mesh
    from palm.settings import parse_mesh
    from palm.train import TrainConfig, init_state, make_train_step, place_batch

    config = palm.preset(args.preset)
    if args.n_layers:
        config = dataclasses.replace(config, n_layers=args.n_layers)
    if args.seq_len > config.max_seq_len:
        raise ValueError(f"--seq-len {args.seq_len} exceeds max_seq_len={config.max_seq_len} of {args.preset}")
    b, t = args.batch_size, args.seq_len
    tokens = b * t
    per_token = palm.flops_per_token(config, t)
    mesh_shape = None if args.mesh is None else parse_mesh(args.mesh)  # (data, model)
    mesh = None if mesh_shape is None else palm.make_mesh(*mesh_shape)
    if mesh is not None:
        check_mesh(mesh, config, b)
    devices = 1 if mesh is None else mesh.size

    def batch(i, length):  # int32 [B, length], split over "data" with a mesh
        ids = jax.random.randint(jax.random.key(i), (b, length), 0, config.vocab_size, jax.numpy.int32)
        return place_batch(np.asarray(ids), mesh)

    if args.what == "train":
        train_config = TrainConfig(batch_size=b, seq_len=t, impl=args.impl, mesh=mesh_shape,
                                   collective_matmul=args.collective_matmul)
        carry = {"state": init_state(config, train_config, mesh)}
        step = make_train_step(config, train_config, mesh)

        def fn(tokens_):
            carry["state"], metrics = step(carry["state"], tokens_)
            return carry["state"], metrics

        batches = [batch(i, t + 1) for i in range(3)]
        return (fn, lambda i: (batches[i % 3],),
                lambda: step.lower(carry["state"], batches[0]).compile().as_text(), tokens, per_token * tokens,
                config, devices)

    params = palm.init(config, jax.random.key(0))
    if mesh is not None:
        params = palm.shard(params, mesh, config)
    forward = jax.jit(lambda p, x: palm.forward(p, x, config, impl=args.impl, mesh=mesh,
                                                collective_matmul=args.collective_matmul))
    batches = [batch(i, t) for i in range(3)]
    return (forward, lambda i: (params, batches[i % 3]),
            lambda: forward.lower(params, batches[0]).compile().as_text(), tokens, per_token * tokens / 3.0,
            config, devices)


def _utilisation(flops_per_step: float, step_s: float, config, devices: int) -> tuple[float | None, str]:
    from palm.flops import device_peak_flops

    peak = device_peak_flops()
    if peak is None:
        return None, f"n/a (no peak FLOP/s known for device kind {jax.devices()[0].device_kind!r})"
    if config.dtype not in ("bfloat16", "float16"):
        return None, f"n/a (the known peak is bf16; this config computes in {config.dtype})"
    value = flops_per_step / step_s / (peak * devices)
    return value, f"{value:.1%} of {devices} x {peak / 1e12:.0f} TFLOP/s"


def main(argv: list[str] | None = None) -> int:
    import kernels
    import palm
    from palm.settings import TrainError

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo", choices=sorted(palm.PRESETS))
    parser.add_argument("--what", default="train", choices=("train", "forward"))
    parser.add_argument("--steps", type=int, default=5, help="traced (and separately timed) steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation)")
    parser.add_argument("--out", required=True, help="trace directory (TensorBoard --logdir)")
    parser.add_argument("--impl", default="auto", choices=kernels.IMPLS)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=None, help="default: 128, or the preset's max_seq_len if less")
    parser.add_argument("--n-layers", type=int, default=None, help="override the preset's layer count")
    parser.add_argument("--top", type=int, default=20, help="operations listed")
    parser.add_argument("--mesh", metavar="data=D,model=M", default=None,
                        help="run sharded over a device mesh as `python -m palm train --mesh` does; "
                             "D*M must be the device count (default: one device)")
    parser.add_argument("--collective-matmul", action="store_true",
                        help="with --mesh: rings of ppermutes instead of some weight all-gathers "
                             "(as `python -m palm train --collective-matmul`)")
    args = parser.parse_args(argv)
    if args.seq_len is None:
        args.seq_len = min(128, palm.preset(args.preset).max_seq_len)
    for name in ("steps", "warmup", "batch_size", "seq_len", "top"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            parser.error(f"--{name.replace('_', '-')} must be positive")

    try:
        fn, inputs, hlo_text, tokens, flops_per_step, config, devices = _build(args)
        impl = kernels.resolve_impl(args.impl)
        where = jax.devices()[0].device_kind + (f", mesh {args.mesh}" if args.mesh else "")
        print(f"{args.what} {args.preset} (L={config.n_layers}, {config.dtype}) impl={impl} B={args.batch_size} "
              f"T={args.seq_len} on {where} (jax {jax.__version__})", flush=True)
        start = time.perf_counter()
        for i in range(args.warmup):
            jax.block_until_ready(fn(*inputs(i)))
        print(f"warm-up: {args.warmup} steps in {time.perf_counter() - start:.1f} s", flush=True)
    except (ValueError, NotImplementedError, TrainError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    times = []
    for i in range(args.steps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*inputs(i)))
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    out = Path(args.out)
    run_dir = capture(fn, inputs, args.steps, out)
    hlo = hlo_text()
    (out / "compiled_hlo.txt").write_text(hlo)
    summary = summarize(run_dir, [hlo], args.steps, top=args.top)
    mfu, mfu_text = _utilisation(flops_per_step, step_s, config, devices)
    summary.update(what=args.what, preset=args.preset, impl=impl, mesh=args.mesh, batch_size=args.batch_size,
                   seq_len=args.seq_len, device_kind=jax.devices()[0].device_kind, jax_version=jax.__version__,
                   step_ms=step_s * 1e3, tokens_per_s=tokens / step_s,
                   mfu=mfu, mfu_kind="MFU" if args.what == "train" else "forward MFU")

    perfetto = sorted(run_dir.glob("perfetto_trace.json.gz"))
    report = "\n".join([
        format_summary(summary),
        "",
        f"step time {step_s * 1e3:.3f} ms (median of {args.steps} untraced steps), "
        f"{tokens / step_s:,.0f} tokens/s, {summary['mfu_kind']} {mfu_text}",
        "",
        f"trace: {run_dir}",
        f"  TensorBoard: tensorboard --logdir {out}   (needs tensorboard and tensorboard-plugin-profile)",
        f"  XProf:       xprof --logdir={out} --port=8791   (pip install xprof)",
        f"  Perfetto:    open https://ui.perfetto.dev and load {perfetto[0] if perfetto else summary['trace']}",
    ])
    print(report)
    (out / "summary.txt").write_text(report + "\n")
    (out / "summary.json").write_text(json.dumps(dict(summary, report=report), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
