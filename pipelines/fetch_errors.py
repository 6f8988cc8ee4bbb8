"""Why a request failed, and the retry loop around it: kept apart from the fetcher so that the
URL rules, robots.txt and the API clients (``pipelines.rewriters``) raise and retry the same
errors without importing the HTTP layer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from typing import TypeVar


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


def retry_after_seconds(value: str | None) -> float | None:
    """The wait a ``Retry-After`` header asks for (seconds or an HTTP date); ``None`` if none."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class OptedOut(FetchError):
    """The item's owner opted out (``reason`` ``opted-out``) or robots.txt could not be read
    (``robots-unavailable``); ``detail`` says how. A ``FetchError``, so it becomes the item's
    failure reason like any other."""
