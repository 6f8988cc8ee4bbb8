"""Opt-out at collection time: ``X-Robots-Tag`` headers and ``robots.txt``.

Both are on by default; ``surd build scrape ... --ignore-opt-out`` is the only way to turn them
off. An item that is opted out is not stored and ends as a failure with reason ``opted-out``.

**X-Robots-Tag** (every source's image responses): the directives ``noai``, ``noimageai``,
``noindex``, ``noimageindex`` and ``none`` opt out, when unscoped or scoped to surd (``surd:
noai``) or to every agent (``*: noai``); directives scoped to another agent (``googlebot:
noindex``) do not apply. Several headers are read one by one; in one header, an ``agent:`` prefix
applies to the directives after it. Parsed in ``pipelines.x_robots``, applied by
``pipelines.download.Fetcher.get_image``.

**robots.txt** (the ``urls`` source, whose items are pages of the open web; API sources are
governed by their API terms): fetched once per origin (scheme, host and port) per process,
following up to 5 redirects, kept for its ``Cache-Control: max-age`` clamped to 1 minute..24
hours (24 hours without one), and evaluated for the product token ``surd`` with ``protego``
(RFC 9309: longest match wins, ``*`` and ``$`` patterns, groups of one agent merged). Every hop
of a redirect is checked before it is requested. As RFC 9309 and the major crawlers do:

- a 2xx answer is parsed (a UTF-8 byte-order mark is dropped); lines that are not rules are
  ignored, so a malformed file allows what it does not clearly disallow;
- a 4xx answer (404, 403...) other than 429 means no rules: everything is allowed;
- a 429 or 5xx answer, a timeout or an unreachable host means "disallowed for now": the item
  fails with ``robots-unavailable`` (not ``opted-out``), is retried on the next run, and the
  origin is asked again after 5 minutes.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from pipelines.fetch_errors import FetchError, OptedOut
from pipelines.url_policy import check_url
from pipelines.x_robots import PRODUCT_TOKEN

ROBOTS_TTL_SECONDS = 24 * 3600.0
MIN_TTL_SECONDS = 60.0
UNAVAILABLE_TTL_SECONDS = 300.0


class _Options(Protocol):
    @property
    def allowed_hosts(self) -> tuple[str, ...]: ...


class _Page(Protocol):
    @property
    def data(self) -> bytes: ...

    @property
    def cache_control(self) -> str: ...


class RobotsFetcher(Protocol):
    """What robots.txt needs of a fetcher (``pipelines.download.Fetcher`` is one): a protocol,
    so that this module does not import the fetcher, which applies its X-Robots-Tag rules."""

    @property
    def options(self) -> _Options: ...

    def get(self, url: str) -> _Page: ...


@dataclass
class _Rules:
    parser: Any | None  # a protego.Protego; None: robots.txt could not be read
    expires: float
    detail: str


def _max_age(cache_control: str) -> float | None:
    match = re.search(r"max-age\s*=\s*(\d+)", cache_control or "")
    return float(match.group(1)) if match else None


class RobotsPolicy:
    """robots.txt rules per host, fetched once (one request per host even with many threads)."""

    def __init__(
        self,
        fetcher: RobotsFetcher,
        agent: str = PRODUCT_TOKEN,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.fetcher, self.agent, self.clock = fetcher, agent, clock
        self._rules: dict[str, _Rules] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self.fetches = 0  # robots.txt requests made (tests, reports)

    def check(self, url: str) -> None:
        """Raise :class:`OptedOut` unless robots.txt lets surd fetch ``url`` (a URL that cannot
        be fetched at all raises its own ``FetchError`` first, e.g. ``bad-url``)."""
        check_url(url, self.fetcher.options.allowed_hosts)
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            return
        origin = f"{parts.scheme}://{parts.netloc}"
        rules = self._rules_for(origin)
        if rules.parser is None:
            raise OptedOut("robots-unavailable", f"{origin}/robots.txt: {rules.detail}")
        if not rules.parser.can_fetch(url, self.agent):
            raise OptedOut("opted-out", f"robots.txt of {origin} disallows {parts.path or '/'}")

    def _rules_for(self, origin: str) -> _Rules:
        with self._guard:
            lock = self._locks.setdefault(origin, threading.Lock())
        with lock:
            rules = self._rules.get(origin)
            if rules is None or rules.expires <= self.clock():
                rules = self._rules[origin] = self._fetch(origin)
            return rules

    def _fetch(self, origin: str) -> _Rules:
        from protego import Protego

        self.fetches += 1
        now = self.clock()
        try:
            fetched = self.fetcher.get(f"{origin}/robots.txt")
        except FetchError as error:
            status = error.reason.removeprefix("http-")
            if status.isdigit() and 400 <= int(status) < 500 and status != "429":
                # no rules: everything allowed
                return _Rules(Protego.parse(""), now + ROBOTS_TTL_SECONDS, error.reason)
            return _Rules(None, now + UNAVAILABLE_TTL_SECONDS, error.reason)
        parser = Protego.parse(fetched.data.decode("utf-8-sig", errors="replace"))
        ttl = _max_age(fetched.cache_control)
        ttl = (
            ROBOTS_TTL_SECONDS
            if ttl is None
            else min(max(ttl, MIN_TTL_SECONDS), ROBOTS_TTL_SECONDS)
        )
        return _Rules(parser, now + ttl, "ok")


_POLICIES: dict[str, RobotsPolicy] = {}
_POLICIES_LOCK = threading.Lock()


def shared_policy(fetcher: RobotsFetcher) -> RobotsPolicy:
    """One policy per process and fetch settings, so a worker process asks each origin once
    however many batches (and stage copies) it runs."""
    key = repr(fetcher.options)
    with _POLICIES_LOCK:
        policy = _POLICIES.get(key)
        if policy is None:
            policy = _POLICIES[key] = RobotsPolicy(fetcher)
        return policy


def forget_robots_rules() -> None:
    """Drop every cached robots.txt (as a new process starts with none)."""
    with _POLICIES_LOCK:
        _POLICIES.clear()
