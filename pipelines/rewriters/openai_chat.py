"""``openai:<base URL>``: any server speaking OpenAI's chat-completions protocol.

vLLM, llama.cpp's server, Ollama, TGI and the hosted APIs all expose
``POST {base}/chat/completions``; this is how users rewrite at scale on GPU servers. Requests run
concurrently (a thread pool; the server batches them), each retried with exponential backoff on
429, 5xx, timeouts, dropped connections and malformed answers, honouring ``Retry-After``.

Errors that would fail every item the same way (401/403: bad key; 404: no such model or URL)
stop the run with one line. The API key comes from an environment variable (``--api-key-env``,
default ``OPENAI_API_KEY``), is sent only to the base URL's host, and is never logged or stored.

With ``--with-image`` each request also carries the sample's image, downscaled to
``--image-max-side`` (:mod:`.vision`), as a base64 ``image_url`` content part of the user turn:
one call that sees the image and the keyword prompt. Before any work, one small request with an
64x64 image checks that the server takes images: a text-only model or a server started without
vision support is then one line, not a failure row per sample.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import urlsplit

from pipelines.base import WorkerNeeds
from pipelines.fetch_errors import FetchError, Retryable, retry_after_seconds, with_retries
from pipelines.rewriters.base import ItemFailed, Rewriter, RewriteRequest, RewriterUnavailable
from pipelines.rewriters.template import DEFAULT_TEMPLATE, PromptTemplate
from pipelines.rewriters.vision import DEFAULT_IMAGE_MAX_SIDE, UploadImage, upload_image
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
    with_image: bool = False  # send the image with each request (a vision model)
    image_max_side: int = DEFAULT_IMAGE_MAX_SIDE


Reader = Callable[[dict[str, Any]], Any]
PROBE_SIDE = 64
Messages = list[dict[str, Any]]
# a conversation, or how to build it on the worker thread that sends it (encoding an image is
# CPU work: done there, the images of a batch are encoded in parallel and not all held at once)
Conversation = Messages | Callable[[], "Messages | ItemFailed"]


def completion_text(document: dict[str, Any]) -> str:
    """The answer's text in a chat-completion document."""
    return document["choices"][0]["message"]["content"] or ""


def _probe_image() -> UploadImage:
    """A 64x64 grey PNG: small, and above every processor's minimum side (Qwen2-VL and GLM-4V
    refuse sides under 28 px)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (PROBE_SIDE, PROBE_SIDE), (128, 128, 128)).save(buffer, format="PNG")
    return UploadImage(buffer.getvalue(), "image/png", PROBE_SIDE, PROBE_SIDE)


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
        self.uses_image = (options or ChatOptions()).with_image  # this instance's, not the class's
        self.base_url = base_url.rstrip("/")
        self.shown_url = without_credentials(self.base_url)  # for messages: no user:password@
        self.template = template
        self.options = options or ChatOptions()
        self._sleep = sleep
        self._local = threading.local()
        self._pool: ThreadPoolExecutor | None = None  # kept: its threads keep their connections
        self._reached = False  # set once the server has answered anything
        self._took_image = False  # set once the server has answered a request with an image
        # request fields the image check sends too (a judge's logprobs): a server refusing them
        # is found before any work, not as a failure row per sample
        self.probe_fields: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_local"] = None
        state["_pool"] = None
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
        identity = {
            **super().identity(),
            "template": self.template.digest(),
            "max_tokens": self.options.max_tokens,
        }
        if self.uses_image:  # what the model sees (the image's hash is in the cache key too)
            identity["image_max_side"] = self.options.image_max_side
        return identity

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
        if not self.uses_image:
            conversations = [self.template.messages(r.complex_prompt, r.caption) for r in requests]
            return self.complete_all(conversations, attempt)
        conversations = [
            self.vision_conversation(self.template, r.complex_prompt, r.image) for r in requests
        ]
        return self.complete_all(conversations, attempt)

    def vision_conversation(
        self, template: PromptTemplate, text: str, image: bytes | None
    ) -> Callable[[], Messages | ItemFailed]:
        """Builds ``template``'s messages for ``text`` with ``image`` as an ``image_url`` part,
        on the thread that sends them (encoded once: a retry of the request sends the same
        body), or says why the image cannot be sent."""

        def build() -> Messages | ItemFailed:
            if image is None:
                return ItemFailed("no-image", "the sample has no stored image")
            try:
                part = upload_image(image, self.options.image_max_side).content_part()
            except ItemFailed as failure:
                return failure
            return template.vision_messages(text, part)

        return build

    def _executor(self) -> ThreadPoolExecutor:
        """One pool for the rewriter's life: its threads' sessions keep their connections
        between batches (no new TCP and TLS handshakes per batch)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                max_workers=self.options.concurrency, thread_name_prefix="surd-chat"
            )
        return self._pool

    def complete_all(
        self,
        conversations: list[Conversation],
        attempt: int,
        extra: dict[str, Any] | None = None,
        read: Reader = completion_text,
    ) -> list[Any]:
        """One answer per conversation (``read`` from its completion, or an
        :class:`ItemFailed`), ``concurrency`` requests in flight at a time; ``extra`` adds to
        or replaces request fields (a judge asks for one token and its logprobs).

        Stops at the first error that concerns the whole server (bad key, no such model) and,
        until the server has answered once, when it cannot be reached: a run against a server
        that is down ends with one line instead of hours of retries."""
        if not conversations:
            return []
        answers: list[Any] = []
        if not self._reached:
            # one request alone first: a server that is down costs one item's retries, not all
            first = self._complete(conversations[0], attempt, extra, read)
            answers.append(self._check_reached(first))
        rest = conversations[len(answers) :]
        pool = self._executor()
        futures = [pool.submit(self._complete, c, attempt, extra, read) for c in rest]
        try:
            answers += [future.result() for future in futures]
        except BaseException:
            # the run stops (bad key, Ctrl-C): nothing queued is sent, nothing in flight is left
            for future in futures:
                future.cancel()
            wait(futures)
            raise
        return answers

    def check_reachable(self) -> None:
        """One ``GET {base}/models`` within the connect timeout: any HTTP answer means the
        server is up (what it thinks of the key or the model is for the first request). Asked
        once: a server that answered is not asked again, here or before the first request."""
        import requests

        if self._reached:
            self._check_takes_images()
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
        self._check_takes_images()

    def _check_takes_images(self) -> None:
        """With ``--with-image``: one request with a 64x64 image and a one-token answer (plus
        :attr:`probe_fields`). A server that refuses it (HTTP 400/415/422/501 at once, a 500
        again after one retry: "is not a multimodal model", "image input is not supported",
        "0 images allowed") stops the run here, before any work."""
        if not self.uses_image or self._took_image:
            return
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What colour is this image? One word."},
                    _probe_image().content_part(),
                ],
            }
        ]
        body = {
            "model": self.model,
            "messages": messages,
            "max_tokens": 1,
            "temperature": 0.0,
            **self.probe_fields,
        }
        try:
            with_retries(
                lambda: self._post(body, completion_text, image_probe=True),
                1,  # a 500 may be load: once more; llama.cpp's refusal is a 500 too
                self.options.backoff_seconds,
                self.options.max_wait_seconds,
                self._sleep,
            )
        except (FetchError, ItemFailed) as error:
            reason = error.reason
            detail = f": {error.detail}" if error.detail else ""
            asked = " and " + ", ".join(sorted(self.probe_fields)) if self.probe_fields else ""
            raise RewriterUnavailable(
                f"{self.shown_url} did not take an image{asked} for model {self.model!r} "
                f"({reason}{detail}); serve a vision-language model with image input enabled, "
                "or drop --with-image"
            ) from None
        self._took_image = True

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

    def _complete(
        self,
        conversation: Conversation,
        attempt: int,
        extra: dict[str, Any] | None = None,
        read: Reader = completion_text,
    ) -> Any:
        messages = conversation() if callable(conversation) else conversation
        if isinstance(messages, ItemFailed):
            return messages
        options = self.options
        body = {
            "model": self.model,
            "messages": messages,
            "max_tokens": options.max_tokens,
            "temperature": 0.0 if attempt == 0 else options.retry_temperature,
            **(extra or {}),
        }
        try:
            return with_retries(
                lambda: self._post(body, read),
                options.retries,
                options.backoff_seconds,
                options.max_wait_seconds,
                self._sleep,
            )
        except FetchError as error:  # retries exhausted
            return ItemFailed(error.reason, error.detail or "")
        except ItemFailed as error:
            return error

    def _post(self, body: dict[str, Any], read: Reader, image_probe: bool = False) -> Any:
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
        if image_probe and status in (400, 415, 422, 501):
            # a refusal of the image itself, not load: retrying will not change it
            raise ItemFailed(f"http-{status}", _error_message(response))
        if status == 429 or status >= 500:
            raise Retryable(
                f"http-{status}",
                _error_message(response),
                retry_after_seconds(response.headers.get("Retry-After")),
            )
        if status != 200:  # 400: e.g. the prompt is too long for the model; this item only
            raise ItemFailed(f"http-{status}", _error_message(response))
        try:
            return read(response.json())
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise Retryable("bad-response", "answer is not a chat completion") from None
