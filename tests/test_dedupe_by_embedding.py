"""``surd build dedupe --by embedding``: CLIP image-embedding pairs joined into the clusters.

Random-weight CLIP (``save_tiny_clip``) tests the mechanics only, so the pictures are chosen for
cosines that do not depend on the weights: identical pixels in two files embed identically
(cosine 1.0), and so do two wide images that differ only outside the square the CLIP processor
crops from the centre (while their perceptual hashes are far apart). A JPEG-q95 or mirrored copy
of random noise (which the hashes find), and distinct noise images, stay below 0.999 (about
0.99 at most with these weights).
"""

from __future__ import annotations

import importlib.util
import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipelines.dedupe import cluster_samples, dedupe
from pipelines.embedding_dedupe import DEFAULT_MIN_COSINE, EmbeddingPass, cache_folder
from pipelines.ingest import IngestStage
from pipelines.runner import RunOptions, run_stage
from surd_builder.cli import app
from surd_builder.clip import ClipScorer
from surd_builder.errors import InputError
from surd_builder.workspace import Workspace
from tests.tiny_models import save_tiny_clip

QUIET = RunOptions(show_progress=False)
THRESHOLD = 0.999  # distinct noise images of the tiny CLIP stay below it (max ~0.99)


def noise(seed: int, size: tuple[int, int] = (64, 64)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def encode(pixels: np.ndarray, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def wide(centre: np.ndarray, sides_seed: int) -> np.ndarray:
    """96x32: ``centre`` (32x32) between two noise squares; CLIP sees only the centre."""
    sides = noise(sides_seed, (64, 32))
    return np.concatenate([sides[:, :32], centre, sides[:, 32:]], axis=1)


def pictures() -> dict[str, bytes]:
    original = noise(1)
    centre = noise(2, (32, 32))
    return {
        "a.png": encode(original, compress_level=9),
        "a-resaved.png": encode(original, compress_level=1),  # other bytes, the same pixels
        "a.jpg": encode(original, "JPEG", quality=95),  # a hash copy; CLIP cosine ~0.99
        "a-mirror.png": encode(original[:, ::-1].copy()),  # found by the mirror hash only
        "wide-1.png": encode(wide(centre, 3)),
        "wide-2.png": encode(wide(centre, 4)),  # the same centre: CLIP's alone
        "b.png": encode(noise(5)),
        "c.png": encode(noise(6)),
    }


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return str(save_tiny_clip(tmp_path_factory.mktemp("tiny-clip") / "clip"))


@pytest.fixture
def ingested(workspace: Workspace, tmp_path) -> Workspace:
    folder = tmp_path / "images"
    folder.mkdir()
    for name, data in pictures().items():
        (folder / name).write_bytes(data)
        (folder / name).with_suffix(".txt").write_text(f"a picture, {name}")
    assert run_stage(IngestStage(folder, source="emb"), workspace, QUIET).written == 8
    return workspace


def marks(workspace: Workspace) -> dict[str, tuple]:
    """{file name: (kept file name, duplicate_match, duplicate_distance)} of clustered rows."""
    rows = workspace.dataset().to_pylist()
    names = {r["sample_id"]: r["source_item_id"] for r in rows}
    return {
        r["source_item_id"]: (
            names[r["duplicate_of"]],
            r["duplicate_match"],
            r["duplicate_distance"],
        )
        for r in rows
        if r["duplicate_of"] is not None
    }


def groups(found: dict[str, tuple]) -> set[frozenset[str]]:
    clusters: dict[str, set[str]] = {}
    for name, (kept, _, _) in found.items():
        clusters.setdefault(kept, set()).add(name)
    return {frozenset(members) for members in clusters.values()}


def invoke(workspace: Workspace, *args: str):
    return CliRunner().invoke(
        app,
        ["build", "dedupe", "-w", str(workspace.root), "--workers", "1", "--no-progress", *args],
    )


def by_embedding(clip_dir: str, *extra: str) -> list[str]:
    return ["--by", "embedding", "--clip-model", clip_dir, "--min-cosine", str(THRESHOLD), *extra]


def test_a_copy_joins_its_original_by_embedding_and_distinct_images_stay_apart(
    ingested, clip_dir
) -> None:
    hashes = ingested.table_parts("hashes")  # what ingest stored
    result = invoke(ingested, *by_embedding(clip_dir))
    assert result.exit_code == 0, result.output
    assert "2 embedding pairs (cosine >= 0.999, exact)" in result.output
    assert "hashed" not in result.output  # --by embedding alone hashes nothing
    assert ingested.table_parts("hashes") == hashes
    found = marks(ingested)
    assert groups(found) == {
        frozenset({"a.png", "a-resaved.png"}),
        frozenset({"wide-1.png", "wide-2.png"}),
    }
    for name, (kept, match, distance) in found.items():
        assert (match, distance) == ((None, None) if name == kept else ("clip", None))
    (run,) = [r for r in ingested.runs() if r["stage"] == "dedupe"]
    assert run["params"]["hash"] is None
    assert run["params"]["embedding"] == {
        "clip_model": clip_dir,
        "min_cosine": THRESHOLD,
        "index": "exact",
    }


def test_hash_and_embedding_pairs_are_united(ingested, clip_dir) -> None:
    # --no-verify: random noise is no test of the colour check (tests/test_dedupe*.py are)
    result = invoke(ingested, *by_embedding(clip_dir), "--by", "hash,embedding", "--no-verify")
    assert result.exit_code == 0, result.output
    assert "2 embedding pairs (cosine >= 0.999, exact), 1 found by no hash" in result.output
    found = marks(ingested)
    copies = frozenset({"a.png", "a-resaved.png", "a.jpg", "a-mirror.png"})
    assert groups(found) == {copies, frozenset({"wide-1.png", "wide-2.png"})}
    kept_a = found["a.png"][0]
    for name in copies - {kept_a}:
        match, distance = found[name][1:]
        # a direct hash match wins over the embedding edge; its distance is in bits
        assert match.startswith("phash-8") and distance is not None, (name, match)
    # the wide pair: the kept one unmarked, the other by CLIP alone (no distance)
    assert {found[name][1:] for name in ("wide-1.png", "wide-2.png")} == {
        (None, None),
        ("clip", None),
    }


def test_default_by_hash_is_unchanged_and_loads_no_clip(ingested, clip_dir) -> None:
    result = invoke(ingested)
    assert result.exit_code == 0, result.output
    assert "8 hashed" in result.output and "embedding" not in result.output
    assert not (ingested.root / "cache" / "image-embeddings").exists()
    found = marks(ingested)
    assert found["a.png"][0] == found["a-resaved.png"][0]  # identical pixels: any hash joins
    assert "wide-1.png" not in found and "wide-2.png" not in found  # only CLIP joins those
    assert all(match is None or match.startswith("phash-8") for _, match, _ in found.values())
    (run,) = [r for r in ingested.runs() if r["stage"] == "dedupe"]
    assert run["params"]["hash"] == "phash-8" and "embedding" not in run["params"]
    # the pipeline without an embedding pass agrees, and writes nothing new
    assert dedupe(ingested, "phash-8").written == 0


def test_rerun_writes_nothing_and_reuses_the_embedding_cache(ingested, clip_dir) -> None:
    first = invoke(ingested, *by_embedding(clip_dir))
    assert first.exit_code == 0, first.output
    folder = cache_folder(ingested, clip_dir)
    parts = sorted(folder.glob("part-*.parquet"))
    duplicates = ingested.table_parts("duplicates")
    assert len(parts) == 1 and len(duplicates) == 1
    again = invoke(ingested, *by_embedding(clip_dir))
    assert again.exit_code == 0, again.output
    assert "marked 0 new" in again.output
    assert sorted(folder.glob("part-*.parquet")) == parts
    assert ingested.table_parts("duplicates") == duplicates
    # the same through the pipeline: every embedding from the cache, no model loaded
    scorer = ClipScorer(clip_dir, device="cpu")
    report = dedupe(ingested, None, embedding=EmbeddingPass(scorer, THRESHOLD), show_progress=False)
    assert report.written == 0 and report.embedding_pairs == 2 and len(report.clusters) == 2
    assert scorer._loaded is None
    if importlib.util.find_spec("usearch") is not None:  # the approximate index agrees here
        approximate = EmbeddingPass(scorer, THRESHOLD, "usearch")
        report = dedupe(ingested, None, embedding=approximate, show_progress=False)
        assert report.written == 0 and report.embedding_pairs == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--by", "embedding"], "--by embedding needs --clip-model"),
        (["--by", "embedding", "--clip-model", "CLIP", "--min-cosine", "2"], "--min-cosine"),
        (["--by", "foo"], "--by takes a comma list of: hash, embedding"),
        (["--by", "hash,"], None),  # a trailing comma is fine
        (["--by", "embedding", "--clip-model", "CLIP", "--index", "nope"], "--index must be"),
        (["--clip-model", "CLIP"], "--clip-model: only with --by embedding"),
    ],
)
def test_bad_options_are_one_line_errors_before_any_work(ingested, clip_dir, args, message) -> None:
    args = [clip_dir if a == "CLIP" else a for a in args]
    hashes = ingested.table_parts("hashes")  # what ingest stored
    result = invoke(ingested, *args)
    if message is None:
        assert result.exit_code == 0, result.output
        return
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert ingested.table_parts("hashes") == hashes  # nothing hashed
    assert not (ingested.root / "cache" / "image-embeddings").exists()


def test_help_says_where_to_start_and_the_default_matches_the_module() -> None:
    import typer.main

    command = typer.main.get_command(app).commands["build"].commands["dedupe"]
    option = next(p for p in command.params if p.name == "min_cosine")
    assert option.default == DEFAULT_MIN_COSINE
    assert "0.97" in option.help and "0.93-0.95" in option.help
    assert next(p for p in command.params if p.name == "by").default == "hash"


def test_cluster_samples_joins_embedding_edges_of_rows_without_a_hash() -> None:
    table = pa.table(
        {
            "sample_id": ["a", "b", "c", "d", "e"],
            "phash": [None, None, None, "ffff0000ffff0000", "ffff0000ffff0000"],
            "complex_prompt": ["x"] * 5,
        }
    )
    plain = cluster_samples(table, 6)
    assert plain.clusters == [["d", "e"]] and plain.embedding_pairs == 0
    empty = (np.empty((0, 2), np.int64), np.empty(0, np.float32))
    assert cluster_samples(table, 6, extra_edges=empty) == plain
    edges = (np.array([[0, 1], [2, 1], [3, 4]]), np.array([0.99, 0.98, 1.0], np.float32))
    found = cluster_samples(table, 6, extra_edges=edges)
    assert found.clusters == [["a", "b", "c"], ["d", "e"]]
    # b: directly by embedding; c: through b; e: its hash match wins over the embedding edge
    assert found.matches == {"b": ("clip", None), "c": ("clip", None), "e": ("phash-8", 0)}
    assert (found.embedding_pairs, found.embedding_only_pairs, found.image_pairs) == (3, 2, 1)
    with pytest.raises(ValueError, match="row indices"):
        cluster_samples(table, 6, extra_edges=(np.array([[0, 5]]), np.array([1.0])))


def test_embedding_pass_checks_its_options(clip_dir) -> None:
    scorer = ClipScorer(clip_dir, device="cpu")
    assert EmbeddingPass(scorer).min_cosine == DEFAULT_MIN_COSINE
    with pytest.raises(InputError, match="--min-cosine must be 0..1"):
        EmbeddingPass(scorer, min_cosine=-0.5)
    with pytest.raises(InputError, match="--index must be one of: exact, usearch"):
        EmbeddingPass(scorer, index="faiss")
