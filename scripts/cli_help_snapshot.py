"""Write every ``surd`` command's ``--help`` text to one file, to compare two versions of the CLI.

    .venv/bin/python scripts/cli_help_snapshot.py > before.txt
    ... change the CLI ...
    .venv/bin/python scripts/cli_help_snapshot.py > after.txt && cmp before.txt after.txt

Commands are found by walking the Click tree of the Typer app, so a command added or removed
shows up as a difference too. The terminal width is fixed (``COLUMNS``) and colour is off, so
the text depends on the code only.
"""

from __future__ import annotations

import os
import sys

os.environ["COLUMNS"] = "100"
os.environ["TERMINAL_WIDTH"] = "100"
os.environ["NO_COLOR"] = "1"
os.environ["_TYPER_FORCE_DISABLE_TERMINAL"] = "1"

import typer  # noqa: E402
from typer.testing import CliRunner  # noqa: E402


def main() -> None:
    from surd_builder.cli import app
    from surd_builder.cli.help_layout import command_paths

    root = typer.main.get_command(app)
    runner = CliRunner()
    for path in command_paths(root):
        result = runner.invoke(app, [*path, "--help"], prog_name="surd", terminal_width=100)
        sys.stdout.write(f"=== surd {' '.join(path)} (exit {result.exit_code})\n{result.output}\n")


if __name__ == "__main__":
    main()
