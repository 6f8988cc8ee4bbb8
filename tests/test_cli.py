from __future__ import annotations

import ast

import datasets
import pytest
import typer.main
from typer.testing import CliRunner

from surd_builder import __version__
from surd_builder.cli import app
from tests.conftest import run_surd, sidecar_folder

runner = CliRunner()


def all_commands(command, path=()):
    yield path, command
    if hasattr(command, "commands"):  # a group (typer vendors its own click)
        for name, sub in command.commands.items():
            yield from all_commands(sub, (*path, name))


def test_version():
    result = run_surd("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"surd {__version__}"


def test_every_command_has_informative_help():
    root = typer.main.get_command(app)
    commands = list(all_commands(root))
    assert {" ".join(p) for p, _ in commands} >= {
        "init",
        "demo",
        "quickstart",
        "demo-models",
        "build ingest",
        "build export",
        "build status",
    }
    for path, command in commands:
        result = runner.invoke(app, [*path, "--help"], terminal_width=120)
        assert result.exit_code == 0, path
        assert "Usage:" in result.output
        assert command.help and command.help.split("\n")[0] in " ".join(result.output.split()), path
        for param in command.params:
            if param.param_type_name == "option" and not param.hidden and param.name != "help":
                assert param.help, f"{path} --{param.name} has no help"


def test_defaults_are_shown_in_help():
    result = runner.invoke(app, ["build", "export", "--help"], terminal_width=200)
    assert "default: 0.05" in result.output and "default: 256" in result.output


def assert_one_line_error(result, code: int, fragment: str):
    assert result.returncode == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and fragment in lines[0]
    assert "Traceback" not in result.stderr + result.stdout


def test_user_mistakes_give_one_line_errors(tmp_path):
    assert_one_line_error(
        run_surd("build", "status", "-w", str(tmp_path)), 3, "is not a surd workspace"
    )
    assert_one_line_error(
        run_surd("build", "status", "-w", str(tmp_path / "nope")), 3, "does not exist"
    )
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert_one_line_error(run_surd("init", str(tmp_path / "full")), 3, "non-empty folder")

    ws = tmp_path / "ws"
    assert run_surd("init", str(ws)).returncode == 0
    assert_one_line_error(
        run_surd("build", "ingest", str(tmp_path / "missing"), "-w", str(ws)), 2, "does not exist"
    )
    assert_one_line_error(
        run_surd("build", "export", str(tmp_path / "out"), "-w", str(ws)), 2, "no samples yet"
    )
    folder = tmp_path / "in"
    sidecar_folder(folder, 3)
    (folder / "metadata.csv").write_bytes(b"file_name,prompt\x00\x00\x89PNG\n")
    assert_one_line_error(
        run_surd("build", "ingest", str(folder), "-w", str(ws)), 2, "not a text file"
    )
    (folder / "metadata.csv").unlink()
    (folder / "broken.png").write_bytes(b"not an image")
    (folder / "broken.txt").write_text("broken")
    ingest = run_surd("build", "ingest", str(folder), "-w", str(ws), "--no-progress")
    assert ingest.returncode == 0, ingest.stderr
    assert "not-an-image" in ingest.stdout  # a per-item problem is a counted skip, not an error
    out = tmp_path / "out"
    assert run_surd("build", "export", str(out), "-w", str(ws), "--no-progress").returncode == 0
    assert_one_line_error(run_surd("build", "export", str(out), "-w", str(ws)), 5, "already exists")
    assert_one_line_error(
        run_surd("build", "export", str(tmp_path / "o2"), "-w", str(ws), "--status", "approved"),
        2,
        "unknown review status",
    )
    status = run_surd("build", "status", "-w", str(ws))
    assert status.returncode == 0
    assert (
        "samples" in status.stdout
        and "not-an-image" in status.stdout
        and "completed" in status.stdout
    )
    assert "source: in" in status.stdout and "review: pending" in status.stdout


def test_debug_flag_shows_the_traceback(tmp_path):
    result = run_surd("--debug", "build", "status", "-w", str(tmp_path))
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_init_is_idempotent(tmp_path):
    assert "created workspace" in run_surd("init", str(tmp_path / "ws")).stdout
    again = run_surd("init", str(tmp_path / "ws"))
    assert again.returncode == 0 and "already a workspace" in again.stdout


@pytest.mark.parametrize("count", [24, 2])
def test_quickstart_build_and_its_load_snippet_works(tmp_path, count):
    # the build alone (--no-train); tests/test_quickstart_mission.py runs the whole mission
    args = ("quickstart", str(tmp_path / "qs"), "--count", str(count), "--no-train")
    args += ("--no-progress",)
    first = run_surd(*args)
    assert first.returncode == 0, first.stderr
    result = run_surd(*args)  # resumes: reuses the demo images, ingests nothing new, re-exports
    assert result.returncode == 0, result.stderr
    assert f"reusing {count} images" in result.stdout and "already done" in result.stdout
    # the snippet it prints is what a user pastes: it must load (only splits that exist)
    snippet = next(line for line in result.stdout.splitlines() if "load_dataset(" in line)
    data_files = ast.literal_eval(snippet[snippet.index("data_files=") + len("data_files=") : -1])
    loaded = datasets.load_dataset("parquet", data_files=data_files)
    assert sum(len(split) for split in loaded.values()) == count
    row = loaded["train"][0]
    assert row["image"].size == (128, 128)
    assert row["narrative_prompt"].endswith("background") and "8k" not in row["narrative_prompt"]
