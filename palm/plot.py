"""`python -m palm plot DIR [DIR...]`: loss and tokens/s against step, one image for one or more runs.

Reads each run directory's `metrics.jsonl` as `palm.train.train` writes it: one JSON object per
line, either a metric record (`step`, `loss`, `cross_entropy`, `tokens_per_second`, ..., and
`val_*` on validation steps) or an event (`{"event": "resume", "step": N}`,
`{"event": "loss_spike", "step": S, "rewound_to": N, ...}`). `plot_runs(...)` for scripts;
`add_arguments` and `run` for the command line.

Depends on matplotlib, an optional extra (`pip install 'palm-kernels[plot]'`), imported only
when drawing, and never on jax, so the command answers without loading the model's stack.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
# Where the image goes without --out: next to the metrics for one run; for several there is no
# one run directory it belongs to, so the current directory, as most tools that merge inputs do.
SINGLE_RUN_IMAGE = "loss.png"
MULTI_RUN_IMAGE = "runs-loss.png"
INSTALL_HINT = "pip install 'palm-kernels[plot]'"
# Event -> (line style, legend text) for the vertical markers.
EVENT_STYLE = {"resume": ("-.", "resumed from checkpoint"), "loss_spike": (":", "loss spike, rewound")}


# --- Reading. ---

def read_log(run_dir: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """Reads a run's metrics.jsonl into the history of the run's final model.

    train.py appends, so a resumed or rewound run re-logs steps it had logged before. A resume
    from checkpoint N, or a loss-spike rewind to N, abandons everything logged after step N:
    those records are dropped (not merely overwritten, since the new timeline may stop short of
    the old one), and any record re-logged for a step replaces the earlier one.

    Args:
      run_dir: a directory holding metrics.jsonl.

    Returns:
      (records, events): metric records sorted by step, one per step; the "resume" and
      "loss_spike" events that still belong to the history, in file order. Other events (such
      as newer train.py versions may add) are skipped.

    Raises:
      FileNotFoundError: run_dir or its metrics.jsonl does not exist.
      NotADirectoryError: run_dir is a file.
      ValueError: a malformed line (named by file and line number), or no metric records.
    """
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    if not run_dir.is_dir():
        raise NotADirectoryError(f"{run_dir} is not a run directory")
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a training run directory?")

    by_step: dict[int, dict] = {}
    events: list[dict] = []

    def rewind(to_step: int) -> None:
        for step in [s for s in by_step if s > to_step]:
            del by_step[step]
        events[:] = [e for e in events if e["step"] <= to_step]

    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    lines = text.splitlines()
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            # train.py writes whole lines and flushes; a last line without its newline is one a
            # running or crashed process had in hand, so it is not yet (or never) part of the log.
            if lineno == len(lines) and not text.endswith("\n"):
                break
            raise ValueError(f"{path}:{lineno}: not a JSON line ({e.msg}): {line[:80]!r}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {line[:80]!r}")
        step = record.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            raise ValueError(f"{path}:{lineno}: no integer 'step' in {line[:80]!r}")
        event = record.get("event")
        if event is None:
            by_step[step] = record
        elif event == "resume":
            rewind(step)
            events.append(record)
        elif event == "loss_spike":
            rewound_to = record.get("rewound_to")
            if not isinstance(rewound_to, int) or isinstance(rewound_to, bool):
                raise ValueError(f"{path}:{lineno}: loss_spike without an integer 'rewound_to'")
            rewind(rewound_to)
            events.append(record)
        # Other events carry nothing to plot; newer train.py versions may add some.
    if not by_step:
        raise ValueError(f"{path} holds no metric records (has the run logged its first step?)")
    return [by_step[s] for s in sorted(by_step)], events


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The metric records of a run, one per step (the latest), sorted by step; see `read_log`."""
    return read_log(run_dir)[0]


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that hold a number under key (mfu may be null, val_* are
    only on validation steps)."""
    pairs = [(r["step"], float(r[key])) for r in records
             if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    return [s for s, _ in pairs], [v for _, v in pairs]


# --- Drawing. ---

def default_out_path(run_dirs: Sequence[str | os.PathLike]) -> Path:
    """DIR/loss.png for one run, ./runs-loss.png for several."""
    return Path(run_dirs[0]) / SINGLE_RUN_IMAGE if len(run_dirs) == 1 else Path(MULTI_RUN_IMAGE)


def _labels(run_dirs: Sequence[Path]) -> list[str]:
    """Each run's directory name, or its path as given where two runs share a name."""
    names = [d.name if d.name not in ("", ".", "..") else d.resolve().name for d in run_dirs]
    return [str(d) if names.count(n) > 1 else n for d, n in zip(run_dirs, names)]


def _import_matplotlib():
    try:
        # The object-oriented API with an explicit Agg canvas, not pyplot: no display is needed
        # (servers), and the caller's own pyplot backend and figure list are left alone.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    except ImportError as e:
        raise ImportError(f"plotting needs matplotlib, an optional extra: {INSTALL_HINT}") from e
    return FigureCanvasAgg, Figure, Line2D, FuncFormatter, LogLocator, NullFormatter


def plot_runs(run_dirs: Sequence[str | os.PathLike], out_path: str | os.PathLike | None = None, *,
              log_loss: bool = True, title: str | None = None, dpi: int = 120) -> Path:
    """Draws training and validation cross-entropy, and tokens/s, against step for each run.

    Args:
      run_dirs: one or more run directories, each holding metrics.jsonl; one colour each,
        labelled by directory name.
      out_path: the image to write; its suffix picks the format (.png; .svg and .pdf also work).
        Default: `default_out_path(run_dirs)`.
      log_loss: a log-scale loss axis, so the long slow tail is not flattened by the first steps.
      title: the figure's title; default the run's name, or "N runs".
      dpi: resolution of raster formats.

    Returns:
      The path written. The file appears complete or not at all (written beside it, then
      renamed), so a crash never leaves a truncated image where the old one was.

    Raises:
      FileNotFoundError, NotADirectoryError, ValueError: a bad run directory or metrics line,
        named; an unknown image format.
      ImportError: matplotlib is not installed (the message says how to install it).
    """
    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise ValueError("no run directories to plot")
    out = Path(out_path) if out_path is not None else default_out_path(run_dirs)
    logs = [read_log(d) for d in run_dirs]
    FigureCanvasAgg, Figure, Line2D, FuncFormatter, LogLocator, NullFormatter = _import_matplotlib()

    fig = Figure(figsize=(10, 7.5), layout="constrained")
    canvas = FigureCanvasAgg(fig)
    fmt = out.suffix.lower().lstrip(".")
    if fmt not in canvas.get_supported_filetypes():
        raise ValueError(f"{out}: unknown image format {out.suffix!r}; use .png, .svg or .pdf")
    loss_ax, speed_ax = fig.subplots(2, 1, sharex=True, height_ratios=[2, 1])

    run_handles = []
    any_val = False
    marked = set()
    for i, (label, (records, events)) in enumerate(zip(_labels(run_dirs), logs)):
        colour = f"C{i % 10}"
        # Cross-entropy, not `loss`: `loss` adds PaLM's z-loss term (section 5), an auxiliary
        # stabiliser whose size depends on z_loss_weight, while cross-entropy is the quantity
        # validation reports (val_cross_entropy), is comparable across runs with other weights,
        # and reads directly in nats/token. Older logs without it fall back to `loss`.
        train_key = "cross_entropy" if any("cross_entropy" in r for r in records) else "loss"
        steps, values = _series(records, train_key)
        # A marker where a series has one point (one log line so far), or its line draws nothing.
        lone = "o" if len(steps) == 1 else None
        loss_ax.plot(steps, values, color=colour, linewidth=1.2, alpha=0.85, marker=lone)
        val_steps, val_values = _series(records, "val_cross_entropy")
        if val_steps:
            any_val = True
            loss_ax.plot(val_steps, val_values, color=colour, linestyle="--", marker="o", markersize=4,
                         linewidth=1.5)
            label = f"{label} (val {val_values[-1]:.3f} at step {val_steps[-1]:,})"
        # Resumes and rewinds as vertical lines on both panels: they explain a jump in the loss
        # or a dip in throughput (the resumed process compiles again).
        for event in events:
            marked.add(event["event"])
            for ax in (loss_ax, speed_ax):
                ax.axvline(event["step"], color=colour, linestyle=EVENT_STYLE[event["event"]][0],
                           linewidth=1, alpha=0.7)
        speed_steps, speeds = _series(records, "tokens_per_second")
        speed_ax.plot(speed_steps, speeds, color=colour, linewidth=1.2,
                      marker="o" if len(speeds) == 1 else None)
        run_handles.append(Line2D([], [], color=colour, linewidth=2, label=label))

    style_handles = [Line2D([], [], color="0.35", linewidth=1.2, label="train (last batch)")]
    if any_val:
        style_handles.append(Line2D([], [], color="0.35", linestyle="--", marker="o", markersize=4,
                                    label="validation"))
    style_handles += [Line2D([], [], color="0.35", linestyle=EVENT_STYLE[e][0], label=EVENT_STYLE[e][1])
                      for e in EVENT_STYLE if e in marked]
    loss_ax.legend(handles=run_handles + style_handles, loc="upper right", fontsize="small", framealpha=0.9)
    loss_ax.set_title("Cross-entropy")
    loss_ax.set_ylabel("nats/token" + (" (log scale)" if log_loss else ""))
    if log_loss:
        loss_ax.set_yscale("log")
        # Plain numbers at every integer multiple within one decade, 1-2-5 over several: a loss
        # range such as 2.5-8 holds no power of ten, so default log ticks would label it in
        # scientific notation or not at all.
        low, high = loss_ax.get_ylim()
        subs = range(1, 10) if high / low <= 10 else (1, 2, 5)
        loss_ax.yaxis.set_major_locator(LogLocator(subs=[float(s) for s in subs], numticks=30))
        loss_ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        loss_ax.yaxis.set_minor_formatter(NullFormatter())
    loss_ax.grid(True, which="major", alpha=0.3)
    # Each point is train.py's mean over the steps since its previous log line. Logs written
    # before the compile step was timed apart show a low first point (it paid for compilation);
    # it is drawn as logged, not dropped, so the panel never hides a real slow window.
    speed_ax.set_title("Throughput")
    speed_ax.set_ylabel("tokens/s")
    speed_ax.set_xlabel("step")
    speed_ax.set_ylim(bottom=0)
    speed_ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    speed_ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    speed_ax.grid(True, alpha=0.3)
    fig.suptitle(title or (_labels(run_dirs)[0] if len(run_dirs) == 1 else f"{len(run_dirs)} runs"),
                 fontweight="bold")

    _save_atomically(fig, out, fmt, dpi)
    return out


def _save_atomically(fig, out: Path, fmt: str, dpi: int) -> None:
    """Writes to a hidden file in out's directory (same filesystem, so the rename is atomic),
    syncs it, then renames it over out; on any failure removes it and leaves out untouched."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(4)}.tmp")
    try:
        # open(), not tempfile.mkstemp: mkstemp's 0600 mode would carry over to the image.
        with open(tmp, "xb") as f:
            fig.savefig(f, format=fmt, dpi=dpi)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --- Command line. ---

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="DIR",
                        help="training run directories (each holds metrics.jsonl)")
    parser.add_argument("--out", help=f"image to write, .png (or .svg, .pdf); default DIR/{SINGLE_RUN_IMAGE} "
                                      f"for one run, ./{MULTI_RUN_IMAGE} for several")
    parser.add_argument("--linear", action="store_true", help="linear loss axis (default: log scale)")
    parser.add_argument("--title", help="figure title (default: the run's name, or 'N runs')")


def run(args: argparse.Namespace) -> int:
    """The `python -m palm plot` command: prints the image's path; bad input exits with code 2."""
    try:
        out = plot_runs(args.run_dirs, args.out, log_loss=not args.linear, title=args.title)
    except (OSError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0
