"""``openai:<base URL>``: any server speaking OpenAI's chat-completions protocol.

vLLM, llama.cpp's server, Ollama, TGI and the hosted APIs all expose
``POST {base}/chat/completions``; this is how users rewrite at scale on GPU servers. Requests run
concurrently (a thread pool; the server batches them), each retried with exponential backoff on
429, 5xx, timeouts, dropped connections and malformed answers, honouring ``Retry-After``.

Errors that would fail every item the same way (401/403: bad key; 404: no such model or URL)
stop the run with one line. The API key comes from an environment variable (``--api-key-env``,
default ``OPENAI_API_KEY``), is sent only to the base URL's host, and is never logged or stored.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import urlsplit

from pipelines.base import WorkerNeeds
from pipelines.fetch_errors import FetchError, Retryable, retry_after_seconds, with_retries
from pipelines.rewriters.base import ItemFailed, Rewriter, RewriteRequest, RewriterUnavailable
from pipelines.rewriters.template import DEFAULT_TEMPLATE, PromptTemplate
from surd_builder.errors import InputError
from surd_builder.models import without_credentials

DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"


@dataclass(frozen=True)
class ChatOptions:
    concurrency: int = 8
    max_tokens: int = 96
    retries: int = 4
    backoff_seconds: float = 1.0
    max_wait_seconds: float = 60.0
    connect_timeout: float = 10.0
    read_timeout: float = 120.0
    retry_temperature: float = 0.7
    api_key_env: str = DEFAULT_API_KEY_ENV


def _error_message(response) -> str:
    try:
        error = response.json().get("error")
        message = error.get("message") if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        message = None
    return str(message or response.reason or "")[:200]


class OpenAIChatRewriter(Rewriter):
    backend: ClassVar[str] = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        template: PromptTemplate = DEFAULT_TEMPLATE,
        options: ChatOptions | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InputError(
                f"openai rewriter needs an http(s) base URL, got {without_credentials(base_url)!r}"
            )
        if not model:
            raise InputError("the openai rewriter needs --model (the name the server serves)")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", (options or ChatOptions()).api_key_env):
            # never echo it: a key pasted here by mistake must not reach the terminal or logs
            raise InputError("--api-key-env takes the NAME of an environment variable, not a key")
        super().__init__(model)
        self.base_url = base_url.rstrip("/")
        self.shown_url = without_credentials(self.base_url)  # for messages: no user:password@
        self.template = template
        self.options = options or ChatOptions()
        self._sleep = sleep
        self._local = threading.local()
        self._reached = False  # set once the server has answered anything

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_local"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def worker_needs(self) -> WorkerNeeds:
        # threads waiting on one server: a worker hardly uses its CPU, and two workers (each
        # with --concurrency requests in flight) keep the server busy between batches
        return WorkerNeeds(cpus=0.25, default_workers=2)

    def environment(self) -> tuple[str, ...]:
        return (self.options.api_key_env,)

    def identity(self) -> dict[str, Any]:
        # the server's address is not part of it: the same model behind another URL answers alike
        return {
            **super().identity(),
            "template": self.template.digest(),
            "max_tokens": self.options.max_tokens,
        }

    def params(self) -> dict[str, Any]:
        return {
            **self.identity(),
            "base_url": self.shown_url,
            "concurrency": self.options.concurrency,
        }

    def _session(self):
        session = getattr(self._local, "session", None)
        if session is None:
            import requests

            session = requests.Session()
            key = os.environ.get(self.options.api_key_env)
            if key:
                session.headers["Authorization"] = f"Bearer {key}"
            self._local.session = session
        return session

    def generate(self, requests: list[RewriteRequest], attempt: int) -> list[str | ItemFailed]:
        conversations = [self.template.messages(r.complex_prompt, r.caption) for r in requests]
        return self.complete_all(conversations, attempt)

    def complete_all(
        self, conversations: list[list[dict[str, str]]], attempt: int
    ) -> list[str | ItemFailed]:
        """One answer per conversation, ``concurrency`` requests in flight at a time.

        Stops at the first error that concerns the whole server (bad key, no such model) and,
        until the server has answered once, when it cannot be reached: a run against a server
        that is down ends with one line instead of hours of retries."""
        if not conversations:
            return []
        answers: list[str | ItemFailed] = []
        if not self._reached:
            # one request alone first: a server that is down costs one item's retries, not all
            answers.append(self._check_reached(self._complete(conversations[0], attempt)))
        rest = conversations[len(answers) :]
        workers = max(1, min(self.options.concurrency, len(rest)))
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="surd-chat")
        try:
            futures = [pool.submit(self._complete, c, attempt) for c in rest]
            answers += [future.result() for future in futures]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return answers

    def check_reachable(self) -> None:
        """One ``GET {base}/models`` within the connect timeout: any HTTP answer means the
        server is up (what it thinks of the key or the model is for the first request). Asked
        once: a server that answered is not asked again, here or before the first request."""
        import requests

        if self._reached:
            return
        timeout = self.options.connect_timeout
        try:
            self._session().get(f"{self.base_url}/models", timeout=(timeout, timeout)).close()
        except requests.Timeout:
            raise RewriterUnavailable(
                f"cannot reach {self.shown_url} (no answer in {timeout:g} s): "
                "is the server running?"
            ) from None
        except requests.ConnectionError:
            raise RewriterUnavailable(
                f"cannot reach {self.shown_url} (connection-error): is the server running?"
            ) from None
        self._reached = True

    def _check_reached(self, answer: str | ItemFailed) -> str | ItemFailed:
        unreachable = isinstance(answer, ItemFailed) and answer.reason in (
            "connection-error",
            "timeout",
        )
        if unreachable and not self._reached:
            raise RewriterUnavailable(
                f"cannot reach {self.shown_url} ({answer.reason}): is the server running?"
            )
        return answer

    def _complete(self, messages: list[dict[str, str]], attempt: int) -> str | ItemFailed:
        options = self.options
        body = {
            "model": self.model,
            "messages": messages,
            "max_tokens": options.max_tokens,
            "temperature": 0.0 if attempt == 0 else options.retry_temperature,
        }
        try:
            return with_retries(
                lambda: self._post(body),
                options.retries,
                options.backoff_seconds,
                options.max_wait_seconds,
                self._sleep,
            )
        except FetchError as error:  # retries exhausted
            return ItemFailed(error.reason, error.detail or "")
        except ItemFailed as error:
            return error

    def _post(self, body: dict[str, Any]) -> str:
        import requests

        url = f"{self.base_url}/chat/completions"
        try:
            response = self._session().post(
                url, json=body, timeout=(self.options.connect_timeout, self.options.read_timeout)
            )
        except requests.Timeout:
            raise Retryable("timeout", f"no answer from {self.shown_url} in time") from None
        except requests.ConnectionError as error:
            detail = f"{self.shown_url}: {type(error).__name__}"
            raise Retryable("connection-error", detail) from None
        self._reached = True
        status = response.status_code
        if status in (401, 403):
            raise RewriterUnavailable(
                f"{self.shown_url} refused the API key (HTTP {status}); set "
                f"{self.options.api_key_env} to a valid key"
            )
        if status == 404:
            raise RewriterUnavailable(
                f"{self.shown_url}: HTTP 404 for model {self.model!r}: {_error_message(response)}"
            )
        if status == 429 or status >= 500:
            raise Retryable(
                f"http-{status}",
                _error_message(response),
                retry_after_seconds(response.headers.get("Retry-After")),
            )
        if status != 200:  # 400: e.g. the prompt is too long for the model; this item only
            raise ItemFailed(f"http-{status}", _error_message(response))
        try:
            return response.json()["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            raise Retryable("bad-response", "answer is not a chat completion") from None
