"""Tables from pytest-benchmark JSON: one run, or two runs side by side.

    pytest bench/ --benchmark-only --benchmark-json=results.json
    python tools/bench_report.py results.json              # one table
    python tools/bench_report.py before.json after.json    # compared, matched by test name
    python tools/bench_report.py results.json --markdown   # the goals and the table, Markdown
    python tools/bench_report.py results.json --annotate out.json  # ratios into extra_info

Columns: median time, achieved TFLOP/s and GB/s (from the FLOP and byte counts of
bench/costs.py that the harness stores in each benchmark's extra_info), the fraction of the
device's roofline reached ("n/a" where the device or dtype has no known ceiling), and the
extras: tokens/s and MFU for training steps, ms/token for decoding. A comparison shows both
medians, the speed-up of the second run over the first (old time / new time; > 1 is faster)
and both roofline fractions; tests present in only one file are listed with "-" for the other.

Ratios to the alternatives measured in the same run (`annotate`; the harness times each case
on its own, so they are computed here from the JSON and written into each benchmark's
extra_info by `--annotate`, as tools/gpu_check.py does before results are committed):
  * vs_<impl>: the other implementation's median over this one's, for every other
    implementation or baseline of the same test, pass and shapes (attention: xla, cudnn,
    pallas_gpu_mha, and pallas_gpu against pallas_mosaic_gpu; kernels: xla against
    pallas_gpu and pallas_mosaic_gpu); > 1 means this one is faster. Their
    figures go in `alternatives` ({impl: {median_s, tflops}}).
  * vs_matmul, matmul_tflops: a fused projection's TFLOP/s over the bare matmul of the same
    M, N, K and pass (bench/test_ceilings.py).
  * mfu_vs_matmul, matmul_tflops: the model's achieved TFLOP/s (training step: Appendix B's
    model FLOPs; forward: a third of them) over the square bare matmul's, beside the
    datasheet-peak MFU.
  * copy_bound_s, vs_copy_bound (and copy_bound_ms_per_token for decoding): the time to move
    the case's bytes once at the copy bandwidth measured in the same run, and the median over
    it (>= 1; the decode goal is <= 1.3).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path


def load(path: str | Path) -> tuple[dict, list[dict]]:
    """(run description, benchmarks) from a pytest-benchmark JSON file."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"error: cannot read {path}: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise SystemExit(f"error: {path} is not pytest-benchmark JSON (no 'benchmarks' list)")
    rows = [_row(b) for b in annotate(data["benchmarks"])]
    info = rows[0]["info"] if rows else {}
    run = {"path": str(path), "datetime": data.get("datetime", "?"),
           "device": info.get("device_kind", "?"), "jax": info.get("jax_version", "?")}
    return run, rows


def _row(bench: dict) -> dict:
    info = bench.get("extra_info") or {}
    median = (bench.get("stats") or {}).get("median")
    flops, nbytes = info.get("flops"), info.get("bytes")
    tflops = info.get("tflops")
    if tflops is None and flops is not None and median:
        tflops = flops / median / 1e12
    gbps = info.get("gbps")
    if gbps is None and nbytes is not None and median:
        gbps = nbytes / median / 1e9
    return {"name": bench["name"], "median": median, "tflops": tflops, "gbps": gbps,
            "roofline": info.get("roofline_fraction"), "info": info}


def _num(value, fmt: str = "{:.3g}") -> str:
    return "n/a" if value is None else fmt.format(value)


def _ms(seconds) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.4g}"


def _times(ratio) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}x"


def _pct(fraction) -> str:
    return "n/a" if fraction is None else f"{fraction:.1%}"


def _extras(info: dict) -> str:
    parts = []
    if "tokens_per_s" in info and "ms_per_token" not in info:
        parts.append(f"{info['tokens_per_s']:,.0f} tok/s")
    if "mfu" in info:
        parts.append(f"MFU {_pct(info['mfu'])}")
    if "forward_mfu" in info:
        parts.append(f"fwd MFU {_pct(info['forward_mfu'])}")
    if "ms_per_token" in info:
        parts.append(f"{info['ms_per_token']:.3g} ms/token")
    if "speedup_vs_recompute" in info:
        parts.append(f"{info['speedup_vs_recompute']:.1f}x recompute")
    if info.get("copy_bound_ms_per_token") is not None:
        parts.append(f"bound {info['copy_bound_ms_per_token']:.3g} ms/token")
    return ", ".join(parts)


def format_table(header: list[str], rows: list[list[str]], align: str) -> str:
    """Columns padded to their widest cell; align holds '<' or '>' per column."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "  ".join(f"{c:{a}{w}}" for c, a, w in zip(cells, align, widths)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def single(run: dict, rows: list[dict]) -> str:
    header = ["benchmark", "median ms", "TFLOP/s", "GB/s", "of roofline", "extra"]
    body = [[r["name"], _ms(r["median"]), _num(r["tflops"]), _num(r["gbps"]), _pct(r["roofline"]),
             _extras(r["info"])] for r in rows]
    title = f"{run['path']}: {run['device']}, jax {run['jax']}, {run['datetime']}"
    return title + "\n" + format_table(header, body, "<>>>><")


def compare(run_a: dict, rows_a: list[dict], run_b: dict, rows_b: list[dict]) -> str:
    by_a = {r["name"]: r for r in rows_a}
    by_b = {r["name"]: r for r in rows_b}
    names = [r["name"] for r in rows_a] + [r["name"] for r in rows_b if r["name"] not in by_a]
    header = ["benchmark", "A ms", "B ms", "speed-up B/A", "A TFLOP/s", "B TFLOP/s", "A roofline", "B roofline"]
    body = []
    for name in names:
        a, b = by_a.get(name), by_b.get(name)
        speedup = "-"
        if a and b and a["median"] and b["median"]:
            speedup = f"{a['median'] / b['median']:.2f}x"
        body.append([name, _ms(a and a["median"]), _ms(b and b["median"]), speedup,
                     _num(a["tflops"]) if a else "-", _num(b["tflops"]) if b else "-",
                     _pct(a["roofline"]) if a else "-", _pct(b["roofline"]) if b else "-"])
    title = (f"A = {run_a['path']}: {run_a['device']}, jax {run_a['jax']}, {run_a['datetime']}\n"
             f"B = {run_b['path']}: {run_b['device']}, jax {run_b['jax']}, {run_b['datetime']}")
    return title + "\n" + format_table(header, body, "<>>>>>>>")


# ------------------------------------------------------------------------------------------
# Ratios to the alternatives of the same run.

_FUSED = ("norm_swiglu", "norm_qkv_rope", "block_in", "block_out")
_MODEL = ("test_train_step", "test_forward")
_COPY_BOUND = ("test_generate", "test_mq_decode_attention")


def _split_name(bench: dict) -> tuple[str, list[str]]:
    """("test_x", ["xla", "fwd", ...]) from "test_x[xla-fwd-...]"."""
    found = re.match(r"^([^\[]+)(?:\[(.*)\])?$", bench["name"])
    return found.group(1), (found.group(2) or "").split("-")


def group_key(bench: dict) -> tuple:
    """What must match for two benchmarks to be alternatives: test, pass and shapes (the test
    id without the implementation's token)."""
    test, tokens = _split_name(bench)
    impl = (bench.get("extra_info") or {}).get("impl")
    if impl in tokens:
        tokens = tokens.copy()
        tokens.remove(impl)
    return test, tuple(tokens)


def _median(bench: dict) -> float | None:
    return (bench.get("stats") or {}).get("median")


def _tflops(bench: dict) -> float | None:
    info, median = bench.get("extra_info") or {}, _median(bench)
    if info.get("tflops") is not None:
        return info["tflops"]
    return info["flops"] / median / 1e12 if info.get("flops") is not None and median else None


def annotate(benchmarks: list[dict]) -> list[dict]:
    """Adds the ratios listed in the module docstring to each benchmark's extra_info (in place;
    also returned). Benchmarks without a median (none in pytest-benchmark's own output) are
    left alone."""
    timed = [b for b in benchmarks if _median(b)]
    for b in timed:
        b.setdefault("extra_info", {})
    groups: dict[tuple, list[dict]] = {}
    for b in timed:
        groups.setdefault(group_key(b), []).append(b)
    for members in groups.values():
        for b in members:
            others = [o for o in members if o is not b and o["extra_info"].get("impl")]
            if not others or not b["extra_info"].get("impl"):
                continue
            b["extra_info"]["alternatives"] = {
                o["extra_info"]["impl"]: {"median_s": _median(o), "tflops": _tflops(o)} for o in others}
            for o in others:
                b["extra_info"][f"vs_{o['extra_info']['impl']}"] = _median(o) / _median(b)

    matmuls = {(b["extra_info"].get("matmul_of"), b["extra_info"].get("pass"), b["extra_info"].get("dtype")): b
               for b in timed if b["extra_info"].get("ceiling") == "matmul"}
    square = matmuls.get(("square", "fwd", None)) or next(
        (m for (what, pass_, _), m in matmuls.items() if what == "square" and pass_ == "fwd"), None)
    copies = [b["extra_info"]["copy_bandwidth"] for b in timed if b["extra_info"].get("copy_bandwidth")]
    copy_bw = max(copies) if copies else None
    for b in timed:
        info = b["extra_info"]
        test, _ = _split_name(b)
        kernel = test.removeprefix("test_")
        if kernel in _FUSED:
            ceiling = matmuls.get((kernel, info.get("pass"), info.get("dtype")))
            if ceiling is not None and _tflops(b) and _tflops(ceiling):
                info["matmul_tflops"] = _tflops(ceiling)
                info["vs_matmul"] = _tflops(b) / _tflops(ceiling)
        if test in _MODEL and square is not None and _tflops(b) and _tflops(square):
            info["matmul_tflops"] = _tflops(square)
            info["mfu_vs_matmul"] = _tflops(b) / _tflops(square)
        if test in _COPY_BOUND and copy_bw and info.get("bytes"):
            bound = info["bytes"] / copy_bw
            info["copy_bandwidth"] = copy_bw
            info["copy_bound_s"] = bound
            info["vs_copy_bound"] = _median(b) / bound
            if info.get("new_tokens"):
                info["copy_bound_ms_per_token"] = bound / info["new_tokens"] * 1e3
    return benchmarks


# ------------------------------------------------------------------------------------------
# Markdown: issue 9's goals, then every benchmark.

def _ours(rows: list[dict]) -> str:
    impls = {r["info"].get("impl") for r in rows}
    return next((i for i in ("pallas_gpu", "pallas_tpu") if i in impls), "pallas_gpu")


def _find(rows, test, *tokens, impl=None):
    for r in rows:
        name_test, name_tokens = _split_name(r)
        if name_test == test and all(t in name_tokens for t in tokens) and (
                impl is None or r["info"].get("impl") == impl):
            return r
    return None


def goals(rows: list[dict]) -> list[list[str]]:
    """[goal, measured, target, met] rows for issue 9's goals, from annotated rows."""
    ours = _ours(rows)
    out = []

    def add(goal, value, target, ok):
        out.append([goal, value, target, "-" if ok is None else ("yes" if ok else "no")])

    # Attention: each of our implementations measured (the Triton one, and the Mosaic GPU one).
    measured = {r["info"].get("impl") for r in rows}
    attention_impls = [i for i in (ours, "pallas_mosaic_gpu") if i in measured]
    for pass_, target in (("fwd", 1.0), ("fwdbwd", 0.8)):
        for r in rows:
            test, tokens = _split_name(r)
            impl = r["info"].get("impl")
            if test != "test_mq_flash_attention" or impl not in attention_impls or pass_ not in tokens:
                continue
            shape = "-".join(t for t in tokens if t[:1] in "BT" and t[1:].isdigit())
            ratio = r["info"].get("vs_cudnn")
            add(f"attention {pass_} {shape}: {impl} / cuDNN TFLOP/s",
                f"{_num(r['tflops'])} / {_num((r['info'].get('alternatives') or {}).get('cudnn', {}).get('tflops'))}"
                f" = {_times(ratio)}", f">= {target}x", None if ratio is None else ratio >= target)
    for kernel in ("norm_swiglu", "norm_qkv_rope", "block_out"):
        # Each of our implementations measured for the kernel (the Mosaic GPU one where it has one).
        mosaic = _find(rows, f"test_{kernel}", "fwd", impl="pallas_mosaic_gpu")
        for impl in [ours] + (["pallas_mosaic_gpu"] if mosaic is not None else []):
            r = _find(rows, f"test_{kernel}", "fwd", impl=impl)
            ratio = r and r["info"].get("vs_matmul")
            add(f"{kernel} fwd: {impl} / bare matmul TFLOP/s",
                "not run" if r is None else f"{_num(r['tflops'])} / {_num(r['info'].get('matmul_tflops'))} = "
                                            f"{_times(ratio)}", ">= 0.9x", None if not ratio else ratio >= 0.9)
    steps = [r for r in rows if _split_name(r)[0] == "test_train_step"]
    trained = {r["info"].get("impl") for r in steps}
    # One pair of rows per batch size measured (the B token of the id), B1 if none was.
    batches = sorted({t for r in steps for t in _split_name(r)[1] if t[:1] == "B" and t[1:].isdigit()},
                     key=lambda t: int(t[1:])) or ["B1"]
    for batch in batches:
        x = _find(rows, "test_train_step", batch, impl="xla")
        for impl in [ours] + (["pallas_mosaic_gpu"] if "pallas_mosaic_gpu" in trained else []):
            r = _find(rows, "test_train_step", batch, impl=impl)
            mfu = r and r["info"].get("mfu")
            add(f"training step {batch} ({impl}): MFU of 989 TFLOP/s (of bare matmul)",
                "not run" if r is None else f"{_pct(mfu)} ({_pct(r['info'].get('mfu_vs_matmul'))})",
                ">= 45%", None if mfu is None else mfu >= 0.45)
            vs = r and r["info"].get("vs_xla")
            add(f"training step {batch}: {impl} speed-up over xla",
                "not run" if r is None or x is None else f"{_times(vs)}", "> 1x",
                None if vs is None else vs > 1)
    decodes = [r for r in rows if _split_name(r)[0] == "test_generate" and "kv_cache" in _split_name(r)[1]
               and "B1" in _split_name(r)[1]]
    # The largest model comes last; of its implementations, the fastest.
    decodes = [r for r in decodes if _split_name(r)[1][0] == _split_name(decodes[-1])[1][0]] if decodes else []
    r = min(decodes, key=lambda r: r["median"]) if decodes else None
    ratio = r and r["info"].get("vs_copy_bound")
    add("decode B1 (" + (f"{_split_name(r)[1][0]}, {r['info'].get('impl')}" if r else "?")
        + "): ms/token over the weight+cache read",
        "not run" if r is None else f"{_num(r['info'].get('ms_per_token'))} / "
                                    f"{_num(r['info'].get('copy_bound_ms_per_token'))} ms = {_times(ratio)}",
        "<= 1.3x", None if ratio is None else ratio <= 1.3)
    return out


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    cell = lambda c: str(c).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(cell(c) for c in r) + " |" for r in rows)])


def _ratios(info: dict) -> str:
    parts = [f"{k.removeprefix('vs_')} {v:.2f}x" for k, v in info.items()
             if k.startswith("vs_") and isinstance(v, (int, float))]
    if info.get("mfu_vs_matmul") is not None:
        parts.append(f"MFU of matmul {_pct(info['mfu_vs_matmul'])}")
    return ", ".join(parts)


def markdown(run: dict, rows: list[dict]) -> str:
    """Issue 9's goals, then every benchmark with its ratios ("x 1.20x": 1.2 times as fast as x;
    "copy_bound 1.10x": 1.1 times the copy-bandwidth bound)."""
    copy = next((r["info"]["copy_bandwidth"] for r in rows if r["info"].get("ceiling") == "copy"
                 and r["info"].get("copy_bandwidth")), None)
    square = next((r for r in rows if r["info"].get("matmul_of") == "square" and r["info"].get("pass") == "fwd"),
                  None)
    lines = [f"Device {run['device']}, jax {run['jax']}, {run['datetime']}.",
             f"Measured ceilings: bare matmul {_num(square and square['tflops'])} TFLOP/s "
             f"({square['name'] if square else 'not run'}), copy {_num(copy and copy / 1e9)} GB/s "
             "(read + write).", "", "### Goals (issue 9)", "",
             _md_table(["goal", "measured", "target", "met"], goals(rows)), "", "### Every benchmark", "",
             _md_table(["benchmark", "median ms", "TFLOP/s", "GB/s", "of roofline", "extra", "ratios"],
                       [[r["name"], _ms(r["median"]), _num(r["tflops"]), _num(r["gbps"]), _pct(r["roofline"]),
                         _extras(r["info"]), _ratios(r["info"])] for r in rows])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("other", nargs="?", help="a second run to compare with the first")
    parser.add_argument("--markdown", action="store_true",
                        help="one run: issue 9's goals and every benchmark with its ratios, as Markdown")
    parser.add_argument("--annotate", metavar="OUT", default=None,
                        help="one run: write it to OUT with the ratios added to each extra_info")
    args = parser.parse_args(argv)
    if args.other is not None and (args.markdown or args.annotate):
        parser.error("--markdown and --annotate take one run")
    run, rows = load(args.results)
    if args.annotate:
        data = json.loads(Path(args.results).read_text())
        annotate(data["benchmarks"])
        Path(args.annotate).write_text(json.dumps(data, indent=1) + "\n")
    if args.markdown:
        print(markdown(run, rows))
    elif args.other is None:
        print(single(run, rows))
    else:
        print(compare(run, rows, *load(args.other)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
