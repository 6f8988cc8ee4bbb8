"""Near-duplicate marks in exports (issue 24): ``duplicate_of``, ``cluster_id``,
``duplicate_match`` and ``duplicate_distance`` travel with every row whether duplicates are kept or
dropped, load in ``datasets`` with their types, and the card counts the clusters."""

from __future__ import annotations

import json

import datasets
import pyarrow as pa
import pytest

from pipelines.export import ExportOptions, cluster_marks, cluster_summary, export_dataset
from pipelines.ingest import IngestStage
from pipelines.runner import RunOptions, run_stage
from surd_builder.demo import make_demo_folder
from surd_builder.schema import EXPORT_COLUMNS, records_to_table, table_spec

MARKS = ("duplicate_of", "cluster_id", "duplicate_match", "duplicate_distance")
DROP = ExportOptions(show_progress=False)
KEEP = ExportOptions(drop_duplicates=False, show_progress=False)


@pytest.fixture
def demo_workspace(tmp_path, workspace):
    make_demo_folder(tmp_path / "demo", count=40, seed=3, size=32)
    run_stage(
        IngestStage(tmp_path / "demo", source="demo"), workspace, RunOptions(show_progress=False)
    )
    return workspace


@pytest.fixture
def ids(demo_workspace):
    return sorted(demo_workspace.sample_ids("samples"))


def write_marks(workspace, rows) -> None:
    workspace.write_table_part(
        "duplicates", records_to_table(rows, table_spec("duplicates").schema)
    )


def two_clusters(workspace, ids) -> dict[str, str]:
    """Cluster A: kept ``a`` (marked as its own duplicate, as dedupe does today) with ``a1``
    (phash-8, 3 bits) and ``a2`` (mirror, 5 bits). Cluster B: kept ``b`` (no duplicate_of, only
    cluster_id) with ``b1`` (prompt, no distance). Every other sample is in no cluster."""
    names = dict(zip(("a", "a1", "a2", "b", "b1"), ids[:5], strict=True))
    a, b = names["a"], names["b"]
    write_marks(
        workspace,
        [
            {"sample_id": a, "duplicate_of": a, "cluster_id": a},
            {
                "sample_id": names["a1"],
                "duplicate_of": a,
                "cluster_id": a,
                "duplicate_match": "phash-8",
                "duplicate_distance": 3,
            },
            {
                "sample_id": names["a2"],
                "duplicate_of": a,
                "cluster_id": a,
                "duplicate_match": "phash-8:mirror",
                "duplicate_distance": 5,
            },
            {"sample_id": b, "cluster_id": b},
            {
                "sample_id": names["b1"],
                "duplicate_of": b,
                "cluster_id": b,
                "duplicate_match": "prompt",
            },
        ],
    )
    return names


def load(out) -> dict[str, datasets.Dataset]:
    files = {
        split: str(out / "data" / f"{split}-*.parquet")
        for split in ("train", "validation", "test")
        if list((out / "data").glob(f"{split}-*"))
    }
    return datasets.load_dataset("parquet", data_files=files)


def exported_rows(out) -> dict[str, dict]:
    return {row["sample_id"]: row for part in load(out).values() for row in part}


def marks(row: dict) -> tuple:
    return tuple(row[column] for column in MARKS)


def check_feature_types(part: datasets.Dataset) -> None:
    for column in ("duplicate_of", "cluster_id", "duplicate_match"):
        assert part.features[column] == datasets.Value("string")
        assert part.data.schema.field(column).type == pa.string()
    assert part.features["duplicate_distance"] == datasets.Value("int16")
    assert part.data.schema.field("duplicate_distance").type == pa.int16()


def card(out) -> str:
    return (out / "README.md").read_text()


def test_kept_duplicates_carry_their_marks_through_datasets(tmp_path, demo_workspace, ids):
    names = two_clusters(demo_workspace, ids)
    a, b = names["a"], names["b"]
    report = export_dataset(demo_workspace, tmp_path / "out", KEEP)
    assert report.exported == 40 and "duplicate" not in report.skipped
    loaded = load(tmp_path / "out")
    for part in loaded.values():
        check_feature_types(part)
    rows = {row["sample_id"]: row for part in loaded.values() for row in part}
    # the kept sample does not point at itself; its duplicates point at it
    assert marks(rows[a]) == (None, a, None, None)
    assert marks(rows[names["a1"]]) == (a, a, "phash-8", 3)
    assert marks(rows[names["a2"]]) == (a, a, "phash-8:mirror", 5)
    assert marks(rows[b]) == (None, b, None, None)
    assert marks(rows[names["b1"]]) == (b, b, "prompt", None)
    outside = [rows[s] for s in ids[5:]]
    assert len(outside) == 35 and all(marks(r) == (None,) * 4 for r in outside)
    # one row per cluster, as the card suggests, is exactly what dropping exports
    singles = {s for s, r in rows.items() if r["duplicate_of"] is None}
    export_dataset(demo_workspace, tmp_path / "dropped", DROP)
    assert singles == set(exported_rows(tmp_path / "dropped"))


def test_dropped_duplicates_leave_their_kept_sample_with_its_cluster(tmp_path, demo_workspace, ids):
    names = two_clusters(demo_workspace, ids)
    a, b = names["a"], names["b"]
    report = export_dataset(demo_workspace, tmp_path / "out", DROP)
    assert report.exported == 37 and report.skipped == {"duplicate": 3}
    rows = exported_rows(tmp_path / "out")
    assert not {names["a1"], names["a2"], names["b1"]} & set(rows)
    assert marks(rows[a]) == (None, a, None, None)
    assert marks(rows[b]) == (None, b, None, None)
    for part in load(tmp_path / "out").values():
        check_feature_types(part)


def test_card_and_marker_count_clusters_by_match_kind(tmp_path, demo_workspace, ids):
    two_clusters(demo_workspace, ids)
    expected = {
        "clusters": 2,
        "samples_in_clusters": 5,
        "duplicates": 3,
        "duplicates_dropped": 3,
        "duplicates_kept": 0,
        "kept_sample_left_out": 0,
        "by_match": {
            "phash-8": {"duplicates": 1, "dropped": 1},
            "phash-8:mirror": {"duplicates": 1, "dropped": 1},
            "prompt": {"duplicates": 1, "dropped": 1},
        },
    }
    dropped = export_dataset(demo_workspace, tmp_path / "dropped", DROP)
    assert dropped.clusters == expected
    marker = json.loads((tmp_path / "dropped" / "surd-export.json").read_text())
    assert marker["clusters"] == expected
    text = card(tmp_path / "dropped")
    assert "## Near-duplicates" in text
    assert "2 cluster(s) of near-duplicates" in text and "5 sample(s) in them" in text
    assert "3 are duplicates of their cluster's kept sample: 3 left out" in text
    assert "| phash-8 | 1 | 1 |" in text and "| prompt | 1 | 1 |" in text
    assert "| phash-8:mirror | 1 | 1 |" in text

    kept = export_dataset(demo_workspace, tmp_path / "kept", KEEP)
    assert kept.clusters == {
        **expected,
        "duplicates_dropped": 0,
        "duplicates_kept": 3,
        "by_match": {kind: {"duplicates": 1, "dropped": 0} for kind in expected["by_match"]},
    }
    text = card(tmp_path / "kept")
    assert "3 are duplicates of their cluster's kept sample: all 3 kept" in text
    assert "| phash-8 | 1 | 0 |" in text and "| prompt | 1 | 0 |" in text


def test_card_documents_every_column(tmp_path, demo_workspace, ids):
    two_clusters(demo_workspace, ids)
    export_dataset(demo_workspace, tmp_path / "out", DROP)
    text = card(tmp_path / "out")
    columns = text.split("## Columns\n", 1)[1]
    for name in EXPORT_COLUMNS:
        assert f"| `{name}` |" in columns
    assert "&#x27;" not in columns  # the project's own texts keep their quotes
    assert "| `duplicate_distance` | int16 |" in columns
    assert "| `duplicate_of` | string | sample_id of the kept sample" in columns
    assert "null for the kept sample itself" in columns
    assert "| `image` | image |" in columns


def test_a_workspace_never_deduped_exports_null_marks(tmp_path, demo_workspace):
    assert not demo_workspace.table_parts("duplicates")
    report = export_dataset(demo_workspace, tmp_path / "out", KEEP)
    assert report.exported == 40
    assert report.clusters["clusters"] == 0 and report.clusters["by_match"] == {}
    loaded = load(tmp_path / "out")
    for part in loaded.values():
        check_feature_types(part)
        assert all(marks(row) == (None,) * 4 for row in part)
    assert sum(len(part) for part in loaded.values()) == 40
    text = card(tmp_path / "out")
    assert "No near-duplicate clusters among the exported samples" in text
    assert "| match | duplicates | left out |" not in text


def test_marks_written_before_cluster_id_existed(tmp_path, demo_workspace, ids):
    """Older dedupe runs wrote only duplicate_of (the kept sample pointing at itself)."""
    kept, copy = ids[:2]
    write_marks(
        demo_workspace,
        [{"sample_id": kept, "duplicate_of": kept}, {"sample_id": copy, "duplicate_of": kept}],
    )
    export_dataset(demo_workspace, tmp_path / "out", KEEP)
    rows = exported_rows(tmp_path / "out")
    assert marks(rows[kept]) == (None, kept, None, None)
    assert marks(rows[copy]) == (kept, kept, None, None)
    report = export_dataset(demo_workspace, tmp_path / "dropped", DROP)
    assert report.clusters["by_match"] == {"unknown": {"duplicates": 1, "dropped": 1}}
    assert "| unknown | 1 | 1 |" in card(tmp_path / "dropped")


def test_a_stand_in_for_a_filtered_kept_sample_keeps_its_marks(tmp_path, demo_workspace, ids):
    names = two_clusters(demo_workspace, ids)
    a = names["a"]
    demo_workspace.write_table_part(
        "screening",
        records_to_table([{"sample_id": a, "nsfw": True}], table_spec("screening").schema),
    )
    options = ExportOptions(nsfw="exclude", show_progress=False)
    report = export_dataset(demo_workspace, tmp_path / "out", options)
    # a1 (the first remaining member by sample_id) stands in for a; a2 and b1 are left out
    assert report.skipped == {"nsfw": 1, "duplicate": 2} and report.exported == 37
    rows = exported_rows(tmp_path / "out")
    assert a not in rows and names["a2"] not in rows
    assert marks(rows[names["a1"]]) == (a, a, "phash-8", 3)
    assert report.clusters["kept_sample_left_out"] == 1
    assert (report.clusters["duplicates_kept"], report.clusters["duplicates_dropped"]) == (1, 2)
    text = card(tmp_path / "out")
    assert "2 left out (one sample per cluster is exported); 1 kept, standing in" in text
    assert "1 cluster(s) lost their kept sample to another filter" in text
    # kept duplicates: the cluster has no row without duplicate_of, and the card says so
    options = ExportOptions(nsfw="exclude", drop_duplicates=False, show_progress=False)
    kept = export_dataset(demo_workspace, tmp_path / "kept", options)
    assert kept.exported == 39 and kept.clusters["duplicates_kept"] == 3
    rows = exported_rows(tmp_path / "kept")
    assert [rows[s]["duplicate_of"] for s in (names["a1"], names["a2"])] == [a, a]
    assert "is None)` (but for the clusters below)." in card(tmp_path / "kept")


def test_cluster_marks_and_summary_are_pure():
    table = pa.table(
        {
            "sample_id": ["k", "d", "x", "lone"],
            "duplicate_of": ["k", "k", "gone", None],
            "cluster_id": [None, None, "gone", None],
            "duplicate_match": [None, "phash-8:crop", "prompt", None],
            "duplicate_distance": pa.array([None, 9, None, None], pa.int16()),
        }
    )
    marked = cluster_marks(table)
    assert marked["duplicate_of"].to_pylist() == [None, "k", "gone", None]
    assert marked["cluster_id"].to_pylist() == ["k", "k", "gone", None]
    summary = cluster_summary(marked, pa.array([True, False, True, True]))
    assert summary == {
        "clusters": 2,
        "samples_in_clusters": 3,
        "duplicates": 2,
        "duplicates_dropped": 1,
        "duplicates_kept": 1,
        "kept_sample_left_out": 1,
        "by_match": {
            "phash-8:crop": {"duplicates": 1, "dropped": 1},
            "prompt": {"duplicates": 1, "dropped": 0},
        },
    }
    empty = cluster_marks(table.slice(0, 0))
    assert empty.num_rows == 0 and cluster_summary(empty)["clusters"] == 0


def test_a_real_dedupe_run_exports_consistent_marks(tmp_path, workspace):
    """Whatever dedupe writes for the kept sample, the export shows the same shape."""
    from pipelines.dedupe import HashStage, dedupe
    from tests.test_dedupe import add_samples, encode, photo

    original = photo(1)
    images = {
        "orig": encode(original),
        "q20": encode(original, quality=20),
        "half": encode(original.resize((128, 128))),
        "other": encode(photo(2)),
        "third": encode(photo(3)),
    }
    add_samples(workspace, images)
    run_stage(HashStage(), workspace, RunOptions(show_progress=False))
    result = dedupe(workspace, "phash-8")
    assert len(result.clusters) == 1 and sorted(result.clusters[0]) == ["half", "orig", "q20"]
    report = export_dataset(workspace, tmp_path / "out", KEEP)
    assert report.clusters["clusters"] == 1 and report.clusters["duplicates"] == 2
    rows = exported_rows(tmp_path / "out")
    assert rows["orig"]["cluster_id"] == "orig" and rows["orig"]["duplicate_of"] is None
    for copy in ("q20", "half"):
        assert rows[copy]["duplicate_of"] == rows[copy]["cluster_id"] == "orig"
        distance = rows[copy]["duplicate_distance"]
        assert distance is None or 0 <= distance <= 6
    for alone in ("other", "third"):
        assert marks(rows[alone]) == (None,) * 4


def test_the_export_command_prints_the_cluster_counts(tmp_path, workspace):
    """What the card counts, the terminal shows too: clusters, duplicates dropped or kept."""
    from pipelines.dedupe import HashStage, dedupe
    from tests.conftest import run_surd
    from tests.test_dedupe import add_samples, encode, photo

    original = photo(1)
    add_samples(
        workspace,
        {"orig": encode(original), "q20": encode(original, quality=20), "other": encode(photo(2))},
    )
    run_stage(HashStage(), workspace, RunOptions(show_progress=False))
    assert len(dedupe(workspace, "phash-8").clusters) == 1
    for flag, dropped, kept in (("--no-keep-duplicates", 1, 0), ("--keep-duplicates", 0, 1)):
        out = tmp_path / flag
        result = run_surd("build", "export", str(out), "-w", str(workspace.root), flag)
        assert result.returncode == 0, result.stderr
        cells = [line.split("│")[1:3] for line in result.stdout.splitlines() if "│" in line]
        counts = {label.strip(): value.strip() for label, value in cells}
        assert counts["near-duplicate clusters"] == "1", result.stdout
        assert counts["duplicates dropped"] == str(dropped)
        assert counts["duplicates kept"] == str(kept)
