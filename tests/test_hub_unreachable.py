"""No hub reachable: every command that loads a model by hub id fails fast with one clear line.

Two kinds of unreachable ``HF_ENDPOINT`` on loopback: a port with nothing listening (refused at
once) and a server that accepts connections and never answers (the slow case: a firewall that
drops packets, a dead proxy). Each command runs as a user runs it, in a child process with a
clean environment (no ``HF_HUB_OFFLINE``, an empty hub cache, a ``user:password@`` in
``HF_ENDPOINT`` that no message may show), one after another: each one's time is then its own,
as a user would see it, not that of six processes sharing a small CI machine's cores (side by
side on two cores, each took several times as long as alone). Alone each takes about a second,
plus the silent hub's probe wait (2 s here), so the sequence stays short.

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
SECRET = "s3cret"  # the password in HF_ENDPOINT: never in any output
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
def silent_server():
    silent = SilentServer()
    yield silent
    silent.close()


@pytest.fixture(scope="module")
def endpoints(silent_server):
    return {
        "refused": f"http://127.0.0.1:{free_port()}",
        "silent": f"http://127.0.0.1:{silent_server.port}",
    }


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


def with_credentials(endpoint: str) -> str:
    return endpoint.replace("://", f"://user:{SECRET}@")


@pytest.mark.parametrize("kind", ["refused", "silent"])
def test_each_command_fails_fast_naming_the_model_and_the_fixes(endpoints, inputs, kind, tmp_path):
    endpoint = with_credentials(endpoints[kind])  # the errors show endpoints[kind], without them
    env = {**clean_env(endpoint, tmp_path / "hf-home"), "HF_HUB_ETAG_TIMEOUT": PROBE_SECONDS}
    runs = commands(inputs, kind)
    # one at a time: each duration is the command's own (see the module docstring)
    results = {name: run_timed(args, env, inputs["root"]) for name, (args, _) in runs.items()}
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
        for noise in ("Traceback", "Retrying", "thrown while requesting", "stacktrace", SECRET):
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


# ----------------------------------------------------------------------------- review fixes
NOT_HUB_IDS = ["/nope/sd", "./nope-sd", "../nope-sd", "~/nope-surd-sd", "models/sd/v1",
               "a//b", "sd v1", "surd-test/sd--tiny", "-sd", "sd.git", "models/"]  # fmt: skip


@pytest.fixture
def probe_calls(monkeypatch, endpoints) -> list[str]:
    """The endpoints the hub probe is asked about (it answers "down"); the real hub cache is
    never read (importing huggingface_hub under HF_HUB_OFFLINE=1 would keep it offline for the
    rest of this test process)."""
    calls: list[str] = []
    monkeypatch.setattr(models, "_probe", lambda endpoint: calls.append(endpoint) or "down")
    monkeypatch.setattr(models, "_probe_results", {})
    monkeypatch.setattr(models, "in_hub_cache", lambda model: False)
    monkeypatch.setenv("HF_ENDPOINT", endpoints["refused"])
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return calls


@pytest.mark.parametrize("offline", [False, True])
def test_a_name_that_can_only_be_a_folder_is_a_missing_folder_without_asking_the_hub(
    probe_calls, monkeypatch, tmp_path, offline
):
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    a_file = tmp_path / "model.safetensors"
    a_file.write_bytes(b"")
    for model in [*NOT_HUB_IDS, str(a_file)]:
        with pytest.raises(models.InputError) as raised:
            models.check_hub_model(model, "base model")
        message = str(raised.value)
        assert message.startswith(f"cannot load base model: the folder {model} does not exist")
        assert "hub cache" not in message and "HF_HUB_OFFLINE" not in message
    assert probe_calls == []
    for model in ("sd-tiny", "surd-test/sd-tiny", "Org_1/sd.v1-5"):  # hub ids: as before
        with pytest.raises(models.InputError, match="in the local hub cache"):
            models.check_hub_model(model, "base model")
    assert probe_calls == ([] if offline else [models.hub_endpoint()])


def test_hub_ids_are_what_huggingface_hub_validates(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    names = [*NOT_HUB_IDS, "sd", "surd-test/sd-tiny", "Org_1/sd.v1-5", "a" * 96, "a" * 97,
             "a/b.", "_a/_b_", "café", "a..b", "a.b/c", ".a", "1/2"]  # fmt: skip
    for name in names:
        try:
            validate_repo_id(name)
            valid = True
        except HFValidationError:
            valid = False
        assert models.could_be_hub_id(name) == valid, name


def test_cli_a_mistyped_folder_is_named_at_once(inputs, silent_server, endpoints, tmp_path):
    """The reported case (HF_HUB_OFFLINE=1), and a silent hub that is never asked."""
    seen = len(silent_server.connections)
    for offline in (True, False):
        env = clean_env(endpoints["silent"], tmp_path / "hf-home")  # the default 5 s probe
        if offline:
            env["HF_HUB_OFFLINE"] = "1"
        seconds, result = run_timed(
            ["generate", "x", "--base-model", "/nope/sd", "--adapter", str(inputs["adapter"]),
             "--output", str(tmp_path / "out"), "--device", "cpu"],
            env,
            tmp_path,
        )  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().splitlines() == [
            "error: cannot load base model: the folder /nope/sd does not exist"
        ]
        assert seconds <= LIMIT_SECONDS
    assert len(silent_server.connections) == seen  # the hub was not probed


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("", 5.0), ("2", 2.0), ("0.5", 0.5), ("0", 5.0), ("-1", 5.0), ("-0.5", 5.0),
     ("soon", 5.0), ("inf", 5.0), ("nan", 5.0)],
)  # fmt: skip
def test_hf_hub_etag_timeout_is_used_only_when_positive(monkeypatch, value, seconds):
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", value)
    assert models._probe_timeout() == seconds


@pytest.mark.parametrize("value", ["0", "-1"])
def test_a_reachable_hub_is_reachable_whatever_hf_hub_etag_timeout_says(monkeypatch, server, value):
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", value)
    assert models._probe(server.base) is None  # neither "no answer in 0 s" nor a ValueError


def test_without_credentials_drops_only_the_userinfo():
    drop = models.without_credentials
    assert drop("https://user:s3cret@hub.example.com:8443/v1") == "https://hub.example.com:8443/v1"
    assert drop("http://tok@127.0.0.1:1") == "http://127.0.0.1:1"
    assert drop("https://u:p@ss@h/x?a=b@c") == "https://h/x?a=b@c"  # the last @ of the host part
    assert drop("at https://hub.example.com/a@b and http://u:p@x/") == (
        "at https://hub.example.com/a@b and http://x/"
    )
    assert drop("no URL: a@b, surd-test/sd") == "no URL: a@b, surd-test/sd"


def test_hub_errors_never_show_the_endpoint_password(monkeypatch, endpoints):
    """Unreachable (the probe's reason) and answering but not serving the model (the loader's
    error naming the URL it asked)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(models, "_probe_results", {})
    monkeypatch.setattr(models, "in_hub_cache", lambda model: False)
    monkeypatch.setenv("HF_ENDPOINT", with_credentials(endpoints["refused"]))
    with pytest.raises(models.InputError) as raised:
        models.check_hub_model("surd-test/x", "model")
    assert endpoints["refused"] in str(raised.value) and SECRET not in str(raised.value)

    monkeypatch.setattr(models, "_probe", lambda endpoint: None)  # it answers
    monkeypatch.setattr(models, "_probe_results", {})

    def loader(model, **kwargs):
        url = f"{models.hub_endpoint()}/{model}/resolve/main/config.json"
        raise OSError(f"We couldn't connect to '{url}' to load the files")

    with pytest.raises(models.InputError) as raised:
        models.load_pretrained(loader, "surd-test/x", "model")
    message = str(raised.value)
    assert "did not serve it" in message and endpoints["refused"] in message
    assert SECRET not in message and "user:" not in message
