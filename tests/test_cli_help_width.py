"""Every command's ``--help`` reads well in an 80-column terminal (issue 21).

Each help page is rendered at 80 columns, the way a user's terminal would show it, and checked for
what made it hard to read: option names cut short (``--validation-sp…``), a value metavar on flags
(``--version <bool>``), and descriptions broken mid-sentence where the docstring's source lines
broke instead of where the column ends.
"""

from __future__ import annotations

import re
from unittest import mock

import pytest
import typer.main
from typer import rich_utils
from typer.testing import CliRunner

from surd_builder.cli import app
from surd_builder.cli.help_layout import command_paths

WIDTH = 80
runner = CliRunner()


def context_at(root, path: tuple[str, ...]) -> typer.Context:
    """A context for the command at ``path``, under its parents' (help option names included)."""
    ctx = typer.Context(root, info_name="surd", **root.context_settings)
    for name in path:
        ctx = typer.Context(ctx.command.commands[name], info_name=name, parent=ctx)
    return ctx


ROOT = typer.main.get_command(app)
PATHS = command_paths(ROOT)


def render(path: tuple[str, ...], width: int = WIDTH) -> str:
    # Typer reads TERMINAL_WIDTH once, on import, and it would win over COLUMNS: unset it
    with mock.patch.object(rich_utils, "MAX_WIDTH", None):
        result = runner.invoke(
            app,
            [*path, "--help"],
            prog_name="surd",
            terminal_width=width,
            env={"COLUMNS": str(width), "NO_COLOR": "1"},
        )
    assert result.exit_code == 0, result.output
    return result.output


def panel_rows(output: str) -> list[str]:
    """The inside of every panel line (``│ ... │``), borders removed."""
    return [line[1:-1] for line in output.splitlines() if line.startswith("│")]


def flag_row(output: str, flag: str) -> str | None:
    """The options-panel line that starts with ``flag`` in full (after an optional ``*``)."""
    starts = re.compile(r"^\s*(\*\s+)?" + re.escape(flag) + r"(?![\w-])")
    return next((row for row in panel_rows(output) if starts.match(row)), None)


def shown(output: str, flag: str) -> bool:
    return re.search(r"(?<![\w-])" + re.escape(flag) + r"(?![\w-])", output) is not None


def help_problems(path: tuple[str, ...], width: int = WIDTH) -> list[str]:
    """What is wrong with the help of the command at ``path`` at ``width`` columns."""
    output = render(path, width)
    ctx = context_at(ROOT, path)
    problems = []
    if "…" in output:
        problems += [f"cut short: {row.strip()}" for row in panel_rows(output) if "…" in row]
    too_wide = [line for line in output.splitlines() if len(line) > width]
    problems += [f"wider than {width}: {line}" for line in too_wide]
    for param in ctx.command.get_params(ctx):
        if param.param_type_name != "option" or getattr(param, "hidden", False):
            continue
        primary = next((o for o in param.opts if o.startswith("--")), param.opts[0])
        row = flag_row(output, primary)
        if row is None:
            problems.append(f"{primary}: no options row starts with it in full")
        for flag in [*param.opts, *param.secondary_opts]:
            if not shown(output, flag):
                problems.append(f"{flag}: missing")
        if getattr(param, "is_flag", False) and row is not None and re.search(r"<bool>", row):
            problems.append(f"{primary}: a flag shown with a value metavar (<bool>)")
    problems += broken_sentences(output, width)
    return problems


def broken_sentences(output: str, width: int) -> list[str]:
    """Description lines that end before the column does although the next word would fit:
    a line break kept from the source text rather than made by wrapping. Checked in the
    command's own description and in the Commands panel."""
    problems = []
    lines = output.splitlines()
    # the command's description: from after the usage line to the first panel
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("Usage:")) + 1
    end = next((i for i, line in enumerate(lines) if line.startswith("╭")), len(lines))
    block = [line.rstrip() for line in lines[start:end]]
    for line, following in zip(block, block[1:], strict=False):
        if line and following and _fits(line, following.split()[0], width - 1):
            problems.append(f"description breaks early: {line.strip()!r} / {following.strip()!r}")
    # the Commands panel: a command name, then its description, continued on indented lines
    inside, rows = False, []
    for line in lines:
        inside = line.startswith("╭─ Commands") or (inside and not line.startswith("╰"))
        if inside and line.startswith("│"):
            rows.append(line[1:-1])
    if rows:
        offset = re.match(r"\s*\S+\s+", rows[0]).end()  # where the descriptions start
        end = len(rows[0]) - 1  # the description column's last character, plus one
        for line, following in zip(rows, rows[1:], strict=False):
            line, continued = line.rstrip(), not following[:offset].strip()
            if continued and _fits(line, following.split()[0], end):
                problems.append(f"command help breaks early: {line.strip()!r}")
    return problems


def _fits(line: str, word: str, width: int) -> bool:
    return len(line) + 1 + len(word) <= width


@pytest.mark.parametrize("path", PATHS, ids=[" ".join(p) or "surd" for p in PATHS])
def test_help_is_readable_at_80_columns(path):
    assert help_problems(path) == []


def test_wider_terminals_show_every_option_too():
    for path in PATHS:
        assert help_problems(path, 120) == [], path
