"""No hub reachable: every command that loads a model by hub id fails fast with one clear line.

Two kinds of unreachable ``HF_ENDPOINT`` on loopback: a port with nothing listening (refused at
once) and a server that accepts connections and never answers (the slow case: a firewall that
drops packets, a dead proxy). Each command runs as a user runs it, in a child process with a
clean environment (no ``HF_HUB_OFFLINE``, an empty hub cache), all of them side by side.

Also: a captioner whose ``--merge-with`` server is down fails on that server before loading its
model, and a model in the hub cache still loads with the hub unreachable, and with
``HF_HUB_OFFLINE=1`` as before.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pipelines.ingest import IngestStage
from pipelines.runner import RunOptions, run_stage
from surd_builder import models
from surd_builder.demo import make_demo_folder, write_demo_dataset
from surd_builder.workspace import Workspace
from tests.conftest import REPO

LIMIT_SECONDS = 15.0  # the whole command, Python start and imports included
PROBE_SECONDS = "2"  # HF_HUB_ETAG_TIMEOUT: the probe's wait for a silent hub (default 5 s)
HUB_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", "HF_HOME",
                 "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_ETAG_TIMEOUT")  # fmt: skip


def free_port() -> int:
    """A loopback port with nothing listening on it (connections are refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class SilentServer:
    """Accepts TCP connections on loopback and never sends a byte."""

    def __init__(self):
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(64)
        self.port = self.socket.getsockname()[1]
        self.connections: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:  # closed: the test is over
                return
            self.connections.append(connection)  # held open, unanswered

    def close(self) -> None:
        self.socket.shutdown(socket.SHUT_RDWR)  # wakes the accept() waiting in the thread
        self.socket.close()
        for connection in self.connections:
            connection.close()
        self.thread.join(timeout=5)


@pytest.fixture(scope="module")
def endpoints():
    silent = SilentServer()
    yield {
        "refused": f"http://127.0.0.1:{free_port()}",
        "silent": f"http://127.0.0.1:{silent.port}",
    }
    silent.close()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A workspace of demo samples (images, keyword prompts, narratives), an export folder and
    an adapter folder: everything the commands read before their models."""
    root = tmp_path_factory.mktemp("hub")
    make_demo_folder(root / "shapes", count=4, seed=1, size=32)
    workspace = Workspace.create(root / "ws")
    run_stage(
        IngestStage(root / "shapes", source="demo"), workspace, RunOptions(show_progress=False)
    )
    adapter = root / "adapter"
    adapter.mkdir()
    # the hub is checked before the adapter is read, so its config is enough here
    (adapter / "config.json").write_text('{"_class_name": "SURAdapter", "embed_dim": 32}')
    return {
        "root": root,
        "ws": workspace.root,
        "data": write_demo_dataset(root / "data", count=8, held_out=2),
        "adapter": adapter,
    }


def clean_env(endpoint: str, hf_home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in HUB_VARIABLES}
    return {**env, "HF_ENDPOINT": endpoint, "HF_HOME": str(hf_home), "COLUMNS": "120"}


def run_timed(
    args: list[str], env: dict[str, str], cwd: Path
) -> tuple[float, subprocess.CompletedProcess]:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "surd_builder", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,  # far above the limit: a regression shows as a failed assertion, not a hang
    )
    return time.monotonic() - started, result


def commands(inputs: dict[str, Path], kind: str) -> dict[str, tuple[list[str], str]]:
    """name -> (arguments, the hub id the error must name); each on its own copy of what it
    writes to (one run of a stage per workspace at a time)."""
    root = inputs["root"]
    workspaces = {}
    for name in ("screen", "hf", "caption"):
        workspaces[name] = root / f"ws-{kind}-{name}"
        shutil.copytree(inputs["ws"], workspaces[name])
    rewrite = ["build", "rewrite", "--include-source-narratives", "--device", "cpu"]
    return {
        "train": (
            ["train", "--data", str(inputs["data"]), "--base-model", "surd-test/sd-tiny",
             "--llm", "surd-test/llm-tiny", "--llm-layer", "1", "--output",
             str(root / f"train-{kind}"), "--device", "cpu", "--no-progress"],
            "surd-test/sd-tiny",
        ),
        "generate": (
            ["generate", "a red square", "--base-model", "surd-test/sd-tiny", "--adapter",
             str(inputs["adapter"]), "--output", str(root / f"images-{kind}"), "--device", "cpu"],
            "surd-test/sd-tiny",
        ),
        "eval": (
            ["eval", "--base-model", "surd-test/sd-tiny", "--adapter", str(inputs["adapter"]),
             "--clip-model", "surd-test/clip-tiny", "--output", str(root / f"eval-{kind}"),
             "--device", "cpu", "--no-progress"],
            "surd-test/clip-tiny",
        ),
        "screen": (
            ["build", "screen", "-w", str(workspaces["screen"]), "--clip-model",
             "surd-test/clip-tiny", "--device", "cpu", "--no-progress"],
            "surd-test/clip-tiny",
        ),
        "hf": (
            [*rewrite, "-w", str(workspaces["hf"]), "--rewriter", "hf:surd-test/lm-tiny",
             "--no-progress"],
            "surd-test/lm-tiny",
        ),
        "caption": (
            [*rewrite, "-w", str(workspaces["caption"]), "--rewriter",
             "caption:surd-test/blip-tiny", "--no-progress"],
            "surd-test/blip-tiny",
        ),
    }  # fmt: skip


@pytest.mark.parametrize("kind", ["refused", "silent"])
def test_each_command_fails_fast_naming_the_model_and_the_fixes(endpoints, inputs, kind, tmp_path):
    env = {**clean_env(endpoints[kind], tmp_path / "hf-home"), "HF_HUB_ETAG_TIMEOUT": PROBE_SECONDS}
    runs = commands(inputs, kind)
    with ThreadPoolExecutor(max_workers=len(runs)) as pool:
        futures = {
            name: pool.submit(run_timed, args, env, inputs["root"])
            for name, (args, _) in runs.items()
        }
        results = {name: future.result() for name, future in futures.items()}
    problems = []
    for name, (seconds, result) in results.items():
        model = runs[name][1]
        lines = result.stderr.strip().splitlines()
        said = f"{name}: exit {result.returncode} in {seconds:.1f} s, stderr:\n{result.stderr}"
        if result.returncode != 2 or not 1 <= len(lines) <= 3 or seconds > LIMIT_SECONDS:
            problems.append(said)
            continue
        error = lines[-1]
        wanted = [model, endpoints[kind], "HF_HUB_OFFLINE=1", "HF_ENDPOINT", "local folder"]
        wanted.append(
            "Connection refused" if kind == "refused" else f"no answer in {PROBE_SECONDS} s"
        )
        missing = [text for text in wanted if text not in error]
        if not error.startswith("error: ") or missing:
            problems.append(f"{said}\nmissing from the last line: {missing}")
        for noise in ("Traceback", "Retrying", "thrown while requesting", "stacktrace"):
            if noise in result.stderr + result.stdout:
                problems.append(f"{said}\n{noise!r} in the output")
    times = ", ".join(f"{name} {seconds:.1f} s" for name, (seconds, _) in results.items())
    assert not problems, "\n\n".join([times, *problems])


def test_caption_merge_server_is_checked_before_the_model_loads(endpoints, inputs, tmp_path):
    """The captioning model is a hub id on an unreachable hub: had it been loaded first, the
    error would name it; the dead merge server is named instead."""
    copy = tmp_path / "ws"
    shutil.copytree(inputs["ws"], copy)
    server = f"http://127.0.0.1:{free_port()}/v1"
    seconds, result = run_timed(
        ["build", "rewrite", "-w", str(copy), "--include-source-narratives", "--rewriter",
         "caption:surd-test/blip-tiny", "--merge-with", f"openai:{server}", "--model", "m",
         "--device", "cpu", "--no-progress"],
        clean_env(endpoints["refused"], tmp_path / "hf-home"),
        tmp_path,
    )  # fmt: skip
    assert result.returncode == 7, result.stderr  # a ServiceError
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach " + server), lines
    assert "blip-tiny" not in result.stderr
    assert seconds <= LIMIT_SECONDS


# ----------------------------------------------------------------------------- the cache
# Saves a tiny model into the hub cache layout ``hf download`` leaves (refs/main naming a
# snapshot folder) of $HF_HOME, then loads it by hub id, then asks for one that is not cached.
LOAD_SCRIPT = """
import os
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer
from surd_builder.errors import InputError
from surd_builder.models import load_pretrained
from tests.tiny_models import save_tiny_causal_lm

repo = Path(os.environ["HF_HOME"]) / "hub" / "models--surd-test--cached-lm"
commit = "0123456789abcdef0123456789abcdef01234567"
save_tiny_causal_lm(repo / "snapshots" / commit)
(repo / "refs").mkdir()
(repo / "refs" / "main").write_text(commit)
load_pretrained(AutoTokenizer.from_pretrained, "surd-test/cached-lm", "tokenizer")
model = load_pretrained(AutoModelForCausalLM.from_pretrained, "surd-test/cached-lm", "LM")
print("loaded", type(model).__name__)
try:
    load_pretrained(AutoTokenizer.from_pretrained, "surd-test/not-cached", "tokenizer")
except InputError as error:
    print("error:", error)
"""


def test_a_cached_model_loads_without_the_hub(endpoints, tmp_path):
    """With the hub unreachable (no retries: the cache alone) and with HF_HUB_OFFLINE=1."""

    def load(offline: bool) -> subprocess.CompletedProcess:
        env = clean_env(endpoints["refused"], tmp_path / f"home-{offline}")
        if offline:
            env["HF_HUB_OFFLINE"] = "1"
        return subprocess.run(
            [sys.executable, "-c", LOAD_SCRIPT], cwd=REPO, env=env, capture_output=True,
            text=True, timeout=120,
        )  # fmt: skip

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip((False, True), pool.map(load, (False, True)), strict=True))
    for offline, result in results.items():
        assert result.returncode == 0, result.stderr
        loaded, error = result.stdout.strip().splitlines()
        assert loaded == "loaded LlamaForCausalLM"
        assert "'surd-test/not-cached'" in error and "in the local hub cache" in error
        assert ("HF_HUB_OFFLINE is set" in error) == offline
        assert "Retrying" not in result.stderr


# ----------------------------------------------------------------------------- units
def test_local_folders_and_offline_mode_skip_the_probe(tmp_path, monkeypatch, endpoints):
    calls = []
    monkeypatch.setattr(models, "_probe", lambda endpoint: calls.append(endpoint) or "down")
    monkeypatch.setattr(models, "_probe_results", {})
    # not the real cache: importing huggingface_hub under HF_HUB_OFFLINE=1 would keep it
    # offline for the rest of this test process
    monkeypatch.setattr(models, "in_hub_cache", lambda model: False)
    monkeypatch.setenv("HF_ENDPOINT", endpoints["refused"])
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert models.check_hub_model(str(tmp_path), "model") is False  # a folder here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.InputError, match="surd-test/x.*HF_HUB_OFFLINE is set"):
        models.check_hub_model("surd-test/x", "model")  # not in the cache: no need to load
    assert calls == []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    for _ in range(3):
        with pytest.raises(models.InputError, match="surd-test/x"):
            models.check_hub_model("surd-test/x", "model")
    assert calls == [endpoints["refused"]]  # once per process and endpoint


def test_the_probe_tells_refused_and_silent_from_answering(endpoints, monkeypatch, server):
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")  # whole seconds: the hub reads an int
    assert "refused" in models._probe(endpoints["refused"]).lower()
    started = time.monotonic()
    assert models._probe(endpoints["silent"]).startswith("no answer in 1 s")
    assert time.monotonic() - started < 5
    assert models._probe(server.base) is None  # any HTTP answer, a 404 included


def test_the_openai_server_check_asks_models_once_and_names_a_dead_server():
    from pipelines.rewriters.base import RewriterUnavailable
    from pipelines.rewriters.openai_chat import ChatOptions, OpenAIChatRewriter
    from tests.chat_server import ChatCompletionsServer

    with ChatCompletionsServer(responder=lambda body: "a fox") as server:
        OpenAIChatRewriter(server.base_url, "m").check_reachable()
        assert server.paths == ["/v1/models"]
    dead = f"http://127.0.0.1:{free_port()}/v1"
    options = ChatOptions(connect_timeout=2.0)
    with pytest.raises(RewriterUnavailable, match=f"cannot reach {dead}"):
        OpenAIChatRewriter(dead, "m", options=options).check_reachable()
