from __future__ import annotations

import json
from datetime import UTC, datetime

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from surd_builder.atomic import write_parquet_atomic
from surd_builder.ids import make_sample_id, split_for
from surd_builder.schema import (
    EXPORT_COLUMNS,
    SAMPLE_SCHEMA,
    STAGE_TABLES,
    conform,
    export_schema,
    records_to_table,
)

FULL_RECORD = {
    "sample_id": make_sample_id("civitai", "123"),
    "source": "civitai",
    "source_item_id": "123",
    "source_url": "https://example.org/i/123.jpeg",
    "page_url": "https://example.org/images/123",
    "creator": "someone",
    "license": "CC-BY-4.0",
    "image_sha256": "ab" * 32,
    "width": 512,
    "height": 768,
    "image_format": "JPEG",
    "complex_prompt": "castle, fantasy, 8k, artstation, (volumetric light:1.2)",
    "negative_prompt": "blurry, lowres",
    "narrative_prompt": "a castle on a hill at dusk",
    "narrative_origin": "rules",
    "model_name": "sd-1.5",
    "sampler": "Euler a",
    "steps": 30,
    "cfg_scale": 7.5,
    "seed": 2**40 + 3,
    "nsfw": False,
    "clip_score": 0.31,
    "text_similarity": 0.72,
    "phash": "c3a1f0e0d0c0b0a0",
    "duplicate_of": None,
    "review_status": "corrected",
    "review_tags": ["count", "colour"],
    "reviewer": "annotator-7",
    "reviewed_at": datetime(2026, 11, 1, 12, 0, tzinfo=UTC),
    "split": "train",
    "collected_at": datetime(2026, 10, 1, 8, 30, tzinfo=UTC),
    "updated_at": datetime(2026, 11, 1, 12, 0, 1, 5, tzinfo=UTC),
}


def test_every_field_round_trips_through_parquet(tmp_path):
    sparse = {
        "sample_id": make_sample_id("local", "a.png"),
        "source": "local",
        "source_item_id": "a.png",
    }
    table = records_to_table([FULL_RECORD, sparse], SAMPLE_SCHEMA)
    path = write_parquet_atomic(table, tmp_path / "samples.parquet")
    back = pq.read_table(path)
    assert back.schema.equals(SAMPLE_SCHEMA, check_metadata=False)
    rows = back.to_pylist()
    assert rows[0]["cfg_scale"] == pytest.approx(7.5)
    assert rows[0]["clip_score"] == pytest.approx(0.31)
    for key in set(FULL_RECORD) - {"cfg_scale", "clip_score", "text_similarity"}:
        assert rows[0][key] == FULL_RECORD[key], key
    assert all(rows[1][key] is None for key in set(FULL_RECORD) - set(sparse))
    # field docs travel with the schema, so any reader of the files can see what a column means
    assert back.schema.field("narrative_origin").metadata[b"doc"].startswith(b"who wrote")


def test_conform_rejects_what_would_break_readers():
    good = {"sample_id": "x", "source": "s", "source_item_id": "1"}
    schema = STAGE_TABLES["samples"].schema
    with pytest.raises(ValueError, match="not in the schema"):
        conform(pa.Table.from_pylist([{**good, "prompt2": "x"}]), schema)
    with pytest.raises(ValueError, match="must not contain nulls"):
        conform(pa.Table.from_pylist([{**good, "source": None}]), schema)
    with pytest.raises(ValueError, match="required column 'source_item_id'"):
        conform(pa.Table.from_pylist([{"sample_id": "x", "source": "s"}]), schema)
    widened = conform(pa.Table.from_pylist([{**good, "width": 64}]), schema)
    assert widened.schema.field("width").type == pa.int32()
    assert widened.column_names == list(schema.names)


def test_stage_tables_are_cut_from_the_sample_schema():
    for spec in STAGE_TABLES.values():
        assert spec.columns[0] == "sample_id"
        assert set(spec.columns) <= set(SAMPLE_SCHEMA.names)
        assert spec.schema.field("sample_id").nullable is False


def test_export_schema_carries_hf_features():
    schema = export_schema()
    assert schema.names == list(EXPORT_COLUMNS)
    features = datasets.Features.from_dict(
        json.loads(schema.metadata[b"huggingface"])["info"]["features"]
    )
    assert isinstance(features["image"], datasets.Image)
    assert features["narrative_prompt"] == datasets.Value("string")
    assert features["steps"] == datasets.Value("int32")


def test_sample_ids_are_stable_and_distinct():
    assert make_sample_id("civitai", "42") == make_sample_id("civitai", "42")
    assert make_sample_id("civitai", "42") != make_sample_id("lexica", "42")
    assert make_sample_id("ab", "c") != make_sample_id("a", "bc")
    assert len(make_sample_id("x", "y")) == 32
    with pytest.raises(ValueError):
        make_sample_id("", "1")


def test_splits_are_deterministic_and_match_fractions():
    ids = [make_sample_id("demo", str(n)) for n in range(20_000)]
    splits = [split_for(i, 0.1, 0.05) for i in ids]
    assert splits == [split_for(i, 0.1, 0.05) for i in ids]
    assert splits.count("test") / len(ids) == pytest.approx(0.1, abs=0.01)
    assert splits.count("validation") / len(ids) == pytest.approx(0.05, abs=0.01)
    # growing the test share only moves samples out of train, never between test and train
    wider = [split_for(i, 0.2) for i in ids]
    assert all(w == "test" for s, w in zip(splits, wider, strict=True) if s == "test")
    with pytest.raises(ValueError):
        split_for(ids[0], 0.6, 0.5)


def test_ids_and_splits_are_pinned():
    """Changing how ids or splits are derived would silently move every existing sample to a new
    id or split: these values are a compatibility promise, not an implementation detail."""
    assert make_sample_id("demo", "0") == "794fdc1a43f9d71cc65a5834a1fde26d"
    splits = [split_for(make_sample_id("demo", str(n)), 0.2, 0.2) for n in range(8)]
    expected = ["test", "train", "train", "test", "validation", "train", "test", "train"]
    assert splits == expected
