"""Semantic near-duplicates: CLIP image embeddings, every pair above a cosine threshold.

A perceptual hash sees pixels: it misses a re-post with a new crop and a caption bar, a
recoloured copy, the same render upscaled with another sampler. CLIP image embeddings of such
pairs stay close (cosine about 0.95 and up), while distinct images of one subject sit lower.
``surd build dedupe --by embedding`` adds these pairs to the hash pairs before clustering.

- **Embeddings** (:func:`image_embeddings`) are computed once per image and model and kept in
  the workspace (``cache/image-embeddings/<model>/part-*.parquet``, ``image_sha256`` ->
  float32 vector, L2-normalised), written a batch at a time: an interrupted run keeps what it
  computed, a re-run computes only new images.
- **Search** (:func:`cosine_pairs`): ``exact`` is a blocked matrix product in numpy (every
  pair, exactly; 57k SURD-size images is ~3 TFLOP, tens of seconds on two cores);
  ``usearch`` is an HNSW index (the ``usearch`` package) asked for each vector's
  ``neighbours`` nearest, filtered by the threshold: approximate (a pair is missed when more
  than ``neighbours`` images are closer), for millions of images. ``bench/dedupe.py`` measures
  both.

Thresholds to start from (CLIP ViT-L/14 or ViT-B/32 image embeddings): 0.97 for copies that
differ by re-encoding, resizing, small crops or colour changes; 0.93-0.95 also catches heavier
crops and overlays, and starts to join distinct images of one scene (a photo series, the same
prompt with another seed). Check a sample of the clusters (``--grid``) before trusting a lower
threshold.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from surd_builder.atomic import part_name, write_parquet_atomic
from surd_builder.errors import InputError
from surd_builder.models import decode_rgb
from surd_builder.progress import progress_bar

if TYPE_CHECKING:
    from surd_builder.clip import ClipScorer
    from surd_builder.workspace import Workspace

INDEXES = ("exact", "usearch")
DEFAULT_MIN_COSINE = 0.97
DEFAULT_NEIGHBOURS = 16
BATCH = 256  # images per embedding part (and per model call group)


def check_min_cosine(value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise InputError("--min-cosine must be 0..1 (a cosine similarity; start at 0.97)")
    return float(value)


def check_index(index: str) -> str:
    """``index`` if it is one of :data:`INDEXES` and can be used here (usearch is installed)."""
    if index not in INDEXES:
        raise InputError(f"--index must be one of: {', '.join(INDEXES)}")
    if index == "usearch":
        _usearch_index()
    return index


def _usearch_index():
    try:
        from usearch.index import Index
    except ImportError:
        raise InputError(
            "--index usearch needs the usearch package (pip install 'surd[ann]')"
        ) from None
    return Index


@dataclass(frozen=True)
class EmbeddingPass:
    """``dedupe --by embedding``: rows whose images' CLIP embeddings (``scorer``, loaded only
    when an image is not in the cache yet) are at least ``min_cosine`` alike are joined, the
    pairs searched with ``index``. Options are checked on construction."""

    scorer: ClipScorer
    min_cosine: float = DEFAULT_MIN_COSINE
    index: str = "exact"

    def __post_init__(self) -> None:
        check_min_cosine(self.min_cosine)
        check_index(self.index)

    def params(self) -> dict[str, Any]:
        """What a dedupe run records of this pass."""
        return {
            "clip_model": self.scorer.model,
            "min_cosine": self.min_cosine,
            "index": self.index,
        }


def cache_folder(workspace: Workspace, model: str) -> Path:
    """Where one CLIP model's image embeddings are kept: a readable name plus a digest."""
    slug = "".join(c if c.isalnum() else "-" for c in Path(model).name)[:40] or "model"
    digest = hashlib.sha256(model.encode()).hexdigest()[:12]
    return workspace.root / "cache" / "image-embeddings" / f"{slug}-{digest}"


def _read_cache(folder: Path) -> dict[str, np.ndarray]:
    found: dict[str, np.ndarray] = {}
    for part in sorted(folder.glob("part-*.parquet")):
        table = pq.read_table(part)
        vectors = np.asarray(table["embedding"].combine_chunks().flatten(), dtype=np.float32)
        width = len(vectors) // max(table.num_rows, 1)
        for sha, row in zip(
            table["image_sha256"].to_pylist(), vectors.reshape(-1, width), strict=True
        ):
            found[sha] = row
    return found


def image_embeddings(
    workspace: Workspace,
    shas: list[str],
    scorer: ClipScorer,
    show_progress: bool = True,
) -> tuple[np.ndarray, list[bool]]:
    """(an ``(len(shas), d)`` float32 array of L2-normalised CLIP image embeddings, whether
    each image could be read). Cached per model; unreadable images get a zero row."""
    folder = cache_folder(workspace, scorer.model)
    cached = _read_cache(folder)
    missing = sorted({sha for sha in shas if sha not in cached})
    if missing:
        folder.mkdir(parents=True, exist_ok=True)
        with progress_bar("embedding images", len(missing), show_progress) as advance:
            for start in range(0, len(missing), BATCH):
                chunk = missing[start : start + BATCH]
                images = workspace.images.read(chunk)
                decoded, _failed = decode_rgb([images[sha] for sha in chunk])
                if decoded:
                    vectors = scorer.image_features([image for _, image in decoded]).numpy()
                    computed = {chunk[i]: vectors[n] for n, (i, _) in enumerate(decoded)}
                    width = vectors.shape[1]
                    table = pa.table(
                        {
                            "image_sha256": pa.array(list(computed), pa.string()),
                            "embedding": pa.FixedSizeListArray.from_arrays(
                                pa.array(np.concatenate(list(computed.values())), pa.float32()),
                                width,
                            ),
                        }
                    )
                    write_parquet_atomic(table, folder / part_name("part"))
                    cached.update(computed)
                advance(len(chunk))
    width = next((len(v) for v in cached.values()), 1)
    readable = [sha in cached for sha in shas]
    matrix = np.zeros((len(shas), width), dtype=np.float32)
    for row, sha in enumerate(shas):
        if sha in cached:
            matrix[row] = cached[sha]
    return matrix, readable


def cosine_pairs(
    embeddings: np.ndarray,
    min_cosine: float,
    index: str = "exact",
    neighbours: int = DEFAULT_NEIGHBOURS,
    block: int = 2048,
) -> tuple[np.ndarray, np.ndarray]:
    """(pairs ``(n, 2)`` int64 with ``i < j``, sorted; their cosines, float32) of rows of
    ``embeddings`` (L2-normalised) whose cosine similarity is at least ``min_cosine``.
    Zero rows (unreadable images) never pair."""
    if index not in INDEXES:
        raise InputError(f"--index must be one of: {', '.join(INDEXES)}")
    if not -1.0 <= min_cosine <= 1.0:
        raise InputError("--min-cosine must be -1..1")
    vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
    live = np.flatnonzero(np.abs(vectors).sum(axis=1) > 0)
    if len(live) < 2:
        return np.empty((0, 2), np.int64), np.empty(0, np.float32)
    if index == "usearch":
        pairs, cosines = _usearch_pairs(vectors[live], min_cosine, neighbours)
    else:
        pairs, cosines = _exact_pairs(vectors[live], min_cosine, block)
    pairs = live[pairs] if len(pairs) else pairs
    order = np.lexsort((pairs[:, 1], pairs[:, 0])) if len(pairs) else np.empty(0, np.int64)
    return pairs[order], cosines[order]


def _exact_pairs(vectors: np.ndarray, min_cosine: float, block: int):
    found, values = [], []
    for start in range(0, len(vectors), block):
        rows = vectors[start : start + block]
        # only columns after each row's own index: every pair once
        similarities = rows @ vectors[start:].T
        i, j = np.nonzero(similarities >= min_cosine)
        keep = j > i
        found.append(np.stack([i[keep] + start, j[keep] + start], axis=1))
        values.append(similarities[i[keep], j[keep]])
    return np.concatenate(found).astype(np.int64), np.concatenate(values).astype(np.float32)


def _usearch_pairs(vectors: np.ndarray, min_cosine: float, neighbours: int):
    Index = _usearch_index()
    index = Index(ndim=vectors.shape[1], metric="cos", dtype="f32")
    keys = np.arange(len(vectors), dtype=np.uint64)
    index.add(keys, vectors)
    matches = index.search(vectors, min(neighbours + 1, len(vectors)))
    found: dict[tuple[int, int], float] = {}
    for query, (neighbour_keys, distances) in enumerate(
        zip(np.atleast_2d(matches.keys), np.atleast_2d(matches.distances), strict=True)
    ):
        for key, distance in zip(neighbour_keys, distances, strict=True):
            key = int(key)
            cosine = 1.0 - float(distance)
            if key == query or key >= len(vectors) or cosine < min_cosine:
                continue
            found[(min(query, key), max(query, key))] = cosine
    if not found:
        return np.empty((0, 2), np.int64), np.empty(0, np.float32)
    pairs = np.array(list(found), dtype=np.int64)
    return pairs, np.array(list(found.values()), dtype=np.float32)


def embedding_edges(
    workspace: Workspace,
    data: pa.Table,
    scorer: ClipScorer,
    min_cosine: float,
    index: str = "exact",
    show_progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Edges between rows of ``data`` (dataset rows with ``image_sha256``) whose images' CLIP
    embeddings are at least ``min_cosine`` apart in cosine, and those cosines."""
    shas = data["image_sha256"].to_pylist()
    rows = [i for i, sha in enumerate(shas) if sha]
    matrix, _readable = image_embeddings(workspace, [shas[i] for i in rows], scorer, show_progress)
    pairs, cosines = cosine_pairs(matrix, min_cosine, index)
    positions = np.array(rows, dtype=np.int64)
    return (positions[pairs] if len(pairs) else pairs), cosines


__all__ = [
    "DEFAULT_MIN_COSINE",
    "INDEXES",
    "EmbeddingPass",
    "check_index",
    "check_min_cosine",
    "cosine_pairs",
    "embedding_edges",
    "image_embeddings",
]
