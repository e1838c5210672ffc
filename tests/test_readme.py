"""The README's command lines are what users paste first: each must parse against the real CLI
(right subcommand, known options, the right number of arguments). Parsing only: nothing runs."""

from __future__ import annotations

import re
import shlex
from pathlib import Path


import pytest
import typer
from typer._click.exceptions import UsageError  # typer vendors click

from edgevit_export.cli import app, argv

README = Path(__file__).resolve().parent.parent / "README.md"


def _readme_commands() -> list[str]:
    text = README.read_text()
    lines = []
    for line in text.splitlines():  # code blocks: "    edgevit-export …" and "$ edgevit-export …"
        m = re.match(r"^\s*(?:\$\s+)?(edgevit-export\s.*)$", line)
        if m:
            lines.append(m.group(1).split("  #")[0].strip())
    lines += re.findall(r"`(edgevit-export\s[^`]+)`", text)  # inline, in prose
    return lines


COMMANDS = _readme_commands()


def test_readme_has_the_commands_users_copy():
    subcommands = {shlex.split(c)[1] for c in COMMANDS}
    assert {"export", "info", "bench", "quantize", "evaluate", "train-shapes"} <= subcommands


@pytest.mark.parametrize("line", COMMANDS)
def test_readme_command_parses(line):
    group = typer.main.get_command(app)
    args = argv(shlex.split(line)[1:])   # as main() parses them (a bare --features)
    with group.make_context("edgevit-export", list(args)) as ctx:
        cmd = group.get_command(ctx, args[0])
        assert cmd is not None, f"README names an unknown subcommand: {line}"
        try:
            cmd.make_context(args[0], args[1:], parent=ctx).close()
        except UsageError as e:
            pytest.fail(f"README command does not parse ({e.format_message()}): {line}")
