"""``surd annotate serve-images``: the workspace's images over HTTP, read-only, for annotators.

``GET /images/<sha256>`` returns the stored bytes with their media type (immutable: the name is
the content's hash, so browsers may cache forever); anything else is 404. It binds to the
address the user gives (127.0.0.1 by default: open it wider only on a network you trust) and
serves nothing but images the workspace holds.
"""

from __future__ import annotations

import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from annotation.tasks import media_type
from surd_builder.workspace import Workspace, read_shard_images

_IMAGE_PATH = re.compile(r"^/images/([0-9a-f]{64})$")
RELOAD_SECONDS = 2.0


class ImageServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        workspace: Workspace,
        host: str = "127.0.0.1",
        port: int = 8081,
        reload_seconds: float = RELOAD_SECONDS,
    ):
        self.workspace = workspace
        self.reload_seconds = reload_seconds
        self._lock = threading.Lock()  # the workspace's image index is not thread-safe
        self._reloaded_at = 0.0
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

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

    def _respond(self, head_only: bool) -> None:
        match = _IMAGE_PATH.match(self.path.split("?", 1)[0])
        data = self.server.image(match.group(1)) if match else None
        if data is None:
            body = b"not found\n"
            self.send_response(404)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head_only:
                self.wfile.write(body)
            return
        self.send_response(200)
        self.send_header("Content-Type", media_type(data))
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "public, max-age=31536000, immutable")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if not head_only:
            self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._respond(head_only=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._respond(head_only=True)
