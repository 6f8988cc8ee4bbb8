"""A real HTTP server on 127.0.0.1 for scraper tests, with the faults real servers have.

Routes (``n`` is any number, used to make distinct URLs):

- ``/img/n.jpg``, ``/img/n.png``: a valid 48 px JPEG / 200 px PNG (``n`` sets its colour)
- ``/status/CODE/n.jpg``: always answers CODE
- ``/flaky/K/n.jpg``: 500 for the first K requests of that path, then the image
- ``/retry-after/SECONDS/n.jpg``: 429 with ``Retry-After: SECONDS`` once, then the image
- ``/truncated/n.jpg``: declares more bytes than it sends, then closes
- ``/html/n.jpg``: an HTML page; ``/octet/n.jpg``: an image served as application/octet-stream
- ``/corrupt/n.jpg``: ``image/jpeg`` that is not a JPEG
- ``/slow/SECONDS/n.jpg``: waits before answering
- ``/redirect/n.jpg`` -> ``/img/n.jpg``; ``/redirect-file/n.jpg`` -> ``file:///etc/passwd``
- ``/hold/n.jpg``: blocks until the test releases it (``server.release``), then the image
- any path in ``server.documents``: that JSON document (``bytes``: served as an HTML page)
- any path in ``server.files``: that (body, content type)
- ``server.statuses[path]``: answer that status; ``server.delays[path]``: wait that many seconds
  first; ``server.redirects[path]``: 302 to that URL; ``server.extra_headers[path]``: add those
  (name, value) headers to the answer (repeated names stay separate header lines)
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image


def jpeg(n: int, size: int = 48, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (n * 37 % 256, n * 11 % 256, 90)).save(buffer, format=fmt)
    return buffer.getvalue()


class FaultyServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hits: Counter[str] = Counter()
        self.user_agents: set[str] = set()
        self.authorizations: set[str] = set()
        self.auth_by_host: set[tuple[str, str]] = set()
        self.queries: list[tuple[str, str]] = []
        self.request_times: list[tuple[str, float]] = []  # (path, time.monotonic()) per request
        self.files: dict[str, tuple[bytes, str]] = {}  # path -> (body, content type)
        self.documents: dict[str, object] = {}
        self.statuses: dict[str, int] = {}
        self.delays: dict[str, float] = {}
        self.redirects: dict[str, str] = {}
        self.extra_headers: dict[str, list[tuple[str, str]]] = {}
        self.held = threading.Event()  # set when a /hold/ request is waiting
        self.release = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def count(self, path: str) -> int:
        with self._lock:
            self.hits[path] += 1
            return self.hits[path]

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: FaultyServer

    def log_message(self, *args):  # keep test output clean
        pass

    def _send(self, status: int, body: bytes, content_type: str, headers=()):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in [*headers, *self.server.extra_headers.get(self._path, [])]:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _image(self, name: str):
        number = int("".join(c for c in name if c.isdigit()) or 0)
        if name.endswith(".png"):
            self._send(200, jpeg(number, size=200, fmt="PNG"), "image/png")
        else:
            self._send(200, jpeg(number), "image/jpeg")

    def do_GET(self):  # noqa: N802 (http.server's name)
        path = self._path = self.path.split("?", 1)[0]
        parts = path.strip("/").split("/")
        hit = self.server.count(path)
        self.server.request_times.append((path, time.monotonic()))
        self.server.user_agents.add(self.headers.get("User-Agent", ""))
        self.server.authorizations.add(self.headers.get("Authorization", ""))
        host = self.headers.get("Host", "").rsplit(":", 1)[0]
        self.server.auth_by_host.add((host, self.headers.get("Authorization", "")))
        self.server.queries.append((path, self.path.partition("?")[2]))
        if path in self.server.delays:
            time.sleep(self.server.delays[path])
        if path in self.server.statuses:
            self._send(self.server.statuses[path], b"status", "text/plain")
            return
        if path in self.server.redirects:
            self._send(302, b"", "text/plain", [("Location", self.server.redirects[path])])
            return
        if path in self.server.files:
            self._send(200, *self.server.files[path])
            return
        if path in self.server.documents:  # API pages; bytes are served as HTML (a broken API)
            document = self.server.documents[path]
            if isinstance(document, bytes):
                self._send(200, document, "text/html")
            else:
                self._send(200, json.dumps(document).encode(), "application/json")
            return
        kind, name = parts[0], parts[-1]
        if kind == "img":
            self._image(name)
        elif kind == "status":
            self._send(int(parts[1]), b"nope", "text/plain")
        elif kind == "flaky":
            if hit <= int(parts[1]):
                self._send(500, b"try again", "text/plain")
            else:
                self._image(name)
        elif kind == "retry-after":
            if hit == 1:
                self._send(429, b"slow down", "text/plain", [("Retry-After", parts[1])])
            else:
                self._image(name)
        elif kind == "truncated":
            body = jpeg(1)
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body) * 2))
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True
        elif kind == "html":
            self._send(200, b"<html><body>not an image</body></html>", "text/html; charset=utf-8")
        elif kind == "octet":
            self._send(200, jpeg(2), "application/octet-stream")
        elif kind == "corrupt":
            self._send(200, b"\xff\xd8\xff\xe0 definitely not a jpeg", "image/jpeg")
        elif kind == "slow":
            time.sleep(float(parts[1]))
            self._image(name)
        elif kind == "redirect":
            self._send(302, b"", "text/plain", [("Location", f"/img/{name}")])
        elif kind == "redirect-file":
            self._send(302, b"", "text/plain", [("Location", "file:///etc/passwd")])
        elif kind == "hold":
            self.server.held.set()
            self.server.release.wait(timeout=60)
            self._image(name)
        else:
            self._send(404, b"not found", "text/plain")


# ----------------------------------------------------------------------------- more faults
# Added for tests/test_scrape_faults.py. ``FaultServer`` is a ``FaultyServer`` (every route and
# table above works the same) with a request log, a way to wait for requests, and these routes:
#
# - ``/trickle/n.jpg``: declares 10,000 bytes of image/jpeg, then sends one byte every 0.2 s for
#   5 s (far past a test's deadline, and bounded so a client without one fails, not hangs), then
#   closes: the body stays short
# - ``/trickle-headers/n.jpg``: the status line, then one header byte every 0.2 s for 4.2 s,
#   then the rest of the headers and the image
# - ``/huge/n.jpg``: declares 10 GB of image/jpeg, then trickles bytes like ``/trickle/``
#
# Answers stop trickling when the client leaves or the server stops. Shutdown takes at most
# 0.05 s (the poll interval), not FaultyServer's 0.5 s, and the listen backlog is 128, not 5.
#
# ``requests`` logs every request as (Host header, path, Authorization or ""), in arrival order;
# ``wait_for(predicate, timeout)`` waits until ``predicate()`` holds, woken by each new request.

import gzip  # noqa: E402 (appended section)
import struct  # noqa: E402
import zlib  # noqa: E402
from collections.abc import Callable  # noqa: E402
from functools import lru_cache  # noqa: E402
from typing import NamedTuple  # noqa: E402


def png_bomb(width: int = 40000, height: int = 40000) -> bytes:
    """The start of a valid PNG that declares ``width`` x ``height`` RGB pixels (a
    decompression bomb: a few hundred bytes on the wire, gigabytes once decoded)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\0" * (1 + 3 * width) * 4)  # a few rows of the image
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


@lru_cache(maxsize=4)
def gzip_bomb(decoded_bytes: int = 50 * 2**20) -> bytes:
    """``decoded_bytes`` zeros, gzip-compressed (50 MB become about 50 KB)."""
    return gzip.compress(b"\0" * decoded_bytes, compresslevel=9)


class SeenRequest(NamedTuple):
    host: str  # the Host header as sent: "127.0.0.1:8123", "localhost:8123"
    path: str
    authorization: str  # "" when none was sent


class FaultServer(FaultyServer):
    request_queue_size = 128  # socketserver's 5 drops connections of a 16-thread scrape

    def __init__(self):
        super().__init__()
        self.RequestHandlerClass = _FaultHandler
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)
        self.requests: list[SeenRequest] = []
        self.stopping = threading.Event()  # set on exit: trickling answers stop
        self._seen = threading.Condition()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def saw(self, request: SeenRequest) -> None:
        with self._seen:
            self.requests.append(request)
            self._seen.notify_all()

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``predicate()`` is true (checked on every new request); its result."""
        with self._seen:
            return self._seen.wait_for(predicate, timeout)

    def __exit__(self, *exc):
        self.stopping.set()
        super().__exit__(*exc)


class _FaultHandler(_Handler):
    server: FaultServer

    def do_GET(self):  # noqa: N802 (http.server's name)
        path = self.path.split("?", 1)[0]
        host, auth = self.headers.get("Host", ""), self.headers.get("Authorization", "")
        self.server.saw(SeenRequest(host, path, auth))
        kind = path.strip("/").split("/")[0]
        routes = {
            "trickle": self._trickle,
            "trickle-headers": self._trickle_headers,
            "huge": self._huge,
        }
        overridden = (
            self.server.delays,
            self.server.statuses,
            self.server.redirects,
            self.server.files,
            self.server.documents,
        )
        if kind not in routes or any(path in table for table in overridden):
            super().do_GET()
            return
        self._path = path  # what FaultyServer records for every request
        self.server.count(path)
        self.server.request_times.append((path, time.monotonic()))
        self.server.user_agents.add(self.headers.get("User-Agent", ""))
        self.server.authorizations.add(auth)
        self.server.auth_by_host.add((host.rsplit(":", 1)[0], auth))
        self.server.queries.append((path, self.path.partition("?")[2]))
        routes[kind]()
        self.close_connection = True

    def _drip(self, count: int, byte: bytes = b"\0", every: float = 0.2) -> bool:
        """Send ``count`` single bytes ``every`` seconds apart; False if the client left or the
        server is stopping."""
        for _ in range(count):
            if self.server.stopping.wait(every):
                return False
            try:
                self.wfile.write(byte)
            except OSError:
                return False
        return True

    def _declare(self, length: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(length))
        self.end_headers()

    def _trickle(self):
        self._declare(10_000)
        self._drip(25)

    def _huge(self):
        self._declare(10 * 10**9)
        self._drip(25)

    def _trickle_headers(self):
        self.wfile.write(b"HTTP/1.0 200 OK\r\nX-Slow: ")
        if not self._drip(21, b"a"):
            return
        body = jpeg(3)
        self.wfile.write(
            b"\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
