"""Near-duplicate search and dedupe: the index against brute force, planted copies found,
distinct images kept apart, the keep-best rule, and what dedupe writes."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipelines.dedupe import (
    HashStage,
    dedupe,
    find_clusters,
    keep_order,
    normalise_prompt,
)
from pipelines.export import ExportOptions, export_dataset
from pipelines.neardup import brute_force_pairs, choose_chunks, near_pairs
from pipelines.perceptual import image_hash
from pipelines.runner import RunOptions, run_stage
from surd_builder.ids import sha256_hex
from surd_builder.schema import IMAGES_SCHEMA, records_to_table, table_spec

QUIET = RunOptions(show_progress=False)


@pytest.mark.parametrize(
    ("count", "k"), [(1500, 8), (1500, 6), (400, 3), (300, 12), (500, 0), (500, 2)]
)
def test_index_finds_exactly_the_brute_force_pairs(count: int, k: int) -> None:
    rng = np.random.default_rng(count + k)
    hashes = rng.integers(0, 2**63, count, dtype=np.int64).view(np.uint64)
    hashes |= rng.integers(0, 2, count).astype(np.uint64) << np.uint64(63)
    for source, target in zip(rng.choice(count, 40), rng.choice(count, 40), strict=True):
        flips = rng.choice(64, rng.integers(1, k + 3), replace=False)
        hashes[target] = hashes[source] ^ np.uint64(sum(1 << int(b) for b in flips))
    hashes = np.unique(hashes)
    expected = brute_force_pairs(hashes, k)
    assert len(expected) >= 10 or k == 0  # planted pairs within k are there to be found
    assert np.array_equal(near_pairs(hashes, k), expected)
    for chunks in range(3, min(max(k + 1, 3), 9) + 1):  # any valid chunking is exact
        assert np.array_equal(near_pairs(hashes, k, chunks=chunks), expected)


def test_distances_count_every_bit_including_the_top_one() -> None:
    """The reference itself against plain Python popcounts (numpy counts the bits of the
    absolute value of signed integers, so a hash with bit 63 set must never be one)."""
    rng = np.random.default_rng(5)
    hashes = np.unique(rng.integers(0, 2**63, 300, dtype=np.int64).view(np.uint64))
    hashes[::2] |= np.uint64(1 << 63)
    hashes[1] = hashes[0] ^ np.uint64((1 << 63) | 0b111)  # 4 bits apart, top bit included
    hashes = np.unique(hashes)
    values = [int(h) for h in hashes]
    python = [
        [i, j]
        for i in range(len(values))
        for j in range(i + 1, len(values))
        if bin(values[i] ^ values[j]).count("1") <= 8
    ]
    assert brute_force_pairs(hashes, 8).tolist() == python
    assert near_pairs(hashes, 8).tolist() == python
    assert len(python) >= 1
    top = np.array([0, 1 << 63, (1 << 64) - 1], dtype=np.uint64)
    assert near_pairs(top, 1).tolist() == [[0, 1]] and near_pairs(top, 0).tolist() == []


def test_index_in_worker_processes_gives_the_same_pairs() -> None:
    rng = np.random.default_rng(1)
    hashes = np.unique(rng.integers(0, 2**62, 3000, dtype=np.int64).view(np.uint64))
    hashes[1] = hashes[0] ^ np.uint64(0b1011)
    assert np.array_equal(near_pairs(hashes, 6, workers=2), near_pairs(hashes, 6))
    assert choose_chunks(1_000_000, 8) == 3  # ~21-bit chunks at a million hashes


def photo(seed: int, size: int = 256) -> Image.Image:
    """A photo-like image: random blobs at several scales, smooth shading and noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    pixels = np.zeros((size, size, 3))
    for _ in range(12):
        cx, cy, radius = rng.uniform(0, 1, 2).tolist() + [rng.uniform(0.05, 0.4)]
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * radius**2))
        pixels += blob[..., None] * rng.uniform(-120, 120, 3)
    pixels += 128 + rng.normal(0, 6, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def encode(image: Image.Image, fmt: str = "JPEG", quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, quality=quality)
    return buffer.getvalue()


def variants(image: Image.Image) -> dict[str, bytes]:
    width, height = image.size
    return {
        "resized": encode(image.resize((width // 2, height // 2))),
        "jpeg-q20": encode(image, quality=20),
        "cropped": encode(image.crop((4, 4, width - 4, height - 4))),
        "brighter": encode(Image.eval(image, lambda value: min(255, value + 12))),
        "png": encode(image, "PNG"),
    }


def add_samples(workspace, images: dict[str, bytes], **extra) -> None:
    rows, stored = [], []
    base = datetime(2026, 1, 1, tzinfo=UTC)
    for number, (sample_id, data) in enumerate(images.items()):
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
        row = {
            "sample_id": sample_id,
            "source": "test",
            "source_item_id": sample_id,
            "image_sha256": sha256_hex(data),
            "width": width,
            "height": height,
            "complex_prompt": f"prompt {sample_id}",
            "collected_at": base + timedelta(minutes=number),
        }
        rows.append({**row, **extra.get(sample_id, {})})
        stored.append({"image_sha256": sha256_hex(data), "image_bytes": data})
    workspace.write_images(records_to_table(stored, IMAGES_SCHEMA))
    workspace.write_table_part("samples", records_to_table(rows, table_spec("samples").schema))


def test_planted_copies_are_found_and_distinct_images_kept_apart(workspace) -> None:
    images = {}
    for seed in range(12):
        original = photo(seed)
        images[f"img{seed:02d}"] = encode(original)
        if seed < 3:
            for name, data in variants(original).items():
                images[f"img{seed:02d}-{name}"] = data
    add_samples(workspace, images)
    report = run_stage(HashStage(), workspace, QUIET)
    assert (report.written, report.failed) == (len(images), 0)
    result = dedupe(workspace, "phash-8")
    by_original = {cluster[0][:5]: sorted(cluster) for cluster in result.clusters}
    assert len(result.clusters) == 3  # the 9 images without copies stay alone
    for seed in range(3):
        cluster = by_original[f"img{seed:02d}"]
        assert cluster == sorted(
            [f"img{seed:02d}"] + [f"img{seed:02d}-{v}" for v in variants(photo(0))]
        )
    # the kept sample is the largest image, and duplicates point to it
    data = {r["sample_id"]: r for r in workspace.dataset().to_pylist()}
    for cluster in result.clusters:
        kept = cluster[0]
        assert data[kept]["width"] == 256
        assert all(data[s]["duplicate_of"] == kept for s in cluster)
    untouched = [s for s in images if not any(s in c for c in result.clusters)]
    assert len(untouched) == 9 and all(data[s]["duplicate_of"] is None for s in untouched)
    # a re-run writes nothing; export leaves the duplicates out
    assert dedupe(workspace, "phash-8").written == 0
    export = export_dataset(
        workspace, workspace.root.parent / "out", ExportOptions(show_progress=False)
    )
    assert export.exported == len(images) - 15 and export.skipped["duplicate"] == 15


def test_dry_run_writes_nothing_and_a_tighter_distance_clears_marks(workspace) -> None:
    original = photo(5)
    images = {"a": encode(original), "b": encode(original, quality=20), "c": encode(photo(6))}
    add_samples(workspace, images)
    run_stage(HashStage(), workspace, QUIET)
    preview = dedupe(workspace, "phash-8", dry_run=True)
    assert preview.marked == 1 and workspace.read_table("duplicates").num_rows == 0
    assert dedupe(workspace, "phash-8").marked == 1
    strict = dedupe(workspace, "phash-8", max_distance=0)  # only identical hashes now
    distance = bin(int(image_hash(images["a"]), 16) ^ int(image_hash(images["b"]), 16)).count("1")
    if distance > 0:
        assert strict.cleared == 1  # b is no duplicate any more (a's self-mark goes too)
        assert {r["duplicate_of"] for r in workspace.dataset().to_pylist()} == {None}


def test_keep_order_prefers_reviewed_then_larger_then_scored_then_earlier() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    rows = [
        {"sample_id": "big", "width": 1024, "height": 1024, "collected_at": t0},
        {"sample_id": "human", "width": 256, "height": 256, "review_status": "accepted"},
        {"sample_id": "rejected", "width": 4096, "height": 4096, "review_status": "rejected"},
        {"sample_id": "big-scored", "width": 1024, "height": 1024, "clip_score": 0.3},
        {"sample_id": "big-late", "width": 1024, "height": 1024, "collected_at": t0 + timedelta(1)},
    ]
    ordered = [r["sample_id"] for r in sorted(rows, key=keep_order)]
    assert ordered == ["human", "big-scored", "big", "big-late", "rejected"]


def test_prompt_dedupe_normalises_case_spacing_and_weights() -> None:
    assert normalise_prompt("(Red Fox:1.3),  snowy   FOREST ,8k") == "red fox, snowy forest, 8k"
    table = pa.table(
        {
            "sample_id": ["a", "b", "c"],
            "complex_prompt": ["Red fox, forest", "((red fox)), FOREST", "blue bird"],
            "phash": [None, None, None],
        }
    )
    assert find_clusters(table, 6, prompts="off")[0] == []
    clusters, _, groups = find_clusters(table, 6, prompts="exact")
    assert clusters == [["a", "b"]] and groups == 2


def test_draft_decoding_stays_close_to_the_full_decode() -> None:
    """Against imagehash's pHash of the fully decoded image: the reference hash."""
    import imagehash

    distances = []
    for seed in range(20):
        data = encode(photo(seed, size=512))
        full = str(imagehash.phash(Image.open(io.BytesIO(data)).convert("RGB")))
        distances.append(bin(int(image_hash(data), 16) ^ int(full, 16)).count("1"))
    assert max(distances) <= 4 and np.mean(distances) <= 1.5


def test_dedupe_command_lists_clusters_and_draws_the_grid(workspace, tmp_path) -> None:
    from tests.conftest import run_surd

    original = photo(7)
    add_samples(workspace, {"a": encode(original), "b": encode(original, quality=20)})
    grid = tmp_path / "clusters.png"
    result = run_surd(
        "build",
        "dedupe",
        "-w",
        str(workspace.root),
        "--dry-run",
        "--report",
        str(grid),
        "--workers",
        "1",
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    assert "1 clusters, 1 duplicates (would mark 1 new" in result.stdout
    assert "keep a  drop b" in result.stdout
    with Image.open(grid) as image:
        assert image.size[0] > 256 and image.size[1] >= 128
    assert workspace.read_table("duplicates").num_rows == 0
    bad = run_surd("build", "dedupe", "-w", str(workspace.root), "--prompts", "fuzzy")
    assert bad.returncode == 2 and bad.stderr.startswith("error:")


def test_near_duplicate_prompts_and_a_configurable_keep_order() -> None:
    from pipelines.dedupe import check_keep
    from surd_builder.errors import InputError

    prompts = [
        "a castle on a hill, fantasy, 8k, artstation, volumetric light, highly detailed",
        "a castle on a hill, fantasy, 8k, artstation, volumetric light, highly detailed, sharp",
        "a dragon in a cave, fantasy, 8k, artstation, volumetric light, highly detailed",
        "portrait of a woman, fantasy, 8k, artstation, volumetric light, highly detailed",
    ]
    table = pa.table(
        {
            "sample_id": ["a", "b", "c", "d"],
            "complex_prompt": prompts,
            "phash": [None] * 4,
            "width": [512, 1024, 512, 512],
            "height": [512, 1024, 512, 512],
        }
    )
    assert find_clusters(table, 6, prompts="exact")[0] == []
    # only the one-piece edit is near; shared style boilerplate does not make prompts near
    assert find_clusters(table, 6, prompts="near")[0] == [["b", "a"]]
    # the larger image is kept by default; with earliest-first only, the id breaks the tie
    assert find_clusters(table, 6, prompts="near", keep=("earliest",))[0] == [["a", "b"]]
    with pytest.raises(InputError, match="--keep"):
        check_keep(("biggest",))


def test_hash_options_are_checked() -> None:
    from surd_builder.errors import InputError

    with pytest.raises(InputError, match="power of 2"):
        HashStage("whash", 6)
    with pytest.raises(InputError, match="2..8"):
        HashStage("phash", 16)
    with pytest.raises(InputError, match="unknown hash"):
        HashStage("md5")


def test_the_cluster_grid_has_a_legend_sizes_distances_and_names(
    workspace, tmp_path, monkeypatch
) -> None:
    import surd_builder.pictures as pictures
    from pipelines.dedupe_grid import DUPLICATE_COLOUR, KEPT_COLOUR, cluster_grid

    images, extra = {}, {}
    for seed in range(3):
        original = photo(seed)
        images[f"img{seed:02d}"] = encode(original)
        extra[f"img{seed:02d}"] = {"source_item_id": f"holiday/img{seed:02d}.jpg"}
        if seed < 2:
            for name, data in variants(original).items():
                images[f"img{seed:02d}-{name}"] = data
    add_samples(workspace, images, **extra)
    run_stage(HashStage(), workspace, QUIET)
    clusters_ = dedupe(workspace, "phash-8", dry_run=True).clusters
    assert [len(c) for c in clusters_] == [6, 6]
    drawn = {}
    real = pictures.labelled_grid

    def recording(*args, **kwargs):
        drawn.update(kwargs, rows=args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(pictures, "labelled_grid", recording)
    path = cluster_grid(workspace, clusters_, tmp_path / "grid.png", 8, 4, "phash-8")
    # what is written: the legend, a label per cluster with its size, a caption per image
    assert "Each row is one cluster" in drawn["title"] and "green frame" in drawn["title"]
    assert "kept" in drawn["title"] and "distance" in drawn["title"]
    assert drawn["row_labels"] == [
        "cluster 1 of 2: 6 samples, first 4 shown",
        "cluster 2 of 2: 6 samples, first 4 shown",
    ]
    hashes = {s: image_hash(images[s]) for s in images}
    for cluster, notes in zip(clusters_, drawn["captions"], strict=True):
        kept = cluster[0]
        assert notes[0] == ["kept", f"{kept}.jpg", kept]
        for sample_id, note in zip(cluster[1:4], notes[1:], strict=True):
            bits = bin(int(hashes[kept], 16) ^ int(hashes[sample_id], 16)).count("1")
            assert note == [f"d = {bits}", sample_id, sample_id]
    # ... and it is really drawn: a legend band above the rows, frames in the two colours
    layout = real(
        drawn["rows"], row_labels=drawn["row_labels"], title=drawn["title"],
        max_label_lines=1, captions=drawn["captions"], max_title_lines=8, min_width=4 * 132 + 4,
    )  # fmt: skip
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB")).astype(int)
    plain_height = 2 * (128 + 6) + 6  # the unlabelled grid of two rows
    assert pixels.shape[0] > plain_height + layout.header_height - 1
    legend = pixels[: layout.header_height]
    assert layout.header_height > 20 and (legend.sum(axis=2) < 300).sum() > 100  # dark ink
    for row in range(2):
        (x, y, width, _), (x1, y1, _, _) = layout.cells[row][0], layout.cells[row][1]
        left = x + (width - 128) // 2
        assert tuple(pixels[y + 1, left + 64]) == KEPT_COLOUR
        assert tuple(pixels[y1 + 1, x1 + (width - 128) // 2 + 64]) == DUPLICATE_COLOUR
        caption = pixels[y + 128 : y + 128 + 40, x : x + width]
        assert (caption.sum(axis=2) < 300).sum() > 20  # "kept", the name and the id
