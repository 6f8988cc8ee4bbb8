"""Shared fixtures: workspaces, image folders with prompts, and running the real CLI."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from surd_builder.demo import make_demo_folder, write_demo_dataset  # noqa: F401 (tests import it from here)
from surd_builder.workspace import Workspace
from tests.http_fixture import FaultyServer
from tests.label_studio import label_studio  # noqa: F401 (a session fixture)

REPO = Path(__file__).resolve().parents[1]


def image_bytes(color=(200, 30, 30), size=(24, 16), fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def write_image(path: Path, color=(200, 30, 30), size=(24, 16), fmt="PNG") -> bytes:
    data = image_bytes(color, size, fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def sidecar_folder(root: Path, count: int) -> dict[str, str]:
    """``count`` PNGs with sidecar .txt prompts; returns {relative path: prompt}."""
    prompts = {}
    for number in range(count):
        name = f"img-{number:03d}.png"
        write_image(root / name, color=(number * 7 % 256, 40, 90))
        prompt = f"{number} red foxes, snowy forest, 8k, artstation"
        (root / name).with_suffix(".txt").write_text(prompt)
        prompts[name] = prompt
    return prompts


def reset_accelerate_state() -> None:
    """accelerate keeps one precision per process (the CLI runs one training per process);
    tests run several in one, so its shared state is cleared after each, as its own tests do."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()


@pytest.fixture
def fresh_accelerate_state():
    """Use in test modules that train: ``pytestmark = pytest.mark.usefixtures(...)``."""
    yield
    reset_accelerate_state()


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    return Workspace.create(tmp_path / "ws")


def run_surd(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, **kwargs
) -> subprocess.CompletedProcess:
    """Run the real ``surd`` CLI in a child process (what a user's shell does)."""
    env = {**(env if env is not None else os.environ), "COLUMNS": "120"}
    return subprocess.run(
        [sys.executable, "-m", "surd_builder", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        **kwargs,
    )


@pytest.fixture
def server():
    """A real HTTP server on 127.0.0.1 with the faults real servers have (http_fixture.py).
    robots.txt rules cached by earlier tests are dropped: ports are reused."""
    from pipelines.optout import forget_robots_rules

    forget_robots_rules()
    with FaultyServer() as running:
        yield running
