"""Scrape faults against real servers on 127.0.0.1: address rules (allowed hosts, private,
link-local and metadata addresses in every spelling, every redirect hop), the per-attempt
deadline, size and decode limits, the API token's origin, NSFW levels, unreachable sources and
a scrape killed with SIGKILL.

Nothing here connects anywhere but loopback: ``network_guard`` (autouse) refuses every
in-process connection to another address and records it, so a check that happens too late shows
as a recorded attempt (and a ``connection-error``), never as traffic.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.download import Fetcher, FetchOptions
from pipelines.fetch_errors import FetchError
from pipelines.runner import RunOptions, run_stage
from pipelines.scrape import ScrapeStage
from pipelines.sources.civitai import CivitaiImages, CivitaiModels
from pipelines.sources.urls import UrlListSource
from surd_builder.atomic import TEMP_PREFIX
from surd_builder.workspace import Workspace
from tests.conftest import run_surd
from tests.http_fixture import FaultServer, gzip_bomb, jpeg, png_bomb

QUIET = RunOptions(batch_size=32, show_progress=False)
SECRET = f"surd-test-token-{uuid.uuid4().hex}"  # unique: found nowhere it was not put
BEARER = f"Bearer {SECRET}"


def fetch_options(**changes) -> FetchOptions:
    """Loopback allowed, no backoff, short timeouts. Built per test: ``allowed_hosts`` and
    ``deadline_seconds`` are new fields, so a module-level constant would fail collection."""
    settings = {
        "allowed_hosts": ("127.0.0.1",),
        "retries": 0,
        "backoff_seconds": 0.0,
        "connect_timeout": 0.5,
        "read_timeout": 2.0,
        "deadline_seconds": 5.0,
    }
    return FetchOptions(**{**settings, **changes})


# ----------------------------------------------------------------------------- fixtures
def _loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


class NetworkGuard:
    """Connections to non-loopback addresses: recorded, and refused unless ``forward`` maps the
    address to a loopback port (then they go there instead)."""

    def __init__(self):
        self.attempts: list[str] = []
        self.forward: dict[str, int] = {}

    def target(self, address):
        if isinstance(address, tuple) and not _loopback(str(address[0])):
            host = str(address[0])
            self.attempts.append(host)
            if host not in self.forward:
                raise ConnectionRefusedError(f"test guard: no connections to {host}")
            return ("127.0.0.1", self.forward[host])
        return address


@pytest.fixture(autouse=True)
def network_guard(monkeypatch):
    guard = NetworkGuard()
    connect, connect_ex = socket.socket.connect, socket.socket.connect_ex
    monkeypatch.setattr(socket.socket, "connect", lambda s, a: connect(s, guard.target(a)))
    monkeypatch.setattr(socket.socket, "connect_ex", lambda s, a: connect_ex(s, guard.target(a)))
    return guard


@pytest.fixture
def server():
    """tests.http_fixture.FaultServer: FaultyServer's routes plus a request log and trickles."""
    from pipelines.optout import forget_robots_rules

    forget_robots_rules()  # ports are reused: robots.txt rules of earlier tests do not apply
    with FaultServer() as running:
        yield running


@pytest.fixture
def other_server():
    with FaultServer() as running:
        yield running


def write_list(path: Path, urls: list[str]) -> Path:
    rows = [{"url": url, "prompt": f"lighthouse {n}, 8k, artstation"} for n, url in enumerate(urls)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def failed_reasons(workspace: Workspace, stage: str) -> dict[str, str]:
    rows = workspace.read_failures(stage).to_pylist()
    return {row["source_item_id"]: row["reason"] for row in rows}


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def civitai_item(n: int, url: str, **fields) -> dict:
    item = {
        "id": n,
        "url": url,
        "width": 48,
        "height": 48,
        "username": f"artist{n}",
        "meta": {"prompt": f"tower {n}, fantasy, 8k", "seed": 100 + n},
    }
    return {**item, **fields}


# ----------------------------------------------------------------------------- addresses
@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1/x.jpg",
        "http://[::ffff:10.0.0.1]/x",
        "http://167772161/x.jpg",  # 10.0.0.1 in decimal
        "http://192.168.7.7:8080/x.jpg",
        "http://[fd12:3456::1]/x.jpg",
    ],
)
def test_private_addresses_are_refused_before_connecting(network_guard, url):
    with pytest.raises(FetchError) as error:
        Fetcher(fetch_options()).get(url)
    assert error.value.reason == "private-address"
    assert "--allow-host" in (error.value.detail or "")
    assert network_guard.attempts == []


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("http://169.254.169.254/latest/meta-data", ()),
        ("http://169.254.169.254/latest/meta-data", ("169.254.169.254",)),
        ("http://169.254.169.254:80/latest/meta-data", ("169.254.169.254:80",)),
        ("http://[::ffff:169.254.169.254]/x", ()),
        ("http://[::ffff:a9fe:a9fe]/x", ()),
        ("http://2852039166/x", ("2852039166",)),  # decimal
        ("http://0xa9fea9fe/x", ("0xa9fea9fe",)),  # hex
        ("http://0251.0376.0251.0376/x", ("0251.0376.0251.0376",)),  # octal
        ("http://169.254.10.20:8080/x.jpg", ("169.254.10.20",)),  # any link-local
        ("http://[fe80::1]/x.jpg", ()),
        ("http://[fd00:ec2::254]/latest/meta-data", ()),
        ("http://100.100.100.200/latest/meta-data", ("100.100.100.200",)),
        ("http://[::a9fe:a9fe]/x", ()),  # IPv4-compatible (deprecated) form
        ("http://[64:ff9b::a9fe:a9fe]/x", ()),  # NAT64
        ("http://168.63.129.16/machine", ("168.63.129.16",)),  # Azure WireServer
    ],
)
def test_link_local_and_metadata_addresses_are_always_forbidden(network_guard, url, allowed):
    options = fetch_options(allowed_hosts=("127.0.0.1", *allowed))
    with pytest.raises(FetchError) as error:
        Fetcher(options).get(url)
    assert error.value.reason == "forbidden-address"
    assert network_guard.attempts == []


def test_loopback_needs_an_allowed_host_entry(server, other_server):
    with pytest.raises(FetchError) as error:
        Fetcher(FetchOptions(retries=0)).get(f"{server.base}/img/1.jpg")
    assert error.value.reason == "private-address"
    assert "--allow-host" in (error.value.detail or "")
    assert server.requests == []

    # "host:port" allows that port only
    only_this_port = Fetcher(fetch_options(allowed_hosts=(f"127.0.0.1:{server.port}",)))
    assert only_this_port.get(f"{server.base}/img/1.jpg").data == jpeg(1)
    with pytest.raises(FetchError) as error:
        only_this_port.get(f"{other_server.base}/img/1.jpg")
    assert error.value.reason == "private-address"
    assert other_server.requests == []

    # "host" allows every port of that host name, and only that name
    by_name = Fetcher(fetch_options(allowed_hosts=("localhost",)))
    assert by_name.get(f"http://localhost:{other_server.port}/img/2.jpg").data == jpeg(2)
    with pytest.raises(FetchError) as error:
        by_name.get(f"{server.base}/img/2.jpg")
    assert error.value.reason == "private-address"
    assert "/img/2.jpg" not in {r.path for r in server.requests}


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("file:///etc/passwd", "bad-url"),
        ("http://10.0.0.1/x.jpg", "private-address"),
        ("http://[::ffff:10.0.0.1]/x", "private-address"),
        ("http://169.254.169.254/latest/meta-data", "forbidden-address"),
        ("http://2852039166/latest/meta-data", "forbidden-address"),
        ("http://0xa9fea9fe/x", "forbidden-address"),
        ("http://0251.0376.0251.0376/x", "forbidden-address"),
        ("http://[::ffff:169.254.169.254]/x", "forbidden-address"),
    ],
)
def test_every_redirect_hop_is_checked(server, network_guard, target, reason):
    server.redirects["/hop/1.jpg"] = target
    # the metadata hosts are "allowed" too: forbidden addresses stay forbidden
    allowed = ("127.0.0.1", "169.254.169.254", "2852039166", "0xa9fea9fe")
    with pytest.raises(FetchError) as error:
        Fetcher(fetch_options(allowed_hosts=allowed)).get(f"{server.base}/hop/1.jpg")
    assert error.value.reason == reason
    assert server.hits["/hop/1.jpg"] == 1  # the redirect was read, its target refused
    assert network_guard.attempts == []


def test_a_redirect_loop_is_too_many_redirects(server):
    server.redirects["/loop/a.jpg"] = "/loop/b.jpg"
    server.redirects["/loop/b.jpg"] = f"{server.base}/loop/a.jpg"
    with pytest.raises(FetchError) as error:
        Fetcher(fetch_options(max_redirects=3)).get(f"{server.base}/loop/a.jpg")
    assert error.value.reason == "too-many-redirects"
    assert 3 <= server.hits["/loop/a.jpg"] + server.hits["/loop/b.jpg"] <= 5


# ----------------------------------------------------------------------------- responses
@pytest.mark.parametrize(
    ("path", "changes", "reason"),
    [
        ("/status/503/1.jpg", {"retries": 1}, "http-503"),
        ("/status/502/1.jpg", {}, "http-502"),
        ("/truncated/1.jpg", {}, "truncated"),
        ("/huge/1.jpg", {}, "too-large"),  # 10 GB declared; the body trickles: never read
        ("/gzip/1.png", {"max_bytes": 2**20}, "too-large"),  # 50 MB of zeros, gzipped
    ],
)
def test_broken_responses_fail_with_a_reason(server, path, changes, reason):
    server.files["/gzip/1.png"] = (gzip_bomb(), "image/png")
    server.extra_headers["/gzip/1.png"] = [("Content-Encoding", "gzip")]
    started = time.monotonic()
    with pytest.raises(FetchError) as error:
        Fetcher(fetch_options(**changes)).get(server.base + path)
    assert error.value.reason == reason
    assert time.monotonic() - started < 3  # the deadline is 5 s: decided, not waited out
    assert server.hits[path] == 1 + changes.get("retries", 0)


def test_a_trickling_body_ends_at_the_deadline(server):
    fetcher = Fetcher(fetch_options(deadline_seconds=1.0, read_timeout=2.0, retries=0))
    started = time.monotonic()
    with pytest.raises(FetchError) as error:
        fetcher.get(f"{server.base}/trickle/1.jpg")  # a byte every 0.2 s: no read times out
    elapsed = time.monotonic() - started
    assert error.value.reason == "timeout"
    assert 0.9 <= elapsed < 4
    assert server.hits["/trickle/1.jpg"] == 1


def test_trickling_headers_end_at_the_deadline(server):
    fetcher = Fetcher(fetch_options(deadline_seconds=1.0, read_timeout=2.0, retries=0))
    started = time.monotonic()
    with pytest.raises(FetchError) as error:
        fetcher.get(f"{server.base}/trickle-headers/1.jpg")  # headers take 4.2 s, a byte a time
    elapsed = time.monotonic() - started
    assert error.value.reason == "timeout"
    assert elapsed < 4


def test_an_x_robots_tag_noai_image_is_opted_out(server):
    server.extra_headers["/img/7.jpg"] = [("X-Robots-Tag", "noai")]
    with pytest.raises(FetchError) as error:
        Fetcher(fetch_options()).get_image(f"{server.base}/img/7.jpg")
    assert error.value.reason == "opted-out"


def test_scrape_ends_every_fault_as_a_sample_or_a_failure_row(
    tmp_path, workspace, server, network_guard
):
    base = server.base
    server.files["/fake/6.jpg"] = (b"<!doctype html><html><body>hi</body></html>", "image/jpeg")
    server.files["/bomb/9.png"] = (png_bomb(40000, 40000), "image/png")
    server.files["/gzip/10.png"] = (gzip_bomb(), "image/png")
    server.extra_headers["/gzip/10.png"] = [("Content-Encoding", "gzip")]
    server.redirects["/to-private/12.jpg"] = "http://10.0.0.1/12.jpg"
    server.redirects["/to-metadata/13.jpg"] = "http://169.254.169.254/latest/meta-data"
    server.redirects["/loop/14.jpg"] = "/loop/14b.jpg"
    server.redirects["/loop/14b.jpg"] = "/loop/14.jpg"
    server.extra_headers["/img/15.jpg"] = [("X-Robots-Tag", "noai")]
    outcomes = {
        f"{base}/retry-after/1/1.jpg": None,  # 429, Retry-After: 1, then the image
        f"{base}/flaky/1/2.jpg": None,  # 500, then the image
        f"{base}/status/503/3.jpg": "http-503",
        f"{base}/truncated/4.jpg": "truncated",
        f"{base}/trickle/5.jpg": "timeout",
        f"{base}/fake/6.jpg": "not-an-image",  # HTML served as image/jpeg
        f"{base}/html/7.jpg": "not-an-image",  # text/html
        f"{base}/huge/8.jpg": "too-large",
        f"{base}/bomb/9.png": "too-large",  # a PNG declaring 40000 x 40000 pixels
        f"{base}/gzip/10.png": "too-large",
        f"{base}/redirect-file/11.jpg": "bad-url",
        f"{base}/to-private/12.jpg": "private-address",
        f"{base}/to-metadata/13.jpg": "forbidden-address",
        f"{base}/loop/14.jpg": "too-many-redirects",
        f"{base}/img/15.jpg": "opted-out",
        "http://10.0.0.1/16.jpg": "private-address",
        "http://0251.0376.0251.0376/17.jpg": "forbidden-address",
        f"{base}/img/18.jpg": None,
    }
    options = fetch_options(
        retries=1, read_timeout=1.0, deadline_seconds=1.0, max_bytes=2**20, max_redirects=3
    )
    listing = write_list(tmp_path / "list.jsonl", list(outcomes))
    run_stage(ScrapeStage(UrlListSource(listing), options, threads=len(outcomes)), workspace, QUIET)

    failures = workspace.read_failures("scrape-urls").to_pylist()
    assert {row["source_item_id"]: row["reason"] for row in failures} == {
        url: reason for url, reason in outcomes.items() if reason
    }
    details = {row["source_item_id"]: row["detail"] or "" for row in failures}
    assert "--allow-host" in details["http://10.0.0.1/16.jpg"]
    assert "--allow-host" in details[f"{base}/to-private/12.jpg"]
    samples = {r["source_item_id"]: r for r in workspace.read_table("samples").to_pylist()}
    assert set(samples) == {url for url, reason in outcomes.items() if reason is None}
    stored = workspace.read_images([samples[f"{base}/flaky/1/2.jpg"]["image_sha256"]])
    assert list(stored.values()) == [jpeg(2)]
    # Retry-After: 1 was waited out between the two requests the server saw
    asked = [at for path, at in server.request_times if path == "/retry-after/1/1.jpg"]
    assert len(asked) == 2 and asked[1] - asked[0] >= 0.95
    assert server.hits["/status/503/3.jpg"] == 2  # retried once
    assert network_guard.attempts == []


# ----------------------------------------------------------------------------- the API token
def test_the_token_goes_only_to_the_exact_api_origin(server, other_server):
    api, elsewhere = server, other_server
    api.redirects["/away/4.jpg"] = f"{elsewhere.base}/img/4.jpg"
    options = fetch_options(allowed_hosts=("127.0.0.1", "localhost"))
    fetcher = Fetcher(options, auth_headers={"Authorization": BEARER}, auth_origin=api.base)
    for url in (
        f"{api.base}/img/1.jpg",
        f"{elsewhere.base}/img/2.jpg",  # same host, another port
        f"http://localhost:{api.port}/img/3.jpg",  # same address, another host name
        f"{api.base}/away/4.jpg",  # the API origin redirects elsewhere
    ):
        fetcher.get(url)
    seen = {(r.host, r.path): r.authorization for r in api.requests + elsewhere.requests}
    assert seen == {
        (f"127.0.0.1:{api.port}", "/img/1.jpg"): BEARER,
        (f"127.0.0.1:{elsewhere.port}", "/img/2.jpg"): "",
        (f"localhost:{api.port}", "/img/3.jpg"): "",
        (f"127.0.0.1:{api.port}", "/away/4.jpg"): BEARER,
        (f"127.0.0.1:{elsewhere.port}", "/img/4.jpg"): "",
    }

    # an origin is scheme, host and port: none of these is the server's origin
    for origin in (f"https://127.0.0.1:{api.port}", elsewhere.base, f"http://localhost:{api.port}"):
        Fetcher(options, auth_headers={"Authorization": BEARER}, auth_origin=origin).get(
            f"{api.base}/img/5.jpg"
        )
    assert [r.authorization for r in api.requests if r.path == "/img/5.jpg"] == ["", "", ""]


def test_the_token_never_goes_over_plain_http_to_a_remote_host(server, network_guard):
    remote = "93.184.215.14"  # a global address; the guard hands its connections to the server
    network_guard.forward[remote] = server.port
    url = f"http://{remote}:{server.port}/img/6.jpg"
    # the connection really reaches loopback, which the peer-address check refuses unless the
    # host is allowed: allow it, as a user naming their own mirror would
    options = fetch_options(allowed_hosts=(remote,))
    assert Fetcher(options).get(url).data == jpeg(6)  # the forwarding works
    fetcher = Fetcher(
        options,
        auth_headers={"Authorization": BEARER},
        auth_origin=f"http://{remote}:{server.port}",
    )
    assert not fetcher.sends_auth(url)  # plain http to a host that is not loopback
    secure = Fetcher(options, {"Authorization": BEARER}, auth_origin=f"https://{remote}")
    assert secure.sends_auth(f"https://{remote}/api") and not secure.sends_auth(url)
    try:
        fetcher.get(url)
    except FetchError as error:  # refusing the request is fine too, for a reason of its own
        assert error.reason not in ("connection-error", "timeout"), error
    assert [r.authorization for r in server.requests] in ([""], ["", ""])
    assert set(network_guard.attempts) == {remote}


def test_sources_expose_their_api_origin():
    assert CivitaiImages(base_url="http://127.0.0.1:8123").api_origin == "http://127.0.0.1:8123"
    assert CivitaiModels(base_url="http://127.0.0.1:8123/").api_origin == "http://127.0.0.1:8123"
    mirror = CivitaiImages(base_url="https://mirror.example/civitai")
    assert mirror.api_origin == "https://mirror.example"
    assert CivitaiImages().api_origin == "https://civitai.com"


def test_civitai_token_end_to_end_reaches_only_the_api_origin_and_is_stored_nowhere(
    tmp_path, server, other_server
):
    api, images = server, other_server
    api.redirects["/away/4.jpg"] = f"{images.base}/img/4.jpg"
    api.documents["/api/v1/images"] = {
        "items": [
            civitai_item(1, f"{api.base}/img/1.jpg"),
            civitai_item(2, f"{images.base}/img/2.jpg"),
            civitai_item(3, f"http://localhost:{api.port}/img/3.jpg"),
            civitai_item(4, f"{api.base}/away/4.jpg"),
        ],
        "metadata": {},
    }
    ws = Workspace.create(tmp_path / "ws").root
    env = {**os.environ, "CIVITAI_API_TOKEN": SECRET}
    scrape = run_surd(
        "build", "scrape", "civitai", "-w", str(ws), "--base-url", api.base,
        "--allow-host", "127.0.0.1", "--allow-host", "localhost", "--retries", "0",
        "--workers", "1", "--no-progress", env=env,
    )  # fmt: skip
    assert scrape.returncode == 0, scrape.stderr
    samples = Workspace.open(ws).read_table("samples")["source_item_id"].to_pylist()
    assert sorted(samples) == ["1", "2", "3", "4"]

    origin = f"127.0.0.1:{api.port}"
    seen = api.requests + images.requests
    assert (origin, "/api/v1/images", BEARER) in seen  # the API gets it
    assert {r.authorization for r in seen if r.host != origin} == {""}  # nobody else does
    assert {r.authorization for r in seen} <= {"", BEARER}
    assert {r.path for r in images.requests} >= {"/img/2.jpg", "/img/4.jpg"}
    assert (f"localhost:{api.port}", "/img/3.jpg", "") in seen

    out = tmp_path / "export"
    export = run_surd("build", "export", str(out), "-w", str(ws), "--no-progress", env=env)
    assert export.returncode == 0, export.stderr
    for output in (scrape.stdout, scrape.stderr, export.stdout, export.stderr):
        assert SECRET not in output
    files = [path for root in (ws, out) for path in root.rglob("*") if path.is_file()]
    assert any(path.suffix == ".parquet" for path in files)
    for path in files:
        assert SECRET.encode() not in path.read_bytes(), path


# ----------------------------------------------------------------------------- NSFW levels
def test_civitai_nsfw_levels_are_normalised_and_exported(tmp_path, workspace, server):
    base = server.base
    levels = {1: 1, 2: 2, 3: 4, 4: 8, 5: 16, 6: "None", 7: "Soft", 8: "Mature", 9: "X"}
    server.documents["/api/v1/images"] = {
        "items": [civitai_item(n, f"{base}/img/{n}.jpg", nsfwLevel=v) for n, v in levels.items()],
        "metadata": {},
    }
    model_images = {11: "None", 12: "Soft", 13: "Mature", 14: "X"}
    server.documents["/api/v1/models"] = {
        "items": [
            {
                "id": 100,
                "name": "Towers",
                "modelVersions": [
                    {
                        "name": "v1",
                        "images": [
                            civitai_item(n, f"{base}/img/{n}.jpg", nsfw=v)
                            for n, v in model_images.items()
                        ],
                    }
                ],
            }
        ],
        "metadata": {},
    }
    for source in (
        CivitaiImages(base_url=base, name="civitai"),
        CivitaiModels(base_url=base, name="civitai-models"),
    ):
        run_stage(ScrapeStage(source, fetch_options()), workspace, QUIET)

    samples = workspace.read_table("samples").to_pylist()
    found = {r["source_item_id"]: (r["nsfw_level"], r["nsfw"]) for r in samples}
    expected_levels = {
        "1": "None", "2": "Soft", "3": "Mature", "4": "X", "5": "X",
        "6": "None", "7": "Soft", "8": "Mature", "9": "X",
        "11": "None", "12": "Soft", "13": "Mature", "14": "X",
    }  # fmt: skip
    assert found == {item: (level, level != "None") for item, level in expected_levels.items()}

    out = tmp_path / "export"
    result = run_surd(
        "build", "export", str(out), "-w", str(workspace.root), "--nsfw", "exclude",
        "--no-progress",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    exported = pa.concat_tables(
        pq.read_table(part, columns=["source_item_id"])
        for part in sorted((out / "data").glob("*.parquet"))
    )
    assert sorted(exported["source_item_id"].to_pylist()) == ["1", "11", "6"]


# ----------------------------------------------------------------------------- whole commands
def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and lines[0].startswith("error:"), result.stderr
    return lines[0]


def test_an_unreachable_api_source_exits_7_and_is_no_completed_run(workspace):
    ws, api = str(workspace.root), f"http://127.0.0.1:{closed_port()}"
    common = ("-w", ws, "--base-url", api, "--allow-host", "127.0.0.1", "--retries", "0")
    for command in (("civitai",), ("lexica", "castle")):
        result = run_surd("build", "scrape", *command, *common, "--no-progress")
        assert result.returncode == 7, (command, result.stdout, result.stderr)
        one_error_line(result)

    completed = {r["stage"] for r in workspace.runs() if r["status"] == "completed"}
    assert not completed & {"scrape-civitai", "scrape-lexica"}
    status = run_surd("build", "status", "-w", ws)
    assert status.returncode == 0, status.stderr
    for line in status.stdout.splitlines():
        if "scrape-civitai" in line or "scrape-lexica" in line:
            assert "completed" not in line, status.stdout


def test_diffusiondb_with_no_reachable_part_exits_7_naming_each_part(workspace, server):
    result = run_surd(
        "build", "scrape", "diffusiondb", f"{server.base}/dataset", "-w", str(workspace.root),
        "--parts", "1-2", "--allow-host", "127.0.0.1", "--retries", "0", "--no-progress",
    )  # fmt: skip
    assert result.returncode == 7, (result.stdout, result.stderr)
    line = one_error_line(result)
    assert re.search(r"\bpart[- ]0*1\b", line) and re.search(r"\bpart[- ]0*2\b", line), line
    assert server.hits["/dataset/images/part-000001.zip"] == 1
    assert server.hits["/dataset/images/part-000002.zip"] == 1


def test_a_list_refused_as_private_prints_one_allow_host_hint(tmp_path, workspace, server):
    urls = [f"{server.base}/img/{n}.jpg" for n in range(3)]
    listing = write_list(tmp_path / "list.jsonl", urls)
    result = run_surd(
        "build", "scrape", "urls", str(listing), "-w", str(workspace.root), "--retries", "0",
        "--batch-size", "1", "--workers", "2", "--no-progress",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert failed_reasons(workspace, "scrape-urls") == dict.fromkeys(urls, "private-address")
    output = (result.stdout + result.stderr).splitlines()
    assert len([line for line in output if "--allow-host" in line]) == 1, output
    assert server.requests == []


# ----------------------------------------------------------------------------- SIGKILL
def test_kill_9_at_seeded_moments_then_resume_stores_every_item_once(tmp_path, workspace, server):
    rng = random.Random(5150)
    count = 60
    urls = [f"{server.base}/img/{n}.jpg" for n in range(count)]
    for url in urls:
        server.delays[urlsplit(url).path] = rng.uniform(0.005, 0.04)
    listing = write_list(tmp_path / "list.jsonl", urls)
    command = [
        sys.executable, "-m", "surd_builder", "build", "scrape", "urls", str(listing),
        "-w", str(workspace.root), "--allow-host", "127.0.0.1", "--threads", "4",
        "--workers", "1", "--batch-size", "6", "--retries", "0", "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "COLUMNS": "120"}

    def image_requests() -> int:
        return sum(1 for request in server.requests if request.path.startswith("/img/"))

    killed: list[int] = []
    for _ in range(3):
        # at most a third of what is left: the kill comes with two thirds of it still to go
        remaining = count - len(workspace.sample_ids("samples"))
        target = image_requests() + rng.randint(1, remaining // 3)
        child = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            deadline = time.monotonic() + 60
            while not server.wait_for(lambda t=target: image_requests() >= t, timeout=0.5):
                assert child.poll() is None, "the scrape ended before it was killed"
                assert time.monotonic() < deadline, "no requests from the scrape"
            child.send_signal(signal.SIGKILL)
            assert child.wait(timeout=60) == -signal.SIGKILL
            killed.append(child.pid)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    assert len(killed) == 3

    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert workspace.runs()[-1]["status"] == "completed"

    history = workspace.read_table_history(
        "samples", columns=["sample_id", "source_item_id", "image_sha256"]
    ).to_pylist()
    assert sorted(row["source_item_id"] for row in history) == sorted(urls)  # each once
    stored = [
        sha
        for shard in workspace.image_shards()
        for sha in pq.read_table(shard, columns=["image_sha256"])["image_sha256"].to_pylist()
    ]
    assert len(stored) == len(set(stored)) == count  # each image once in the store
    assert set(stored) == {row["image_sha256"] for row in history}
    images = workspace.read_images(stored)
    for row in history:
        number = int(urlsplit(row["source_item_id"]).path.rsplit("/", 1)[1].split(".")[0])
        assert images[row["image_sha256"]] == jpeg(number)
    assert workspace.read_failures("scrape-urls", outstanding_in="samples").num_rows == 0

    # what a reader sees: only whole files; temporary files only from the killed writers
    for path in workspace.root.rglob("*"):
        relative = path.relative_to(workspace.root)
        temps = [part for part in relative.parts if part.startswith(TEMP_PREFIX)]
        if temps:
            pid = temps[0][len(TEMP_PREFIX) :].split("-", 1)[0]
            assert pid.isdigit() and int(pid) in killed, relative
        elif path.suffix == ".parquet":
            pq.read_table(path)
        elif path.suffix == ".json":
            json.loads(path.read_text())


def test_an_address_that_changes_after_the_check_is_refused_at_connect(server, monkeypatch):
    """DNS rebinding: the name looked public when it was checked, then resolved to loopback
    when the connection was made. The peer address of the socket is checked as well, before
    anything is sent, so the request never reaches the server."""
    from pipelines import url_policy

    resolve = socket.getaddrinfo

    def rebinding(host, *args, **kwargs):
        return resolve("127.0.0.1" if host == "rebind.test" else host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    monkeypatch.setattr(url_policy, "_address_kind", lambda host: ("public", None))  # 1st answer
    url = f"http://rebind.test:{server.port}/img/7.jpg"
    with pytest.raises(FetchError) as refused:
        Fetcher(FetchOptions(retries=0)).get(url)
    assert refused.value.reason == "private-address"
    assert server.hits["/img/7.jpg"] == 0
    allowed = Fetcher(FetchOptions(retries=0, allowed_hosts=("rebind.test",)))
    assert allowed.get(url).data.startswith(b"\xff\xd8")  # an allowed host is fetched
    assert server.hits["/img/7.jpg"] == 1
