"""HTTP for the scrapers: polite, bounded and safe, one ``requests`` session per thread.

- Retries with exponential backoff on connection errors, timeouts, truncated bodies, 429 and 5xx,
  honouring ``Retry-After`` (capped); other 4xx answers fail at once.
- Connect and read timeouts; a byte cap checked against ``Content-Length`` and while streaming.
- Redirects are followed by hand so every hop is checked: only ``http``/``https``, and, unless
  ``allow_private``, no host that resolves to a private, loopback, link-local or reserved address
  (URLs from a remote API must not make surd probe the local network).
- A per-host request rate shared by all threads of the process.
- Every request carries surd's user agent. Headers given to the fetcher (API tokens) are sent but
  never appear in errors or failure details.

Failures raise :class:`FetchError` with a short ``reason`` (``http-404``, ``timeout``,
``too-large``, ``private-address``...) that becomes the failure row's reason.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, BinaryIO, TypeVar
from urllib.parse import urljoin, urlsplit

from pipelines.base import HostLimiter
from surd_builder import __version__
from surd_builder.atomic import atomic_path

DEFAULT_USER_AGENT = f"surd/{__version__} (+https://github.com/surd-dataset/surd)"
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class FetchOptions:
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    max_bytes: int = 64 * 2**20
    retries: int = 3
    backoff_seconds: float = 1.0
    max_wait_seconds: float = 120.0
    max_redirects: int = 5
    allow_private: bool = False
    per_host_rate: float = 0.0  # requests per second per host; 0: no limit
    user_agent: str = DEFAULT_USER_AGENT
    respect_opt_out: bool = True  # X-Robots-Tag on images, robots.txt for URL lists


class FetchError(Exception):
    """A request that failed for good; ``reason`` is the failure reason recorded for the item."""

    def __init__(self, reason: str, detail: str | None = None, retry_after: float | None = None):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail, self.retry_after = reason, detail, retry_after


T = TypeVar("T")


class Retryable(FetchError):
    """A failure worth another attempt (after ``retry_after`` seconds if the server said so)."""


def with_retries(
    call: Callable[[], T],
    retries: int,
    backoff_seconds: float,
    max_wait_seconds: float,
    sleep: Callable[[float], None],
) -> T:
    """``call()``, again after each :class:`Retryable` up to ``retries`` times: waiting what
    the server asked (``Retry-After``) or ``backoff_seconds * 2**n``, at most
    ``max_wait_seconds``. The last failure is raised as a plain :class:`FetchError`."""
    for attempt in range(retries + 1):
        try:
            return call()
        except Retryable as error:
            if attempt == retries:
                raise FetchError(error.reason, error.detail) from None
            delay = error.retry_after
            if delay is None:
                delay = backoff_seconds * 2**attempt
            sleep(min(delay, max_wait_seconds))
    raise AssertionError("unreachable")  # pragma: no cover


@dataclass(frozen=True)
class Fetched:
    data: bytes
    url: str | None  # after redirects (None: not fetched over HTTP)
    content_type: str  # media type, lower case, without parameters
    robots_tags: tuple[str, ...] = ()  # the X-Robots-Tag header values, one per header
    cache_control: str = ""


class HostRateLimiter:
    """At most ``rate`` requests per second to each host, across threads.

    :meth:`reserve` books the next free slot of a host and says how long to wait for it, so the
    same object can serve other processes too: an engine running a stage on several workers
    keeps one of these in one place (``surd_builder.ray_engine.SharedHostLimiter``) and every
    worker asks it, which keeps the rate for the whole run."""

    def __init__(
        self,
        rate: float,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.rate, self._sleep, self._clock = rate, sleep, clock
        self._next: dict[str, float] = {}
        self._lock = threading.Lock()

    def reserve(self, host: str) -> float:
        """Book the host's next slot; the seconds until it starts (0: now)."""
        if self.rate <= 0:
            return 0.0
        with self._lock:
            now = self._clock()
            slot = max(now, self._next.get(host, now))
            self._next[host] = slot + 1.0 / self.rate
        return slot - now

    def wait(self, host: str) -> None:
        delay = self.reserve(host)
        if delay > 0:
            self._sleep(delay)


def retry_after_seconds(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _proxies_configured() -> bool:
    import os

    proxy_variables = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}
    return any(name.lower() in proxy_variables for name in os.environ)


def _ca_bundle() -> str | None:
    """The CA bundle requests would take from the environment (it checks these two)."""
    import os

    return os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")


def check_url(url: str, allow_private: bool) -> str:
    """Return the host of ``url`` or raise: only http(s), and no private address unless allowed."""
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
    except ValueError as error:
        raise FetchError("bad-url", f"malformed URL ({error})") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise FetchError(
            "bad-url", f"only http and https URLs are fetched, not {parts.scheme or '?'}:"
        )
    if not hostname:
        raise FetchError("bad-url", "URL without a host")
    if not allow_private:
        private = _private_address(hostname)
        if private:
            raise FetchError(
                "private-address",
                f"{hostname} resolves to {private} (use --allow-private to permit)",
            )
    return hostname


@functools.lru_cache(maxsize=4096)
def _private_address(host: str) -> str | None:
    """The first non-public address ``host`` resolves to, or ``None`` (cached per process: a
    scrape asks about the same few hosts thousands of times)."""
    try:
        addresses = sorted({info[4][0] for info in socket.getaddrinfo(host, None)})
    except UnicodeError:
        raise FetchError("bad-url", f"{host!r} is not a valid host name") from None
    except OSError as error:
        raise FetchError("dns-error", f"{host}: {error.strerror or error}") from None
    for address in addresses:
        if not ipaddress.ip_address(address.split("%", 1)[0]).is_global:
            return address
    return None


def _header_values(response, name: str) -> tuple[str, ...]:
    """Every value of a repeated header, one per header line (requests joins them with commas,
    which would blur an ``agent:`` scope into the next header)."""
    raw_headers = getattr(getattr(response, "raw", None), "headers", None)
    if raw_headers is not None and hasattr(raw_headers, "getlist"):
        return tuple(raw_headers.getlist(name))
    value = response.headers.get(name)
    return (value,) if value else ()


def user_agent_for(contact: str | None) -> str:
    """``surd/<version> (+<contact>)``: every request says what it is and whom to ask."""
    return f"surd/{__version__} (+{contact})" if contact else DEFAULT_USER_AGENT


class Fetcher:
    """GETs with retries, limits and checks; safe to share between threads."""

    def __init__(
        self,
        options: FetchOptions | None = None,
        auth_headers: dict[str, str] | None = None,
        auth_host: str | None = None,
        sleep: Callable[[float], None] = time.sleep,
        limiter: HostLimiter | None = None,
    ):
        """``auth_headers`` (an API token) go only to ``auth_host``, never to image hosts or
        redirect targets elsewhere. ``limiter`` replaces this fetcher's own per-host rate
        limiter with one shared by other fetchers (other processes of the same run)."""
        self.options = options or FetchOptions()
        self._headers = {"User-Agent": self.options.user_agent}
        self._auth_headers, self._auth_host = auth_headers or {}, auth_host
        self._sleep = sleep
        self._limiter = limiter or HostRateLimiter(self.options.per_host_rate, sleep)
        self._local = threading.local()

    def _session(self):
        session = getattr(self._local, "session", None)
        if session is None:
            import requests

            session = requests.Session()
            session.headers.update(self._headers)
            # requests re-reads the whole environment on every request for proxy and CA settings
            # (a third of the CPU of a loopback download): read the CA bundle once here, and let
            # requests look per request only when proxies are configured.
            session.trust_env = _proxies_configured()
            if not session.trust_env:
                session.verify = _ca_bundle() or True
            self._local.session = session
        return session

    def get(self, url: str, params: dict[str, Any] | None = None) -> Fetched:
        """The body of ``url``, retried as described in the module docstring."""
        return self._get(url, params, None, self.options.max_bytes)

    def get_image(self, url: str, before_each_hop: Callable[[str], None] | None = None) -> Fetched:
        """:meth:`get` for an image to keep: an ``X-Robots-Tag`` opt-out that applies to surd
        (see ``pipelines.optout``) raises ``opted-out`` unless opt-outs are ignored.
        ``before_each_hop(url)`` runs before every request, redirects included (robots.txt)."""
        from pipelines.optout import OptedOut, x_robots_opt_outs

        fetched = self._get(url, None, None, self.options.max_bytes, before_each_hop)
        if self.options.respect_opt_out:
            directives = x_robots_opt_outs(list(fetched.robots_tags))
            if directives:
                raise OptedOut("opted-out", f"{fetched.url}: X-Robots-Tag {', '.join(directives)}")
        return fetched

    @property
    def robots(self):
        """robots.txt rules per origin (``pipelines.optout.RobotsPolicy``), shared by every
        fetcher of this process with the same settings."""
        from pipelines.optout import shared_policy

        return shared_policy(self)

    def download_to(self, url: str, path: Path, max_bytes: int) -> int:
        """Stream ``url`` into the file ``path``, atomically: for archives too big for memory.
        Same retries and checks as :meth:`get`; returns the size written."""
        with atomic_path(Path(path)) as temp, open(temp, "wb") as handle:
            self._get(url, None, handle, max_bytes)
            handle.flush()
            return handle.tell()

    def _get(
        self,
        url: str,
        params,
        sink: BinaryIO | None,
        max_bytes: int,
        before_each_hop: Callable[[str], None] | None = None,
    ) -> Fetched:
        options = self.options
        return with_retries(
            lambda: self._get_once(url, params, sink, max_bytes, before_each_hop),
            options.retries,
            options.backoff_seconds,
            options.max_wait_seconds,
            self._sleep,
        )

    def get_json(self, url: str, params: dict[str, Any] | None = None) -> Any:
        fetched = self.get(url, params)
        import json

        try:
            return json.loads(fetched.data)
        except ValueError:
            kind = fetched.content_type or "unknown content"
            raise FetchError("bad-json", f"{fetched.url} did not return JSON ({kind})") from None

    def _get_once(
        self,
        url: str,
        params: dict[str, Any] | None,
        sink: BinaryIO | None,
        max_bytes: int,
        before_each_hop: Callable[[str], None] | None = None,
    ) -> Fetched:
        import requests

        options = self.options
        current = url
        for _ in range(options.max_redirects + 1):
            host = check_url(current, options.allow_private)
            if before_each_hop is not None:
                before_each_hop(current)
            self._limiter.wait(host)
            try:
                response = self._session().get(
                    current,
                    params=params,
                    headers=self._auth_headers if host == self._auth_host else None,
                    stream=True,
                    allow_redirects=False,
                    timeout=(options.connect_timeout, options.read_timeout),
                )
            except requests.Timeout:
                raise Retryable("timeout", host) from None
            except requests.ConnectionError as error:
                raise Retryable("connection-error", f"{host}: {type(error).__name__}") from None
            except (requests.RequestException, ValueError) as error:  # e.g. an invalid port
                raise FetchError("bad-url", f"{host}: {type(error).__name__}") from None
            with response:
                if response.is_redirect:
                    current = urljoin(current, response.headers["Location"])
                    params = None  # they are part of the redirect target now
                    continue
                return self._read_body(response, current, sink, max_bytes)
        raise FetchError("too-many-redirects", f"more than {options.max_redirects} from {url}")

    def _read_body(self, response, url: str, sink: BinaryIO | None, limit: int) -> Fetched:
        import requests

        status = response.status_code
        if status in RETRYABLE_STATUS:
            raise Retryable(
                f"http-{status}", url, retry_after_seconds(response.headers.get("Retry-After"))
            )
        if status >= 400:
            raise FetchError(f"http-{status}", url)
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > limit:
            raise FetchError("too-large", f"{url}: {int(declared):,} bytes > {limit:,}")
        chunks, total = [], 0
        if sink is not None:  # a retry starts the file over
            sink.seek(0)
            sink.truncate()
        try:
            for chunk in response.iter_content(chunk_size=1 << 16):
                total += len(chunk)
                if total > limit:
                    raise FetchError("too-large", f"{url}: more than {limit:,} bytes")
                if sink is not None:
                    sink.write(chunk)
                else:
                    chunks.append(chunk)
        except requests.exceptions.ConnectionError as error:
            reason = "timeout" if "timed out" in str(error).lower() else "truncated"
            raise Retryable(reason, url) from None
        except requests.exceptions.ChunkedEncodingError:
            raise Retryable("truncated", url) from None
        except requests.exceptions.ContentDecodingError:
            raise FetchError("bad-encoding", url) from None
        media_type = response.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        return Fetched(
            b"".join(chunks),
            response.url or url,
            media_type,
            _header_values(response, "X-Robots-Tag"),
            response.headers.get("Cache-Control", ""),
        )
