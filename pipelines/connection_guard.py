"""Guards on each HTTP request in flight: an overall deadline, and the address it really
connects to.

- **Deadline.** ``requests`` and urllib3 time out per socket read: a server that sends one byte
  just before each read timeout holds a request as long as it likes, in its headers as in its
  body. One watchdog thread per process keeps the deadlines of the requests in flight and, when
  one passes, shuts its socket down; the blocked read returns at once and the request fails,
  which the caller reports as ``timeout``. A request costs one heap entry, not a thread.
- **Address.** The fetcher checks the address a host resolves to before it asks for a URL, but
  the connection resolves the name again: a DNS answer that changes in between (rebinding) would
  reach an address the first answer hid. So the socket's peer address is checked too, as soon as
  the connection is made and before a byte is sent on it.

A session is guarded once :func:`guard_session` has given its adapters pools whose connections
report to the :class:`RequestGuard` of the request running in their thread (a reused keep-alive
connection as well as a new one).
"""

from __future__ import annotations

import heapq
import itertools
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

_current = threading.local()  # the RequestGuard of the request this thread is making


class RequestGuard:
    """One request's deadline (:attr:`expired` once the watchdog cut its connection) and its
    check of the peer address (:attr:`refused`: the error that check raised)."""

    def __init__(self, at: float):
        self.at = at
        self.expired = False
        self.done = False
        self.check_peer: Callable[[str], None] | None = None
        self.refused: Exception | None = None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def attach(self, connection) -> None:
        """The connection a request is about to be sent on (new or kept alive); an expired
        guard sends nothing."""
        with self._lock:
            if connection.sock is not None:
                self._sock = connection.sock
            if self.expired:
                raise OSError("past the deadline before the request was sent")

    def expire(self) -> None:
        with self._lock:
            if self.done:
                return
            self.expired = True
            if self._sock is not None:  # kept here: http.client forgets it on Connection: close
                with suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)

    def finish(self) -> None:
        with self._lock:
            self.done = True
            self._sock = self.check_peer = None  # nothing held while it waits in the heap

    def connected(self, sock: socket.socket) -> None:
        """Check a new connection's peer; close it and raise ``OSError`` when it is refused."""
        with self._lock:
            self._sock = sock
        if self.check_peer is None:
            return
        try:
            self.check_peer(sock.getpeername()[0])
        except Exception as error:
            self.refused = error
            sock.close()
            raise OSError("connection refused by surd's address check") from None


class _Watchdog:
    def __init__(self):
        self._heap: list[tuple[float, int, RequestGuard]] = []
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self.active = 0  # guards not finished yet

    def add(self, guard: RequestGuard) -> None:
        with self._wake:
            self.active += 1
            if len(self._heap) > 4 * self.active + 256:
                # finished guards leave the heap only when they reach its top: drop them all
                # now and then, so it holds about the requests in flight, not every recent one
                self._heap = [entry for entry in self._heap if not entry[2].done]
                heapq.heapify(self._heap)
            heapq.heappush(self._heap, (guard.at, next(self._order), guard))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="surd-deadline", daemon=True)
                self._thread.start()
            elif self._heap[0][2] is guard:
                self._wake.notify()

    def finish(self, guard: RequestGuard) -> None:
        guard.finish()
        with self._wake:
            self.active -= 1

    def _run(self) -> None:
        while True:
            with self._wake:
                while self._heap and self._heap[0][2].done:
                    heapq.heappop(self._heap)  # finished in time
                if not self._heap:
                    self._wake.wait()
                    continue
                at, _, guard = self._heap[0]
                delay = at - time.monotonic()
                if delay > 0:
                    self._wake.wait(delay)
                    continue
                heapq.heappop(self._heap)
            guard.expire()


_WATCHDOG = _Watchdog()


@contextmanager
def guarded_request(seconds: float) -> Iterator[RequestGuard]:
    """Guard the request this thread makes in this block (through a guarded session): cut it
    once ``seconds`` have passed, and check each new connection with the guard's
    ``check_peer``."""
    guard = RequestGuard(time.monotonic() + seconds)
    outer = getattr(_current, "guard", None)  # a request made while another waits (robots.txt)
    _current.guard = guard
    _WATCHDOG.add(guard)
    try:
        yield guard
    finally:
        _WATCHDOG.finish(guard)
        _current.guard = outer


def _guarded_pool(pool_class):
    connection_class = pool_class.ConnectionCls

    class GuardedConnection(connection_class):
        def _new_conn(self):
            sock = super()._new_conn()
            guard = getattr(_current, "guard", None)
            if guard is not None:
                guard.connected(sock)  # before TLS, before the request: nothing is sent yet
            return sock

        def request(self, *args, **kwargs):
            guard = getattr(_current, "guard", None)
            if guard is not None:
                guard.attach(self)
            return super().request(*args, **kwargs)

    class GuardedPool(pool_class):
        ConnectionCls = GuardedConnection

    return GuardedPool


_POOLS: dict[str, type] = {}


def guard_session(session) -> None:
    """Make every request of ``session`` (http and https) guarded by :func:`guarded_request`."""
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    if not _POOLS:
        _POOLS.update(
            http=_guarded_pool(HTTPConnectionPool), https=_guarded_pool(HTTPSConnectionPool)
        )
    for adapter in session.adapters.values():
        manager = getattr(adapter, "poolmanager", None)
        if manager is not None:
            manager.pool_classes_by_scheme = dict(_POOLS)
