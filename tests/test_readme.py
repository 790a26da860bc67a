"""The README's examples run as written: its Python blocks execute, its commands parse."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from palm.cli import build_parser

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
BLOCKS = re.findall(r"```(\w*)\n(.*?)```", README, flags=re.S)


def test_python_blocks_run():
    namespace: dict = {}
    python = [code for lang, code in BLOCKS if lang == "python"]
    assert len(python) >= 2
    for code in python:  # one namespace: later blocks use names of earlier ones
        exec(compile(code, "README.md", "exec"), namespace)


COMMANDS = [line for lang, code in BLOCKS if lang == "" for line in code.splitlines()
            if line.startswith("python -m palm ")]


@pytest.mark.parametrize("command", COMMANDS)
def test_commands_parse(command):
    # Running them needs the user's files; every flag and value must at least be accepted.
    args = build_parser().parse_args(shlex.split(command)[3:])
    assert args.run
