from __future__ import annotations

import io
import json

import datasets
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.export import ExportOptions, export_dataset
from pipelines.ingest import IngestStage
from pipelines.runner import RunOptions, run_stage
from surd_builder.demo import make_demo_folder
from surd_builder.errors import InputError, OutputError, OutputExistsError
from surd_builder.ids import split_for
from surd_builder.schema import EXPORT_COLUMNS, STAGE_TABLES, records_to_table

QUIET = ExportOptions(show_progress=False)


@pytest.fixture
def demo_workspace(tmp_path, workspace):
    make_demo_folder(tmp_path / "demo", count=40, seed=3, size=32)
    run_stage(
        IngestStage(tmp_path / "demo", source="demo"), workspace, RunOptions(show_progress=False)
    )
    return workspace


def load(out):
    files = {
        s: str(out / "data" / f"{s}-*.parquet")
        for s in ("train", "test")
        if list((out / "data").glob(f"{s}-*"))
    }
    return datasets.load_dataset("parquet", data_files=files)


def test_export_loads_in_datasets_with_decoded_images(tmp_path, demo_workspace):
    out = tmp_path / "export"
    report = export_dataset(
        demo_workspace, out, ExportOptions(test_fraction=0.25, show_progress=False)
    )
    assert report.exported == 40 and sum(report.by_split.values()) == 40
    loaded = load(out)
    assert set(loaded) == set(report.by_split) == {"train", "test"}
    train = loaded["train"]
    assert list(train.features) == list(EXPORT_COLUMNS)
    assert isinstance(train.features["image"], datasets.Image)
    assert train.features["complex_prompt"] == datasets.Value("string")

    workspace_rows = {r["sample_id"]: r for r in demo_workspace.dataset().to_pylist()}
    for split, part in loaded.items():
        for row in part:
            source = workspace_rows[row["sample_id"]]
            assert isinstance(row["image"], Image.Image)
            assert row["image"].size == (32, 32) == (row["width"], row["height"])
            assert row["narrative_prompt"] == source["narrative_prompt"]
            assert row["complex_prompt"] == source["complex_prompt"]
            assert row["split"] == split == split_for(row["sample_id"], 0.25)
            assert row["review_status"] == "pending"
    # embedded bytes, not paths: the original file's bytes come back
    first = train[0]
    original = demo_workspace.read_images([workspace_rows[first["sample_id"]]["image_sha256"]])
    buffer = io.BytesIO()
    first["image"].save(buffer, format="PNG")
    assert (
        Image.open(io.BytesIO(next(iter(original.values())))).tobytes() == first["image"].tobytes()
    )


def test_shards_are_bounded_and_named_for_splits(tmp_path, demo_workspace):
    out = tmp_path / "export"
    bound = 1_000
    options = ExportOptions(test_fraction=0.0, max_shard_bytes=bound, show_progress=False)
    report = export_dataset(demo_workspace, out, options)
    names = sorted(p.name for p in (out / "data").iterdir())
    total = len(names)
    assert total > 2 and names == [f"train-{i:05d}-of-{total:05d}.parquet" for i in range(total)]
    for name in names:
        images = pq.read_table(out / "data" / name, columns=["image"])["image"].to_pylist()
        payload = sum(len(image["bytes"]) for image in images)
        assert payload <= bound or len(images) == 1
    assert sum(pq.ParquetFile(out / "data" / n).metadata.num_rows for n in names) == 40
    assert report.files == [out / "data" / n for n in names]
    assert len(load(out)["train"]) == 40


def test_review_status_and_duplicates_filter(tmp_path, demo_workspace):
    ids = sorted(demo_workspace.sample_ids("samples"))
    reviews = [
        {"sample_id": ids[0], "review_status": "rejected"},
        {"sample_id": ids[1], "review_status": "accepted"},
        {"sample_id": ids[2], "review_status": "corrected", "narrative_prompt": "fixed by a human"},
    ]
    demo_workspace.write_table_part(
        "reviews", records_to_table(reviews, STAGE_TABLES["reviews"].schema)
    )
    duplicates = [
        {"sample_id": ids[3], "duplicate_of": ids[4]},
        {"sample_id": ids[4], "duplicate_of": ids[4]},
    ]
    demo_workspace.write_table_part(
        "duplicates", records_to_table(duplicates, STAGE_TABLES["duplicates"].schema)
    )

    report = export_dataset(demo_workspace, tmp_path / "all", QUIET)
    assert report.exported == 38
    assert report.skipped == {"review-status": 1, "duplicate": 1}
    rows = {r["sample_id"]: r for split in load(tmp_path / "all").values() for r in split}
    assert ids[0] not in rows and ids[3] not in rows and ids[4] in rows
    assert rows[ids[2]]["narrative_prompt"] == "fixed by a human"

    reviewed = export_dataset(
        demo_workspace,
        tmp_path / "reviewed",
        ExportOptions(statuses=("accepted", "corrected"), show_progress=False),
    )
    assert reviewed.exported == 2


def test_existing_target_and_bad_options(tmp_path, demo_workspace):
    out = tmp_path / "export"
    export_dataset(demo_workspace, out, QUIET)
    before = sorted(p.name for p in (out / "data").iterdir())
    with pytest.raises(OutputExistsError, match="already exists"):
        export_dataset(demo_workspace, out, QUIET)
    assert sorted(p.name for p in (out / "data").iterdir()) == before  # untouched
    (out / "data" / "stray.txt").write_text("from an older export")
    export_dataset(demo_workspace, out, ExportOptions(overwrite=True, show_progress=False))
    assert not (out / "data" / "stray.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    with pytest.raises(InputError, match="unknown review status"):
        ExportOptions(statuses=("approved",))
    with pytest.raises(InputError, match="fractions must be >= 0 and sum to less than 1"):
        ExportOptions(test_fraction=0.7, validation_fraction=0.4)


def test_empty_workspace_is_a_clear_error(tmp_path, workspace):
    with pytest.raises(InputError, match="no samples yet"):
        export_dataset(workspace, tmp_path / "out", QUIET)
    assert not (tmp_path / "out").exists()


def test_overwrite_replaces_only_an_earlier_export(tmp_path, demo_workspace):
    mine = tmp_path / "my-files"
    mine.mkdir()
    (mine / "thesis.tex").write_text("irreplaceable")
    overwrite = ExportOptions(overwrite=True, show_progress=False)
    with pytest.raises(OutputExistsError, match="not a surd export"):
        export_dataset(demo_workspace, mine, overwrite)
    assert (mine / "thesis.tex").read_text() == "irreplaceable"
    for target in (demo_workspace.root, demo_workspace.root / "out", demo_workspace.root.parent):
        with pytest.raises(OutputExistsError, match="the workspace"):
            export_dataset(demo_workspace, target, overwrite)
    assert demo_workspace.read_table("samples").num_rows == 40

    out = tmp_path / "export"
    export_dataset(demo_workspace, out, QUIET)
    marker = json.loads((out / "surd-export.json").read_text())
    assert marker["format"] == "surd-export" and marker["samples"] == 40
    assert sum(marker["splits"].values()) == 40
    assert sorted(marker["files"]) == sorted(p.name for p in (out / "data").iterdir())
    assert str(tmp_path) not in json.dumps(marker)  # no local paths in published files
    export_dataset(demo_workspace, out, overwrite)  # an earlier export may be replaced


def test_no_match_and_unwritable_targets_are_clear_errors(tmp_path, demo_workspace):
    only_rejected = ExportOptions(statuses=("rejected",), show_progress=False)
    with pytest.raises(InputError, match="no sample passes the export filters"):
        export_dataset(demo_workspace, tmp_path / "none", only_rejected)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(OutputError, match="cannot write the export to .*a-file/out"):
        export_dataset(demo_workspace, tmp_path / "a-file" / "out", QUIET)


def test_rows_whose_image_is_not_stored_are_left_out(tmp_path, demo_workspace):
    orphan = {"sample_id": "0" * 32, "source": "x", "source_item_id": "1", "image_sha256": "f" * 64}
    demo_workspace.write_table_part(
        "samples", records_to_table([orphan], STAGE_TABLES["samples"].schema)
    )
    report = export_dataset(demo_workspace, tmp_path / "out", QUIET)
    assert (report.exported, report.skipped) == (40, {"image-missing": 1})


def test_min_side_and_nsfw_policies(tmp_path, demo_workspace):
    ids = sorted(demo_workspace.read_table("samples", ["sample_id"])["sample_id"].to_pylist())
    marked = {"sample_id": ids[:5], "nsfw": [True] * 5}
    demo_workspace.write_table_part(
        "screening",
        records_to_table(
            [
                dict(zip(marked, values, strict=True))
                for values in zip(*marked.values(), strict=True)
            ],
            STAGE_TABLES["screening"].schema,
        ),
    )
    excluded = export_dataset(
        demo_workspace, tmp_path / "a", ExportOptions(nsfw="exclude", show_progress=False)
    )
    assert (excluded.exported, excluded.skipped) == (35, {"nsfw": 5})
    only = export_dataset(
        demo_workspace, tmp_path / "b", ExportOptions(nsfw="only", show_progress=False)
    )
    assert only.exported == 5
    assert export_dataset(demo_workspace, tmp_path / "c", QUIET).exported == 40  # include
    with pytest.raises(InputError, match="no sample passes"):
        export_dataset(
            demo_workspace, tmp_path / "e", ExportOptions(min_side=33, show_progress=False)
        )
    assert (
        export_dataset(
            demo_workspace, tmp_path / "f", ExportOptions(min_side=32, show_progress=False)
        ).exported
        == 40
    )
    with pytest.raises(InputError, match="nsfw"):
        ExportOptions(nsfw="maybe")


def test_dataset_card_and_report(tmp_path, demo_workspace):
    import yaml

    out = tmp_path / "export"
    report = export_dataset(
        demo_workspace, out, ExportOptions(test_fraction=0.25, show_progress=False)
    )
    text = (out / "README.md").read_text()
    front = yaml.safe_load(text.split("---\n")[1])
    assert [c["config_name"] for c in front["configs"]] == ["default"]
    splits = {s["name"]: s["num_examples"] for s in front["dataset_info"]["splits"]}
    assert splits == report.by_split
    names = [f["name"] for f in front["dataset_info"]["features"]]
    assert names == list(EXPORT_COLUMNS)
    assert "| demo | 40 |" in text
    # the card alone is enough for datasets: load the folder, no data_files
    loaded = datasets.load_dataset(str(out))
    assert {name: len(part) for name, part in loaded.items()} == report.by_split
    assert isinstance(loaded["train"][0]["image"], Image.Image)
    page = (out / "report.html").read_text()
    assert page.startswith("<!doctype html>") and "Samples per source" in page
    assert "http" not in page and "<script" not in page  # opens offline, nothing fetched


def test_export_round_trips_through_pandas(tmp_path, demo_workspace):
    import pandas as pd

    out = tmp_path / "export"
    export_dataset(demo_workspace, out, QUIET)
    frame = pd.read_parquet(out / "data")
    assert len(frame) == 40 and list(frame.columns) == list(EXPORT_COLUMNS)
    stored = demo_workspace.read_images(demo_workspace.image_index())
    for _, row in frame.iterrows():
        assert row["image"]["bytes"] == stored[row["image_sha256"]]
        assert Image.open(io.BytesIO(row["image"]["bytes"])).size == (row["width"], row["height"])


KILLED_EXPORT = """
import sys
from pipelines import export
from surd_builder.workspace import Workspace
original = export._ShardWriter.write
def write_then_block(self, table, row_bytes):
    original(self, table, row_bytes)
    print("shard written", flush=True)
    sys.stdin.readline()  # blocks: the parent kills us here, mid-export
export._ShardWriter.write = write_then_block
options = export.ExportOptions(show_progress=False)
export.export_dataset(Workspace(sys.argv[1]), sys.argv[2], options)
"""


def test_a_killed_export_leaves_no_partial_output(tmp_path, demo_workspace):
    import subprocess
    import sys

    out = tmp_path / "export"
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_EXPORT, str(demo_workspace.root), str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout.readline().strip() == "shard written"  # mid-export, for certain
    child.kill()
    child.wait()
    assert not out.exists()  # nothing half-written under the real name
    assert [p.name for p in tmp_path.glob(".tmp-*-export")]  # the staging copy, left by the kill
    report = export_dataset(demo_workspace, out, QUIET)  # and the next export just works
    assert report.exported == 40 and (out / "README.md").is_file()


def test_a_filtered_out_keeper_leaves_one_stand_in_of_its_cluster(tmp_path, demo_workspace):
    from pipelines.card import _cell

    ids = sorted(demo_workspace.read_table("samples", ["sample_id"])["sample_id"].to_pylist())
    keeper, first, second = ids[:3]
    rows = [{"sample_id": s, "duplicate_of": keeper} for s in (keeper, first, second)]
    demo_workspace.write_table_part(
        "duplicates", records_to_table(rows, STAGE_TABLES["duplicates"].schema)
    )
    assert export_dataset(demo_workspace, tmp_path / "a", QUIET).exported == 38
    screening = [{"sample_id": keeper, "nsfw": True}]
    demo_workspace.write_table_part(
        "screening", records_to_table(screening, STAGE_TABLES["screening"].schema)
    )
    options = ExportOptions(nsfw="exclude", show_progress=False)
    report = export_dataset(demo_workspace, tmp_path / "b", options)
    assert report.exported == 38 and report.skipped == {"nsfw": 1, "duplicate": 1}
    exported = set(
        pq.read_table(tmp_path / "b" / "data", columns=["sample_id"])["sample_id"].to_pylist()
    )
    assert first in exported and second not in exported and keeper not in exported
    assert _cell("CC | BY\n# not a heading") == "CC \\| BY # not a heading"


def test_report_has_score_histograms_and_bounded_offline_thumbnails(tmp_path, demo_workspace):
    import base64
    import re

    from pipelines.report_page import THUMBNAIL_SIDE, THUMBNAILS_PER_GROUP

    make_demo_folder(tmp_path / "other", count=12, seed=5, size=32)
    run_stage(
        IngestStage(tmp_path / "other", source="other"), demo_workspace,
        RunOptions(show_progress=False),
    )  # fmt: skip
    ids = sorted(demo_workspace.sample_ids("samples"))
    scores = [
        {"sample_id": s, "clip_score": 0.2 + 0.01 * (n % 10), "text_similarity": 0.5 + n / 200}
        for n, s in enumerate(ids)
    ]
    scores[0]["clip_score"] = None  # a sample without a CLIP score is counted as such
    demo_workspace.write_table_part(
        "screening", records_to_table(scores, STAGE_TABLES["screening"].schema)
    )
    reviews = [{"sample_id": s, "review_status": "accepted"} for s in ids[:10]]
    demo_workspace.write_table_part(
        "reviews", records_to_table(reviews, STAGE_TABLES["reviews"].schema)
    )
    out = tmp_path / "export"
    export_dataset(demo_workspace, out, QUIET)
    page = (out / "report.html").read_text()
    # a histogram per screening score, with its summary
    assert page.count("<svg class=hist") == 2
    assert "CLIP score" in page and "Text similarity" in page
    assert "51 samples, mean" in page and "1 without a score" in page
    # galleries per source (demo, other) and per review status (pending, accepted)
    thumbnails = re.findall(r'<img src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(thumbnails) == 4 * THUMBNAILS_PER_GROUP
    groups = re.findall(r"<div class=gallery>(.*?)</div>", page)
    assert len(groups) == 4 and all(g.count("<img") <= THUMBNAILS_PER_GROUP for g in groups)
    for name in ("demo", "other", "pending", "accepted"):
        assert f"<h3>{name} <span class=note>(8 of" in page
    with Image.open(io.BytesIO(base64.b64decode(thumbnails[0]))) as thumb:
        assert thumb.format == "JPEG" and max(thumb.size) <= THUMBNAIL_SIDE
    # offline: nothing external is referenced, no script
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page, re.I)
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page and "<link" not in page and "@import" not in page
    assert len(page.encode()) < 300_000


def test_report_thumbnails_are_bounded_per_group(tmp_path, demo_workspace, monkeypatch):
    import pipelines.report_page as report_page

    monkeypatch.setattr(report_page, "THUMBNAILS_PER_GROUP", 3)
    out = tmp_path / "export"
    export_dataset(demo_workspace, out, QUIET)
    page = (out / "report.html").read_text()
    # one source, one review status: 3 thumbnails each; no scores, so no histogram
    assert page.count('<img src="data:image/jpeg;base64,') == 6
    assert "(3 of 40)" in page and "<svg" not in page
