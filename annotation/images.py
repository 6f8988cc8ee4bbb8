"""``surd annotate serve-images``: the workspace's images over HTTP, read-only, for annotators.

``GET /images/<sha256>`` returns the stored bytes with their media type; anything else is 404,
and methods other than GET, HEAD and OPTIONS are 405. It binds to the address the user gives
(127.0.0.1 by default: open it wider only on a network you trust) and serves nothing but images
the workspace holds.

CORS: Label Studio's editor loads task images with ``crossorigin="anonymous"``, so a browser
draws an image only if the response allows the page's origin. Every image response says so
(``Access-Control-Allow-Origin``: ``*`` by default, the read-only public-asset value; or the
requesting origin when it is one of ``cors_origins``, with ``Vary: Origin``), and ``OPTIONS``
answers a preflight. Caching: the name is the content's hash, so responses are ``immutable`` for
a year. A browser that fetched an image from a server that sent no CORS header keeps that
response and would refuse it forever; the default URL template therefore carries a query
(``?cors=1``, ignored here) that makes it a different cache entry.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from annotation.tasks import media_type
from surd_builder.errors import InputError
from surd_builder.image_store import read_shard_images
from surd_builder.workspace import Workspace

_IMAGE_PATH = re.compile(r"^/images/([0-9a-f]{64})$")
RELOAD_SECONDS = 2.0
ANY_ORIGIN = "*"
ALLOWED_METHODS = "GET, HEAD, OPTIONS"
# what a preflight may ask for: the headers browsers send on an image fetch
ALLOWED_REQUEST_HEADERS = ("accept", "range", "if-none-match", "if-modified-since", "cache-control")


def cors_origins(values: Iterable[str]) -> tuple[str, ...]:
    """``--cors-origin`` values as origins (``scheme://host[:port]``, or ``*``); a Label Studio
    URL with a path is reduced to its origin. One-line error for anything else."""
    origins = []
    for value in values:
        value = value.strip()
        if value == ANY_ORIGIN:
            origins.append(ANY_ORIGIN)
            continue
        origins.append(_origin(value))
    if not origins:
        return (ANY_ORIGIN,)
    return (ANY_ORIGIN,) if ANY_ORIGIN in origins else tuple(dict.fromkeys(origins))


def _origin(value: str) -> str:
    """``value`` as the Origin header a browser sends for it: scheme://host[:port], the
    port left out when it is the scheme's default."""
    problem = (
        f"--cors-origin {value!r} is not an origin: give '*' or scheme://host[:port], e.g. "
        "http://127.0.0.1:8080 (the address annotators open Label Studio at)"
    )
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        raise InputError(problem) from None
    if parts.scheme not in ("http", "https") or not parts.hostname or "@" in parts.netloc:
        raise InputError(problem)
    host = parts.hostname.lower()
    host = f"[{host}]" if ":" in host else host
    default = {"http": 80, "https": 443}[parts.scheme]
    return f"{parts.scheme}://{host}" + (f":{port}" if port not in (None, default) else "")


class ImageServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        workspace: Workspace,
        host: str = "127.0.0.1",
        port: int = 8081,
        reload_seconds: float = RELOAD_SECONDS,
        allowed_origins: Iterable[str] = (ANY_ORIGIN,),
    ):
        self.workspace = workspace
        self.reload_seconds = reload_seconds
        self.allowed_origins = cors_origins(allowed_origins)
        self._lock = threading.Lock()  # the workspace's image index is not thread-safe
        self._reloaded_at = 0.0
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def url_template(self) -> str:
        """What ``surd annotate push --image-url-template`` should be for this server."""
        return f"{self.url}/images/{{image_sha256}}?cors=1"

    def allow_origin(self, origin: str | None) -> str | None:
        """The ``Access-Control-Allow-Origin`` value for a request from ``origin``."""
        if self.allowed_origins == (ANY_ORIGIN,):
            return ANY_ORIGIN
        if origin and origin.lower() in self.allowed_origins:
            return origin
        return None

    def image(self, sha256: str) -> bytes | None:
        with self._lock:
            index = self.workspace.image_index()
            if sha256 not in index and time.monotonic() - self._reloaded_at >= self.reload_seconds:
                # a scrape may have added images since; at most once per reload_seconds, so
                # requests for unknown names cannot make the server re-read every shard
                self._reloaded_at = time.monotonic()
                self.workspace.reload_image_index()
                index = self.workspace.image_index()
            shard = index.get(sha256)
        if shard is None:
            return None
        return read_shard_images(shard, [sha256]).get(sha256)  # outside the lock


class _Handler(BaseHTTPRequestHandler):
    server: ImageServer
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, *args: object) -> None:  # one line per image is noise
        pass

    def _cors_headers(self) -> None:
        allowed = self.server.allow_origin(self.headers.get("Origin"))
        if allowed is not None:
            self.send_header("Access-Control-Allow-Origin", allowed)
        if allowed != ANY_ORIGIN:
            self.send_header("Vary", "Origin")  # the answer depends on who asks
        # a page that isolates itself (COEP) may still embed these images
        self.send_header("Cross-Origin-Resource-Policy", "cross-origin")

    def _plain(self, status: int, text: str, head_only: bool = False, **headers: str) -> None:
        body = f"{text}\n".encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self._cors_headers()
        self.end_headers()
        if not head_only:
            self.wfile.write(body)

    def _respond(self, head_only: bool) -> None:
        match = _IMAGE_PATH.match(self.path.split("?", 1)[0])
        data = self.server.image(match.group(1)) if match else None
        if data is None:
            self._plain(404, "not found", head_only)
            return
        self.send_response(200)
        self.send_header("Content-Type", media_type(data))
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "public, max-age=31536000, immutable")
        self.send_header("ETag", f'"{match.group(1)}"')
        self.send_header("X-Content-Type-Options", "nosniff")
        self._cors_headers()
        self.end_headers()
        if not head_only:
            self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._respond(head_only=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._respond(head_only=True)

    def do_OPTIONS(self) -> None:  # noqa: N802
        """A CORS preflight (or a plain OPTIONS): what this server allows."""
        if (self.headers.get("Content-Length") or "0").strip() != "0" or self.headers.get(
            "Transfer-Encoding"
        ):
            self.close_connection = True  # a body is not read, so it must not be a next request
        self.send_response(204)
        self.send_header("Allow", ALLOWED_METHODS)
        self.send_header("Access-Control-Allow-Methods", ALLOWED_METHODS)
        asked = self.headers.get("Access-Control-Request-Headers") or ""
        granted = [
            h.strip() for h in asked.split(",") if h.strip().lower() in ALLOWED_REQUEST_HEADERS
        ]
        if granted:
            self.send_header("Access-Control-Allow-Headers", ", ".join(granted))
        if (
            self.headers.get("Access-Control-Request-Private-Network", "").lower() == "true"
            and self.server.allowed_origins != (ANY_ORIGIN,)
            and self.server.allow_origin(self.headers.get("Origin")) is not None
        ):
            # Chrome's Private Network Access: a page on a public address loading from this
            # private one. Granted only to origins named with --cors-origin, never for '*'
            self.send_header("Access-Control-Allow-Private-Network", "true")
        self.send_header("Access-Control-Max-Age", "86400")
        self.send_header("Content-Length", "0")
        self._cors_headers()
        self.end_headers()

    def _not_allowed(self) -> None:
        # the body is not read: the connection ends with this answer, so the body can never
        # be taken for a next request on it
        self.close_connection = True
        self._plain(
            405, "read-only: GET, HEAD or OPTIONS", Allow=ALLOWED_METHODS, Connection="close"
        )

    do_POST = do_PUT = do_DELETE = do_PATCH = _not_allowed  # noqa: N815
