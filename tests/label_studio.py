"""A real Label Studio server for the annotation tests, started with ``scripts/label-studio.sh``.

The server runs from its own venv (``.label-studio-venv``), installed by the script on first use
(about 80 s, then kept), on a free port on 127.0.0.1 with an empty data dir, so the admin user
and token below are created fresh. One server serves the whole test session; each test uses its
own project. ``SURD_SKIP_LABEL_STUDIO=1`` skips these tests for a quick local run.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "label-studio.sh"
ADMIN = "admin@surd.local"
TOKEN = "surd-test-token-0123456789"


@dataclass(frozen=True)
class LabelStudioServer:
    url: str
    api_key: str
    data_dir: Path
    files_root: Path  # LOCAL_FILES_DOCUMENT_ROOT: what its local storages may serve

    def env(self) -> dict[str, str]:
        return {**os.environ, "LABEL_STUDIO_URL": self.url, "LABEL_STUDIO_API_KEY": self.api_key}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def narrated_workspace(root: Path, count: int, seed: int = 7, size: int = 32):
    """``count`` demo samples in a workspace under ``root``, ingested, with rules narratives
    (origin ``rules:v2``): what the annotation tests push."""
    from pipelines.ingest import IngestStage
    from pipelines.rewrite import RewriteStage
    from pipelines.rewriters import make_rewriter
    from pipelines.runner import RunOptions, run_stage
    from surd_builder.demo import make_demo_folder
    from surd_builder.workspace import Workspace

    make_demo_folder(root / "demo", count=count, seed=seed, size=size)
    workspace = Workspace.create(root / "ws")
    quiet = RunOptions(show_progress=False)
    run_stage(IngestStage(root / "demo", source="demo"), workspace, quiet)
    run_stage(
        RewriteStage(make_rewriter("rules"), include_source_narratives=True), workspace, quiet
    )
    return workspace


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory) -> Iterator[LabelStudioServer]:
    if os.environ.get("SURD_SKIP_LABEL_STUDIO") == "1":
        pytest.skip("SURD_SKIP_LABEL_STUDIO=1")
    install = subprocess.run(
        ["bash", str(SCRIPT), "install"], capture_output=True, text=True, timeout=900
    )
    assert install.returncode == 0, install.stderr[-2000:]
    data_dir = tmp_path_factory.mktemp("label-studio-data")
    files_root = data_dir / "files"
    files_root.mkdir()
    env = {
        **os.environ,
        "LABEL_STUDIO_API_KEY": TOKEN,
        "LABEL_STUDIO_USERNAME": ADMIN,
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(files_root),
    }
    started = subprocess.run(
        ["bash", str(SCRIPT), "start", str(_free_port()), str(data_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    if started.returncode != 0:
        log = (data_dir / "server.log").read_text(errors="replace")[-3000:]
        pytest.fail(f"Label Studio did not start: {started.stderr}\n{log}")
    try:
        url = started.stdout.strip().splitlines()[-1]
        yield LabelStudioServer(url, TOKEN, data_dir, files_root)
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", str(data_dir)], timeout=60)
