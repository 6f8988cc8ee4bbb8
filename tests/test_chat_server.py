"""The chat-completions test server itself: protocol shape, auth, each fault, concurrency."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests

from tests.chat_server import ChatCompletionsServer, default_responder

KEY = "sk-test"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
def server():
    with ChatCompletionsServer(model="test-model", api_key=KEY) as running:
        yield running


def chat(
    server: ChatCompletionsServer,
    text: str = "a red fox",
    *,
    headers: dict[str, str] | None = None,
    timeout: float | tuple[float, float] = 2.0,
    **extra: Any,
) -> requests.Response:
    body = {"model": "test-model", "messages": [{"role": "user", "content": text}], **extra}
    return requests.post(
        f"{server.base_url}/chat/completions",
        json=body,
        headers=AUTH if headers is None else headers,
        timeout=timeout,
    )


def test_completion_has_the_openai_shape(server):
    body = {
        "model": "test-model",
        "temperature": 0.2,
        "messages": [
            {"role": "system", "content": "You write captions."},
            {"role": "user", "content": "Cat on a mat\n  A Red  Bicycle Leaning On A Wall  "},
        ],
    }
    response = requests.post(f"{server.base_url}/chat/completions", json=body, headers=AUTH)
    assert response.status_code == 200
    document = response.json()
    assert document["id"].startswith("chatcmpl-")
    assert document["object"] == "chat.completion"
    assert isinstance(document["created"], int)
    assert document["model"] == "test-model"
    (choice,) = document["choices"]
    assert choice["index"] == 0
    assert choice["finish_reason"] == "stop"
    assert choice["message"] == {
        "role": "assistant",
        "content": "a picture of a red bicycle leaning on a wall",
    }
    usage = document["usage"]
    assert usage["prompt_tokens"] == 14  # whitespace words: 3 + 4 + 7
    assert usage["completion_tokens"] == 10
    assert usage["total_tokens"] == 24
    assert server.hits == 1
    recorded_body, recorded_headers = server.requests[0]
    assert recorded_body == body
    assert recorded_headers["authorization"] == f"Bearer {KEY}"


def test_default_responder_is_deterministic_and_short():
    long = {"messages": [{"role": "user", "content": " ".join(["Word"] * 30)}]}
    assert default_responder(long) == "a picture of " + " ".join(["word"] * 9)
    multimodal = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
                    {"type": "text", "text": "Describe This"},
                ],
            }
        ]
    }
    assert default_responder(multimodal) == "a picture of describe this"


def test_custom_responder_sees_the_body_and_max_tokens_cuts_it():
    seen: list[dict] = []

    def responder(body: dict) -> str:
        seen.append(body)
        return "one two three four"

    with ChatCompletionsServer(responder=responder) as server:
        response = chat(server, "hello", headers={}, max_tokens=2)
    assert seen[0]["max_tokens"] == 2
    (choice,) = response.json()["choices"]
    assert choice["message"]["content"] == "one two"
    assert choice["finish_reason"] == "length"


def test_models_lists_the_configured_model(server):
    response = requests.get(f"{server.base_url}/models", headers=AUTH, timeout=2)
    assert response.json() == {
        "object": "list",
        "data": [{"id": "test-model", "object": "model", "created": 0, "owned_by": "test"}],
    }
    assert server.paths == ["/v1/models"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}])
def test_missing_or_wrong_key_is_401(server, headers):
    response = chat(server, headers=headers)
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "invalid_api_key"
    assert error["message"]
    assert server.hits == 1  # failed requests are recorded too


def test_unknown_model_is_404():
    with ChatCompletionsServer(model="a", known_models=["a", "b"]) as server:
        assert chat(server, model="b").status_code == 200
        response = chat(server, model="nope")
        models = requests.get(f"{server.base_url}/models", timeout=2).json()
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
    assert [m["id"] for m in models["data"]] == ["a", "b"]


def test_bad_bodies_are_400(server):
    url = f"{server.base_url}/chat/completions"
    not_json = requests.post(url, data=b"{nope", headers=AUTH, timeout=2)
    no_messages = requests.post(url, json={"model": "test-model"}, headers=AUTH, timeout=2)
    assert not_json.status_code == no_messages.status_code == 400
    assert no_messages.json()["error"]["param"] == "messages"
    assert server.requests[0][0] == "{nope"


@pytest.mark.parametrize("status", [400, 500, 503])
def test_status_faults_answer_that_status_once(server, status):
    server.fail_next(str(status), message="injected here")
    failed = chat(server)
    assert failed.status_code == status
    assert failed.json()["error"]["message"] == "injected here"
    assert "Retry-After" not in failed.headers
    assert chat(server).status_code == 200  # consumed: the next request succeeds


def test_429_carries_retry_after(server):
    server.fail_next("429", retry_after=0)
    server.fail_next(429, retry_after=2.5)
    first, second = chat(server), chat(server)
    assert first.status_code == second.status_code == 429
    assert first.headers["Retry-After"] == "0"
    assert second.headers["Retry-After"] == "2.5"
    assert first.json()["error"]["code"] == "rate_limit_exceeded"


def test_faults_are_consumed_in_order_and_only_by_completions(server):
    server.fail_next("500")
    server.fail_next("429", times=2)
    assert server.pending_faults == 3
    assert requests.get(f"{server.base_url}/models", headers=AUTH, timeout=2).ok
    assert [chat(server).status_code for _ in range(4)] == [500, 429, 429, 200]
    assert server.pending_faults == 0


def test_malformed_is_not_json(server):
    server.fail_next("malformed")
    response = chat(server)
    assert response.status_code == 200
    with pytest.raises(ValueError):
        response.json()


def test_no_choices(server):
    server.fail_next("no-choices")
    document = chat(server).json()
    assert document["object"] == "chat.completion"
    assert document["choices"] == []


def test_timeout_outlasts_the_client_read_timeout(server):
    server.fail_next("timeout", seconds=2)
    started = time.monotonic()
    with pytest.raises(requests.Timeout):
        chat(server, timeout=(1, 0.2))
    assert time.monotonic() - started < 1
    assert chat(server).status_code == 200  # the sleeping handler does not block others


def test_timeout_then_responds_normally(server):
    server.fail_next("timeout", seconds=0.05)
    response = chat(server)
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "a picture of a red fox"


def test_disconnect_closes_without_a_response(server):
    server.fail_next("disconnect")
    with pytest.raises(requests.ConnectionError):
        chat(server)
    assert chat(server).status_code == 200


def test_stop_cuts_a_sleeping_timeout_short():
    server = ChatCompletionsServer().start()
    server.fail_next("timeout", seconds=30)
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            chat(server, timeout=(1, 10))
        except requests.RequestException as exc:
            outcome.append(exc)

    client = threading.Thread(target=call)
    client.start()
    assert server.wait_for_hits(1, timeout=2)
    started = time.monotonic()
    server.stop()
    client.join(timeout=2)
    assert time.monotonic() - started < 1
    assert not client.is_alive()
    assert isinstance(outcome[0], requests.ConnectionError)


def test_latency_lets_concurrency_be_observed():
    with ChatCompletionsServer(latency=0.2) as server, ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda n: chat(server, f"n{n}").status_code, range(8)))
    assert statuses == [200] * 8
    assert server.hits == 8
    assert server.max_concurrency >= 4
    assert server.active == 0


def test_unknown_fault_kind_is_rejected(server):
    with pytest.raises(ValueError):
        server.fail_next("teapot")
    with pytest.raises(ValueError):
        server.fail_next("200")
