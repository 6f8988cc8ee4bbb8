from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
from PIL import Image

from pipelines.download import Fetcher, FetchOptions
from pipelines.fetch_errors import FetchError
from pipelines.runner import RunOptions, run_stage
from pipelines.scrape import ScrapeStage
from pipelines.sources.urls import UrlListSource
from surd_builder.errors import InputError
from tests.conftest import run_surd
from tests.http_fixture import jpeg

QUIET = RunOptions(batch_size=8, show_progress=False)
LOOPBACK = FetchOptions(
    allowed_hosts=("127.0.0.1",), retries=2, backoff_seconds=0.0, read_timeout=2.0
)


def test_retries_honour_retry_after_and_back_off(server):
    waits: list[float] = []
    options = FetchOptions(
        allowed_hosts=("127.0.0.1",), retries=3, backoff_seconds=0.5, max_wait_seconds=60
    )
    fetcher = Fetcher(options, sleep=waits.append)
    assert fetcher.get(f"{server.base}/retry-after/7/1.jpg").data == jpeg(1)
    assert waits == [7.0]
    assert fetcher.get(f"{server.base}/flaky/2/1.jpg").data == jpeg(1)
    assert waits[1:] == [0.5, 1.0] and server.hits["/flaky/2/1.jpg"] == 3
    fetcher.get(f"{server.base}/retry-after/999/2.jpg")
    assert waits[-1] == 60  # capped
    with pytest.raises(FetchError) as failed:
        fetcher.get(f"{server.base}/status/503/1.jpg")
    assert failed.value.reason == "http-503" and server.hits["/status/503/1.jpg"] == 4
    with pytest.raises(FetchError) as missing:
        fetcher.get(f"{server.base}/status/404/1.jpg")
    assert missing.value.reason == "http-404" and server.hits["/status/404/1.jpg"] == 1
    assert {ua.split(" ")[0].split("/")[0] for ua in server.user_agents} == {"surd"}


@pytest.mark.parametrize(
    ("path", "options", "reason"),
    [
        ("/img/1.jpg", FetchOptions(), "private-address"),  # loopback refused by default
        ("/redirect-file/1.jpg", LOOPBACK, "bad-url"),
        ("/img/1.jpg", FetchOptions(allowed_hosts=("127.0.0.1",), max_bytes=100), "too-large"),
        (
            "/slow/3/1.jpg",
            FetchOptions(allowed_hosts=("127.0.0.1",), retries=0, read_timeout=0.3),
            "timeout",
        ),
        ("/truncated/1.jpg", FetchOptions(allowed_hosts=("127.0.0.1",), retries=0), "truncated"),
    ],
)
def test_unsafe_or_broken_responses_fail_with_a_reason(server, path, options, reason):
    with pytest.raises(FetchError) as error:
        Fetcher(options).get(server.base + path)
    assert error.value.reason == reason


def test_only_http_urls_are_fetched():
    with pytest.raises(FetchError, match="only http and https"):
        Fetcher(LOOPBACK).get("file:///etc/passwd")


def write_list(path, rows):
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


def test_scrape_urls_each_fault_ends_as_documented(tmp_path, workspace, server, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # the 200 px PNG is a "bomb" now
    base = server.base
    outcomes = {
        f"{base}/img/1.jpg": None,
        f"{base}/img/2.png": "too-large",
        f"{base}/flaky/1/3.jpg": None,
        f"{base}/retry-after/0/4.jpg": None,
        f"{base}/redirect/5.jpg": None,
        f"{base}/octet/6.jpg": None,
        f"{base}/status/404/7.jpg": "http-404",
        f"{base}/status/500/8.jpg": "http-500",
        f"{base}/truncated/9.jpg": "truncated",
        f"{base}/html/10.jpg": "not-an-image",
        f"{base}/corrupt/11.jpg": "not-an-image",
        f"{base}/redirect-file/12.jpg": "bad-url",
    }
    rows = [{"url": url, "prompt": f"item {n}, 8k", "seed": n} for n, url in enumerate(outcomes)]
    rows.append({"url": f"{base}/img/1.jpg", "prompt": "the same URL again"})  # one item, once
    rows.append({"url": f"{base}/img/13.jpg", "prompt": ""})
    rows.append({"url": "", "prompt": "no url"})
    listing = write_list(tmp_path / "list.jsonl", rows)
    stage = ScrapeStage(UrlListSource(listing), LOOPBACK, threads=4)
    report = run_stage(stage, workspace, QUIET)

    expected_failures = [r for r in outcomes.values() if r] + ["no-prompt", "no-url"]
    assert report.written == 5 and report.failed == len(expected_failures)
    failures = {r["source_item_id"]: r["reason"] for r in workspace.read_failures().to_pylist()}
    for url, reason in outcomes.items():
        assert failures.get(url) == reason, url
    assert failures["row-15"] == "no-url" and failures[f"{base}/img/13.jpg"] == "no-prompt"
    assert server.hits["/img/13.jpg"] == 0  # no prompt: never downloaded

    samples = {r["source_item_id"]: r for r in workspace.read_table("samples").to_pylist()}
    assert samples[f"{base}/img/1.jpg"]["complex_prompt"] == "the same URL again"
    assert samples[f"{base}/redirect/5.jpg"]["source_url"] == f"{base}/img/5.jpg"
    assert samples[f"{base}/retry-after/0/4.jpg"]["seed"] == 3
    assert (
        samples[f"{base}/img/1.jpg"]["width"],
        samples[f"{base}/img/1.jpg"]["image_format"],
    ) == (
        48,
        "JPEG",
    )
    image = workspace.read_images([samples[f"{base}/octet/6.jpg"]["image_sha256"]])
    assert list(image.values()) == [jpeg(2)]

    # a re-run retries only the failures and downloads nothing it already has
    before = sum(server.hits.values())
    again = run_stage(ScrapeStage(UrlListSource(listing), LOOPBACK), workspace, QUIET)
    assert (again.already_done, again.processed, again.written) == (5, len(expected_failures), 0)
    assert server.hits["/img/1.jpg"] == 1
    assert sum(server.hits.values()) > before


def test_scrape_killed_part_way_then_resumed_has_every_item_once(tmp_path, workspace, server):
    rows = [{"url": f"{server.base}/img/{n}.jpg", "prompt": f"cat {n}"} for n in range(12)]
    rows.append({"url": f"{server.base}/hold/99.jpg", "prompt": "held until killed"})
    listing = write_list(tmp_path / "list.jsonl", rows)
    command = [
        sys.executable, "-m", "surd_builder", "build", "scrape", "urls", str(listing),
        "-w", str(workspace.root), "--allow-host", "127.0.0.1", "--threads", "1", "--workers", "1",
        "--batch-size", "4", "--id-column", "url", "--no-progress",
    ]  # fmt: skip
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert server.held.wait(timeout=60)  # the child is stuck on the last item
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
    server.release.set()
    assert workspace.read_table("samples").num_rows == 12  # three whole batches

    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    items = workspace.read_table("samples")["source_item_id"].to_pylist()
    assert sorted(items) == sorted(r["url"] for r in rows)
    assert server.hits["/img/0.jpg"] == 1  # nothing downloaded twice


def test_bad_url_lists_are_one_line_errors(tmp_path, workspace):
    with pytest.raises(InputError, match="does not exist"):
        run_stage(ScrapeStage(UrlListSource(tmp_path / "none.csv")), workspace, QUIET)
    csv = tmp_path / "list.csv"
    csv.write_text("link,prompt\nhttp://example.org/a.jpg,a cat\n")
    with pytest.raises(InputError, match="no column 'url'"):
        run_stage(ScrapeStage(UrlListSource(csv)), workspace, QUIET)
    result = run_surd("build", "scrape", "urls", str(csv), "-w", str(workspace.root))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {csv} has no column 'url' (--url-column)"
    ]


def test_resize_keeps_the_original_unless_asked(tmp_path, workspace, server):
    listing = write_list(
        tmp_path / "list.jsonl",
        [{"url": f"{server.base}/img/{n}.png", "prompt": "p"} for n in (1, 2)],
    )
    run_stage(ScrapeStage(UrlListSource(listing), LOOPBACK, resize_max_side=64), workspace, QUIET)
    rows = workspace.read_table("samples").to_pylist()
    assert {(r["width"], r["height"], r["image_format"]) for r in rows} == {(64, 64, "PNG")}
    other = tmp_path / "ws2"
    from surd_builder.workspace import Workspace

    original = Workspace.create(other)
    report = run_stage(ScrapeStage(UrlListSource(listing), LOOPBACK), original, QUIET)
    assert {r["width"] for r in original.read_table("samples").to_pylist()} == {200}
    assert report.image_bytes == sum(len(jpeg(n, size=200, fmt="PNG")) for n in (1, 2))


def test_malformed_urls_are_failures_not_crashes(tmp_path, workspace):
    urls = ["http://[::1", "http://" + "a" * 70 + ".example/x.jpg", "ftp://example.org/x.jpg"]
    listing = write_list(tmp_path / "list.jsonl", [{"url": u, "prompt": "p"} for u in urls])
    report = run_stage(ScrapeStage(UrlListSource(listing), FetchOptions()), workspace, QUIET)
    assert report.failures_by_reason == {"bad-url": 3}
