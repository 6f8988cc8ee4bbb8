"""`surd build run`: the [run] steps of surd.toml, checked, run in order, stopped at a failure."""

from __future__ import annotations

import json

import pytest

from surd_builder.demo import make_demo_folder
from surd_builder.errors import ConfigError
from surd_builder.run import load_steps, run_steps
from tests.conftest import run_surd


def write_config(path, steps: list[str]) -> None:
    path.write_text(f"[run]\nsteps = {json.dumps(steps)}\n")  # a JSON string list is TOML too


def test_steps_are_checked(tmp_path) -> None:
    config = tmp_path / "surd.toml"
    write_config(config, ["build ingest images", "build export out --overwrite"])
    assert load_steps(config) == ["build ingest images", "build export out --overwrite"]
    for steps, message in [
        (["rm -rf /"], "is not one of"),
        (["build ingest images -w elsewhere"], "names a workspace"),
        ([], "needs steps"),
    ]:
        write_config(config, steps)
        with pytest.raises(ConfigError, match=message):
            load_steps(config)
    config.write_text("[run\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_steps(config)
    with pytest.raises(ConfigError, match="does not exist"):
        load_steps(tmp_path / "missing.toml")


def test_steps_run_in_order_on_the_workspace_and_stop_at_a_failure(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    calls = []

    def invoke(args: list[str]) -> int:
        calls.append(args)
        return 3 if args[1] == "screen" else 0

    steps = [
        "build ingest images",
        "annotate push -p 'x y'",
        "build screen --text-model m",
        "build export out",
    ]
    summary = run_steps(steps, tmp_path / "ws", tmp_path, invoke, announce=lambda _: None)
    assert [s.status for s in summary.steps] == ["completed", "skipped", "failed"]
    assert summary.failed and summary.steps[2].detail == "exit code 3"
    workspace = str((tmp_path / "ws").resolve())
    assert calls == [
        ["build", "ingest", "-w", workspace, "images"],
        ["build", "screen", "-w", workspace, "--text-model", "m"],
    ]  # the annotate step was skipped (no Label Studio) and export never ran


def test_build_run_end_to_end_keeps_work_done_before_a_failing_step(tmp_path) -> None:
    make_demo_folder(tmp_path / "images", count=12, seed=1, size=32)
    assert run_surd("init", str(tmp_path / "ws")).returncode == 0
    config = tmp_path / "ws" / "surd.toml"
    template = config.read_text().split("[run]")[0]
    config.write_text(
        template + '[run]\nsteps = [\n  "build ingest ../images --source demo --no-progress",\n'
        '  "build rewrite --include-source-narratives --no-progress",\n'
        '  "build ingest ../missing --no-progress",\n'
        '  "build export ../out --no-progress",\n]\n'
    )
    failed = run_surd("build", "run", "-w", str(tmp_path / "ws"))
    assert failed.returncode != 0
    assert failed.stderr.strip().splitlines()[-1].startswith("error: step 'build ingest ../missing")
    assert "Traceback" not in failed.stderr
    assert not (tmp_path / "out").exists()
    status = run_surd("build", "status", "-w", str(tmp_path / "ws"))
    assert "narratives" in status.stdout and "12" in status.stdout  # the first steps' work stays


def test_a_mistyped_step_is_a_one_line_failure_with_a_summary(tmp_path) -> None:
    make_demo_folder(tmp_path / "images", count=4, seed=1, size=32)
    assert run_surd("init", str(tmp_path / "ws")).returncode == 0
    config = tmp_path / "ws" / "surd.toml"
    steps = [
        "build ingest --source demo --no-progress -- ../images",
        "build dedupe --max-distnce 3",
    ]
    config.write_text(
        config.read_text().split("[run]")[0] + f"[run]\nsteps = {json.dumps(steps)}\n"
    )
    result = run_surd("build", "run", "-w", str(tmp_path / "ws"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "No such option" in result.stderr
    assert "completed" in result.stdout and "failed" in result.stdout  # the summary table
    assert result.stderr.strip().splitlines()[-1].startswith("error: step 'build dedupe")
