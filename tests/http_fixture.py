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
