"""Edge cases of collection found by reviewing the hardening (issue 17), one test each: hosts that
read two ways, guards of nested and rate-limited requests, proxies, the watchdog's memory,
archives, and files that are not what their names say."""

from __future__ import annotations

import io
import json
import os
import socket
import threading
import time

import pytest
from PIL import Image

from pipelines import connection_guard, url_policy
from pipelines.download import Fetcher, FetchOptions
from pipelines.fetch_errors import FetchError
from pipelines.ingest import IngestStage
from pipelines.records import nsfw_level
from pipelines.runner import RunOptions, run_stage
from pipelines.url_policy import check_url
from tests.conftest import write_image
from tests.http_fixture import FaultServer

QUIET = RunOptions(batch_size=8, show_progress=False)


@pytest.fixture
def server():
    with FaultServer() as running:
        yield running


def options(**changes) -> FetchOptions:
    settings = {"allowed_hosts": ("127.0.0.1",), "retries": 0, "backoff_seconds": 0.0}
    return FetchOptions(**{**settings, **changes})


# ----------------------------------------------------------------------------- hosts and tokens
def test_a_host_that_reads_two_ways_is_refused(server):
    """``http://a\\@b/``: the standard library reads host b, urllib3 (which connects) host a;
    an allowance for b must not open a, nor a token for b go to a."""
    sneaky = f"http://127.0.0.1:{server.port}\\@localhost:9/img/1.jpg"
    with pytest.raises(FetchError) as refused:
        check_url(sneaky, ("localhost:9",))
    assert refused.value.reason == "bad-url"
    fetcher = Fetcher(options(), {"Authorization": "Bearer x"}, auth_origin="http://localhost:9")
    assert not fetcher.sends_auth(sneaky)
    with pytest.raises(FetchError):
        Fetcher(FetchOptions(allowed_hosts=("localhost:9",), retries=0)).get(sneaky)
    assert server.hits["/img/1.jpg"] == 0


def test_a_token_over_http_goes_to_loopback_by_name_only():
    """``localhost`` and loopback literals may get a token over plain http; a DNS name that
    resolves to loopback today may not (it could resolve elsewhere tomorrow)."""
    for origin, expected in (
        ("http://localhost:8000", True),
        ("http://127.0.0.1:8000", True),
        ("http://[::1]:8000", True),
        ("http://localtest.me:8000", False),
    ):
        fetcher = Fetcher(options(), {"Authorization": "Bearer x"}, auth_origin=origin)
        assert fetcher.sends_auth(f"{origin}/api/v1/images") is expected, origin


@pytest.mark.parametrize("no_proxy", [None, "localhost"])
def test_the_connected_address_is_checked_even_with_no_proxy_set(server, monkeypatch, no_proxy):
    """A ``NO_PROXY`` alone configures no proxy: the peer-address check must stay on."""
    if no_proxy:
        monkeypatch.setenv("NO_PROXY", no_proxy)
    resolve = socket.getaddrinfo
    monkeypatch.setattr(
        socket,
        "getaddrinfo",
        lambda host, *a, **k: resolve("127.0.0.1" if host == "rebind.test" else host, *a, **k),
    )
    monkeypatch.setattr(url_policy, "_address_kind", lambda host: ("public", None))
    with pytest.raises(FetchError) as refused:
        Fetcher(FetchOptions(retries=0)).get(f"http://rebind.test:{server.port}/img/2.jpg")
    assert refused.value.reason == "private-address"
    assert server.hits["/img/2.jpg"] == 0


# ----------------------------------------------------------------------------- request guards
def test_a_nested_guarded_request_gives_the_outer_one_back():
    with connection_guard.guarded_request(5) as outer:
        with connection_guard.guarded_request(5) as inner:
            assert connection_guard._current.guard is inner
        assert connection_guard._current.guard is outer  # robots.txt inside an image's hop
    assert connection_guard._current.guard is None


def test_waits_before_a_request_do_not_count_against_its_deadline(server):
    """The rate limit (and robots.txt) wait before the request; the deadline starts after."""

    class SlowLimiter:
        def wait(self, host: str) -> None:
            time.sleep(1.2)

    fetcher = Fetcher(options(deadline_seconds=1.0), limiter=SlowLimiter())
    assert fetcher.get(f"{server.base}/img/3.jpg").data.startswith(b"\xff\xd8")


def test_the_watchdog_holds_about_the_requests_in_flight(server):
    fetcher = Fetcher(options())
    for n in range(600):
        fetcher.get(f"{server.base}/img/{n}.jpg")
    watchdog = connection_guard._WATCHDOG
    assert watchdog.active == 0
    assert len(watchdog._heap) < 600  # finished guards are dropped, not kept until their time
    assert all(entry[2]._sock is None for entry in watchdog._heap)


def test_an_archive_has_a_deadline_of_its_own(server, tmp_path):
    """``download_to`` (DiffusionDB parts, gigabytes) is not cut at the image deadline."""
    fetcher = Fetcher(options(deadline_seconds=1.0))
    with pytest.raises(FetchError) as cut:
        fetcher.get(f"{server.base}/slow/1.5/4.jpg")
    assert cut.value.reason == "timeout"
    size = fetcher.download_to(f"{server.base}/slow/1.5/4.jpg", tmp_path / "part.zip", 2**20)
    assert size == (tmp_path / "part.zip").stat().st_size > 0


def test_a_disk_error_while_streaming_is_not_a_server_fault(server):
    class FullDisk(io.BytesIO):
        def write(self, data):
            raise OSError(28, "No space left on device")

    fetcher = Fetcher(options(retries=2))
    with pytest.raises(OSError, match="No space left"):
        fetcher._get(f"{server.base}/img/5.jpg", None, FullDisk(), 2**20)
    assert server.hits["/img/5.jpg"] == 1  # not retried as "truncated"


# ----------------------------------------------------------------------------- ingest
def ingest(folder, workspace):
    run_stage(IngestStage(folder), workspace, QUIET)
    samples = {r["source_item_id"]: r for r in workspace.read_table("samples").to_pylist()}
    failures = {r["source_item_id"]: r for r in workspace.read_failures("ingest").to_pylist()}
    return samples, failures


def test_metadata_rows_with_nul_or_escaping_names_are_skipped_alone(tmp_path, workspace):
    folder = tmp_path / "shadow"
    write_image(folder / "a.png")
    rows = [
        {"file_name": "a.png", "prompt": "the real one"},
        {"file_name": "b\u0000.png", "prompt": "nul"},
        {"file_name": "../shadow/a.png", "prompt": "the same file by a way out"},
    ]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    samples, failures = ingest(folder, workspace)
    assert {k: v["complex_prompt"] for k, v in samples.items()} == {"a.png": "the real one"}
    assert failures["metadata.jsonl:2"]["reason"] == "bad-metadata-row"
    assert failures["metadata.jsonl:3"]["reason"] == "bad-file-name"
    assert "../shadow/a.png" in failures["metadata.jsonl:3"]["detail"]


def test_a_backslash_in_a_found_name_is_part_of_the_name(tmp_path, workspace):
    folder = tmp_path / "in"
    one = write_image(folder / "x\\y.png", color=(1, 2, 3))
    two = write_image(folder / "x" / "y.png", color=(200, 2, 3))
    (folder / "x\\y.txt").write_text("backslash")
    (folder / "x" / "y.txt").write_text("folder")
    samples, _ = ingest(folder, workspace)
    assert samples["x\\y.png"]["complex_prompt"] == "backslash"
    assert samples["x/y.png"]["complex_prompt"] == "folder"
    images = workspace.read_images([samples["x\\y.png"]["image_sha256"]])
    assert list(images.values()) == [one] and one != two


def test_pipes_and_folders_named_like_files_never_hang_or_mislead(tmp_path, workspace):
    folder = tmp_path / "in"
    os.makedirs(folder)
    os.mkfifo(folder / "pipe.png")
    (folder / "pipe.txt").write_text("a pipe")
    write_image(folder / "c.png")
    os.mkfifo(folder / "c.txt")  # a pipe sidecar: reading it would wait for a writer forever
    write_image(folder / "d.png")
    (folder / "d.txt").mkdir()  # a folder named like a sidecar is not one
    (folder / "d.caption").write_text("from the caption")
    done = threading.Event()
    result = {}

    def run():
        result["value"] = ingest(folder, workspace)
        done.set()

    threading.Thread(target=run, daemon=True).start()
    assert done.wait(20), "ingest hung on a pipe"
    samples, failures = result["value"]
    assert samples["d.png"]["complex_prompt"] == "from the caption"
    assert failures["pipe.png"]["reason"] == "not-a-file"
    assert failures["c.png"]["reason"] == "not-a-file"


def test_prompt_files_and_values_that_are_not_plain_text(tmp_path, workspace):
    folder = tmp_path / "in"
    write_image(folder / "utf16.png")
    (folder / "utf16.txt").write_bytes("lighthouse, storm".encode("utf-16-le"))  # no BOM
    write_image(folder / "dict.png")
    write_image(folder / "legacy.png")
    write_image(folder / "modern.png")
    lines = [
        json.dumps({"file_name": "dict.png", "prompt": {"en": "a cat"}}).encode(),
        '{"file_name": "legacy.png", "prompt": "caf\xe9"}'.encode("cp1252"),
        json.dumps(
            {"file_name": "modern.png", "prompt": "naïve café"}, ensure_ascii=False
        ).encode(),
    ]
    (folder / "metadata.jsonl").write_bytes(b"\n".join(lines))
    samples, failures = ingest(folder, workspace)
    assert samples["utf16.png"]["complex_prompt"] == "lighthouse, storm"
    assert failures["dict.png"]["reason"] == "bad-metadata"
    assert samples["legacy.png"]["complex_prompt"] == "café"
    assert samples["modern.png"]["complex_prompt"] == "naïve café"  # not read as cp1252


def test_rotated_tiff_is_sized_once(tmp_path, workspace):
    folder = tmp_path / "in"
    folder.mkdir()
    image = Image.new("RGB", (40, 30), (9, 90, 200))
    exif = image.getexif()
    exif[0x0112] = 6
    for fmt in ("TIFF", "JPEG", "PNG"):
        image.save(folder / f"r-{fmt.lower()}.{fmt.lower()}", fmt, exif=exif)
        (folder / f"r-{fmt.lower()}.txt").write_text(fmt)
    samples, _ = ingest(folder, workspace)
    for fmt in ("tiff", "jpeg", "png"):
        row = samples[f"r-{fmt}.{fmt}"]
        assert (row["width"], row["height"]) == (30, 40), fmt  # as shown, for every format


def test_nsfw_levels_of_every_spelling():
    assert [nsfw_level(v) for v in (1, "2", 4.0, "8.0", 16, 32, "Blocked", "xxx", None, 0)] == [
        "None", "Soft", "Mature", "X", "X", "X", "X", "X", None, None,
    ]  # fmt: skip
    assert nsfw_level(31) == "X"  # a combined mask counts by its highest level
    for bad in (64, "Explicit", True, 2.5):
        with pytest.raises(ValueError):
            nsfw_level(bad)
