"""HTTP for the scrapers: polite, bounded and safe, one ``requests`` session per thread.

- Retries with exponential backoff on connection errors, timeouts, truncated bodies, 429 and 5xx,
  honouring ``Retry-After`` (capped); other 4xx answers fail at once.
- Connect and read timeouts, and an overall deadline per request (``deadline_seconds``, each
  redirect hop a request, counted after the hop's waits): a server that trickles a byte now and
  then cannot hold a download past it. A byte cap checked
  against ``Content-Length`` and while streaming (after decoding: a gzip bomb is cut too).
- Redirects are followed by hand so every hop is checked by the rules of
  ``pipelines.url_policy``: only ``http``/``https``; never a link-local or cloud-metadata
  address (``forbidden-address``); and no other non-public address (``private-address``) unless
  the URL's host is one the user allowed (``allowed_hosts``, ``--allow-host HOST[:PORT]``).
- A per-host request rate shared by all threads of the process.
- Every request carries surd's user agent. Headers given to the fetcher (API tokens) go only to
  the exact origin (scheme, host, port) they belong to, never over plain http to a host that is
  not loopback, and never to a redirect target on another origin; they never appear in errors
  or failure details.

- Images whose ``X-Robots-Tag`` opts out of surd are refused (``pipelines.optout``).

Failures raise :class:`~pipelines.fetch_errors.FetchError` with a short ``reason``
(``http-404``, ``timeout``, ``too-large``, ``private-address``...) that becomes the failure
row's reason.
"""

from __future__ import annotations

import functools
import ipaddress
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urljoin

from pipelines.base import HostLimiter
from pipelines.connection_guard import RequestGuard, guard_session, guarded_request
from pipelines.fetch_errors import (
    FetchError,
    OptedOut,
    Retryable,
    retry_after_seconds,
    with_retries,
)
from pipelines.url_policy import check_peer, check_url, url_origin
from pipelines.x_robots import x_robots_opt_outs
from surd_builder import __version__
from surd_builder.atomic import atomic_path

DEFAULT_USER_AGENT = f"surd/{__version__} (+https://github.com/surd-dataset/surd)"
# The deadline of one attempt at an archive (a DiffusionDB part: up to gigabytes).
ARCHIVE_DEADLINE = 24 * 3600.0
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
    #: hosts that may resolve to private or loopback addresses: "host" (any port) or "host:port"
    allowed_hosts: tuple[str, ...] = ()
    #: seconds one request (each redirect hop) may take, headers and body together, counted
    #: after its waits (robots.txt, the rate limit); see ``pipelines.connection_guard``
    deadline_seconds: float = 120.0
    per_host_rate: float = 0.0  # requests per second per host; 0: no limit
    user_agent: str = DEFAULT_USER_AGENT
    respect_opt_out: bool = True  # X-Robots-Tag on images, robots.txt for URL lists


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


def _proxies_configured() -> bool:
    import os

    proxy_variables = {"http_proxy", "https_proxy", "all_proxy"}  # no_proxy alone sets none
    return any(name.lower() in proxy_variables and value for name, value in os.environ.items())


def _proxied(url: str) -> bool:
    """Whether ``requests`` sends ``url`` through a proxy of the environment."""
    from requests.utils import get_environ_proxies, select_proxy

    return bool(select_proxy(url, get_environ_proxies(url)))


def _ca_bundle() -> str | None:
    """The CA bundle requests would take from the environment (it checks these two)."""
    import os

    return os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")


def _header_values(response, name: str) -> tuple[str, ...]:
    """Every value of a repeated header, one per header line (requests joins them with commas,
    which would blur an ``agent:`` scope into the next header)."""
    raw_headers = getattr(getattr(response, "raw", None), "headers", None)
    if raw_headers is not None and hasattr(raw_headers, "getlist"):
        return tuple(raw_headers.getlist(name))
    value = response.headers.get(name)
    return (value,) if value else ()


def _is_loopback(host: str) -> bool:
    """A loopback IP literal, or ``localhost`` (by name, not by a DNS answer that could
    change: a token in clear must not follow a rebinding name)."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def user_agent_for(contact: str | None) -> str:
    """``surd/<version> (+<contact>)``: every request says what it is and whom to ask."""
    return f"surd/{__version__} (+{contact})" if contact else DEFAULT_USER_AGENT


class Fetcher:
    """GETs with retries, limits and checks; safe to share between threads."""

    def __init__(
        self,
        options: FetchOptions | None = None,
        auth_headers: dict[str, str] | None = None,
        auth_origin: str | None = None,
        sleep: Callable[[float], None] = time.sleep,
        limiter: HostLimiter | None = None,
    ):
        """``auth_headers`` (an API token) go only to URLs of ``auth_origin`` (the API's base
        URL: its scheme, host and port), see :meth:`sends_auth`. ``limiter`` replaces this
        fetcher's own per-host rate limiter with one shared by other fetchers (other processes
        of the same run)."""
        self.options = options or FetchOptions()
        self._headers = {"User-Agent": self.options.user_agent}
        self._auth_headers = auth_headers or {}
        self._auth_origin = url_origin(auth_origin) if auth_origin else None
        self._sleep = sleep
        self._limiter = limiter or HostRateLimiter(self.options.per_host_rate, sleep)
        self._local = threading.local()

    def sends_auth(self, url: str) -> bool:
        """Whether a request to ``url`` carries the auth headers: only to the exact origin of
        the API, and over plain http only to a loopback host (a token in clear on a network is
        a token given away)."""
        if not self._auth_headers or self._auth_origin is None:
            return False
        origin = url_origin(url)
        if origin != self._auth_origin:
            return False
        return origin[0] == "https" or _is_loopback(origin[1])

    def _session(self):
        session = getattr(self._local, "session", None)
        if session is None:
            import requests

            session = requests.Session()
            session.headers.update(self._headers)
            guard_session(session)  # the deadline, and the address each connection reaches
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
        fetched = self._get(url, None, None, self.options.max_bytes, before_each_hop)
        if self.options.respect_opt_out:
            directives = x_robots_opt_outs(list(fetched.robots_tags))
            if directives:
                raise OptedOut("opted-out", f"{fetched.url}: X-Robots-Tag {', '.join(directives)}")
        return fetched

    def download_to(
        self, url: str, path: Path, max_bytes: int, deadline_seconds: float = ARCHIVE_DEADLINE
    ) -> int:
        """Stream ``url`` into the file ``path``, atomically: for archives too big for memory.
        Same retries and checks as :meth:`get`, with a deadline of its own (an archive of
        gigabytes takes longer than an image); returns the size written."""
        with atomic_path(Path(path)) as temp, open(temp, "wb") as handle:
            self._get(url, None, handle, max_bytes, deadline_seconds=deadline_seconds)
            handle.flush()
            return handle.tell()

    def _get(
        self,
        url: str,
        params,
        sink: BinaryIO | None,
        max_bytes: int,
        before_each_hop: Callable[[str], None] | None = None,
        deadline_seconds: float | None = None,
    ) -> Fetched:
        options = self.options
        return with_retries(
            lambda: self._get_once(url, params, sink, max_bytes, before_each_hop, deadline_seconds),
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
        deadline_seconds: float | None = None,
    ) -> Fetched:
        """One attempt: the request and the redirects after it, every hop checked before it is
        sent. Each request runs under a :class:`~pipelines.connection_guard.RequestGuard`,
        started once the hop's own waits (robots.txt, the rate limit) are over: it is cut at
        its deadline, and the address its connection reaches is checked."""
        import requests

        options = self.options
        seconds = options.deadline_seconds if deadline_seconds is None else deadline_seconds
        current = url
        for _ in range(options.max_redirects + 1):
            host = check_url(current, options.allowed_hosts)
            if before_each_hop is not None:
                before_each_hop(current)
            self._limiter.wait(host)
            session = self._session()
            # the name is resolved again to connect: the address reached is checked too (a DNS
            # answer that changed since check_url); through a proxy the peer is the user's proxy
            _, _, port = url_origin(current)
            proxied = session.trust_env and _proxied(current)
            with guarded_request(seconds) as guard:
                if not proxied:
                    guard.check_peer = functools.partial(
                        check_peer, host, port, options.allowed_hosts
                    )
                try:
                    try:
                        response = session.get(
                            current,
                            params=params,
                            headers=self._auth_headers if self.sends_auth(current) else None,
                            stream=True,
                            allow_redirects=False,
                            timeout=(options.connect_timeout, options.read_timeout),
                        )
                    except requests.Timeout:
                        raise Retryable("timeout", host) from None
                    except requests.ConnectionError as error:
                        if guard.refused is not None:
                            raise guard.refused from None
                        detail = f"{host}: {type(error).__name__}"
                        raise Retryable("connection-error", detail) from None
                    except (requests.RequestException, ValueError) as error:  # an invalid port
                        raise FetchError("bad-url", f"{host}: {type(error).__name__}") from None
                    with response:
                        if not response.is_redirect:
                            return self._read_body(response, current, sink, max_bytes, guard)
                        current = urljoin(current, response.headers["Location"])
                        params = None  # they are part of the redirect target now
                except FetchError:
                    if not guard.expired or guard.refused is not None:
                        raise
                    raise Retryable(
                        "timeout", f"{current}: not complete within {seconds:g} s"
                    ) from None
        raise FetchError("too-many-redirects", f"more than {options.max_redirects} from {url}")

    def _read_body(
        self, response, url: str, sink: BinaryIO | None, limit: int, guard: RequestGuard
    ) -> Fetched:
        from urllib3.exceptions import DecodeError, ProtocolError, ReadTimeoutError

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
        # read1: whatever the socket has (one read), so the deadline is looked at between reads
        # however slowly the bytes come; iter_content would wait for a full chunk first
        read = response.raw.read1
        while True:
            if time.monotonic() > guard.at:
                guard.expired = True  # reported as the deadline's timeout by the caller
                raise Retryable("timeout", url)
            try:
                chunk = read(1 << 16, decode_content=True)
            except ReadTimeoutError:
                raise Retryable("timeout", url) from None
            except ProtocolError:
                raise Retryable("truncated", url) from None
            except DecodeError:
                raise FetchError("bad-encoding", url) from None
            except OSError as error:  # a reset connection under the urllib3 layer
                raise Retryable("truncated", f"{url}: {type(error).__name__}") from None
            if not chunk:
                break
            total += len(chunk)
            if total > limit:
                raise FetchError("too-large", f"{url}: more than {limit:,} bytes")
            if sink is None:
                chunks.append(chunk)
            else:
                sink.write(chunk)  # a disk error is the machine's, not the server's: no retry
        media_type = response.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        return Fetched(
            b"".join(chunks),
            response.url or url,
            media_type,
            _header_values(response, "X-Robots-Tag"),
            response.headers.get("Cache-Control", ""),
        )
