"""A loopback OpenAI-compatible chat-completions server, with scriptable faults.

It speaks enough of the protocol that vLLM, llama.cpp's server and Ollama expose for an
OpenAI-style client to be tested against it without a model, a GPU or the network:

- ``POST /v1/chat/completions``: a ``chat.completion`` whose text comes from ``responder``
- ``GET /v1/models``: the configured model (and ``known_models``)
- optional ``Authorization: Bearer <api_key>`` check (401), unknown model (404)

Faults are queued with ``fail_next`` and consumed FIFO, one per chat-completions request
(``/v1/models`` never consumes one, so a client's health check cannot eat a fault):

- ``"400"``, ``"429"``, ``"500"``, ``"503"`` (any 4xx/5xx code): that status with an
  OpenAI-style error body; ``retry_after=`` adds a ``Retry-After`` header
- ``"timeout"``: waits ``seconds`` (longer than the client's read timeout), then answers
  normally (``then="respond"``) or closes the connection (``then="close"``)
- ``"malformed"``: 200 whose body is not JSON; ``"no-choices"``: 200 with ``choices: []``
- ``"disconnect"``: closes the connection without any response

``latency`` delays every request, to stand in for a model's per-request time when
benchmarking a client's concurrency; ``max_concurrency`` records the peak reached.

Vision: ``accepts_images=False`` answers any request with an ``image_url`` part as a text-only
model behind vLLM does (HTTP 400 "<model> is not a multimodal model"), or with
``image_refusal="llama.cpp"`` as llama.cpp's server started without ``--mmproj`` does (HTTP 500
"image input is not supported by this server"); ``first_token_logprobs`` returns the first
token's alternatives ``[(token, logprob), ...]`` for a request that asks for ``logprobs``, as a
``choices[0].logprobs.content`` block (what a judge reads); ``accepts_logprobs=False`` answers
a request that asks for them with OpenAI's HTTP 400 for models without logprobs.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Responder = Callable[[dict[str, Any]], str]
LogprobsFunction = Callable[[dict[str, Any]], list[tuple[str, float]]]

FAULT_KINDS = ("timeout", "malformed", "no-choices", "disconnect")
MALFORMED_BODY = b'{"id": "chatcmpl-broken", "object": "chat.completion", "choices": ['


def message_text(content: Any) -> str:
    """The text of a message's content: a string, or the text parts of a multimodal list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p for p in content if isinstance(p, dict) and p.get("type") == "text"]
        return "\n".join(str(p.get("text", "")) for p in parts)
    return ""


def image_urls(body: dict[str, Any]) -> list[str]:
    """Every ``image_url`` URL in a request's messages, in order."""
    urls = []
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else []:
            if isinstance(part, dict) and part.get("type") == "image_url":
                urls.append(str((part.get("image_url") or {}).get("url", "")))
    return urls


def default_responder(body: dict[str, Any]) -> str:
    """A deterministic caption from the last user message, so tests can predict it.

    "a picture of " + the last line of the last user message, lowercased, cut to 12 words.
    """
    user = [m for m in body.get("messages", []) if isinstance(m, dict) and m.get("role") == "user"]
    lines = message_text(user[-1].get("content")).strip().splitlines() if user else []
    words = ("a picture of " + (lines[-1] if lines else "")).lower().split()
    return " ".join(words[:12])


@dataclass(frozen=True)
class Fault:
    """One queued fault; ``kind`` is a status code ("429") or one of ``FAULT_KINDS``."""

    kind: str
    retry_after: float | None = None
    seconds: float = 1.0
    message: str | None = None
    then: str = "respond"

    @property
    def status(self) -> int | None:
        return int(self.kind) if self.kind.isdigit() else None


class ChatCompletionsServer(ThreadingHTTPServer):
    """An OpenAI chat-completions server on 127.0.0.1 (port 0); use it as a context manager."""

    daemon_threads = True  # a handler stuck on a client must never keep the tests alive
    request_queue_size = 256  # concurrency benchmarks open many connections at once
    allow_reuse_address = True

    def __init__(
        self,
        *,
        model: str = "test-model",
        responder: Responder | None = None,
        api_key: str | None = None,
        known_models: list[str] | None = None,
        latency: float = 0.0,
        accepts_images: bool = True,
        image_refusal: str = "vllm",
        first_token_logprobs: LogprobsFunction | None = None,
        accepts_logprobs: bool = True,
    ) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.accepts_images = accepts_images
        self.image_refusal = image_refusal
        self.accepts_logprobs = accepts_logprobs
        self.first_token_logprobs = first_token_logprobs
        self.model = model
        self.responder: Responder = responder or default_responder
        self.api_key = api_key
        self.known_models = known_models
        self.latency = latency
        self.requests: list[tuple[Any, dict[str, str]]] = []  # (parsed body, lowercased headers)
        self.paths: list[str] = []  # parallel to ``requests``
        self.responder_errors: list[BaseException] = []
        self.hits = 0
        self.active = 0
        self.max_concurrency = 0
        self._faults: deque[Fault] = deque()
        self._completions = 0
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._started = False
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """What an OpenAI client takes as ``base_url``."""
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def start(self) -> ChatCompletionsServer:
        if not self._started:
            self._started = True
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; sleeping fault/latency handlers wake up and close their connections."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        if self._started:  # shutdown() waits forever if serve_forever never ran
            self.shutdown()
            self._thread.join(timeout=5)
        self.server_close()

    def __enter__(self) -> ChatCompletionsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- scripting -------------------------------------------------------------------------

    def fail_next(
        self,
        kind: str | int,
        *,
        retry_after: float | None = None,
        seconds: float = 1.0,
        message: str | None = None,
        then: str = "respond",
        times: int = 1,
    ) -> None:
        """Queue ``times`` copies of a fault for the next chat-completions requests (FIFO)."""
        kind = str(kind)
        if not (kind in FAULT_KINDS or (kind.isdigit() and 400 <= int(kind) <= 599)):
            raise ValueError(f"unknown fault {kind!r}: use a 4xx/5xx code or one of {FAULT_KINDS}")
        if then not in ("respond", "close"):
            raise ValueError(f"then must be 'respond' or 'close', not {then!r}")
        fault = Fault(kind, retry_after=retry_after, seconds=seconds, message=message, then=then)
        with self._lock:
            self._faults.extend([fault] * times)

    @property
    def pending_faults(self) -> int:
        with self._lock:
            return len(self._faults)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def wait_for_hits(self, count: int, timeout: float = 5.0) -> bool:
        """Block until ``count`` requests have arrived (real synchronisation, not a sleep)."""
        with self._arrived:
            return self._arrived.wait_for(lambda: self.hits >= count, timeout=timeout)

    # -- used by the handler ---------------------------------------------------------------

    def _begin(self, path: str, body: Any, headers: dict[str, str]) -> None:
        with self._arrived:
            self.requests.append((body, headers))
            self.paths.append(path)
            self.hits += 1
            self.active += 1
            self.max_concurrency = max(self.max_concurrency, self.active)
            self._arrived.notify_all()

    def _end(self) -> None:
        with self._lock:
            self.active -= 1

    def _next_fault(self) -> Fault | None:
        with self._lock:
            return self._faults.popleft() if self._faults else None

    def _next_id(self) -> str:
        with self._lock:
            self._completions += 1
            return f"chatcmpl-{self._completions}"


def _error(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _status_error(status: int, message: str | None) -> dict:
    """The error body OpenAI-compatible servers send for ``status``."""
    if status == 429:
        return _error(message or "Rate limit reached (injected)", "requests", "rate_limit_exceeded")
    if status >= 500:
        text = message or f"{HTTPStatus(status).phrase} (injected)"
        return _error(text, "server_error")
    return _error(message or f"{HTTPStatus(status).phrase} (injected)", "invalid_request_error")


class _Handler(BaseHTTPRequestHandler):
    server: ChatCompletionsServer
    protocol_version = "HTTP/1.1"  # keep-alive, as OpenAI clients (httpx pools) expect
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms stall

    def log_message(self, *args: object) -> None:  # keep test output clean
        pass

    def handle(self) -> None:
        # the client may have given up (its read timeout fired): there is no one to answer
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            super().handle()

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self._serve()

    def do_POST(self) -> None:  # noqa: N802
        self._serve()

    # -- plumbing --------------------------------------------------------------------------

    def _send_json(self, status: int, document: object, headers: dict[str, str] | None = None):
        self._send(status, json.dumps(document).encode(), headers)

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _close(self) -> None:
        self.close_connection = True  # no response: the socket is closed once we return

    def _read_body(self) -> Any:
        """The parsed JSON body; the raw text when it is not JSON; None when empty."""
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode("utf-8", "replace")

    def _serve(self) -> None:
        server = self.server
        path = self.path.split("?", 1)[0].rstrip("/")
        body = self._read_body()
        server._begin(path, body, {k.lower(): v for k, v in self.headers.items()})
        try:
            self._route(path, body)
        finally:
            server._end()

    def _route(self, path: str, body: Any) -> None:
        server = self.server
        if server.latency > 0 and server._stopping.wait(server.latency):
            return self._close()
        completion = self.command == "POST" and path == "/v1/chat/completions"
        if completion:
            fault = server._next_fault()
            if fault is not None and self._fault(fault, body):
                return
        if not self._authorized():
            return
        if completion:
            self._complete(body)
        elif self.command == "GET" and path == "/v1/models":
            names = [server.model] + [m for m in server.known_models or [] if m != server.model]
            data = [{"id": n, "object": "model", "created": 0, "owned_by": "test"} for n in names]
            self._send_json(200, {"object": "list", "data": data})
        else:
            message = f"Unknown request URL: {self.command} {self.path}"
            self._send_json(404, _error(message, "invalid_request_error", "unknown_url"))

    def _authorized(self) -> bool:
        key = self.server.api_key
        if key is None:
            return True
        given = self.headers.get("Authorization", "")
        if given == f"Bearer {key}":
            return True
        if given:
            message = "Incorrect API key provided."
        else:
            message = "You didn't provide an API key (Authorization: Bearer <key>)."
        self._send_json(401, _error(message, "invalid_request_error", "invalid_api_key"))
        return False

    def _fault(self, fault: Fault, body: Any) -> bool:
        """Act out ``fault``; False when the request should then be answered normally."""
        if fault.kind == "timeout":
            if self.server._stopping.wait(fault.seconds) or fault.then == "close":
                self._close()
                return True
            return False
        if fault.kind == "disconnect":
            self._close()
        elif fault.kind == "malformed":
            self._send(200, MALFORMED_BODY)
        elif fault.kind == "no-choices":
            model = (body.get("model") if isinstance(body, dict) else None) or self.server.model
            self._send_json(200, self._completion_document(model, None, "", 1))
        else:
            status = fault.status or 500
            headers = {}
            if fault.retry_after is not None:
                value = fault.retry_after
                headers["Retry-After"] = str(int(value) if float(value).is_integer() else value)
            self._send_json(status, _status_error(status, fault.message), headers)
        return True

    def _complete(self, body: Any) -> None:
        server = self.server
        if not isinstance(body, dict):
            message = "We could not parse the JSON body of your request."
            return self._send_json(400, _error(message, "invalid_request_error"))
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            message = "'messages' must be a non-empty list."
            return self._send_json(400, _error(message, "invalid_request_error", None, "messages"))
        if body.get("stream"):
            message = "stream=true is not supported by this test server."
            return self._send_json(400, _error(message, "invalid_request_error", None, "stream"))
        model = body.get("model") or server.model
        if server.known_models is not None and model not in server.known_models:
            message = f"The model `{model}` does not exist."
            error = _error(message, "invalid_request_error", "model_not_found", "model")
            return self._send_json(404, error)
        if not server.accepts_images and image_urls(body):
            if server.image_refusal == "llama.cpp":  # llama-server without a projector
                message = "image input is not supported by this server"
                return self._send_json(500, _error(message, "server_error"))
            message = f"{model} is not a multimodal model"  # vLLM serving a text-only model
            return self._send_json(400, _error(message, "BadRequestError", None, "messages"))
        if body.get("logprobs") and not server.accepts_logprobs:
            # what OpenAI answers for a model without logprobs (its reasoning models)
            message = "logprobs is not supported with this model."
            return self._send_json(400, _error(message, "invalid_request_error", None, "logprobs"))
        try:
            text = server.responder(body)
            if not isinstance(text, str):
                raise TypeError(f"responder returned {type(text).__name__}, not str")
        except Exception as exc:  # a broken responder is a 500, like a crashing model server
            with server._lock:
                server.responder_errors.append(exc)
            return self._send_json(500, _error(f"responder failed: {exc!r}", "server_error"))
        finish = "stop"
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        if isinstance(limit, int) and limit > 0 and len(text.split()) > limit:
            text, finish = " ".join(text.split()[:limit]), "length"
        prompt_tokens = sum(
            len(message_text(m.get("content")).split()) for m in messages if isinstance(m, dict)
        )
        document = self._completion_document(model, text, finish, prompt_tokens)
        if body.get("logprobs") and server.first_token_logprobs is not None:
            alternatives = server.first_token_logprobs(body)
            top = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in alternatives]
            top = top[: int(body.get("top_logprobs") or 0) or len(top)]
            first = {**top[0], "top_logprobs": top} if top else None
            document["choices"][0]["logprobs"] = {"content": [first] if first else []}
        self._send_json(200, document)

    def _completion_document(
        self, model: str, text: str | None, finish: str, prompt_tokens: int
    ) -> dict[str, Any]:
        """A ``chat.completion``; ``text=None`` gives the empty ``choices`` some servers send."""
        choices = []
        completion_tokens = 0
        if text is not None:
            message = {"role": "assistant", "content": text}
            choices = [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}]
            completion_tokens = len(text.split())
        return {
            "id": self.server._next_id(),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
