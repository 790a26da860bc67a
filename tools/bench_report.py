"""Tables from pytest-benchmark JSON: one run, or two runs side by side.

    pytest bench/ --benchmark-only --benchmark-json=results.json
    python tools/bench_report.py results.json              # one table
    python tools/bench_report.py before.json after.json    # compared, matched by test name

Columns: median time, achieved TFLOP/s and GB/s (from the FLOP and byte counts of
bench/costs.py that the harness stores in each benchmark's extra_info), the fraction of the
device's roofline reached ("n/a" where the device or dtype has no known ceiling), and the
extras: tokens/s and MFU for training steps, ms/token for decoding. A comparison shows both
medians, the speed-up of the second run over the first (old time / new time; > 1 is faster)
and both roofline fractions; tests present in only one file are listed with "-" for the other.
"""

from __future__ import annotations

import argparse
import json
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
    rows = [_row(b) for b in data["benchmarks"]]
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("other", nargs="?", help="a second run to compare with the first")
    args = parser.parse_args(argv)
    run, rows = load(args.results)
    if args.other is None:
        print(single(run, rows))
    else:
        print(compare(run, rows, *load(args.other)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
