"""`python -m palm plot`: reading metrics.jsonl (resumes, rewinds, bad lines) and the image it writes."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
import matplotlib.image  # noqa: E402  (after the skip, so a missing extra skips rather than errors)

from palm import plot  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def metric(step: int, cross_entropy: float, *, val: float | None = None, tokens_per_second: float = 1e4) -> dict:
    """A record shaped like the ones palm.train.train logs."""
    record = {"step": step, "loss": cross_entropy + 0.01, "cross_entropy": cross_entropy, "z_loss": 0.01,
              "accuracy": 0.2, "grad_norm": 1.0, "learning_rate": 1e-2,
              "tokens_per_second": tokens_per_second, "mfu": None, "model_flops_per_token": 3e7}
    if val is not None:
        record.update(val_loss=val + 0.01, val_cross_entropy=val, val_accuracy=0.2)
    return record


def write_run(run_dir: Path, lines: list) -> Path:
    """Writes lines (dicts as JSON, strings as they are) as run_dir/metrics.jsonl."""
    run_dir.mkdir(parents=True, exist_ok=True)
    text = "".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines)
    # surrogateescape writes "\udcff" as the byte 0xff, for the not-UTF-8 case.
    (run_dir / "metrics.jsonl").write_text(text, encoding="utf-8", errors="surrogateescape")
    return run_dir


def simple_run(run_dir: Path, steps: int = 20, scale: float = 1.0) -> Path:
    return write_run(run_dir, [metric(s, scale * (3 + 5 / s), val=scale * (3.1 + 5 / s) if s % 5 == 0 else None)
                               for s in range(1, steps + 1)])


def args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    plot.add_arguments(parser)
    return parser.parse_args(argv)


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 10_000  # two panels with text and curves; an empty canvas is a few kB
    image = matplotlib.image.imread(path)
    height, width, channels = image.shape
    assert (width, height) == (1200, 900)  # figsize (10, 7.5) at dpi 120
    assert channels in (3, 4)
    assert image.std() > 0.05  # not a blank canvas


# --- Reading. ---

def test_resume_keeps_the_latest_value_per_step(tmp_path):
    # The first attempt logged steps 1-5 and crashed; the checkpoint was at step 3, so the
    # resumed run re-logs 4 and 5 (with new values) and goes on to 6.
    run = write_run(tmp_path / "run", [metric(1, 9.0), metric(2, 8.0), metric(3, 7.0), metric(4, 6.0),
                                       metric(5, 5.0), {"event": "resume", "step": 3},
                                       metric(4, 6.5), metric(5, 5.5, val=5.6), metric(6, 4.5)])
    records = plot.read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["cross_entropy"] for r in records] == [9.0, 8.0, 7.0, 6.5, 5.5, 4.5]
    assert records[4]["val_cross_entropy"] == 5.6


def test_resume_drops_steps_the_new_timeline_never_reached(tmp_path):
    # A resumed run that stops earlier than the abandoned one (say, a smaller --steps) must not
    # keep the abandoned tail.
    run = write_run(tmp_path / "run", [metric(s, 10.0 - s) for s in range(1, 9)]
                    + [{"event": "resume", "step": 4}, metric(5, 1.0)])
    assert [(r["step"], r["cross_entropy"]) for r in plot.read_metrics(run)] == [
        (1, 9.0), (2, 8.0), (3, 7.0), (4, 6.0), (5, 1.0)]


def test_loss_spike_rewind_drops_later_steps_and_is_returned(tmp_path):
    spike = {"event": "loss_spike", "step": 5, "loss": 40.0, "rewound_to": 2, "skipped_batches": 200}
    run = write_run(tmp_path / "run", [metric(1, 9.0), metric(2, 8.0), metric(3, 7.0), metric(4, 6.0), spike,
                                       metric(3, 7.5), metric(4, 6.5)])
    records, events = plot.read_log(run)
    assert [(r["step"], r["cross_entropy"]) for r in records] == [(1, 9.0), (2, 8.0), (3, 7.5), (4, 6.5)]
    assert events == [spike]


def test_a_resume_to_before_an_event_forgets_it(tmp_path):
    spike = {"event": "loss_spike", "step": 5, "loss": 40.0, "rewound_to": 4, "skipped_batches": 1}
    run = write_run(tmp_path / "run", [metric(s, 5.0) for s in range(1, 5)]
                    + [{"event": "resume", "step": 3}, spike, {"event": "resume", "step": 2}, metric(3, 4.0)])
    assert plot.read_log(run)[1] == [{"event": "resume", "step": 2}]


def test_a_half_written_last_line_is_skipped(tmp_path):
    # A running (or crashed) train.py may have written part of its last line.
    run = write_run(tmp_path / "run", [metric(1, 9.0), metric(2, 8.0)])
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 7.')
    assert [r["step"] for r in plot.read_metrics(run)] == [1, 2]


def test_unknown_events_and_blank_lines_are_ignored(tmp_path):
    run = write_run(tmp_path / "run", [metric(1, 9.0), "", {"event": "something_new", "step": 1}, metric(2, 8.0)])
    assert [r["step"] for r in plot.read_metrics(run)] == [1, 2]


@pytest.mark.parametrize("make, error, match", [
    (lambda d: d / "missing", FileNotFoundError, r"run directory .*missing does not exist"),
    (lambda d: d, FileNotFoundError, r"metrics\.jsonl does not exist"),
    (lambda d: write_run(d / "r", [{"event": "resume", "step": 0}]), ValueError,
     r"metrics\.jsonl holds no metric"),
    (lambda d: write_run(d / "r", []), ValueError, r"metrics\.jsonl holds no metric"),
    (lambda d: write_run(d / "r", [metric(1, 9.0), "{not json", metric(2, 8.0)]), ValueError,
     r"metrics\.jsonl:2: not a JSON line"),
    (lambda d: write_run(d / "r", [metric(1, 9.0), "[1, 2]"]), ValueError,
     r"metrics\.jsonl:2: expected a JSON object"),
    (lambda d: write_run(d / "r", [{"loss": 3.0}]), ValueError, r"metrics\.jsonl:1: no integer 'step'"),
    (lambda d: write_run(d / "r", [metric(1, 9.0), {"event": "loss_spike", "step": 2}]), ValueError,
     r"metrics\.jsonl:2: loss_spike without an integer 'rewound_to'"),
    (lambda d: write_run(d / "r", ["\udcff"]), ValueError, r"metrics\.jsonl is not UTF-8 text"),
], ids=["no-directory", "no-metrics-file", "only-events", "empty-file", "not-json", "not-an-object",
        "no-step", "spike-without-target", "not-utf8"])
def test_bad_run_directories_are_named(tmp_path, make, error, match):
    run_dir = make(tmp_path)
    with pytest.raises(error, match=match):
        plot.read_metrics(run_dir)
    with pytest.raises(error, match=match):
        plot.plot_runs([run_dir], tmp_path / "out.png")
    assert not (tmp_path / "out.png").exists()


def test_a_file_is_not_a_run_directory(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(NotADirectoryError, match="is not a run directory"):
        plot.read_metrics(tmp_path / "f")


# --- Drawing. ---

def test_one_run_is_drawn_beside_its_metrics(tmp_path):
    run = write_run(tmp_path / "run", [metric(s, 3 + 5 / s, val=3.1 + 5 / s if s % 5 == 0 else None,
                                              tokens_per_second=2e3 if s == 1 else 1.2e4) for s in range(1, 16)]
                    + [{"event": "loss_spike", "step": 16, "loss": 50.0, "rewound_to": 10, "skipped_batches": 1},
                       {"event": "resume", "step": 10}] + [metric(s, 3 + 4 / s) for s in range(11, 31)])
    out = plot.plot_runs([run])
    assert out == run / "loss.png"
    assert_png(out)
    assert sorted(p.name for p in run.iterdir()) == ["loss.png", "metrics.jsonl"]  # no temporary left


def test_several_runs_go_to_the_current_directory_by_default(tmp_path, monkeypatch):
    runs = [simple_run(tmp_path / name, steps=n, scale=k) for name, n, k in (("a", 20, 1.0), ("b", 12, 1.1))]
    monkeypatch.chdir(tmp_path)
    out = plot.plot_runs(runs)
    assert out == Path("runs-loss.png")
    assert_png(tmp_path / "runs-loss.png")


def test_linear_axis_title_and_a_run_with_one_line(tmp_path):
    # One log line so far and no validation yet: still drawn (as a point), not an error.
    runs = [simple_run(tmp_path / "x" / "run"), write_run(tmp_path / "y" / "run", [metric(1, 9.0)])]
    out = plot.plot_runs(runs, tmp_path / "new" / "dir" / "both.png", log_loss=False, title="two runs named run")
    assert_png(out)


def test_other_formats_follow_the_suffix_and_unknown_ones_are_refused(tmp_path):
    run = simple_run(tmp_path / "run")
    assert plot.plot_runs([run], tmp_path / "loss.svg").read_text().lstrip().startswith("<?xml")
    with pytest.raises(ValueError, match=r"nope\.xyz: unknown image format '\.xyz'"):
        plot.plot_runs([run], tmp_path / "nope.xyz")
    assert not (tmp_path / "nope.xyz").exists()


def test_a_failed_write_leaves_the_old_image_and_no_temporary(tmp_path, monkeypatch):
    run = simple_run(tmp_path / "run")
    out = tmp_path / "loss.png"
    out.write_bytes(b"the previous image")

    def crash(self, f, **kwargs):
        f.write(PNG_SIGNATURE + b"half an image")
        raise RuntimeError("disk full")

    monkeypatch.setattr("matplotlib.figure.Figure.savefig", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        plot.plot_runs([run], out)
    assert out.read_bytes() == b"the previous image"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "run"]


def test_missing_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    run = simple_run(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'palm-kernels\[plot\]'"):
        plot.plot_runs([run])
    assert plot.run(args(str(run))) == 2


# --- Command line. ---

def test_run_prints_the_path_and_returns_0(tmp_path, capsys):
    runs = [simple_run(tmp_path / "a"), simple_run(tmp_path / "b", scale=1.2)]
    out = tmp_path / "cmp.png"
    assert plot.run(args(*map(str, runs), "--out", str(out), "--linear", "--title", "a vs b")) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert_png(out)


def test_run_reports_bad_input_and_returns_2(tmp_path, capsys):
    good = simple_run(tmp_path / "good")
    bad = write_run(tmp_path / "bad", [metric(1, 9.0), "{oops"] + [metric(2, 8.0)])
    assert plot.run(args(str(good), str(bad))) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"{bad / 'metrics.jsonl'}:2:" in err
    assert plot.run(args(str(tmp_path / "nowhere"))) == 2
    assert "nowhere does not exist" in capsys.readouterr().err


def test_the_module_imports_neither_jax_nor_matplotlib():
    # palm/__init__ pulls in the model (and jax); load plot.py alone to check its own imports.
    source = Path(plot.__file__)
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('palm_plot', {str(source)!r})\n"
            "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
            "print(sorted(m for m in ('jax', 'matplotlib') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
