"""``surd build dedupe``: perceptual hashes, near-duplicate clusters, and the sample kept in each.

Two steps:

1. :class:`HashStage` (a normal stage: resumable, batched, parallel with ``--workers``) stores a
   perceptual hash per sample in ``hashes``. JPEGs are decoded in draft mode, at the smallest
   DCT scale still at least 4x the hash size (pHash resizes to 32x32 anyway), which is several
   times faster than a full decode and changes a 64-bit pHash by about 0.3 bits on average.
2. :func:`dedupe` (a whole-table step) finds every pair of samples whose hashes differ in at
   most ``max_distance`` bits (:mod:`pipelines.neardup`, exact and fast), optionally also samples
   whose keyword prompts are equal after normalisation, joins them into clusters (connected
   components) and keeps one sample per cluster. The others get ``duplicate_of`` = the kept
   sample in the ``duplicates`` table: marked, never deleted; export leaves them out.

**Default distance 6** (64-bit pHash), from measurements on this project's machines (FACTS.md):
resized, JPEG-q40 and blurred copies are at most 4 bits away, while among 499,500 pairs of
distinct images none was within 6 (the closest was 8, the 0.1th percentile 18). So 6 catches
every re-encode/resize with a margin and no false merge; crops are not reliably caught by any
global 64-bit hash (a 90% crop is ~10 bits away), raise ``--max-distance`` knowingly.

**Which sample is kept** (:func:`keep_order`): a human-accepted/corrected one over a pending one
over a rejected one, then the larger image (width x height), then the higher CLIP score, then the
earliest collected, then the smallest ``sample_id`` (so the choice is deterministic).
"""

from __future__ import annotations

import io
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.base import FAILURE_DETAIL, FAILURE_REASON, IMAGE_BYTES, Stage
from pipelines.neardup import clusters, hex_to_uint64, near_pairs
from pipelines.rewriters.rules import strip_prompt_syntax
from surd_builder.errors import InputError
from surd_builder.ids import text_key

if TYPE_CHECKING:
    from surd_builder.workspace import Workspace

HASH_KINDS = ("phash", "dhash", "ahash", "whash")
DEFAULT_MAX_DISTANCE = 6
PROMPT_MODES = ("off", "exact", "near")
# Bits of a 64-bit SimHash of the normalised prompt. Measured on gallery-style prompts: one piece
# added or changed moves a prompt 5-6 bits; prompts sharing only their style boilerplate
# ("..., 8k, artstation, highly detailed") stay 11 or more apart.
DEFAULT_PROMPT_DISTANCE = 6


def hash_label(kind: str, size: int) -> str:
    return f"{kind}-{size}"


def image_hash(data: bytes, kind: str = "phash", size: int = 8, draft: bool = True) -> str:
    """The hex perceptual hash of an encoded image."""
    import imagehash
    from PIL import Image

    function = {
        "phash": imagehash.phash,
        "dhash": imagehash.dhash,
        "ahash": imagehash.average_hash,
        "whash": imagehash.whash,
    }[kind]
    with Image.open(io.BytesIO(data)) as image:
        if draft and image.format == "JPEG":
            image.draft("RGB", (size * 4, size * 4))  # decode at a reduced DCT scale
        return str(function(image.convert("RGB"), hash_size=size))


class HashStage(Stage):
    name: ClassVar[str] = "hash"
    output_table: ClassVar[str] = "hashes"
    needs_images = True

    def __init__(self, kind: str = "phash", size: int = 8, draft: bool = True):
        if kind not in HASH_KINDS:
            raise InputError(f"unknown hash {kind!r} (known: {', '.join(HASH_KINDS)})")
        if not 2 <= size <= 8:
            raise InputError("hash size must be 2..8 (at most 64 bits, what the index searches)")
        if kind == "whash" and size not in (2, 4, 8):
            raise InputError("whash needs a hash size that is a power of 2 (2, 4 or 8)")
        self.kind, self.size, self.draft = kind, size, draft
        self.label = hash_label(kind, size)

    def params(self) -> dict[str, Any]:
        return {"hash": self.label, "draft": self.draft}

    def plan(self, workspace: Workspace) -> pa.Table:
        data = workspace.read_table("samples", ["source", "source_item_id", "image_sha256"])
        return data.filter(pc.is_valid(data["image_sha256"]))

    def done_ids(self, workspace: Workspace, items: pa.Table) -> set[str]:
        current = workspace.read_table(self.output_table, ["hash_kind"])
        return {r["sample_id"] for r in current.to_pylist() if r["hash_kind"] == self.label}

    def process(self, batch: pa.Table) -> pa.Table:
        rows = []
        for item in batch.to_pylist():
            row = {"sample_id": item["sample_id"], "source": item["source"]}
            row["source_item_id"] = item["source_item_id"]
            data = item.get(IMAGE_BYTES)
            if data is None:
                rows.append({**row, FAILURE_REASON: "no-image", FAILURE_DETAIL: "not stored"})
                continue
            try:
                value = image_hash(data, self.kind, self.size, self.draft)
            except (OSError, ValueError, SyntaxError) as error:
                reason = {FAILURE_REASON: "image-unreadable", FAILURE_DETAIL: type(error).__name__}
                rows.append({**row, **reason})
                continue
            rows.append({**row, "phash": value, "hash_kind": self.label})
        columns = ["sample_id", "source", "source_item_id", "phash", "hash_kind"]
        columns += [FAILURE_REASON, FAILURE_DETAIL]
        return pa.table({c: [r.get(c) for r in rows] for c in columns}).cast(
            pa.schema([pa.field(c, pa.string()) for c in columns])
        )


def normalise_prompt(prompt: str) -> str:
    """Case, whitespace, punctuation spacing and weight syntax removed: prompts equal after this
    are the same prompt."""
    text = strip_prompt_syntax(prompt).lower()
    pieces = [text_key(p) for p in re.split(r"[,;|\n]", text)]
    return ", ".join(p for p in pieces if p)


def simhash(text: str) -> int:
    """64-bit SimHash of a normalised prompt's words and word pairs: prompts that share most of
    their pieces get fingerprints a few bits apart (Charikar 2002)."""
    import hashlib

    words = text.replace(",", " ").split()
    features = words + [f"{a} {b}" for a, b in zip(words, words[1:], strict=False)]
    if not features:
        return 0
    digests = np.frombuffer(
        b"".join(hashlib.blake2b(f.encode(), digest_size=8).digest() for f in features),
        dtype=np.uint8,
    ).reshape(len(features), 8)
    votes = (np.unpackbits(digests, axis=1).astype(np.int32) * 2 - 1).sum(axis=0)
    return int.from_bytes(np.packbits(votes > 0).tobytes(), "big")


STATUS_RANK = {"accepted": 0, "corrected": 0, "pending": 1, "rejected": 2}


def _rank_reviewed(row: dict[str, Any]) -> float:
    return STATUS_RANK.get(row.get("review_status") or "pending", 1)


def _rank_resolution(row: dict[str, Any]) -> float:
    return -((row.get("width") or 0) * (row.get("height") or 0))


def _rank_clip_score(row: dict[str, Any]) -> float:
    return -(row["clip_score"] if row.get("clip_score") is not None else -2.0)


def _rank_earliest(row: dict[str, Any]) -> float:
    collected = row.get("collected_at")
    return collected.timestamp() if collected is not None else float("inf")


# The criteria of ``--keep``, each a sort key where smaller is better.
KEEP_CRITERIA = {
    "reviewed": _rank_reviewed,
    "resolution": _rank_resolution,
    "clip_score": _rank_clip_score,
    "earliest": _rank_earliest,
}
DEFAULT_KEEP = ("reviewed", "resolution", "clip_score", "earliest")


def check_keep(criteria: tuple[str, ...]) -> tuple[str, ...]:
    unknown = [c for c in criteria if c not in KEEP_CRITERIA]
    if unknown or not criteria:
        raise InputError(f"--keep takes a comma list of: {', '.join(KEEP_CRITERIA)}")
    return criteria


def keep_order(row: dict[str, Any], criteria: tuple[str, ...] = DEFAULT_KEEP) -> tuple:
    """Sort key: the first row of a cluster in this order is kept (module docstring); ties
    go to the smallest ``sample_id``, so the choice is deterministic."""
    return (*(KEEP_CRITERIA[c](row) for c in criteria), row["sample_id"])


@dataclass
class DedupeReport:
    hashed: int = 0
    image_pairs: int = 0
    prompt_groups: int = 0
    clusters: list[list[str]] = field(default_factory=list)  # kept sample first, largest first
    marked: int = 0  # samples now marked as duplicates
    cleared: int = 0  # samples no longer duplicates (settings changed)
    written: int = 0
    seconds: float = 0.0

    @property
    def duplicates(self) -> int:
        return sum(len(c) - 1 for c in self.clusters)


def _near_edges(positions: np.ndarray, values: np.ndarray, k: int, workers: int) -> np.ndarray:
    """Edges between the rows at ``positions`` whose 64-bit ``values`` are at most ``k`` bits
    apart: identical values are chained to the first row holding them, the rest searched."""
    unique, inverse = np.unique(values, return_inverse=True)
    first = np.full(len(unique), -1, dtype=np.int64)
    edges = []
    for position, value in zip(positions, inverse, strict=True):
        if first[value] < 0:
            first[value] = position
        else:
            edges.append((first[value], position))
    # worker processes pay off only on large sets (start-up ~0.3 s each)
    pairs = near_pairs(unique, k, workers=workers if len(unique) > 100_000 else 1)
    found = [np.array(edges, dtype=np.int64).reshape(-1, 2)]
    if len(pairs):
        found.append(np.stack([first[pairs[:, 0]], first[pairs[:, 1]]], axis=1))
    return np.concatenate(found)


def find_clusters(
    data: pa.Table,
    max_distance: int,
    prompts: str = "off",
    workers: int = 1,
    keep: tuple[str, ...] = DEFAULT_KEEP,
    prompt_distance: int = DEFAULT_PROMPT_DISTANCE,
) -> tuple[list[list[str]], int, int]:
    """Clusters (kept sample first, largest cluster first), image pairs, prompt groups. Pure.
    ``data`` needs the dataset columns keep_order reads, ``phash`` and ``complex_prompt``."""
    rows = data.to_pylist()
    count = len(rows)
    if prompts not in PROMPT_MODES:
        raise InputError(f"--prompts must be one of: {', '.join(PROMPT_MODES)}")
    edges = [np.empty((0, 2), dtype=np.int64)]
    hashed = [i for i, r in enumerate(rows) if r.get("phash")]
    image_pairs = 0
    if len(hashed) > 1:
        values = hex_to_uint64([rows[i]["phash"] for i in hashed])
        found = _near_edges(np.array(hashed, dtype=np.int64), values, max_distance, workers)
        image_pairs = len(found)
        edges.append(found)
    prompt_groups = 0
    if prompts != "off":
        by_prompt: dict[str, int] = {}
        for index, row in enumerate(rows):
            key = normalise_prompt(row.get("complex_prompt") or "")
            if not key:
                continue
            if key in by_prompt:
                edges.append(np.array([[by_prompt[key], index]], dtype=np.int64))
            else:
                by_prompt[key] = index
        prompt_groups = len(by_prompt)
        if prompts == "near" and len(by_prompt) > 1:
            # near-duplicate prompts: SimHash of word pairs, searched with the same index
            fingerprints = np.array([simhash(k) for k in by_prompt], dtype=np.uint64)
            positions = np.array(list(by_prompt.values()), dtype=np.int64)
            edges.append(_near_edges(positions, fingerprints, prompt_distance, workers=1))
    labels = clusters(count, np.concatenate(edges)) if count else np.empty(0, dtype=np.int64)
    members: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        members.setdefault(int(label), []).append(index)
    result = []
    for indices in members.values():
        if len(indices) < 2:
            continue
        ordered = sorted((rows[i] for i in indices), key=lambda row: keep_order(row, keep))
        result.append([r["sample_id"] for r in ordered])
    result.sort(key=lambda c: (-len(c), c[0]))
    return result, image_pairs, prompt_groups


def dedupe(
    workspace: Workspace,
    hash_label_: str,
    max_distance: int = DEFAULT_MAX_DISTANCE,
    prompts: str = "off",
    workers: int = 1,
    dry_run: bool = False,
    keep: tuple[str, ...] = DEFAULT_KEEP,
    prompt_distance: int = DEFAULT_PROMPT_DISTANCE,
) -> DedupeReport:
    """Mark duplicates in the ``duplicates`` table (only rows whose value changes are written,
    so a re-run writes nothing); with ``dry_run`` only report."""
    started = time.perf_counter()
    if not 0 <= max_distance <= 32:
        raise InputError("--max-distance must be 0..32 bits")
    with workspace.stage_lock("dedupe"):
        data = workspace.dataset()
        kind_ok = pc.fill_null(pc.equal(data["hash_kind"], hash_label_), False)
        data = data.set_column(
            data.schema.get_field_index("phash"),
            "phash",
            pc.if_else(kind_ok, data["phash"], pa.nulls(data.num_rows, pa.string())),
        )
        report = DedupeReport(hashed=pc.sum(kind_ok.cast(pa.int64()), min_count=0).as_py())
        report.clusters, report.image_pairs, report.prompt_groups = find_clusters(
            data, max_distance, prompts, workers, check_keep(keep), prompt_distance
        )
        wanted = {sid: cluster[0] for cluster in report.clusters for sid in cluster}
        current = {
            r["sample_id"]: r["duplicate_of"]
            for r in workspace.read_table("duplicates", ["duplicate_of"]).to_pylist()
        }
        rows = []
        for sample_id in data["sample_id"].to_pylist():
            new, old = wanted.get(sample_id), current.get(sample_id)
            if new != old:
                rows.append({"sample_id": sample_id, "duplicate_of": new})
                was_duplicate = old is not None and old != sample_id
                is_duplicate = new is not None and new != sample_id
                report.marked += is_duplicate and not was_duplicate
                report.cleared += was_duplicate and not is_duplicate
        if not dry_run and rows:
            run = workspace.start_run(
                "dedupe",
                {
                    "hash": hash_label_,
                    "max_distance": max_distance,
                    "prompts": prompts,
                    "keep": list(keep),
                },
                output_table="duplicates",
            )
            table = pa.table(
                {
                    "sample_id": pa.array([r["sample_id"] for r in rows], pa.string()),
                    "duplicate_of": pa.array([r["duplicate_of"] for r in rows], pa.string()),
                }
            )
            workspace.write_table_part("duplicates", table)
            report.written = len(rows)
            workspace.finish_run(
                run, "completed", {"clusters": len(report.clusters), "written": len(rows)}
            )
        report.seconds = time.perf_counter() - started
        return report
