"""``surd build dedupe --by embedding``: CLIP image embeddings, pairs above a cosine.

Random-weight CLIP (``save_tiny_clip``): only the mechanics can be tested here (the cache, the
search, the edges); thresholds for real models are in the module docstring and the README.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipelines.embedding_dedupe import cache_folder, cosine_pairs, embedding_edges, image_embeddings
from pipelines.ingest import IngestStage
from pipelines.runner import RunOptions, run_stage
from surd_builder.clip import ClipScorer
from surd_builder.errors import InputError
from surd_builder.workspace import Workspace
from tests.tiny_models import save_tiny_clip

QUIET = RunOptions(show_progress=False)


def unit_rows(count: int, width: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = rng.standard_normal((count, width)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def brute_force(vectors: np.ndarray, min_cosine: float) -> set[tuple[int, int]]:
    similarities = vectors @ vectors.T
    return {
        (i, j)
        for i in range(len(vectors))
        for j in range(i + 1, len(vectors))
        if similarities[i, j] >= min_cosine and vectors[i].any() and vectors[j].any()
    }


@pytest.mark.parametrize("block", [1, 7, 4096])
def test_exact_search_equals_brute_force_at_any_block_size(block: int) -> None:
    vectors = unit_rows(300)
    near = vectors[:40] + 0.05 * unit_rows(40, seed=1)
    vectors = np.concatenate([vectors, near / np.linalg.norm(near, axis=1, keepdims=True)])
    vectors[5] = 0.0  # an unreadable image: never a pair
    vectors[6] = vectors[7]  # identical embeddings: cosine 1
    pairs, cosines = cosine_pairs(vectors, 0.9, "exact", block=block)
    assert set(map(tuple, pairs.tolist())) == brute_force(vectors, 0.9)
    assert len(pairs) >= 40 and (6, 7) in set(map(tuple, pairs.tolist()))
    assert np.all(np.diff(pairs[:, 0]) >= 0) and np.all(pairs[:, 0] < pairs[:, 1])
    expected = (vectors[pairs[:, 0]] * vectors[pairs[:, 1]]).sum(1)
    assert np.allclose(cosines, expected, atol=1e-5) and np.all(cosines >= 0.9)


def test_usearch_index_finds_the_planted_pairs() -> None:
    pytest.importorskip("usearch")
    vectors = unit_rows(500)
    near = vectors[:25] + 0.03 * unit_rows(25, seed=2)
    vectors = np.concatenate([vectors, near / np.linalg.norm(near, axis=1, keepdims=True)])
    pairs, _ = cosine_pairs(vectors, 0.95, "usearch")
    assert set(map(tuple, pairs.tolist())) == brute_force(vectors, 0.95)


def test_bad_search_options_are_one_line_errors() -> None:
    with pytest.raises(InputError, match="--index must be one of"):
        cosine_pairs(unit_rows(3), 0.9, "faiss-ivf")
    with pytest.raises(InputError, match="--min-cosine"):
        cosine_pairs(unit_rows(3), 1.5)
    assert cosine_pairs(unit_rows(1), 0.0)[0].shape == (0, 2)


def png(color: tuple[int, int, int], size=(40, 30), mirrored: bool = False) -> bytes:
    image = Image.new("RGB", size, (250, 250, 250))
    image.paste(Image.new("RGB", (size[0] // 2, size[1]), color), (0, 0))
    if mirrored:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip") / "clip")


@pytest.fixture
def ingested(workspace: Workspace, tmp_path) -> Workspace:
    folder = tmp_path / "images"
    folder.mkdir()
    images = {
        "red.png": png((220, 20, 20)),
        "red-copy.jpg": None,  # the same picture re-encoded
        "blue.png": png((20, 20, 220), (36, 36)),
        "broken.png": b"\x89PNG broken",
    }
    with Image.open(io.BytesIO(images["red.png"])) as image:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=95)
        images["red-copy.jpg"] = buffer.getvalue()
    for name, data in images.items():
        (folder / name).write_bytes(data)
        (folder / name).with_suffix(".txt").write_text(f"a picture, {name}")
    report = run_stage(IngestStage(folder, source="emb"), workspace, QUIET)
    assert report.written == 3  # the broken file is left out at collection
    return workspace


def test_embeddings_are_cached_per_model_and_a_rerun_loads_no_model(ingested, clip_dir) -> None:
    shas = [s for s in ingested.dataset()["image_sha256"].to_pylist()]
    scorer = ClipScorer(str(clip_dir), device="cpu")
    first, readable = image_embeddings(ingested, shas, scorer, show_progress=False)
    assert first.shape == (3, scorer.load()[1].config.projection_dim) and all(readable)
    assert np.allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    parts = sorted(cache_folder(ingested, str(clip_dir)).glob("part-*.parquet"))
    assert len(parts) == 1
    again = ClipScorer(str(clip_dir), device="cpu")
    second, _ = image_embeddings(ingested, shas[::-1], again, show_progress=False)
    assert np.array_equal(second, first[::-1]) and again._loaded is None  # all from the cache
    # another model, another folder: nothing is shared by mistake
    assert cache_folder(ingested, "other/model") != cache_folder(ingested, str(clip_dir))


def test_edges_join_rows_whose_images_embed_alike(ingested, clip_dir) -> None:
    data = ingested.dataset()
    scorer = ClipScorer(str(clip_dir), device="cpu")
    items = data["source_item_id"].to_pylist()
    matrix, _ = image_embeddings(ingested, data["image_sha256"].to_pylist(), scorer, False)
    copy_cosine = float(matrix[items.index("red.png")] @ matrix[items.index("red-copy.jpg")])
    other_cosine = float(matrix[items.index("red.png")] @ matrix[items.index("blue.png")])
    # even random (seeded) CLIP weights put a re-encoded copy closer than another picture
    assert copy_cosine > other_cosine
    threshold = (copy_cosine + other_cosine) / 2
    edges, cosines = embedding_edges(ingested, data, scorer, threshold, show_progress=False)
    joined = {tuple(sorted((items[i], items[j]))) for i, j in edges.tolist()}
    assert joined == {("red-copy.jpg", "red.png")}
    assert cosines[0] == pytest.approx(copy_cosine, abs=1e-5)
