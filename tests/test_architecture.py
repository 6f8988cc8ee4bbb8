"""The import rules of ARCHITECTURE.md, checked by import-linter's contracts in pyproject.toml.

The first test checks this tree. The others check that the contracts can fail: each copies the
four packages' sources and the pyproject.toml into a temporary folder, adds one import that
breaks a rule, and runs ``lint-imports`` on the copy (first on ``PYTHONPATH``, so the copy is
what gets analysed, not the installed tree).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("surd_builder", "pipelines", "annotation", "adapter")


def lint_imports(tree: Path) -> subprocess.CompletedProcess:
    executable = Path(sys.executable).with_name("lint-imports")
    command = [str(executable)] if executable.exists() else ["lint-imports"]
    environment = {**os.environ, "PYTHONPATH": str(tree), "NO_COLOR": "1"}
    return subprocess.run(
        [*command, "--no-cache"],
        cwd=tree,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_import_rules_hold() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BROKEN" not in result.stdout
    assert result.stdout.count("KEPT") == 4


@pytest.mark.parametrize(
    ("module", "wrong_import", "contract"),
    [
        # the core reaching up into a feature package
        ("surd_builder/schema.py", "import pipelines.export", "Only the CLI imports"),
        # one feature package into another (what annotation/push.py did with pipelines.screen)
        ("annotation/push.py", "import pipelines.screen", "Only the CLI imports"),
        # a feature package into the CLI above it
        ("adapter/model.py", "import surd_builder.cli.options", "Nothing imports the CLI"),
        # a circle inside a package (what pipelines/download.py and optout.py were)
        ("pipelines/base.py", "import pipelines.screen", "No import cycles"),
    ],
)
def test_a_wrong_import_breaks_a_rule(tmp_path, module, wrong_import, contract) -> None:
    for package in PACKAGES:
        shutil.copytree(
            ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with (tmp_path / module).open("a", encoding="utf-8") as source:
        source.write(f"\n{wrong_import}  # noqa\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0, result.stdout
    broken = result.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken, result.stdout
    assert module.removesuffix(".py").replace("/", ".").split(".")[-1] in broken
