"""Screening: real MiniLM text similarity, a tiny random CLIP, auto-reject, review, export, CLI.

The models are built or loaded once per module (loading torch and transformers costs seconds);
every test gets a fresh workspace with the same ingested demo samples.
"""

from __future__ import annotations

import io
import math
import re
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.export import ExportOptions, export_dataset
from pipelines.ingest import IngestStage
from pipelines.rewriters.rules import strip_prompt_syntax
from pipelines.runner import RunOptions, run_stage
from pipelines.scorers import ClipScorer, TextEmbedder
from pipelines.screen import LOW_TEXT_TAG, ScreenStage, Thresholds
from surd_builder.demo import make_demo_folder
from surd_builder.review import SCREEN_REVIEWER, review_priority
from surd_builder.schema import SAMPLE_SCHEMA
from surd_builder.workspace import Workspace, utc_now
from tests.conftest import run_surd
from tests.tiny_models import save_tiny_clip

DEMO_COUNT = 8
QUIET = RunOptions(show_progress=False)
PARAPHRASE = ("three red circles on a blue background", "3 red circles, blue background, 8k")
UNRELATED = ("a dog running on a beach", "3 red circles, blue background, 8k")


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip") / "clip")


@pytest.fixture(scope="module")
def clip(clip_dir) -> ClipScorer:
    scorer = ClipScorer(str(clip_dir), device="cpu")
    scorer.load()
    return scorer


@pytest.fixture(scope="module")
def text() -> TextEmbedder:
    embedder = TextEmbedder("minilm", device="cpu")
    embedder.load()
    return embedder


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo") / "shapes"
    make_demo_folder(folder, count=DEMO_COUNT, seed=3, size=32)
    return folder


@pytest.fixture
def ingested(workspace: Workspace, demo_folder) -> Workspace:
    report = run_stage(IngestStage(demo_folder, source="demo"), workspace, QUIET)
    assert report.written == DEMO_COUNT
    return workspace


def png(color: tuple[int, int, int], size: tuple[int, int] = (40, 24)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def screening(workspace: Workspace) -> dict[str, dict]:
    return {row["sample_id"]: row for row in workspace.read_table("screening").to_pylist()}


def dataset_rows(workspace: Workspace) -> dict[str, dict]:
    return {row["sample_id"]: row for row in workspace.dataset().to_pylist()}


def threshold_in_widest_gap(scores: dict[str, float]) -> tuple[float, set[str]]:
    """A threshold halfway across the widest gap between observed scores, and the ids below it
    (at least one sample on each side)."""
    ordered = sorted(scores.values())
    gaps = [(ordered[i + 1] - ordered[i], i) for i in range(len(ordered) - 1)]
    width, index = max(gaps)
    assert width > 0, ordered
    threshold = (ordered[index] + ordered[index + 1]) / 2
    return threshold, {sid for sid, value in scores.items() if value < threshold}


def screen(workspace, clip=None, text=None, thresholds=None, options=QUIET):
    stage = ScreenStage(clip, text, thresholds)
    return stage, run_stage(stage, workspace, options)


def auto_reject(workspace, clip, text) -> tuple[float, set[str]]:
    """Screen without thresholds, then with a text threshold between the observed scores;
    returns (threshold, rejected ids)."""
    screen(workspace, clip, text)
    scores = {sid: row["text_similarity"] for sid, row in screening(workspace).items()}
    threshold, below = threshold_in_widest_gap(scores)
    stage, _ = screen(workspace, clip, text, Thresholds(min_text_similarity=threshold))
    assert stage.scored == 0
    return threshold, below


# ----------------------------------------------------------------------------- 1. text
def test_minilm_similarity_separates_paraphrase_from_unrelated(text):
    paraphrase, unrelated = text.similarities(
        [PARAPHRASE[0], UNRELATED[0]], [PARAPHRASE[1], UNRELATED[1]]
    )
    assert paraphrase > 0.6, paraphrase
    assert paraphrase - unrelated > 0.3, (paraphrase, unrelated)
    for value in (paraphrase, unrelated):
        assert -1.0 - 1e-6 <= value <= 1.0 + 1e-6

    embeddings = text.embed([*PARAPHRASE, UNRELATED[0], ""])
    assert embeddings.shape == (4, 384)
    assert np.allclose(embeddings.norm(dim=-1).numpy(), 1.0, atol=1e-5)
    assert text.embed([]).shape[0] == 0


def test_text_similarity_does_not_depend_on_order_or_batching(text):
    first = [
        "a cat",
        "three red circles on a blue background",
        "one tiny green triangle floating on a white background in the middle of nowhere",
        "two yellow squares",
        "a dog running on a beach at sunset with waves and seagulls",
    ]
    second = [
        "cat, 8k",
        "3 red circles, blue background, 8k",
        "1 green triangle, white background, minimalism, flat vector art, highly detailed",
        "a purple owl",
        "dog, beach",
    ]
    one_at_a_time = [text.similarities([a], [b])[0] for a, b in zip(first, second, strict=True)]
    batched = text.similarities(first, second)
    assert np.allclose(batched, one_at_a_time, atol=1e-5)
    assert all(-1.0 - 1e-6 <= v <= 1.0 + 1e-6 for v in batched)

    reversed_scores = text.similarities(first[::-1], second[::-1])
    assert np.allclose(reversed_scores[::-1], one_at_a_time, atol=1e-5)

    saved = text.batch_size
    text.batch_size = 2  # several chunks of the length-sorted order
    try:
        small_batches = text.similarities(first, second)
        embeddings = text.embed(first)
    finally:
        text.batch_size = saved
    assert np.allclose(small_batches, one_at_a_time, atol=1e-5)
    for index, sentence in enumerate(first):
        assert np.allclose(embeddings[index].numpy(), text.embed([sentence])[0].numpy(), atol=1e-5)


# ----------------------------------------------------------------------------- 2. CLIP
def test_clip_batch_equals_single_and_unreadable_image_is_none(clip):
    images = [png((200, 30, 30)), png((10, 100, 200), (16, 50)), png((240, 210, 40), (64, 64))]
    texts = ["a red fox", "two cute cats sitting in a snowy forest, 8k, artstation", "castle"]
    pairs = zip(images, texts, strict=True)
    single = [clip.scores([image], [sentence])[0] for image, sentence in pairs]
    batch = clip.scores(images, texts)
    assert all(isinstance(v, float) and -1.0 - 1e-6 <= v <= 1.0 + 1e-6 for v in batch)
    assert np.allclose(batch, single, atol=1e-5)
    assert len(set(batch)) == 3  # the scores do depend on the inputs

    mixed = clip.scores(
        [images[0], b"not an image", images[1], b"", images[2]],
        [texts[0], "broken", texts[1], "empty", texts[2]],
    )
    assert mixed[1] is None and mixed[3] is None
    assert np.allclose([mixed[0], mixed[2], mixed[4]], single, atol=1e-5)
    assert clip.scores([b"not an image"], ["x"]) == [None]
    assert clip.scores([], []) == []


# ----------------------------------------------------------------------------- 3. stage
def test_stage_scores_everyone_and_thresholds_move_samples_without_rescoring(ingested, clip, text):
    ids = set(ingested.read_table("samples", ["sample_id"])["sample_id"].to_pylist())
    stage, report = screen(ingested, clip, text)
    assert (report.planned, report.already_done, report.processed, report.written) == (
        DEMO_COUNT,
        0,
        DEMO_COUNT,
        DEMO_COUNT,
    )
    assert stage.scored == DEMO_COUNT

    rows = screening(ingested)
    assert set(rows) == ids
    data = dataset_rows(ingested)
    for sample_id in ids:
        row, joined = rows[sample_id], data[sample_id]
        assert row["clip_score"] is not None and row["text_similarity"] is not None
        assert -1.0 <= row["clip_score"] <= 1.0 and -1.0 <= row["text_similarity"] <= 1.0
        assert (joined["clip_score"], joined["text_similarity"]) == (
            row["clip_score"],
            row["text_similarity"],
        )
        assert row["review_status"] is None and joined["review_status"] == "pending"
        assert joined["review_tags"] is None and joined["reviewer"] is None
        # the stored scores are what the models give for this sample's inputs
        expected_text = text.similarities(
            [joined["narrative_prompt"]], [strip_prompt_syntax(joined["complex_prompt"])]
        )[0]
        assert math.isclose(row["text_similarity"], expected_text, abs_tol=1e-4)
        image = ingested.read_images([joined["image_sha256"]])[joined["image_sha256"]]
        expected_clip = clip.scores([image], [joined["narrative_prompt"]])[0]
        assert math.isclose(row["clip_score"], expected_clip, abs_tol=1e-4)

    # nothing changed: a re-run has nothing to do
    stage, report = screen(ingested, clip, text)
    assert report.already_done == report.planned == DEMO_COUNT
    assert report.processed == 0 and stage.scored == 0

    # a threshold between the observed scores rejects exactly the samples below it
    scores = {sid: row["text_similarity"] for sid, row in rows.items()}
    threshold, below = threshold_in_widest_gap(scores)
    assert below and below != ids
    stage, report = screen(ingested, clip, text, Thresholds(min_text_similarity=threshold))
    assert stage.scored == 0
    assert report.processed == len(below) and report.already_done == DEMO_COUNT - len(below)
    rows = screening(ingested)
    data = dataset_rows(ingested)
    for sample_id in ids:
        assert rows[sample_id]["text_similarity"] == scores[sample_id]  # not recomputed
        if sample_id in below:
            assert rows[sample_id]["review_status"] == "rejected"
            assert rows[sample_id]["reviewed_at"] is not None
            joined = data[sample_id]
            assert joined["review_status"] == "rejected"
            assert joined["review_tags"] == [LOW_TEXT_TAG]
            assert joined["reviewer"] == SCREEN_REVIEWER
            assert joined["reviewed_at"] is not None
        else:
            assert rows[sample_id]["review_status"] is None
            assert data[sample_id]["review_status"] == "pending"
            assert data[sample_id]["review_tags"] is None

    # the same threshold again: nothing to do
    stage, report = screen(ingested, clip, text, Thresholds(min_text_similarity=threshold))
    assert report.already_done == DEMO_COUNT and stage.scored == 0

    # threshold removed: the rejected samples come back, still without recomputing
    stage, report = screen(ingested, clip, text)
    assert stage.scored == 0
    assert report.processed == len(below)
    data = dataset_rows(ingested)
    assert {row["review_status"] for row in data.values()} == {"pending"}
    assert all(row["review_tags"] is None and row["reviewer"] is None for row in data.values())
    assert {sid: row["text_similarity"] for sid, row in data.items()} == scores


def test_clip_threshold_tags_low_clip_score(ingested, clip):
    screen(ingested, clip=clip)
    rows = screening(ingested)
    assert all(row["text_similarity"] is None for row in rows.values())
    scores = {sid: row["clip_score"] for sid, row in rows.items()}
    threshold, below = threshold_in_widest_gap(scores)
    stage, _ = screen(ingested, clip=clip, thresholds=Thresholds(min_clip_score=threshold))
    assert stage.scored == 0
    data = dataset_rows(ingested)
    assert {sid for sid, row in data.items() if row["review_status"] == "rejected"} == below
    assert all(data[sid]["review_tags"] == ["low-clip-score"] for sid in below)


def test_missing_prompts_are_not_planned_and_missing_scores_never_reject(workspace, text):
    rows = [
        ("fox", "a red fox in a snowy forest", "red fox, snowy forest, 8k"),
        ("no-keywords", "a cat on a sofa", None),
        ("no-narrative", None, "dog, beach"),
        ("empty-narrative", "", "dog, beach"),
        ("syntax", "a cat on a sofa", "(masterpiece:1.2), <lora:catlora:0.8> cat, [sofa]"),
    ]
    workspace.write_table_part(
        "samples",
        pa.table(
            {
                "sample_id": [f"sid-{name}" for name, _, _ in rows],
                "source": ["test"] * len(rows),
                "source_item_id": [name for name, _, _ in rows],
                "narrative_prompt": [narrative for _, narrative, _ in rows],
                "complex_prompt": [keywords for _, _, keywords in rows],
            }
        ),
    )
    with pytest.raises(ValueError):
        ScreenStage()
    stage = ScreenStage(text=text, thresholds=Thresholds(min_text_similarity=0.99))
    assert not stage.needs_images
    report = run_stage(stage, workspace, QUIET)
    assert (report.planned, report.written, report.failed) == (3, 3, 0)
    result = screening(workspace)
    assert set(result) == {"sid-fox", "sid-no-keywords", "sid-syntax"}
    assert result["sid-no-keywords"]["text_similarity"] is None
    assert result["sid-no-keywords"]["review_status"] is None  # no evidence, no rejection
    assert result["sid-fox"]["review_status"] == result["sid-syntax"]["review_status"] == "rejected"
    # prompt syntax (weights, LoRA tags, brackets) is removed before embedding
    expected = text.similarities(["a cat on a sofa"], ["masterpiece, cat, sofa"])[0]
    assert math.isclose(result["sid-syntax"]["text_similarity"], expected, abs_tol=1e-4)
    assert all(row["clip_score"] is None for row in result.values())


# ----------------------------------------------------------------------------- 4. narratives
def test_changed_narrative_rescores_only_that_sample(ingested, clip, text):
    screen(ingested, clip, text)
    before = screening(ingested)
    target = sorted(before)[0]
    before_narrative = dataset_rows(ingested)[target]["narrative_prompt"]
    new_narrative = "a dog running on a beach"
    ingested.write_table_part(
        "narratives",
        pa.table(
            {
                "sample_id": [target],
                "narrative_prompt": [new_narrative],
                "narrative_origin": ["human"],
                "rewrite_key": ["test-key-1"],
            }
        ),
    )
    stage, report = screen(ingested, clip, text)
    assert stage.scored == 1
    assert (report.planned, report.already_done, report.processed) == (
        DEMO_COUNT,
        DEMO_COUNT - 1,
        1,
    )
    after = screening(ingested)
    assert after[target]["screening_key"] != before[target]["screening_key"]
    joined = dataset_rows(ingested)[target]
    assert joined["narrative_prompt"] == new_narrative
    expected = text.similarities([new_narrative], [strip_prompt_syntax(joined["complex_prompt"])])
    assert math.isclose(after[target]["text_similarity"], expected[0], abs_tol=1e-4)
    assert after[target]["text_similarity"] < before[target]["text_similarity"]
    for sample_id in set(before) - {target}:
        assert after[sample_id] == before[sample_id]

    stage, report = screen(ingested, clip, text)
    assert stage.scored == 0 and report.already_done == DEMO_COUNT

    # changing the narrative back finds the first scores in the table's history: no rescoring
    ingested.write_table_part(
        "narratives",
        pa.table(
            {
                "sample_id": [target],
                "narrative_prompt": [before_narrative],
                "narrative_origin": ["human"],
                "rewrite_key": ["test-key-2"],
            }
        ),
    )
    stage, report = screen(ingested, clip, text)
    assert (stage.scored, report.processed) == (0, 1)
    restored = screening(ingested)[target]
    for column in ("screening_key", "clip_score", "text_similarity"):
        assert restored[column] == before[target][column]


# ----------------------------------------------------------------------------- 5. review
def test_human_review_overrides_auto_reject(ingested, clip, text):
    _, rejected = auto_reject(ingested, clip, text)
    target = sorted(rejected)[0]
    narrative = dataset_rows(ingested)[target]["narrative_prompt"]
    reviews = pa.table(
        {
            "sample_id": [target],
            "review_status": ["accepted"],
            "reviewer": ["alice"],
            "reviewed_at": pa.array([utc_now()], SAMPLE_SCHEMA.field("reviewed_at").type),
        }
    )
    ingested.write_table_part("reviews", reviews)
    data = dataset_rows(ingested)
    row = data[target]
    assert row["review_status"] == "accepted"
    assert row["reviewer"] == "alice"
    assert row["review_tags"] is None  # not the screening tags
    assert row["narrative_prompt"] == narrative  # the review did not touch the narrative
    assert row["text_similarity"] is not None
    for sample_id in rejected - {target}:
        assert data[sample_id]["review_status"] == "rejected"
    # the screening row itself still says rejected; only the join lets the human win
    assert screening(ingested)[target]["review_status"] == "rejected"


# ----------------------------------------------------------------------------- 6. export
def test_export_leaves_auto_rejected_samples_out(ingested, clip, text, tmp_path):
    _, rejected = auto_reject(ingested, clip, text)
    report = export_dataset(ingested, tmp_path / "out", ExportOptions(show_progress=False))
    assert report.exported == DEMO_COUNT - len(rejected)
    assert report.skipped == {"review-status": len(rejected)}
    exported = pa.concat_tables([pq.read_table(path) for path in report.files])
    assert not set(exported["sample_id"].to_pylist()) & rejected
    assert set(exported["review_status"].to_pylist()) == {"pending"}


# ----------------------------------------------------------------------------- 7. priority
def test_review_priority_order():
    # clip present on 4 rows: b 0.10 -> 0, a 0.30 -> 1/3, e 0.40 -> 2/3, d 0.50 -> 1
    # text present on 3 rows: d 0.20 -> 0, e 0.60 -> 1/2, a 0.90 -> 1
    # worst: b 0, d 0, a 1/3, e 1/2; c and f have no score
    table = pa.table(
        {
            "sample_id": ["id-d", "id-f", "id-a", "id-c", "id-e", "id-b"],
            "clip_score": pa.array([0.50, None, 0.30, None, 0.40, 0.10], pa.float32()),
            "text_similarity": pa.array([0.20, None, 0.90, None, 0.60, None], pa.float32()),
        }
    )
    order = review_priority(table)
    assert order.type == pa.int64()
    ids = table["sample_id"].take(order).to_pylist()
    assert ids == ["id-b", "id-d", "id-a", "id-e", "id-c", "id-f"]

    # one score column only; rows without it last by sample_id
    only_clip = table.drop_columns(["text_similarity"])
    ids = only_clip["sample_id"].take(review_priority(only_clip)).to_pylist()
    assert ids == ["id-b", "id-a", "id-e", "id-d", "id-c", "id-f"]
    neither = table.select(["sample_id"])
    assert neither["sample_id"].take(review_priority(neither)).to_pylist() == sorted(
        neither["sample_id"].to_pylist()
    )
    assert review_priority(table.slice(0, 0)).to_pylist() == []


def test_review_priority_equal_scores_are_ordered_by_sample_id():
    table = pa.table(
        {
            "sample_id": ["id-2", "id-1", "id-0"],
            "clip_score": pa.array([0.5, 0.5, 0.9], pa.float32()),
        }
    )
    expected = ["id-1", "id-2", "id-0"]
    for permutation in ([0, 1, 2], [1, 0, 2], [2, 1, 0]):
        shuffled = table.take(permutation)
        assert shuffled["sample_id"].take(review_priority(shuffled)).to_pylist() == expected


# ----------------------------------------------------------------------------- 8. CLI
def assert_one_line_error(result, fragment: str) -> None:
    assert result.returncode != 0, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and fragment in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout


def test_cli_screen(ingested, tmp_path):
    ws = str(ingested.root)
    assert_one_line_error(run_surd("build", "screen", "-w", ws), "--clip-model")

    # Both commands below import torch and transformers in a fresh process (seconds each): run
    # them side by side, each on its own workspace (one run of a stage per workspace at a time).
    copy = tmp_path / "copy"
    shutil.copytree(ingested.root, copy)
    with ThreadPoolExecutor(max_workers=2) as pool:
        missing = pool.submit(
            run_surd,
            "build",
            "screen",
            "-w",
            str(copy),
            "--clip-model",
            "/does/not/exist",
            "--no-progress",  # the bar would be drawn before the model loads
        )
        text_only = pool.submit(
            run_surd,
            "build",
            "screen",
            "-w",
            ws,
            "--text-model",
            "minilm",
            "--min-text-similarity",
            "0.99",
            "--no-progress",
        )
        missing, text_only = missing.result(), text_only.result()

    assert_one_line_error(missing, "/does/not/exist")
    assert "screening" not in {p.name for p in (copy / "tables").iterdir()}

    assert text_only.returncode == 0, text_only.stderr
    out = text_only.stdout
    assert "screen" in out and "completed" in out
    for label in ("planned", "already done", "processed", "written", "failed"):
        assert label in out
    assert re.search(rf"planned\W+{DEMO_COUNT}\W", out), out  # the summary table's first row
    data = Workspace.open(ws).dataset().to_pylist()
    rejected = [row for row in data if row["review_status"] == "rejected"]
    assert rejected
    for row in data:
        assert row["text_similarity"] is not None and row["clip_score"] is None
        assert (row["review_status"] == "rejected") == (row["text_similarity"] < 0.99)
    assert all(row["review_tags"] == [LOW_TEXT_TAG] for row in rejected)
    assert all(row["reviewer"] == SCREEN_REVIEWER for row in rejected)
