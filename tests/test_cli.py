"""`python -m palm` and `make train` as a user types them: help, one-line errors, plots."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from palm.cli import main

ROOT = Path(__file__).resolve().parent.parent


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("command", [[], ["train"], ["forward"], ["plot"], ["plan"], ["generate"], ["eval"]])
def test_help_imports_no_jax(command):
    # JAX costs about a second to import; help and argument errors must not wait for it.
    result = _python("import sys\nfrom palm.cli import main\n"
                     f"try:\n    main({command + ['--help']!r})\nexcept SystemExit:\n    pass\n"
                     "print('jax loaded' if 'jax' in sys.modules else 'no jax')")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("no jax")


def test_help_shows_defaults(capsys):
    for command, expected in [("train", ["--steps STEPS", "(default: 300)", "(default: demo)",
                                         "(default: 0.01)", "(default: runs/train)"]),
                              ("forward", ["(default: 16)", "(default: auto)", "(default: 0)"])]:
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        for fragment in expected:
            assert fragment in text, (command, fragment)


@pytest.mark.parametrize("args, message", [
    (["--impl", "bogus"], "unknown impl 'bogus'; valid: auto, xla"),
    (["--seq-len", "65"], "--seq-len 65 must be in [1, 64]"),
    (["--batch-size", "0"], "--batch-size 0 must be >= 1"),
])
def test_forward_bad_input_is_one_line(capsys, args, message):
    assert main(["forward", "--preset", "tiny", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_train_unknown_impl_is_one_line(tmp_path, capsys):
    assert main(["train", "--preset", "tiny", "--impl", "bogus", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "unknown impl 'bogus'" in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_plot_command_draws_runs(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"step": s, "loss": 5.0 - s / 10, "cross_entropy": 5.0 - s / 10,
              "tokens_per_second": 1000.0 + s} for s in range(1, 11)]
    lines[-1].update(val_loss=4.5, val_cross_entropy=4.5, val_accuracy=0.2)
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert main(["plot", str(run)]) == 0
    image = Path(capsys.readouterr().out.strip())
    assert image == run / "loss.png" and image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err


def _make_dry_run(*args: str) -> str:
    """The command `make -n` prints for `palm train`, as a user's shell would run it: outside
    any outer make (`make test` exports MAKEFLAGS and MAKELEVEL, which change the output)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    result = subprocess.run(["make", "--no-print-directory", "-n", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.replace("\\\n", " ").splitlines()
    return next(line for line in lines if "-m palm train" in line)


def test_make_train_resume_reuses_the_run_directory():
    # RESUME continues that directory with its saved settings; no new timestamped directory.
    command = _make_dry_run("train", "RESUME=runs/demo-x", "TRAIN_ARGS=--steps 600")
    assert command.startswith("exec ")  # signals reach the trainer, not a shell around it
    assert command.endswith("-m palm train --out runs/demo-x --resume --steps 600")
    fresh = _make_dry_run("train")
    assert "--out runs/demo-$(date" in fresh and "--resume" not in fresh


def test_plan_command_as_documented():
    """`python -m palm plan` exactly as BUILD.md runs it: the 540B plan on the paper's mesh."""
    result = subprocess.run([sys.executable, "-m", "palm", "plan", "--preset", "540b", "--vocab-size",
                             "256008", "--data", "256", "--model", "12", "--batch-size", "2048",
                             "--device-memory-gib", "32"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "memory per device (GiB)" in result.stdout and "free of 32 GiB" in result.stdout


def test_lazy_names_are_not_shadowed_by_submodules():
    """`palm.generate` and friends stay functions after every submodule has been imported
    (importing palm.x sets the package attribute x, which would shadow a lazy name x)."""
    result = _python("import pkgutil, importlib, palm\n"
                     "for m in pkgutil.iter_modules(palm.__path__):\n"
                     "    if m.name != '__main__':  # it runs the command line\n"
                     "        importlib.import_module('palm.' + m.name)\n"
                     "bad = [n for n in palm._LAZY if not callable(getattr(palm, n)) or "
                     "type(getattr(palm, n)).__name__ == 'module']\n"
                     "print(bad)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
