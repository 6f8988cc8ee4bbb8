"""The ``openai:<base URL>`` rewriter against a real loopback chat-completions server.

Everything goes over real HTTP (``tests/chat_server.py``) into a real workspace (Parquet parts,
failures table, manifest): the rewrite stage run by ``run_stage``, and the ``surd build rewrite``
command in a child process. Retries never wait: the backoff is 0 or ``sleep`` is a recorder.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from pipelines.rewrite import RewriteStage
from pipelines.rewriters import RewriteRequest, RewriterUnavailable, make_rewriter
from pipelines.rewriters.openai_chat import ChatOptions, OpenAIChatRewriter
from pipelines.rewriters.template import DEFAULT_TEMPLATE, PromptTemplate
from pipelines.runner import RunOptions, RunReport, run_stage
from surd_builder.config import RewriteSettings
from surd_builder.ids import make_sample_id
from surd_builder.schema import records_to_table, table_spec
from surd_builder.workspace import Workspace
from tests.chat_server import ChatCompletionsServer
from tests.conftest import REPO, run_surd

MODEL = "test-model"
ORIGIN = f"openai:{MODEL}"
COMPLETIONS = "/v1/chat/completions"
MODELS = "/v1/models"  # the server check before a run's first request
QUIET = RunOptions(show_progress=False)
KEY_ENV = "SURD_TEST_REWRITE_OPENAI_KEY"  # our own name: the user's OPENAI_API_KEY is never read


# ----------------------------------------------------------------------------- helpers
def fox_prompt(number: int) -> str:
    return f"{number} red foxes, snowy forest, 8k, artstation"


def keyword_prompt(body: dict[str, Any]) -> str:
    """The keyword prompt a chat request is about (the default template's last user turn)."""
    return body["messages"][-1]["content"].removeprefix("Keyword prompt: ")


def sentence_responder(body: dict[str, Any]) -> str:
    """A labelled, quoted sentence from the first keyword: what cleaning must unwrap."""
    subject = keyword_prompt(body).split(",")[0].strip()
    return f'Narrative prompt: "{subject} in a snowy forest"'


def expected_sentence(prompt: str) -> str:
    return f"{prompt.split(',')[0].strip()} in a snowy forest"


def add_samples(workspace: Workspace, prompts: list[str], source: str = "folder") -> list[str]:
    """One ``samples`` part with a sample per keyword prompt; returns their ids, in order."""
    records = [
        {
            "sample_id": make_sample_id(source, f"item-{number}"),
            "source": source,
            "source_item_id": f"item-{number}",
            "complex_prompt": prompt,
        }
        for number, prompt in enumerate(prompts)
    ]
    workspace.write_table_part("samples", records_to_table(records, table_spec("samples").schema))
    return [r["sample_id"] for r in records]


def narratives(workspace: Workspace) -> dict[str, tuple[str, str]]:
    """sample_id -> (narrative_prompt, narrative_origin) of the current narratives table."""
    table = workspace.read_table("narratives").to_pylist()
    return {r["sample_id"]: (r["narrative_prompt"], r["narrative_origin"]) for r in table}


def completion_bodies(server: ChatCompletionsServer) -> list[dict[str, Any]]:
    return [
        body
        for (body, _), path in zip(server.requests, server.paths, strict=True)
        if path == COMPLETIONS
    ]


def completions(server: ChatCompletionsServer) -> int:
    """Chat-completion requests the server has had (its ``/v1/models`` checks not counted)."""
    return server.paths.count(COMPLETIONS)


def rewriter(server: ChatCompletionsServer, sleeps: list[float] | None = None, **options: Any):
    settings = {"backoff_seconds": 0.0, "retries": 2, "read_timeout": 5.0, **options}
    sleep = sleeps.append if sleeps is not None else (lambda seconds: None)
    return OpenAIChatRewriter(server.base_url, MODEL, options=ChatOptions(**settings), sleep=sleep)


def rewrite(workspace: Workspace, chat: OpenAIChatRewriter, **run: Any) -> RunReport:
    return rewrite_counting_cache_hits(workspace, chat, **run)[0]


def rewrite_counting_cache_hits(
    workspace: Workspace, chat: OpenAIChatRewriter, **run: Any
) -> tuple[RunReport, int]:
    """Run the rewrite stage; (its report, how many answers it took from the cache)."""
    stage = RewriteStage(chat)
    report = run_stage(stage, workspace, RunOptions(show_progress=False, **run))
    return report, stage.cache_hits


@pytest.fixture
def server():
    with ChatCompletionsServer(model=MODEL, responder=sentence_responder) as running:
        yield running


# ----------------------------------------------------------------------------- happy path
def test_stage_writes_cleaned_answers_and_sends_the_template(server, workspace):
    prompts = [fox_prompt(n) for n in range(5)]
    ids = add_samples(workspace, prompts)
    chat = rewriter(server, max_tokens=50)

    report = rewrite(workspace, chat)

    assert (report.status, report.planned, report.written, report.failed) == ("completed", 5, 5, 0)
    assert narratives(workspace) == {
        sample_id: (expected_sentence(prompt), ORIGIN)
        for sample_id, prompt in zip(ids, prompts, strict=True)
    }
    assert server.paths[0] == MODELS and set(server.paths[1:]) == {COMPLETIONS}  # checked once
    bodies = completion_bodies(server)
    assert sorted(keyword_prompt(b) for b in bodies) == sorted(prompts)  # one request each
    for body in bodies:
        assert body["model"] == MODEL
        assert body["temperature"] == 0
        assert body["max_tokens"] == 50
        messages = body["messages"]
        assert messages == DEFAULT_TEMPLATE.messages(keyword_prompt(body))
        assert messages[0] == {"role": "system", "content": DEFAULT_TEMPLATE.system}
        examples = DEFAULT_TEMPLATE.examples
        assert len(examples) == 3 and len(messages) == 2 + 2 * len(examples)
        for number, example in enumerate(examples):
            user, assistant = messages[1 + 2 * number], messages[2 + 2 * number]
            assert user == {"role": "user", "content": f"Keyword prompt: {example.keyword_prompt}"}
            assert assistant == {"role": "assistant", "content": example.narrative_prompt}
    # the run is in the manifest with the rewriter's parameters
    (run,) = workspace.runs()
    assert run["stage"] == "rewrite" and run["status"] == "completed"
    assert run["params"]["origin"] == ORIGIN
    assert run["params"]["rewriter"]["base_url"] == server.base_url


def test_make_rewriter_builds_the_openai_backend_from_settings(server, workspace):
    add_samples(workspace, [fox_prompt(1)])
    settings = RewriteSettings(
        rewriter=f"openai:{server.base_url}", model=MODEL, max_new_tokens=33, retries=0
    )
    chat = make_rewriter(settings.rewriter, settings)
    assert isinstance(chat, OpenAIChatRewriter) and chat.origin == ORIGIN
    run_stage(RewriteStage(chat), workspace, QUIET)
    assert list(narratives(workspace).values()) == [(expected_sentence(fox_prompt(1)), ORIGIN)]
    (body,) = completion_bodies(server)
    assert body["max_tokens"] == 33


def test_requests_run_concurrently(workspace):
    add_samples(workspace, [fox_prompt(n) for n in range(16)])
    with ChatCompletionsServer(model=MODEL, responder=sentence_responder, latency=0.1) as server:
        report = rewrite(workspace, rewriter(server, concurrency=8))
    assert report.written == 16 and completions(server) == 16
    assert server.max_concurrency >= 4


# ----------------------------------------------------------------------------- faults
TRANSIENT = {
    "500": {},
    "503": {},
    "timeout": {"seconds": 3.0},  # far past the client's 0.3 s read timeout
    "malformed": {},
    "no-choices": {},
    "disconnect": {},
}


@pytest.mark.parametrize("kind", list(TRANSIENT))
def test_a_transient_fault_is_retried_and_the_item_succeeds(server, workspace, kind):
    (sample_id,) = add_samples(workspace, [fox_prompt(7)])
    server.fail_next(kind, **TRANSIENT[kind])
    sleeps: list[float] = []
    report = rewrite(workspace, rewriter(server, sleeps, read_timeout=0.3))
    assert (report.written, report.failed) == (1, 0)
    assert narratives(workspace) == {sample_id: (expected_sentence(fox_prompt(7)), ORIGIN)}
    assert completions(server) == 2 and server.pending_faults == 0
    assert sleeps == [0.0]  # one backoff (0 s here) between the two tries
    assert workspace.read_failures("rewrite").num_rows == 0


def test_429_waits_the_retry_after_value(server, workspace):
    (sample_id,) = add_samples(workspace, [fox_prompt(2)])
    server.fail_next("429", retry_after=3)
    sleeps: list[float] = []
    report = rewrite(workspace, rewriter(server, sleeps, backoff_seconds=0.25))
    assert (report.written, report.failed) == (1, 0)
    assert narratives(workspace)[sample_id] == (expected_sentence(fox_prompt(2)), ORIGIN)
    assert completions(server) == 2
    assert sleeps == [3.0]  # the server's Retry-After, not the client's own backoff


def test_retry_after_is_capped_and_backoff_is_exponential(server, workspace):
    add_samples(workspace, [fox_prompt(3)])
    server.fail_next("429", retry_after=600)
    server.fail_next("500", times=3)
    sleeps: list[float] = []
    chat = rewriter(server, sleeps, retries=4, backoff_seconds=0.5, max_wait_seconds=5.0)
    report = rewrite(workspace, chat)
    assert (report.written, report.failed) == (1, 0)
    assert completions(server) == 5
    assert sleeps == [5.0, 1.0, 2.0, 4.0]  # capped Retry-After, then 0.5 * 2**tries


def test_persistent_500_is_a_failure_row_and_a_rerun_after_recovery_writes_it(server, workspace):
    prompts = [fox_prompt(n) for n in range(3)]
    ids = add_samples(workspace, prompts)
    chat = rewriter(server, retries=2, concurrency=1)  # one at a time: the faults hit one item
    server.fail_next("500", times=3)  # retries + 1 tries of the first planned item

    report = rewrite(workspace, chat)

    assert (report.planned, report.written, report.failed) == (3, 2, 1)
    assert report.failures_by_reason == {"http-500": 1}
    assert completions(server) == 5  # 3 tries of the failing item, 1 each for the others
    # the first item in plan order (sorted by rewrite key) took every fault
    keys = {chat.cache_key(p, None): i for i, p in zip(ids, prompts, strict=True)}
    failed_id = keys[min(keys)]
    failures = workspace.read_failures("rewrite").to_pylist()
    assert [(f["sample_id"], f["stage"], f["reason"]) for f in failures] == [
        (failed_id, "rewrite", "http-500")
    ]
    assert failures[0]["source"] == "folder" and failures[0]["detail"]
    assert failed_id not in narratives(workspace)
    assert set(narratives(workspace)) == set(ids) - {failed_id}

    again = rewrite(workspace, chat)  # the server has recovered (no faults left)

    assert (again.already_done, again.processed, again.written, again.failed) == (2, 1, 1, 0)
    assert completions(server) == 6
    index = ids.index(failed_id)
    assert narratives(workspace)[failed_id] == (expected_sentence(prompts[index]), ORIGIN)
    assert workspace.read_failures("rewrite", outstanding_in="narratives").num_rows == 0


def test_400_fails_only_that_item_without_retrying(server, workspace):
    (sample_id,) = add_samples(workspace, [fox_prompt(4)])
    server.fail_next("400", message="prompt is too long for the model")
    report = rewrite(workspace, rewriter(server, retries=3))
    assert (report.written, report.failed) == (0, 1)
    assert completions(server) == 1  # neither the client nor the stage retries a 400
    (failure,) = workspace.read_failures("rewrite").to_pylist()
    assert (failure["sample_id"], failure["reason"]) == (sample_id, "http-400")
    assert "too long" in failure["detail"]


# ----------------------------------------------------------------------------- key and model
def test_401_without_or_with_a_wrong_key_stops_the_run(workspace, monkeypatch):
    add_samples(workspace, [fox_prompt(n) for n in range(3)])
    with ChatCompletionsServer(
        model=MODEL, responder=sentence_responder, api_key="sk-right-key"
    ) as server:
        for key in (None, "sk-wrong-key"):
            if key is None:
                monkeypatch.delenv(KEY_ENV, raising=False)
            else:
                monkeypatch.setenv(KEY_ENV, key)
            with pytest.raises(RewriterUnavailable) as raised:
                rewrite(workspace, rewriter(server, api_key_env=KEY_ENV))
            message = str(raised.value)
            assert "\n" not in message and "401" in message and KEY_ENV in message
            assert "sk-" not in message
    assert workspace.read_table("narratives").num_rows == 0
    assert workspace.read_failures("rewrite").num_rows == 0  # not a per-item failure
    assert [run["status"] for run in workspace.runs()] == ["failed", "failed"]


def test_404_unknown_model_stops_the_run(workspace):
    add_samples(workspace, [fox_prompt(1), fox_prompt(2)])
    with ChatCompletionsServer(
        model="other-model", responder=sentence_responder, known_models=["other-model"]
    ) as server:
        with pytest.raises(RewriterUnavailable) as raised:
            rewrite(workspace, rewriter(server))
        assert "404" in str(raised.value) and MODEL in str(raised.value)
        assert "\n" not in str(raised.value)
        # a base URL without /v1 is a 404 too: same one-line stop
        wrong_url = OpenAIChatRewriter(server.base_url.removesuffix("/v1"), "other-model")
        with pytest.raises(RewriterUnavailable, match="404"):
            rewrite(workspace, wrong_url)
    assert workspace.read_table("narratives").num_rows == 0
    assert workspace.read_failures("rewrite").num_rows == 0


def _surd_rewrite(workspace: Workspace, server: ChatCompletionsServer, env: dict[str, str]):
    return run_surd(
        "build",
        "rewrite",
        "-w",
        str(workspace.root),
        "--rewriter",
        f"openai:{server.base_url}",
        "--model",
        MODEL,
        "--api-key-env",
        "MY_KEY",
        "--retries",
        "0",
        "--no-progress",
        env=env,
    )


def _workspace_text(root: Path) -> bytes:
    """Every byte under the workspace, plus every Parquet file's decoded values (compressed
    columns would hide a string from a byte search)."""
    chunks = []
    for path in sorted(root.rglob("*")):
        if path.is_file():
            chunks.append(path.read_bytes())
            if path.suffix == ".parquet":
                chunks.append(repr(pq.read_table(path).to_pylist()).encode())
    return b"\n".join(chunks)


def test_cli_key_errors_are_one_line_and_the_key_is_sent_but_never_stored(workspace):
    key = "sk-surd-test-7f3a9c0d2b51e4"
    ids = add_samples(workspace, [fox_prompt(n) for n in range(3)])
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "MY_KEY")}
    with ChatCompletionsServer(model=MODEL, responder=sentence_responder, api_key=key) as server:
        refused = _surd_rewrite(workspace, server, env)  # MY_KEY unset

        assert refused.returncode != 0, (refused.stdout, refused.stderr)
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1, refused.stderr
        assert lines[0].startswith("error:") and "401" in lines[0] and "MY_KEY" in lines[0]
        assert "Traceback" not in refused.stderr + refused.stdout
        assert workspace.read_table("narratives").num_rows == 0

        before = server.hits
        accepted = _surd_rewrite(workspace, server, {**env, "MY_KEY": key})

        assert accepted.returncode == 0, (accepted.stdout, accepted.stderr)
        new_requests = server.requests[before:]
        assert server.paths[before:] == [MODELS] + [COMPLETIONS] * 3
        assert all(h.get("authorization") == f"Bearer {key}" for _, h in new_requests)
    assert set(narratives(workspace)) == set(ids)
    assert {origin for _, origin in narratives(workspace).values()} == {ORIGIN}
    secret = key.encode()
    assert (workspace.root / "manifest.json").is_file()
    assert secret not in _workspace_text(workspace.root)
    for result in (refused, accepted):
        assert key not in result.stdout + result.stderr


# ----------------------------------------------------------------------------- validation
def test_a_keyword_list_answer_is_retried_with_sampling(workspace):
    prompt = "red fox, forest, 8k, masterpiece"
    calls: Counter[str] = Counter()
    lock = threading.Lock()

    def responder(body: dict[str, Any]) -> str:
        with lock:
            calls[keyword_prompt(body)] += 1
            first = calls[keyword_prompt(body)] == 1
        return "8k, masterpiece, red fox, forest" if first else "a red fox standing in a forest"

    (sample_id,) = add_samples(workspace, [prompt])
    with ChatCompletionsServer(model=MODEL, responder=responder) as server:
        report = rewrite(workspace, rewriter(server, retry_temperature=0.7))
    assert (report.written, report.failed) == (1, 0)
    assert narratives(workspace) == {sample_id: ("a red fox standing in a forest", ORIGIN)}
    first, second = completion_bodies(server)
    assert first["temperature"] == 0
    assert second["temperature"] == pytest.approx(0.7) and second["temperature"] > 0
    assert first["messages"] == second["messages"]


WRAPPED_ANSWERS = [
    pytest.param('Sure!\nHere is the narrative prompt:\n"a red fox in a snowy forest"', id="lines"),
    # an interjection and an intro on one line: at commit bc0a1a2 clean_output returned the
    # intro itself ("Sure! Here is the narrative prompt:"), which passed validation
    pytest.param(
        'Sure! Here is the narrative prompt:\n"a red fox in a snowy forest"', id="one-line"
    ),
    pytest.param('Okay, "a red fox in a snowy forest"', id="interjection-before-answer"),
]


@pytest.mark.parametrize("answer", WRAPPED_ANSWERS)
def test_a_wrapped_answer_is_cleaned_before_it_is_stored(workspace, answer):
    (sample_id,) = add_samples(workspace, ["red fox, snowy forest, 8k, masterpiece"])
    with ChatCompletionsServer(model=MODEL, responder=lambda body: answer) as server:
        report = rewrite(workspace, rewriter(server))
    assert report.written == 1
    assert narratives(workspace) == {sample_id: ("a red fox in a snowy forest", ORIGIN)}
    assert completions(server) == 1


def test_an_answer_that_stays_too_short_fails_after_max_attempts(workspace):
    (sample_id,) = add_samples(workspace, ["red fox, snowy forest, 8k, masterpiece"])
    with ChatCompletionsServer(model=MODEL, responder=lambda body: "Fox.") as server:
        stage = RewriteStage(rewriter(server), max_attempts=3)
        report = run_stage(stage, workspace, QUIET)
    assert (report.written, report.failed) == (0, 1)
    assert report.failures_by_reason == {"invalid-too-short": 1}
    assert completions(server) == 3
    assert [b["temperature"] for b in completion_bodies(server)] == [0, 0.7, 0.7]
    (failure,) = workspace.read_failures("rewrite").to_pylist()
    assert (failure["sample_id"], failure["reason"]) == (sample_id, "invalid-too-short")
    assert failure["detail"] == "Fox."
    assert workspace.read_table("narratives").num_rows == 0


# ----------------------------------------------------------------------------- cache
def test_reruns_and_force_use_the_cache_and_a_new_template_does_not(server, workspace):
    prompts = [fox_prompt(n) for n in range(4)]
    ids = add_samples(workspace, prompts)
    first = rewrite(workspace, rewriter(server))
    assert first.written == 4 and completions(server) == 4
    stored = narratives(workspace)

    again = rewrite(workspace, rewriter(server))
    assert completions(server) == 4
    assert again.already_done == again.planned == 4 and again.processed == 0

    forced, hits = rewrite_counting_cache_hits(workspace, rewriter(server), force=True)
    assert completions(server) == 4  # every answer came from the cache
    assert (forced.already_done, forced.processed, forced.written) == (0, 4, 4)
    assert hits == 4
    assert narratives(workspace) == stored

    template = PromptTemplate(
        system="Describe the picture in one plain sentence.",
        user=DEFAULT_TEMPLATE.user,
        examples=DEFAULT_TEMPLATE.examples,
    )
    options = ChatOptions(backoff_seconds=0.0)
    changed = OpenAIChatRewriter(server.base_url, MODEL, template, options)
    redone, hits = rewrite_counting_cache_hits(workspace, changed)
    assert (redone.already_done, redone.written, hits) == (0, 4, 0)
    assert completions(server) == 8
    new_bodies = completion_bodies(server)[4:]
    assert sorted(keyword_prompt(b) for b in new_bodies) == sorted(prompts)
    assert {b["messages"][0]["content"] for b in new_bodies} == {template.system}
    assert set(narratives(workspace)) == set(ids)

    # back to the default template: its answers are still in the table's history
    back, hits = rewrite_counting_cache_hits(workspace, rewriter(server))
    assert completions(server) == 8
    assert (back.already_done, back.written, hits) == (0, 4, 4)
    assert narratives(workspace) == stored


def test_identical_keyword_prompts_cost_one_request(server, workspace):
    prompts = [fox_prompt(1), fox_prompt(2)] * 3
    ids = add_samples(workspace, prompts)
    report = rewrite(workspace, rewriter(server))
    assert report.written == 6
    assert completions(server) == 2
    assert sorted(keyword_prompt(b) for b in completion_bodies(server)) == sorted(set(prompts))
    assert narratives(workspace) == {
        sample_id: (expected_sentence(prompt), ORIGIN)
        for sample_id, prompt in zip(ids, prompts, strict=True)
    }


# ----------------------------------------------------------------------------- review fixes
def dead_url(credentials: str = "") -> str:
    """The base URL of a loopback port nothing listens on (connections are refused)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://{credentials}127.0.0.1:{port}/v1"


def test_a_server_that_is_down_stops_the_run_before_any_request(workspace: Workspace) -> None:
    """Through ``run_stage`` (the Python API) as on the CLI: the plan checks the server."""
    add_samples(workspace, [fox_prompt(n) for n in range(20)])
    waits: list[float] = []
    url = dead_url()
    rewriter = OpenAIChatRewriter(url, MODEL, options=ChatOptions(retries=2), sleep=waits.append)
    with pytest.raises(RewriterUnavailable, match=f"cannot reach {url}"):
        run_stage(RewriteStage(rewriter), workspace, QUIET)
    assert waits == []  # no request was made, so none was retried
    assert workspace.read_table("narratives").num_rows == 0
    assert [run["status"] for run in workspace.runs()] == ["failed"]


def test_a_server_that_goes_down_after_the_check_costs_one_items_retries() -> None:
    """The fallback when the server was not checked (``generate`` called directly): the first
    request alone, then the stop, not twenty items' retries."""
    waits: list[float] = []
    rewriter = OpenAIChatRewriter(
        dead_url(), MODEL, options=ChatOptions(retries=2), sleep=waits.append
    )
    requests = [RewriteRequest(fox_prompt(n)) for n in range(20)]
    with pytest.raises(RewriterUnavailable, match="cannot reach"):
        rewriter.generate(requests, attempt=0)
    assert len(waits) == 2  # one item's retries


def test_the_server_check_asks_once(server) -> None:
    chat = rewriter(server)
    chat.check_reachable()
    chat.check_reachable()
    assert server.paths == [MODELS]
    chat.generate([RewriteRequest(fox_prompt(1)), RewriteRequest(fox_prompt(2))], attempt=0)
    assert server.paths == [MODELS, COMPLETIONS, COMPLETIONS]


# Counts, in the child process, every request the openai rewriter sends through its retry loop
# and every backoff wait of that loop (recorded, never slept).
RETRY_HOOK = """
import os
import pipelines.rewriters.openai_chat as chat

def _log(line):
    with open(os.environ["SURD_TEST_RETRY_LOG"], "a") as log:
        log.write(line + "\\n")

def counted(call, retries, backoff_seconds, max_wait_seconds, sleep):
    _log("request")
    wait = lambda seconds: _log(f"backoff {seconds}")
    return original(call, retries, backoff_seconds, max_wait_seconds, wait)

original = chat.with_retries
chat.with_retries = counted
"""


def test_cli_a_dead_server_is_one_line_at_once_without_retries_or_credentials(
    workspace: Workspace, tmp_path: Path
) -> None:
    add_samples(workspace, [fox_prompt(n) for n in range(3)])
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(RETRY_HOOK)
    log = tmp_path / "retries.log"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(hooks), str(REPO)]),
        "SURD_TEST_RETRY_LOG": str(log),
    }
    url = dead_url("user:s3cret@")
    shown = url.replace("user:s3cret@", "")
    result = run_surd(
        "build", "rewrite", "-w", str(workspace.root), "--rewriter", f"openai:{url}",
        "--model", MODEL, "--no-progress", env=env,
    )  # fmt: skip
    assert result.returncode == 7, result.stderr  # a ServiceError
    assert not log.exists(), log.read_text()  # not one request, so no retry and no backoff
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot reach {shown} "), lines
    output = result.stdout + result.stderr
    assert "s3cret" not in output and "user:" not in output
    assert "retr" not in output.lower() and "Traceback" not in output
    assert b"s3cret" not in _workspace_text(workspace.root)  # the failed run's manifest entry


def test_messages_and_failure_details_leave_url_credentials_out(monkeypatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    said: list[str] = []
    options = ChatOptions(retries=0, connect_timeout=2.0)
    down = OpenAIChatRewriter(dead_url("user:hunter2@"), MODEL, options=options)
    with pytest.raises(RewriterUnavailable) as raised:
        down.check_reachable()
    said.append(str(raised.value))
    with pytest.raises(RewriterUnavailable) as raised:  # the first request's own stop
        down.generate([RewriteRequest(fox_prompt(1))], attempt=0)
    said.append(str(raised.value))
    down._reached = True  # it answered once, then went down: a failure row per item
    (failed,) = down.generate([RewriteRequest(fox_prompt(1))], attempt=0)
    said.append(failed.detail)
    for server_options in ({"api_key": "sk-right"}, {"known_models": ["other"]}):  # 401, 404
        with ChatCompletionsServer(responder=sentence_responder, **server_options) as srv:
            url = srv.base_url.replace("://", "://user:hunter2@")
            chat = OpenAIChatRewriter(url, MODEL, options=replace(options, api_key_env=KEY_ENV))
            with pytest.raises(RewriterUnavailable) as raised:
                chat.generate([RewriteRequest(fox_prompt(1))], attempt=0)
            said.append(str(raised.value))
    with pytest.raises(Exception, match="http") as raised:
        OpenAIChatRewriter("ftp://user:hunter2@llm.example.com/v1", MODEL)
    said.append(str(raised.value))
    assert [text for text in said if "hunter2" in text or "user:" in text] == []
    assert "127.0.0.1" in said[0] and "401" in said[3] and "404" in said[4]


def test_api_key_env_must_be_a_variable_name_and_is_never_echoed() -> None:
    with pytest.raises(Exception, match="NAME of an environment variable") as error:
        OpenAIChatRewriter(
            "http://127.0.0.1:1/v1", MODEL, options=ChatOptions(api_key_env="sk-SECRET123")
        )
    assert "SECRET" not in str(error.value)


def test_manifest_params_leave_url_credentials_out() -> None:
    rewriter = OpenAIChatRewriter("https://user:hunter2@llm.example.com:8443/v1", MODEL)
    assert rewriter.params()["base_url"] == "https://llm.example.com:8443/v1"
    assert "hunter2" not in str(rewriter.params())
