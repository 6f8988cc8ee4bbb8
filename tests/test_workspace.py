from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from surd_builder.errors import WorkspaceError
from surd_builder.ids import make_sample_id, sha256_hex
from surd_builder.schema import STAGE_TABLES, records_to_table
from surd_builder.workspace import MARKER_FILE, Workspace

T0 = datetime(2026, 11, 1, tzinfo=UTC)


def samples(*items, narrative=None, at=T0):
    rows = []
    for item in items:
        rows.append(
            {
                "sample_id": make_sample_id("src", item),
                "source": "src",
                "source_item_id": item,
                "complex_prompt": f"{item}, 8k, artstation",
                "narrative_prompt": narrative,
                "narrative_origin": "source" if narrative else None,
                "image_sha256": sha256_hex(item.encode()),
                "collected_at": at,
                "updated_at": at,
            }
        )
    return records_to_table(rows, STAGE_TABLES["samples"].schema)


def test_create_and_open_errors(tmp_path):
    with pytest.raises(WorkspaceError, match="does not exist"):
        Workspace.open(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(WorkspaceError, match="not a surd workspace"):
        Workspace.open(tmp_path / "plain")
    (tmp_path / "plain" / "notes.txt").write_text("mine")
    with pytest.raises(WorkspaceError, match="non-empty folder"):
        Workspace.create(tmp_path / "plain")
    ws = Workspace.create(tmp_path / "ws")
    assert Workspace.create(tmp_path / "ws").root == ws.root  # idempotent
    marker = ws.root / MARKER_FILE
    marker.write_text(json.dumps({"format": "surd-workspace", "format_version": 99}))
    with pytest.raises(WorkspaceError, match="format 99 is not supported"):
        Workspace.open(ws.root)
    marker.write_text("{not json")
    with pytest.raises(WorkspaceError, match="damaged or unreadable"):
        Workspace.open(ws.root)


def test_table_parts_union_and_latest_write_wins(workspace):
    workspace.write_table_part("samples", samples("a", "b"))
    workspace.write_table_part(
        "samples", samples("b", "c", narrative="redone", at=T0 + timedelta(1))
    )
    assert len(workspace.table_parts("samples")) == 2
    table = workspace.read_table("samples")
    assert table.num_rows == 3
    by_item = {r["source_item_id"]: r for r in table.to_pylist()}
    assert by_item["a"]["narrative_prompt"] is None
    assert by_item["b"]["narrative_prompt"] == "redone"
    assert workspace.sample_ids("samples") == {make_sample_id("src", x) for x in "abc"}
    assert workspace.read_table("samples", columns=["width"]).column_names == ["sample_id", "width"]


def test_parts_written_before_a_column_existed_still_read(workspace):
    old_part = samples("a").drop_columns(["creator", "license", "page_url"])  # an older layout
    workspace.table_dir("samples").mkdir(parents=True)
    pq.write_table(
        old_part, workspace.table_dir("samples") / "part-00000000000000000001-1-0.parquet"
    )
    workspace.write_table_part("samples", samples("b"))
    table = workspace.read_table("samples")
    assert table.schema.equals(STAGE_TABLES["samples"].schema, check_metadata=False)
    assert table.num_rows == 2 and table["creator"].null_count == 2


def test_dataset_joins_stage_tables_later_non_null_wins(workspace):
    workspace.write_table_part("samples", samples("a", "b", "c", narrative="from the source"))
    a, b, c = (make_sample_id("src", x) for x in "abc")
    narratives = [
        {
            "sample_id": a,
            "narrative_prompt": "rewritten a",
            "narrative_origin": "rules",
            "updated_at": T0 + timedelta(1),
        },
        {
            "sample_id": b,
            "narrative_prompt": "rewritten b",
            "narrative_origin": "rules",
            "updated_at": T0 + timedelta(1),
        },
    ]
    workspace.write_table_part(
        "narratives", records_to_table(narratives, STAGE_TABLES["narratives"].schema)
    )
    reviews = [
        {
            "sample_id": a,
            "narrative_prompt": "human a",
            "narrative_origin": "human",
            "review_status": "corrected",
            "review_tags": ["count"],
            "updated_at": T0 + timedelta(2),
        },
        {
            "sample_id": b,
            "review_status": "rejected",
            "review_tags": ["unsafe"],
            "updated_at": T0 + timedelta(2),
        },
    ]
    workspace.write_table_part("reviews", records_to_table(reviews, STAGE_TABLES["reviews"].schema))
    # a sample id only a later table knows is not a sample: the join starts from `samples`
    stray = [{"sample_id": "0" * 32, "narrative_prompt": "orphan"}]
    workspace.write_table_part(
        "narratives", records_to_table(stray, STAGE_TABLES["narratives"].schema)
    )

    rows = {r["sample_id"]: r for r in workspace.dataset().to_pylist()}
    assert set(rows) == {a, b, c}
    assert (rows[a]["narrative_prompt"], rows[a]["narrative_origin"]) == ("human a", "human")
    assert (rows[b]["narrative_prompt"], rows[b]["narrative_origin"]) == ("rewritten b", "rules")
    assert (rows[c]["narrative_prompt"], rows[c]["narrative_origin"]) == (
        "from the source",
        "source",
    )
    assert [rows[x]["review_status"] for x in (a, b, c)] == ["corrected", "rejected", "pending"]
    assert rows[b]["review_tags"] == ["unsafe"]
    assert rows[a]["updated_at"] == T0 + timedelta(2)
    assert rows[c]["updated_at"] == T0
    assert rows[c]["complex_prompt"] == "c, 8k, artstation"


def test_images_are_stored_once_by_content(workspace):
    blobs = [b"first image", b"second image", b"first image"]
    table = pa.table({"image_sha256": [sha256_hex(b) for b in blobs], "image_bytes": blobs})
    assert workspace.write_images(table) == 2
    assert workspace.write_images(table) == 0  # already stored
    assert Workspace.open(workspace.root).image_stats()[0] == 2  # a fresh reader sees the same
    found = Workspace.open(workspace.root).read_images([sha256_hex(b"second image")])
    assert found == {sha256_hex(b"second image"): b"second image"}
    with pytest.raises(WorkspaceError, match="not in the workspace"):
        workspace.read_images(["f" * 64])


def test_failures_latest_per_item_and_outstanding(workspace):
    a = make_sample_id("src", "a")
    failure = {"stage": "ingest", "sample_id": a, "reason": "not-an-image", "failed_at": T0}
    from surd_builder.schema import FAILURES_SCHEMA

    workspace.write_failures(records_to_table([failure], FAILURES_SCHEMA))
    workspace.write_failures(
        records_to_table([{**failure, "reason": "unreadable"}], FAILURES_SCHEMA)
    )
    assert workspace.read_failures("ingest")["reason"].to_pylist() == ["unreadable"]
    assert workspace.read_failures("ingest", outstanding_in="samples").num_rows == 1
    workspace.write_table_part("samples", samples("a"))  # a later attempt succeeded
    assert workspace.read_failures("ingest", outstanding_in="samples").num_rows == 0


def test_manifest_and_stage_lock(workspace):
    run = workspace.start_run("ingest", {"folder": "/data"})
    with workspace.stage_lock("ingest"):
        with pytest.raises(WorkspaceError, match="already running"), workspace.stage_lock("ingest"):
            pass
        with workspace.stage_lock("export"):  # other stages are not blocked
            pass
    workspace.finish_run(run, "completed", {"written": 3})
    runs = Workspace.open(workspace.root).runs()
    assert len(runs) == 1
    assert runs[0]["status"] == "completed" and runs[0]["counts"] == {"written": 3}
    assert runs[0]["params"] == {"folder": "/data"}
    workspace.write_state("scrape", {"cursor": "abc"})
    assert workspace.read_state("scrape") == {"cursor": "abc"}
    assert workspace.read_state("never-ran") == {}


def test_grouped_columns_come_from_one_table(workspace):
    workspace.write_table_part("samples", samples("a", "b", narrative="from the source"))
    a, b = (make_sample_id("src", x) for x in "ab")
    narratives = [
        {"sample_id": a, "narrative_prompt": "rewritten, origin unknown"},
        {"sample_id": b, "narrative_origin": "rules"},  # an origin without a text changes nothing
    ]
    workspace.write_table_part(
        "narratives", records_to_table(narratives, STAGE_TABLES["narratives"].schema)
    )
    rows = {r["sample_id"]: r for r in workspace.dataset().to_pylist()}
    assert (rows[a]["narrative_prompt"], rows[a]["narrative_origin"]) == (
        "rewritten, origin unknown",
        None,
    )
    assert (rows[b]["narrative_prompt"], rows[b]["narrative_origin"]) == (
        "from the source",
        "source",
    )


def test_newest_review_wins_whatever_order_it_was_pulled_in(workspace):
    workspace.write_table_part("samples", samples("a", "b"))
    a, b = (make_sample_id("src", x) for x in "ab")
    schema = STAGE_TABLES["reviews"].schema
    newer = [
        {"sample_id": a, "review_status": "rejected", "reviewed_at": T0 + timedelta(2)},
        {"sample_id": b, "review_status": "accepted", "reviewed_at": T0 + timedelta(1)},
    ]
    older_pulled_later = [
        {"sample_id": a, "review_status": "accepted", "reviewed_at": T0 + timedelta(1)},
        {"sample_id": b, "review_status": "corrected", "reviewed_at": T0 + timedelta(1)},  # tie
    ]
    workspace.write_table_part("reviews", records_to_table(newer, schema))
    workspace.write_table_part("reviews", records_to_table(older_pulled_later, schema))
    current = workspace.read_table("reviews", columns=["review_status"])
    assert current.column_names == ["sample_id", "review_status"]
    assert {r["sample_id"]: r["review_status"] for r in current.to_pylist()} == {
        a: "rejected",
        b: "corrected",
    }
    rows = {r["sample_id"]: r["review_status"] for r in workspace.dataset().to_pylist()}
    assert rows == {a: "rejected", b: "corrected"}
