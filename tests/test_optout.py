"""Opt-out at collection: X-Robots-Tag headers and robots.txt, against a loopback server."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from pipelines.download import Fetcher, FetchOptions, user_agent_for
from pipelines.optout import RobotsPolicy, forget_robots_rules
from pipelines.runner import RunOptions, run_stage
from pipelines.scrape import ScrapeStage
from pipelines.sources.urls import UrlListSource
from pipelines.x_robots import x_robots_opt_outs
from tests.http_fixture import FaultyServer

QUIET = RunOptions(batch_size=8, show_progress=False)
LOOPBACK = FetchOptions(
    allowed_hosts=("127.0.0.1",), retries=1, backoff_seconds=0.0, read_timeout=1.0
)


def scrape(workspace, tmp_path, urls: list[str], options: FetchOptions = LOOPBACK):
    listing = tmp_path / "list.jsonl"
    listing.write_text("\n".join(json.dumps({"url": u, "prompt": "a cat, 8k"}) for u in urls))
    report = run_stage(ScrapeStage(UrlListSource(listing), options), workspace, QUIET)
    outstanding = workspace.read_failures(outstanding_in="samples").to_pylist()
    return report, {row["source_item_id"]: row["reason"] for row in outstanding}


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (["noai"], ["noai"]),
        (["noimageai, max-image-preview: large"], ["noimageai"]),
        (["NoIndex"], ["noindex"]),
        (["noimageindex"], ["noimageindex"]),
        (["none"], ["none"]),
        (["googlebot: noindex"], []),
        (["surd: noai"], ["surd: noai"]),
        (["*: noimageai"], ["*: noimageai"]),
        (["googlebot: noindex", "noai"], ["noai"]),  # separate headers, separate scopes
        (["googlebot: nofollow, surd: noindex"], ["surd: noindex"]),
        (["unavailable_after: 25 Jun 2030 15:00:00 PST", "index, follow"], []),
        ([], []),
    ],
)
def test_which_x_robots_tag_values_opt_out(headers, expected) -> None:
    assert x_robots_opt_outs(headers) == expected


def test_x_robots_tag_opt_outs_are_not_stored(server, workspace, tmp_path) -> None:
    cases = {
        "/img/1.jpg": [("X-Robots-Tag", "noai")],
        "/img/2.jpg": [("X-Robots-Tag", "googlebot: noindex")],
        "/img/3.jpg": [("X-Robots-Tag", "googlebot: noindex"), ("X-Robots-Tag", "noimageai")],
        "/img/4.jpg": [("X-Robots-Tag", "surd: none")],
        "/img/5.jpg": [],
    }
    server.extra_headers.update(cases)
    urls = [server.base + path for path in cases]
    report, reasons = scrape(workspace, tmp_path, urls)
    assert report.failures_by_reason == {"opted-out": 3}
    assert sorted(reasons) == [urls[0], urls[2], urls[3]]
    samples = workspace.read_table("samples").to_pylist()
    assert sorted(row["source_item_id"] for row in samples) == [urls[1], urls[4]]
    # provenance: the headers seen on what was kept
    tags = {row["source_item_id"]: row["robots_tags"] for row in samples}
    assert tags == {urls[1]: "googlebot: noindex", urls[4]: None}
    assert len(list((workspace.root / "images").glob("*.parquet"))) >= 1

    # the explicit switch stores them (the owners agreed, say)
    report, _ = scrape(workspace, tmp_path, urls, replace(LOOPBACK, respect_opt_out=False))
    assert report.failures_by_reason == {}
    assert len(workspace.read_table("samples")) == 5


def test_robots_txt_rules_per_agent_and_path(server, workspace, tmp_path) -> None:
    robots = (
        "User-agent: *\nDisallow: /img/1\n\n"
        "User-agent: surd\nDisallow: /img/2\nAllow: /img/1\n\n"
        "User-agent: otherbot\nDisallow: /\n"
    )
    server.files["/robots.txt"] = (robots.encode(), "text/plain")
    urls = [f"{server.base}/img/{n}.jpg" for n in (1, 2, 3, 4)]
    report, reasons = scrape(workspace, tmp_path, urls)
    # surd's own group applies (not "*"): /img/2 is disallowed, /img/1 allowed
    assert reasons == {urls[1]: "opted-out"}
    assert report.failures_by_reason == {"opted-out": 1}
    assert server.hits["/robots.txt"] == 1  # once per host, however many items
    assert server.hits["/img/2.jpg"] == 0  # a disallowed image is never requested


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        (lambda s: None, None),  # 404: no rules
        (lambda s: s.statuses.__setitem__("/robots.txt", 403), None),  # 4xx: allowed
        (lambda s: s.statuses.__setitem__("/robots.txt", 500), "robots-unavailable"),
        (lambda s: s.delays.__setitem__("/robots.txt", 2.0), "robots-unavailable"),  # timeout
        (
            lambda s: s.files.__setitem__(
                "/robots.txt",
                (
                    b"\xff\xfe garbage {{\nDisallow /nothing\nUser-agent: *\nDisallow: /img/\n",
                    "text/plain",
                ),
            ),  # fmt: skip
            "opted-out",  # junk lines are skipped; the rule it does state holds
        ),
    ],
)
def test_robots_txt_availability_policy(server, workspace, tmp_path, setup, reason) -> None:
    setup(server)
    url = f"{server.base}/img/7.jpg"
    report, reasons = scrape(workspace, tmp_path, [url])
    assert reasons == ({url: reason} if reason else {})
    if reason == "robots-unavailable":
        # not a refusal: the item stays a failure to retry, and a later run may store it
        server.statuses.pop("/robots.txt", None)
        server.delays.pop("/robots.txt", None)
        forget_robots_rules()  # the next run is a new process
        again, reasons = scrape(workspace, tmp_path, [url])
        assert again.failures_by_reason == {} and again.written == 1


def test_a_redirect_to_a_host_that_opts_out_is_not_stored(workspace, tmp_path) -> None:
    forget_robots_rules()
    with FaultyServer() as first, FaultyServer() as second:
        second.files["/robots.txt"] = (b"User-agent: *\nDisallow: /img/\n", "text/plain")
        first.redirects["/moved/1.jpg"] = f"{second.base}/img/1.jpg"
        url = f"{first.base}/moved/1.jpg"
        report, reasons = scrape(workspace, tmp_path, [url])
        assert reasons == {url: "opted-out"}
        assert first.hits["/robots.txt"] == 1 and second.hits["/robots.txt"] == 1


def test_requests_say_who_is_asking_and_robots_txt_expires(server) -> None:
    options = replace(LOOPBACK, user_agent=user_agent_for("mailto:data@example.org"))
    fetcher = Fetcher(options)
    server.files["/robots.txt"] = (b"User-agent: *\nAllow: /\n", "text/plain")
    server.extra_headers["/robots.txt"] = [("Cache-Control", "max-age=60")]
    now = [0.0]
    policy = RobotsPolicy(fetcher, clock=lambda: now[0])
    policy.check(f"{server.base}/img/1.jpg")
    policy.check(f"{server.base}/img/2.jpg")
    assert policy.fetches == 1
    now[0] = 61.0  # past its max-age: asked again
    policy.check(f"{server.base}/img/3.jpg")
    assert policy.fetches == 2
    agents = server.user_agents - {""}
    assert agents == {user_agent_for("mailto:data@example.org")}
    assert next(iter(agents)).startswith("surd/") and "(+mailto:data@example.org)" in agents.pop()


@pytest.mark.parametrize(
    ("robots", "allowed"),
    [
        (b"User-agent: *\nAllow: /\nDisallow: /img/\n", False),  # longest match, not first
        (b"User-agent: *\nDisallow: /*.jpg$\n", False),  # wildcards
        (b"\xef\xbb\xbfUser-agent: *\nDisallow: /\n", False),  # a byte-order mark
        (b"User-agent: surd\nDisallow: /a\n\nUser-agent: surd\nDisallow: /img\n", False),
        (b"User-agent: *\nDisallow: /img/\nAllow: /img/7.jpg\n", True),  # the longer rule
    ],
)
def test_robots_txt_is_read_as_rfc_9309_says(server, workspace, tmp_path, robots, allowed):
    server.files["/robots.txt"] = (robots, "text/plain")
    url = f"{server.base}/img/7.jpg"
    _, reasons = scrape(workspace, tmp_path, [url])
    assert reasons == ({} if allowed else {url: "opted-out"})
    assert server.hits["/img/7.jpg"] == (1 if allowed else 0)


def test_a_429_robots_txt_is_not_a_licence(server, workspace, tmp_path) -> None:
    server.statuses["/robots.txt"] = 429
    url = f"{server.base}/img/7.jpg"
    _, reasons = scrape(workspace, tmp_path, [url], replace(LOOPBACK, retries=0))
    assert reasons == {url: "robots-unavailable"}


def test_every_redirect_hop_is_checked_before_it_is_requested(workspace, tmp_path) -> None:
    forget_robots_rules()
    with FaultyServer() as first, FaultyServer() as second:
        first.files["/robots.txt"] = (b"User-agent: *\nDisallow: /private/\n", "text/plain")
        second.files["/robots.txt"] = (b"User-agent: *\nDisallow: /\n", "text/plain")
        first.redirects["/pub/1.jpg"] = "/private/1.jpg"  # same host, disallowed path
        first.redirects["/pub/2.jpg"] = f"{second.base}/hop/2.jpg"  # via a host that says no
        second.redirects["/hop/2.jpg"] = f"{first.base}/img/2.jpg"
        urls = [f"{first.base}/pub/1.jpg", f"{first.base}/pub/2.jpg"]
        _, reasons = scrape(workspace, tmp_path, urls)
        assert reasons == {urls[0]: "opted-out", urls[1]: "opted-out"}
        assert first.hits["/private/1.jpg"] == 0 and second.hits["/hop/2.jpg"] == 0
        assert first.hits["/img/2.jpg"] == 0


def test_a_contact_that_cannot_go_in_a_header_is_a_one_line_error(workspace, tmp_path) -> None:
    from typer.testing import CliRunner

    from surd_builder.cli import app

    listing = tmp_path / "list.jsonl"
    listing.write_text(json.dumps({"url": "http://example.org/a.jpg", "prompt": "a cat"}))
    result = CliRunner().invoke(
        app,
        ["build", "scrape", "urls", str(listing), "-w", str(workspace.root),
         "--contact", "mailto:\u738b@example.org"],
    )  # fmt: skip
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: --contact must be a printable ASCII URL or e-mail address"
    ]
