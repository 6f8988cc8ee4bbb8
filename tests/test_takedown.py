"""Takedown: a request removes samples from exports, and later scrapes never bring them back."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from pipelines.download import FetchOptions
from pipelines.export import ExportOptions, export_dataset
from pipelines.runner import RunOptions, run_stage
from pipelines.scrape import ScrapeStage
from pipelines.sources.urls import UrlListSource
from pipelines.takedown import TakedownRequest, match_rows, read_removed, take_down
from surd_builder.cli import app

QUIET = RunOptions(batch_size=8, show_progress=False)
LOOPBACK = FetchOptions(
    allowed_hosts=("127.0.0.1",), retries=1, backoff_seconds=0.0, read_timeout=2.0
)


def picture(seed: int, size: int = 96) -> bytes:
    """A picture with structure (shapes on a gradient, laid out by ``seed``), so a perceptual
    hash has something to see."""
    import random

    from PIL import ImageDraw

    rng = random.Random(seed)
    image = Image.linear_gradient("L").resize((size, size)).convert("RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y = rng.randrange(size), rng.randrange(size)
        radius = rng.randrange(8, size // 3)
        colour = tuple(rng.randrange(256) for _ in range(3))
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def re_encoded(data: bytes) -> bytes:
    """What a re-upload looks like: smaller and at a lower JPEG quality."""
    with Image.open(io.BytesIO(data)) as image:
        smaller = image.convert("RGB").resize((64, 64))
    buffer = io.BytesIO()
    smaller.save(buffer, format="JPEG", quality=40)
    return buffer.getvalue()


def scrape(workspace, tmp_path, urls):
    listing = tmp_path / "list.jsonl"
    listing.write_text("\n".join(json.dumps({"url": u, "prompt": "a cat, 8k"}) for u in urls))
    return run_stage(ScrapeStage(UrlListSource(listing), LOOPBACK), workspace, QUIET)


def exported_ids(workspace, out) -> set[str]:
    report = export_dataset(
        workspace, out, ExportOptions(overwrite=True, show_progress=False, test_fraction=0.0)
    )
    import pyarrow.parquet as pq

    ids = set()
    for file in (out / "data").glob("*.parquet"):
        ids |= set(pq.read_table(file, columns=["sample_id"])["sample_id"].to_pylist())
    return ids, report


@pytest.fixture
def server(server):
    """The loopback server (conftest), serving three distinct pictures."""
    for number in range(3):
        server.files[f"/pic/{number}.jpg"] = (picture(number), "image/jpeg")
    return server


def test_a_re_encoded_copy_takes_the_original_down_for_good(server, workspace, tmp_path) -> None:
    urls = [f"{server.base}/pic/{n}.jpg" for n in range(3)]
    assert scrape(workspace, tmp_path, urls).written == 3
    samples = workspace.read_table("samples", ["source_item_id"]).to_pylist()
    target = next(row["sample_id"] for row in samples if row["source_item_id"] == urls[1])

    copy = tmp_path / "complaint.jpg"
    copy.write_bytes(re_encoded(picture(1)))
    result = CliRunner().invoke(
        app,
        ["build", "takedown", "-w", str(workspace.root), "--image", str(copy),
         "--reason", "owner request 2026-11-25"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"removed {target}" in result.output and "1 sample(s) removed" in result.output
    removed = read_removed(workspace)
    assert [(r["sample_id"], r["kind"], r["reason"]) for r in removed] == [
        (target, "image", "owner request 2026-11-25")
    ]

    ids, report = exported_ids(workspace, tmp_path / "export")
    assert target not in ids and len(ids) == 2
    assert report.skipped["taken-down"] == 1

    # a re-scrape of the same list does not download it again ...
    server.hits.clear()
    again = scrape(workspace, tmp_path, urls)
    assert again.written == 0 and server.hits["/pic/1.jpg"] == 0
    # ... and a re-upload elsewhere, re-encoded, is refused after download
    server.files["/mirror/copy.jpg"] = (re_encoded(picture(1)), "image/jpeg")
    server.files["/mirror/other.jpg"] = (picture(2, size=80), "image/jpeg")
    mirror = scrape(workspace, tmp_path, [f"{server.base}/mirror/copy.jpg",
                                          f"{server.base}/mirror/other.jpg"])  # fmt: skip
    assert mirror.failures_by_reason == {"taken-down": 1}
    ids, _ = exported_ids(workspace, tmp_path / "export")
    assert target not in ids and len(ids) == 3  # the other new image is in
    card = (tmp_path / "export" / "README.md").read_text()
    assert "## Opt-out and takedown" in card
    assert "All 3 scrape run(s) honoured opt-outs" in card
    assert "1 matching a taken-down image" in card
    assert "1 request(s), 1 sample(s) removed" in card

    listing = CliRunner().invoke(app, ["build", "takedown", "-w", str(workspace.root), "--list"])
    assert listing.exit_code == 0 and target in listing.output
    assert "owner request 2026-11-25" in listing.output


def test_requests_by_url_source_item_and_sample_id(server, workspace, tmp_path) -> None:
    urls = [f"{server.base}/pic/{n}.jpg" for n in range(3)]
    scrape(workspace, tmp_path, urls)
    rows = workspace.read_table("samples", ["source", "source_item_id", "source_url"]).to_pylist()
    by_url = {row["source_item_id"]: row for row in rows}

    def request(kind, value):
        return TakedownRequest(kind, value, value, "r", "2026-11-25T00:00:00Z")

    matched = match_rows(
        rows,
        [
            request("url", urls[0]),
            request("source-item", f"urls:{urls[1]}"),
            request("sample-id", "not-a-sample"),
        ],
    )
    assert set(matched) == {by_url[urls[0]]["sample_id"], by_url[urls[1]]["sample_id"]}

    report = take_down(workspace, [request("url", urls[2]), request("sample-id", "nothing")])
    assert len(report.removed) == 1 and [r.value for r in report.unmatched] == ["nothing"]
    again = take_down(workspace, [request("url", urls[2])])
    assert again.removed == [] and again.already_removed == 1


def test_bad_takedown_input_is_a_one_line_error(workspace, tmp_path) -> None:
    base = ["build", "takedown", "-w", str(workspace.root)]
    result = CliRunner().invoke(app, [*base, "--source-item", "12345"])
    assert result.exit_code == 2 and "SOURCE:ITEM_ID" in result.output
    (tmp_path / "not-an-image.jpg").write_text("hello")
    result = CliRunner().invoke(app, [*base, "--image", str(tmp_path / "not-an-image.jpg")])
    assert result.exit_code == 2 and "not an image" in result.output
    result = CliRunner().invoke(app, base)
    assert result.exit_code == 2 and "nothing to take down" in result.output
    lines = tmp_path / "requests.txt"
    lines.write_text("# owner mail\nurl https://example.org/a.jpg\nphash 123\n")
    result = CliRunner().invoke(app, [*base, "--from-file", str(lines)])
    assert result.exit_code == 2 and "requests.txt:3" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_bad_request_file_line_shows_the_expected_form(workspace, tmp_path) -> None:
    base = ["build", "takedown", "-w", str(workspace.root)]
    lines = tmp_path / "requests.txt"
    for bad in ("url|https://example.org/a.jpg", "url", "sample-id|abc"):
        lines.write_text(f"# owner mail\n{bad}\n")
        result = CliRunner().invoke(app, [*base, "--from-file", str(lines)])
        assert result.exit_code == 2, result.output
        assert "requests.txt:2" in result.output
        assert 'expected "KIND VALUE" with KIND one of url, source-item, sample-id, image' in (
            result.output
        )
        assert len(result.output.strip().splitlines()) == 1


def test_a_request_file_line_may_separate_kind_and_value_by_a_tab(tmp_path) -> None:
    from pipelines.takedown import read_request_file

    lines = tmp_path / "requests.txt"
    lines.write_text(
        "sample-id\t0123456789abcdef0123456789abcdef\nurl   https://example.org/a b.jpg\n"
    )
    requests = read_request_file(lines, "owner request", "2026-12-02T00:00:00Z")
    assert [(r.kind, r.value) for r in requests] == [
        ("sample-id", "0123456789abcdef0123456789abcdef"),
        ("url", "https://example.org/a b.jpg"),
    ]


def test_requests_hold_under_force_and_match_urls_written_another_way(
    server, workspace, tmp_path
) -> None:
    server.redirects["/listed/5.jpg"] = "/pic/2.jpg"
    listed = f"{server.base}/listed/5.jpg"
    urls = [f"{server.base}/pic/0.jpg", listed]
    # taken down before it was ever scraped, written with an upper-case scheme and a fragment
    shouted = f"HTTP://{server.base.removeprefix('http://')}/pic/0.jpg#top"
    result = CliRunner().invoke(
        app, ["build", "takedown", "-w", str(workspace.root), "--url", shouted, "--url", listed]
    )
    assert result.exit_code == 0 and "2 matched nothing yet" in result.output
    report = run_stage(
        ScrapeStage(UrlListSource(_listing(tmp_path, urls)), LOOPBACK),
        workspace,
        RunOptions(batch_size=8, show_progress=False, force=True),
    )
    assert report.written == 0 and report.failures_by_reason == {"taken-down": 2}
    assert server.hits["/pic/0.jpg"] == 0 and server.hits["/listed/5.jpg"] == 0


def test_an_ingested_sample_is_removed_at_export_and_flat_images_are_refused(
    server, workspace, tmp_path
) -> None:
    url, kept = f"{server.base}/pic/1.jpg", f"{server.base}/pic/0.jpg"
    take_down(workspace, [TakedownRequest("url", url, url, "r", "2026-11-25T00:00:00Z")])
    listing = _listing(tmp_path, [url, kept])
    scrape_stage = ScrapeStage(UrlListSource(listing), LOOPBACK)
    # a scrape that read the (empty) takedown list before the request came in
    scrape_stage.plan = lambda ws: UrlListSource(listing).plan(ws)
    assert run_stage(scrape_stage, workspace, QUIET).written == 2
    ids, report = exported_ids(workspace, tmp_path / "export")
    assert len(ids) == 1 and report.skipped["taken-down"] == 1
    assert len(read_removed(workspace)) == 1  # recorded, so --list shows it
    # later stages leave the removed sample alone (its prompt goes to no rewriter)
    from pipelines.rewrite import RewriteStage
    from pipelines.rewriters import make_rewriter

    rewrite = run_stage(RewriteStage(make_rewriter("rules")), workspace, QUIET)
    assert rewrite.written == 1
    rewritten = workspace.read_table("narratives", ["narrative_prompt"])["sample_id"].to_pylist()
    assert rewritten == sorted(ids)

    flat = tmp_path / "flat.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(flat)
    result = CliRunner().invoke(
        app, ["build", "takedown", "-w", str(workspace.root), "--image", str(flat)]
    )
    assert result.exit_code == 2 and "too little structure" in result.output


def _listing(tmp_path, urls):
    listing = tmp_path / "list.jsonl"
    listing.write_text("\n".join(json.dumps({"url": u, "prompt": "a cat, 8k"}) for u in urls))
    return listing
