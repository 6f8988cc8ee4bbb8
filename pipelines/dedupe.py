"""``surd build dedupe``: perceptual hashes, near-duplicate clusters, and the sample kept in each.

Two steps:

1. Per sample, from one decode of its image (:mod:`pipelines.perceptual`): the perceptual hash
   (``phash``), the hashes of the mirrored image and of five fixed crops (``variant_hashes``,
   :data:`VARIANTS`), and colour layouts (``colour_hash``: the 8x8 mean colours of the whole
   image and of each crop). Collection (ingest, scrape) computes them from the decode that
   checks the image and writes them to the ``hashes`` table; :class:`HashStage` (a normal
   stage: resumable, batched, parallel with ``--workers``) does the samples that lack them
   (collected without a full check, or before this existed, or with another ``--hash``).
   Rows hashed before variants and layouts existed count as not done and are redone.
2. :func:`dedupe` (a whole-table step) finds every pair of samples whose hashes differ in at
   most ``max_distance`` bits (:mod:`pipelines.neardup`, exact and fast): primary against
   primary and, with ``variants``, one sample's mirror or crop hash against another's primary
   (a mirrored or cropped re-post), all through one index. A pair is only a candidate: with
   ``verify`` (default) the colour layouts must agree too (:func:`colour_distances`): the
   whole image's for a primary match, the mirrored one for a mirror match, the crop's own for a
   crop match. Optionally samples whose keyword prompts are equal (or near) join too. Clusters
   are the connected components; one sample per cluster is kept; every member gets
   ``duplicate_of`` and ``cluster_id`` (the kept sample) and the others ``duplicate_match`` and
   ``duplicate_distance`` in the ``duplicates`` table: marked, never deleted; export leaves them
   out.

**Default distance 6** (64-bit pHash), from measurements on this project's machines (FACTS.md):
resized, JPEG-q40 and blurred copies are at most 4 bits away, while among 499,500 pairs of
distinct photos none was within 6 (the closest was 8, the 0.1th percentile 18).

**The colour check** (numbers from ``bench/dedupe_quality.py``). Flat graphics (shapes, text,
gradients on plain backgrounds) collide in pHash far more than photos: pHash sees the luminance
layout at 32x32 only, so a red square on white and a red circle on purple can share a hash. Of
10,000 distinct flat images the pHash alone marked 7,279 as duplicates (with the variant hashes
8,703) and 13-26 of each 200 demo images; with the colour check, independent of the hash, 1 of
the 10,000 and none of the demo's.
It compares 8x8 grids of mean colours, averaged in sRGB (the space resizing, blurring and JPEG
average in, so a copy keeps them) and compared in CIELAB: the largest cell delta E, once the best
brightness change (gain and offset, bounded) is taken out, must be at most
:data:`DEFAULT_COLOUR_DISTANCE` (4). One distinct flat pair is within 3-4, the next above 6;
true copies (50% resize, JPEG q40-95, 1 px blur, +-5% and +-8% brightness) pass: all of
photo-like and 512 px flat images, 99.1% of 128 px flat images (a 64 px resize moves their
shapes' edges across the 16 px cells). Limits: mean colours cannot tell two texts in the same
colours and place apart (29 of 70 such pairs that share a pHash merge), and the check is strict
about alignment: a crop a few percent off a fixed crop does not pass (a 5% border crop of a
sharp photo-like image fails where the pHash alone had found it).

**Variants**: a horizontal flip moves a pHash ~31 bits and a 5% corner crop 4-20 bits, out of
reach. The mirrored image and the centre and corner crops keeping :data:`VARIANT_CROP` (90%) of
each side are hashed too; 90% found more re-posts than 80% or 85% (mean over 5-20% crops: 25%
against 15-16%): every mirrored re-post and every 10% corner and border crop.

**Which sample is kept** (:func:`keep_order`): a human-accepted/corrected one over a pending one
over a rejected one, then the larger image (width x height), then the higher CLIP score, then the
earliest collected, then the smallest ``sample_id`` (so the choice is deterministic).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines import perceptual
from pipelines.base import FAILURE_DETAIL, FAILURE_REASON, IMAGE_BYTES, Stage
from pipelines.neardup import clusters, hex_to_uint64, near_pairs
from pipelines.perceptual import (
    COLOUR_GRID,
    FULL,
    HASH_KINDS,
    LAYOUT_CHARS,
    VARIANT_CROP,
    VARIANTS,
    UnhashableImage,
    area_weights,
    hash_label,
    image_signature,
)
from pipelines.rewriters.rules import strip_prompt_syntax
from surd_builder.errors import InputError
from surd_builder.ids import text_key

if TYPE_CHECKING:
    from pipelines.embedding_dedupe import EmbeddingPass
    from surd_builder.workspace import Workspace

DEFAULT_MAX_DISTANCE = 6
PROMPT_MODES = ("off", "exact", "near")
# Bits of a 64-bit SimHash of the normalised prompt. Measured on gallery-style prompts: one piece
# added or changed moves a prompt 5-6 bits; prompts sharing only their style boilerplate
# ("..., 8k, artstation, highly detailed") stay 11 or more apart.
DEFAULT_PROMPT_DISTANCE = 6

# Colour check threshold (CIELAB delta E, see colour_distances), measured with
# bench/dedupe_quality.py: one pair of 10,000 distinct flat images that share a pHash (or a mirror
# or crop hash) is within it, the next above 6; true copies are (module docstring).
DEFAULT_COLOUR_DISTANCE = 4.0


def _layout_slots(variants: tuple[tuple[str, tuple, bool], ...]) -> list[tuple[int, tuple, bool]]:
    """Per hash slot (0: the primary, then each variant): which stored layout verifies it (0:
    the whole image's, i: the i-th crop's) and the region and mirroring still to apply to it."""
    slots, crops = [(0, FULL, False)], 0
    for _, region, mirror in variants:
        if mirror or region == FULL:
            slots.append((0, region, mirror))
        else:
            crops += 1
            slots.append((crops, FULL, False))
    return slots


# ------------------------------------------------------------------------------ colour check
_SRGB_TO_XYZ = np.array(
    [
        [0.4124564, 0.3575761, 0.1804375],
        [0.2126729, 0.7151522, 0.0721750],
        [0.0193339, 0.1191920, 0.9503041],
    ]
) / np.array([[0.95047], [1.0], [1.08883]])  # D65 white


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of sRGB values 0..255, any leading shape."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = linear @ _SRGB_TO_XYZ.T
    delta = 6 / 29
    f = np.where(xyz > delta**3, np.cbrt(xyz), xyz / (3 * delta**2) + 4 / 29)
    return np.stack(
        [116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])],
        axis=-1,
    )


def colour_grids(hex_layouts: list[str], index: int = 0) -> np.ndarray:
    """``(n, COLOUR_GRID, COLOUR_GRID, 3)`` float sRGB of the ``index``-th layout (0: the whole
    image, i: the i-th crop) of each ``colour_hash``."""
    start = index * LAYOUT_CHARS
    raw = b"".join(bytes.fromhex(h[start : start + LAYOUT_CHARS]) for h in hex_layouts)
    return (
        np.frombuffer(raw, dtype=np.uint8)
        .reshape(len(hex_layouts), COLOUR_GRID, COLOUR_GRID, 3)
        .astype(np.float64)
    )


def region_grids(grids: np.ndarray, region: tuple = FULL, mirror: bool = False) -> np.ndarray:
    """The colour layouts (sRGB) of that crop, of the mirrored image, of each grid: area-weighted
    means of the stored cells, so a crop's layout can be compared cell for cell with the layout
    of a sample that is that crop."""
    if mirror:
        grids = grids[:, :, ::-1]
    if region != FULL:
        x0, y0, x1, y1 = region
        rows = area_weights(y0, y1, COLOUR_GRID, COLOUR_GRID)
        cols = area_weights(x0, x1, COLOUR_GRID, COLOUR_GRID)
        grids = np.einsum("ig,nghc,jh->nijc", rows, grids, cols)
    return grids


# A brightness or contrast change within these bounds is taken out before colours are compared
# (sRGB gain and offset, fitted per pair): white on grey is not grey on black.
MAX_GAIN, MAX_OFFSET = 1.25, 25.0


def _fitted_distances(grids_a: np.ndarray, grids_b: np.ndarray) -> np.ndarray:
    count = len(grids_a)
    a, b = grids_a.reshape(count, -1), grids_b.reshape(count, -1)
    # fitted on the values clipping cannot have moved
    weight = ((a > 4) & (a < 251) & (b > 4) & (b < 251)).astype(np.float64)
    total = np.maximum(weight.sum(axis=1), 1.0)
    mean_a, mean_b = (weight * a).sum(axis=1) / total, (weight * b).sum(axis=1) / total
    variance = (weight * (a - mean_a[:, None]) ** 2).sum(axis=1) / total
    covariance = (weight * (a - mean_a[:, None]) * (b - mean_b[:, None])).sum(axis=1) / total
    gain = np.where(variance > 1e-6, covariance / np.maximum(variance, 1e-6), 1.0)
    gain = np.clip(gain, 1 / MAX_GAIN, MAX_GAIN)
    offset = np.clip(mean_b - gain * mean_a, -MAX_OFFSET, MAX_OFFSET)
    fitted = np.clip(gain[:, None] * a + offset[:, None], 0, 255)
    # pixels clipped at black or white do not move with the rest: a cell whose pixels are partly
    # clipped lands anywhere between its old value and the fitted one
    fitted = np.clip(b, np.minimum(a, fitted), np.maximum(a, fitted))
    difference = srgb_to_lab(fitted.reshape(grids_a.shape)) - srgb_to_lab(grids_b)
    return np.sqrt((difference**2).sum(axis=-1)).max(axis=(1, 2))


def colour_distances(grids_a: np.ndarray, grids_b: np.ndarray) -> np.ndarray:
    """Per pair of sRGB layouts: the largest cell difference in CIELAB (delta E, CIE76) once the
    best brightness change ``gain * x + offset`` (least squares, clipped to :data:`MAX_GAIN` and
    :data:`MAX_OFFSET`) is applied to one of them; of the two ways round, the closer (a
    brightened copy's clipped highlights cannot be darkened back, the original can be
    brightened). A copy stays small (JPEG, resizing and blurring keep cell means, a brightness
    change is taken out); two flat images that share a pHash differ in the colour of their
    background or their shapes, or in their shapes' outline, and so in some cells."""
    return np.minimum(_fitted_distances(grids_a, grids_b), _fitted_distances(grids_b, grids_a))


def slot_grids(hex_layouts: list[str], slot: int) -> np.ndarray:
    """The sRGB layouts that hash ``slot`` (0: the primary, i: ``VARIANTS[i - 1]``) of these
    samples is verified with: the whole image's, mirrored for the mirror hash, a crop's own for a
    crop hash (estimated from the whole image's where a ``colour_hash`` lacks it)."""
    index, region, mirror = _layout_slots(VARIANTS)[slot]
    if index and all(len(h) >= (index + 1) * LAYOUT_CHARS for h in hex_layouts):
        return colour_grids(hex_layouts, index)
    if index:
        region = VARIANTS[slot - 1][1]
    return region_grids(colour_grids(hex_layouts), region, mirror)


def colour_distance(a: str, b: str, slot: int = 0) -> float:
    """:func:`colour_distances` of one pair: ``a``'s layout for hash ``slot`` against ``b``'s."""
    return float(colour_distances(slot_grids([a], slot), colour_grids([b]))[0])


class HashStage(Stage):
    name: ClassVar[str] = "hash"
    output_table: ClassVar[str] = "hashes"
    needs_images = True

    def __init__(
        self,
        kind: str = perceptual.DEFAULT_KIND,
        size: int = perceptual.DEFAULT_SIZE,
        draft: bool = True,
    ):
        if kind not in HASH_KINDS:
            raise InputError(f"unknown hash {kind!r} (known: {', '.join(HASH_KINDS)})")
        if not 2 <= size <= 8:
            raise InputError("hash size must be 2..8 (at most 64 bits, what the index searches)")
        if kind == "whash" and size not in (2, 4, 8):
            raise InputError("whash needs a hash size that is a power of 2 (2, 4 or 8)")
        self.kind, self.size, self.draft = kind, size, draft
        self.label = hash_label(kind, size)
        self.settings = perceptual.hash_settings(draft)

    def params(self) -> dict[str, Any]:
        return {
            "hash": self.label,
            "hash_settings": self.settings,
            "draft": self.draft,
            "variants": [name for name, _, _ in VARIANTS],
            "variant_crop": VARIANT_CROP,
            "colour_grid": COLOUR_GRID,
            "draft_side": perceptual.DRAFT_SIDE,
            "work_side": perceptual.WORK_SIDE,
        }

    def plan(self, workspace: Workspace) -> pa.Table:
        columns = ["source", "source_item_id", "image_sha256", "updated_at"]
        data = workspace.read_table("samples", columns)
        return data.filter(pc.is_valid(data["image_sha256"]))

    def done_ids(self, workspace: Workspace, items: pa.Table) -> set[str]:
        """Samples whose hashes row is of this hash kind and these settings (signature version,
        draft or full decoding), with every variant and layout, and written after the sample's
        own row. So a row from an older version or other settings is redone, and so is one of a
        sample collected again since (a new image, a collection interrupted between its samples
        part and its hashes part, a check without a decode)."""
        current = workspace.read_table(
            self.output_table,
            ["hash_kind", "variant_hashes", "colour_hash", "hash_settings", "updated_at"],
        )
        collected = dict(
            zip(items["sample_id"].to_pylist(), items["updated_at"].to_pylist(), strict=True)
        )
        layouts = 1 + max(index for index, _, _ in _layout_slots(VARIANTS))
        return {
            r["sample_id"]
            for r in current.to_pylist()
            if r["hash_kind"] == self.label
            and r["hash_settings"] == self.settings
            and len(r["colour_hash"] or "") == layouts * LAYOUT_CHARS
            and len(r["variant_hashes"] or ()) == len(VARIANTS)
            and _not_before(r["updated_at"], collected.get(r["sample_id"]))
        }

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
                signature = image_signature(data, self.kind, self.size, self.draft)
            except UnhashableImage as error:
                reason = {FAILURE_REASON: "image-unreadable", FAILURE_DETAIL: str(error)}
                rows.append({**row, **reason})
                continue
            fields = perceptual.signature_fields(signature, self.kind, self.size, self.draft)
            rows.append({**row, **fields})
        types = {"variant_hashes": pa.list_(pa.string())}
        columns = ["sample_id", "source", "source_item_id", "phash", "hash_kind"]
        columns += ["variant_hashes", "colour_hash", "hash_settings", FAILURE_REASON]
        columns += [FAILURE_DETAIL]
        return pa.table(
            {c: pa.array([r.get(c) for r in rows], types.get(c, pa.string())) for c in columns}
        )


def _not_before(hashed: Any, collected: Any) -> bool:
    """Whether a hashes row written at ``hashed`` is not older than its sample's row."""
    return collected is None or (hashed is not None and hashed >= collected)


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


def check_colour_distance(value: float) -> float:
    if not 0 <= value <= 100:
        raise InputError("--colour-distance must be 0..100 (CIELAB delta E)")
    return float(value)


def keep_order(row: dict[str, Any], criteria: tuple[str, ...] = DEFAULT_KEEP) -> tuple:
    """Sort key: the first row of a cluster in this order is kept (module docstring); ties
    go to the smallest ``sample_id``, so the choice is deterministic."""
    return (*(KEEP_CRITERIA[c](row) for c in criteria), row["sample_id"])


@dataclass
class Clustering:
    """What :func:`cluster_samples` found: clusters (kept sample first, largest first) and,
    per member of a cluster other than the kept one, how it matched: (duplicate_match,
    duplicate_distance); and counts of the pairs behind them."""

    clusters: list[list[str]] = field(default_factory=list)
    matches: dict[str, tuple[str | None, int | None]] = field(default_factory=dict)
    image_pairs: int = 0  # image pairs joined (after the colour check)
    candidate_pairs: int = 0  # image pairs within the distance, before the colour check
    rejected_pairs: int = 0  # candidates the colour check turned down
    variant_pairs: int = 0  # joined pairs found only through a mirror or crop hash
    prompt_groups: int = 0
    embedding_pairs: int = 0  # row pairs at least min_cosine alike in CLIP image embeddings
    embedding_only_pairs: int = 0  # of those, pairs no hash (primary, mirror, crop) joined

    @property
    def duplicates(self) -> int:
        return sum(len(c) - 1 for c in self.clusters)


@dataclass
class DedupeReport(Clustering):
    """A :func:`dedupe` run: what was clustered, and what was written."""

    hashed: int = 0
    marked: int = 0  # samples now marked as duplicates
    cleared: int = 0  # samples no longer duplicates (settings changed)
    written: int = 0
    seconds: float = 0.0


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


def _popcount(values: np.ndarray) -> np.ndarray:
    # unsigned on purpose: np.bitwise_count counts the bits of the ABSOLUTE value of signed ints
    return np.bitwise_count(values.astype(np.uint64)).astype(np.int64)


class _Hashes:
    """The hashed rows' hashes, variant hashes and colour layouts, by position among them.
    Layouts stay Arrow strings until a pair needs them (they are ~2 KB a sample)."""

    def __init__(
        self,
        primary: list[str],
        variants: pa.Array,
        colours: pa.Array,
        verify: bool = True,
        threshold: float = DEFAULT_COLOUR_DISTANCE,
        use_variants: bool = True,
    ):
        self.primary = hex_to_uint64(primary)
        self.colours = colours
        self.has_colour = np.asarray(pc.is_valid(colours).to_numpy(zero_copy_only=False))
        self.verify, self.threshold = verify, threshold
        # (n, len(VARIANTS)) uint64, and which rows have all of them
        self.variants = np.zeros((len(primary), len(VARIANTS)), dtype=np.uint64)
        self.has_variants = np.zeros(len(primary), dtype=bool)
        if use_variants and len(primary):
            lengths = pc.fill_null(pc.list_value_length(variants), 0).to_numpy()
            self.has_variants = lengths == len(VARIANTS)
            rows = np.flatnonzero(self.has_variants)
            if len(rows):
                chosen = pc.list_flatten(variants.take(pa.array(rows))).to_pylist()
                self.variants[rows] = hex_to_uint64(chosen).reshape(len(rows), len(VARIANTS))

    def layouts(self, positions: np.ndarray, slot: int = 0) -> np.ndarray:
        """sRGB layouts verifying hash ``slot`` of these positions (:func:`slot_grids`)."""
        hexes = self.colours.take(pa.array(np.asarray(positions, dtype=np.int64))).to_pylist()
        return slot_grids(hexes, slot)

    def verified(self, a: np.ndarray, b: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """Whether ``a``'s hash at ``slot`` (0: its primary) matching ``b``'s primary is
        confirmed by the colour layouts; pairs where either has none pass (rows hashed before
        colour layouts existed: the hash alone decides, as it always did)."""
        passed = np.ones(len(a), dtype=bool)
        if not self.verify or not len(a):
            return passed
        known = self.has_colour[a] & self.has_colour[b]
        for slot in np.unique(slots[known]):
            chosen = np.flatnonzero(known & (slots == slot))
            for start in range(0, len(chosen), 20_000):
                part = chosen[start : start + 20_000]
                grids_a, grids_b = self.layouts(a[part], int(slot)), self.layouts(b[part])
                passed[part] = colour_distances(grids_a, grids_b) <= self.threshold
        return passed

    def variant_values(self, position: int) -> list[int]:
        """The position's variant hashes ([] without variants)."""
        if not self.has_variants[position]:
            return []
        return [int(v) for v in self.variants[position]]


def _cross(starts: np.ndarray, counts: np.ndarray, ga: np.ndarray, gb: np.ndarray):
    """Every (entry of group ga[p], entry of group gb[p]) pair, as two entry index arrays."""
    ca, cb = counts[ga], counts[gb]
    total = ca * cb
    rep = np.repeat(np.arange(len(ga)), total)
    offset = np.arange(int(total.sum())) - np.repeat(np.cumsum(total) - total, total)
    return starts[ga][rep] + offset // cb[rep], starts[gb][rep] + offset % cb[rep]


def _image_edges(hashes: _Hashes, k: int, workers: int) -> tuple[np.ndarray, dict[str, int]]:
    """Joined pairs as ``(a, b, slot, distance)`` rows (positions among the hashed rows):
    ``a``'s hash at ``slot`` (0: primary, i: ``VARIANTS[i - 1]``) is within ``k`` bits of
    ``b``'s primary and the colour check agrees. Samples with an identical primary hash are
    first grouped (one leader per distinct colour layout, so a bucket of thousands of blank
    images costs thousands of checks, not millions), then leaders are searched."""
    count = len(hashes.primary)
    unique, inverse = np.unique(hashes.primary, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    sizes = np.bincount(inverse, minlength=len(unique))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    leader = np.ones(count, dtype=bool)
    found: list[tuple[int, int, int, int]] = []
    stats = {"candidates": 0, "rejected": 0}
    for group in np.flatnonzero(sizes > 1):
        members = order[starts[group] : starts[group] + sizes[group]]
        coloured = [m for m in members if hashes.has_colour[m]]
        if not hashes.verify or not coloured:
            heads = [members[0]]
            layouts = None
        else:
            layouts = dict(zip(coloured, hashes.layouts(np.array(coloured)), strict=True))
            heads = [coloured[0]]
        for member in members:
            if member == heads[0]:
                continue
            leader[member] = False
            stats["candidates"] += 1
            if layouts is None or member not in layouts:
                found.append((heads[0], member, 0, 0))
                continue
            candidates = [h for h in heads if h in layouts]
            distances = colour_distances(
                np.stack([layouts[h] for h in candidates]),
                np.repeat(layouts[member][None], len(candidates), axis=0),
            )
            best = int(np.argmin(distances))
            if distances[best] <= hashes.threshold:
                found.append((candidates[best], member, 0, 0))
            else:
                stats["rejected"] += 1
                heads.append(member)
                leader[member] = True
    # the leaders' primaries and variants, one entry per (value, sample), primary first
    leaders = np.flatnonzero(leader)
    with_variants = leaders[hashes.has_variants[leaders]]
    width = len(VARIANTS)
    value = np.concatenate([hashes.primary[leaders], hashes.variants[with_variants].ravel()])
    owner = np.concatenate([leaders, np.repeat(with_variants, width)])
    slot = np.concatenate(
        [
            np.zeros(len(leaders), dtype=np.int64),
            np.tile(np.arange(1, width + 1), len(with_variants)),
        ]
    )
    by = np.lexsort((slot, owner, value))
    value, owner, slot = value[by], owner[by], slot[by]
    keep = np.ones(len(value), dtype=bool)
    keep[1:] = (value[1:] != value[:-1]) | (owner[1:] != owner[:-1])
    value, owner, slot = value[keep], owner[keep], slot[keep]
    first = np.flatnonzero(np.concatenate([[True], value[1:] != value[:-1]]))
    counts = np.diff(np.append(first, len(value)))
    unique_values = value[first]
    xs, ys = [], []
    for group in np.flatnonzero(counts > 1):  # equal values of different samples
        i, j = np.triu_indices(int(counts[group]), 1)
        i, j = first[group] + i, first[group] + j
        fresh = (slot[i] != 0) | (slot[j] != 0)  # two equal primaries were compared above
        xs.append(i[fresh])
        ys.append(j[fresh])
    # worker processes pay off only on large sets
    pairs = near_pairs(unique_values, k, workers=workers if len(unique_values) > 100_000 else 1)
    if len(pairs):
        x, y = _cross(first, counts, pairs[:, 0], pairs[:, 1])
        xs.append(x)
        ys.append(y)
    x = np.concatenate(xs) if xs else np.empty(0, dtype=np.int64)
    y = np.concatenate(ys) if ys else np.empty(0, dtype=np.int64)
    useful = (owner[x] != owner[y]) & ((slot[x] == 0) | (slot[y] == 0))
    x, y = x[useful], y[useful]
    # orient: a holds the matching hash (a variant, or the smaller position), b's primary matched
    swap = (slot[x] == 0) & ((slot[y] != 0) | (owner[y] < owner[x]))
    a = np.where(swap, owner[y], owner[x])
    b = np.where(swap, owner[x], owner[y])
    via = np.where(swap, slot[y], slot[x])
    distance = _popcount(value[x] ^ value[y])
    low, high = np.minimum(a, b), np.maximum(a, b)
    pair_key = low * count + high
    candidate_keys = np.unique(pair_key)
    passed = hashes.verified(a, b, via)
    a, b, via, distance, pair_key = (v[passed] for v in (a, b, via, distance, pair_key))
    best = np.lexsort((via, distance, pair_key))  # per pair: the closest hash, primary first
    if len(best):
        best = best[np.concatenate([[True], pair_key[best][1:] != pair_key[best][:-1]])]
    primary_keys = np.unique(pair_key[via == 0])
    stats["candidates"] += len(candidate_keys)
    stats["rejected"] += len(candidate_keys) - len(best)
    stats["variant"] = int(np.setdiff1d(pair_key[best], primary_keys).size)
    grouped = np.array(found, dtype=np.int64).reshape(-1, 4)
    searched = np.stack([a[best], b[best], via[best], distance[best]], axis=1).astype(np.int64)
    return np.concatenate([grouped, searched]), stats


def match_name(label: str, slot: int) -> str:
    """``duplicate_match`` of a hash match: the hash label, with ``:mirror`` or ``:crop``."""
    return label if slot == 0 else f"{label}:{VARIANTS[slot - 1][0]}"


def _direct_matches(
    hashes: _Hashes, pairs: list[tuple[int, int]], k: int
) -> dict[int, tuple[int, int]]:
    """For each (member, kept) pair of positions, the closest confirmed match between their
    hashes, as {pair index: (slot, distance)}; pairs without one are left out."""
    options = []  # (pair index, a, b, slot, distance): a's hash at slot against b's primary
    for index, (member, kept) in enumerate(pairs):
        p_member, p_kept = int(hashes.primary[member]), int(hashes.primary[kept])
        options.append((index, member, kept, 0, (p_member ^ p_kept).bit_count()))
        for a, b, p_b in ((kept, member, p_member), (member, kept, p_kept)):
            for slot, value in enumerate(hashes.variant_values(a), 1):
                options.append((index, a, b, slot, (value ^ p_b).bit_count()))
    options = [o for o in options if o[4] <= k]
    if not options:
        return {}
    table = np.array(options, dtype=np.int64)
    passed = hashes.verified(table[:, 1], table[:, 2], table[:, 3])
    best: dict[int, tuple[int, int]] = {}
    for index, _, _, slot, distance in table[passed].tolist():
        if index not in best or (distance, slot) < (best[index][1], best[index][0]):
            best[index] = (slot, distance)
    return best


# ``duplicate_match`` of a member joined to its kept sample by CLIP image embeddings, not a hash
EMBEDDING_MATCH = "clip"


def _embedding_pairs(
    extra_edges: tuple[np.ndarray, np.ndarray], count: int
) -> set[tuple[int, int]]:
    """The ``(smaller, larger)`` row pairs of ``extra_edges`` (pairs, cosines), checked."""
    pairs, cosines = extra_edges
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    if cosines is not None and len(cosines) != len(pairs):
        raise ValueError(f"extra_edges: {len(pairs)} pairs but {len(cosines)} cosines")
    if len(pairs) and (pairs.min() < 0 or pairs.max() >= count):
        raise ValueError(f"extra_edges: row indices must be 0..{count - 1}")
    return {(min(a, b), max(a, b)) for a, b in pairs.tolist() if a != b}


def cluster_samples(
    data: pa.Table,
    max_distance: int,
    prompts: str = "off",
    workers: int = 1,
    keep: tuple[str, ...] = DEFAULT_KEEP,
    prompt_distance: int = DEFAULT_PROMPT_DISTANCE,
    *,
    variants: bool = True,
    verify: bool = True,
    colour_distance: float = DEFAULT_COLOUR_DISTANCE,
    label: str = "phash-8",
    extra_edges: tuple[np.ndarray, np.ndarray] | None = None,
) -> Clustering:
    """Clusters (kept sample first, largest cluster first) and how each member matched its
    kept sample. Pure. ``data`` needs the dataset columns keep_order reads, ``phash`` and
    ``complex_prompt``, and for the new passes ``variant_hashes`` and ``colour_hash`` (rows
    without them are matched by their primary hash alone, unverified).

    ``extra_edges``: ``(pairs, cosines)`` from the embedding pass
    (:func:`pipelines.embedding_dedupe.embedding_edges`: ``(n, 2)`` row indices into ``data``
    and their cosines), joined like the hash and prompt edges, rows without a hash included. A
    member whose direct pair with the kept sample is such an edge gets the closest hash match
    between the two where one exists, else ``"clip"`` (no distance: that column holds bits)."""
    if prompts not in PROMPT_MODES:
        raise InputError(f"--prompts must be one of: {', '.join(PROMPT_MODES)}")
    heavy = [c for c in ("variant_hashes", "colour_hash") if c in data.column_names]
    rows = data.drop_columns(heavy).to_pylist()
    count = len(rows)
    edges = [np.empty((0, 2), dtype=np.int64)]
    result = Clustering()
    hashed = np.array([i for i, r in enumerate(rows) if r.get("phash")], dtype=np.int64)
    position = {int(row): p for p, row in enumerate(hashed)}
    take = pa.array(hashed)

    def column(name: str, type_: pa.DataType) -> pa.Array:
        if name not in data.column_names:
            return pa.nulls(len(hashed), type_)
        return data[name].take(take).combine_chunks()

    hashes = _Hashes(
        [rows[i]["phash"] for i in hashed],
        column("variant_hashes", pa.list_(pa.string())),
        column("colour_hash", pa.string()),
        verify,
        check_colour_distance(colour_distance),
        variants,
    )
    best_edge: dict[int, tuple[int, int]] = {}  # position -> (distance, slot) of its closest
    if len(hashed) > 1:
        found, stats = _image_edges(hashes, max_distance, workers)
        result.image_pairs, result.variant_pairs = len(found), stats["variant"]
        result.candidate_pairs, result.rejected_pairs = stats["candidates"], stats["rejected"]
        edges.append(hashed[found[:, :2]])
        for a, b, slot, distance in found.tolist():
            for end in (a, b):
                best_edge[end] = min(best_edge.get(end, (distance, slot)), (distance, slot))
    embedded: set[tuple[int, int]] = set()  # (smaller, larger) row pairs of the embedding pass
    embedded_rows: set[int] = set()
    if extra_edges is not None:
        embedded = _embedding_pairs(extra_edges, count)
        embedded_rows = {row for pair in embedded for row in pair}
        # the edges so far are the hash pass's
        hash_pairs = {(min(a, b), max(a, b)) for a, b in np.concatenate(edges).tolist()}
        edges.append(np.array(sorted(embedded), dtype=np.int64).reshape(-1, 2))
        result.embedding_pairs = len(embedded)
        result.embedding_only_pairs = len(embedded - hash_pairs)
    keys = [
        normalise_prompt(r.get("complex_prompt") or "") if prompts != "off" else "" for r in rows
    ]
    fingerprints: dict[str, int] = {}
    if prompts != "off":
        by_prompt: dict[str, int] = {}
        for index, key in enumerate(keys):
            if not key:
                continue
            if key in by_prompt:
                edges.append(np.array([[by_prompt[key], index]], dtype=np.int64))
            else:
                by_prompt[key] = index
        result.prompt_groups = len(by_prompt)
        if prompts == "near" and len(by_prompt) > 1:
            # near-duplicate prompts: SimHash of word pairs, searched with the same index
            fingerprints = {key: simhash(key) for key in by_prompt}
            values = np.array(list(fingerprints.values()), dtype=np.uint64)
            positions = np.array(list(by_prompt.values()), dtype=np.int64)
            edges.append(_near_edges(positions, values, prompt_distance, workers=1))
    labels = clusters(count, np.concatenate(edges)) if count else np.empty(0, dtype=np.int64)
    members: dict[int, list[int]] = {}
    for index, cluster in enumerate(labels):
        members.setdefault(int(cluster), []).append(index)
    index_of = {}
    for indices in members.values():
        if len(indices) < 2:
            continue
        ordered = sorted(indices, key=lambda i: keep_order(rows[i], keep))
        result.clusters.append([rows[i]["sample_id"] for i in ordered])
        index_of.update({rows[i]["sample_id"]: i for i in ordered})
    result.clusters.sort(key=lambda c: (-len(c), c[0]))
    # how each member matched the kept one: directly by a hash (with its distance), directly
    # by embedding, directly by prompt, else through others (the kind of its own closest
    # match, no distance: a hash, else an embedding, else a prompt)
    direct_pairs, pair_members = [], []
    for cluster in result.clusters:
        kept = index_of[cluster[0]]
        for sample_id in cluster[1:]:
            member = index_of[sample_id]
            if member in position and kept in position:
                direct_pairs.append((position[member], position[kept]))
                pair_members.append(sample_id)
    direct = _direct_matches(hashes, direct_pairs, max_distance)
    for pair_index, (slot, distance) in direct.items():
        result.matches[pair_members[pair_index]] = (match_name(label, slot), distance)
    for cluster in result.clusters:
        kept = index_of[cluster[0]]
        for sample_id in cluster[1:]:
            if sample_id in result.matches:
                continue
            member = index_of[sample_id]
            same_prompt = prompts != "off" and keys[member] and keys[member] == keys[kept]
            near_prompt = (
                prompts == "near"
                and keys[member]
                and keys[kept]
                and (fingerprints[keys[member]] ^ fingerprints[keys[kept]]).bit_count()
                <= prompt_distance
            )
            own = best_edge.get(position.get(member, -1))
            if (min(member, kept), max(member, kept)) in embedded:
                result.matches[sample_id] = (EMBEDDING_MATCH, None)
            elif same_prompt or near_prompt:
                result.matches[sample_id] = ("prompt" if same_prompt else "prompt:near", None)
            elif own is not None:
                result.matches[sample_id] = (match_name(label, own[1]), None)
            elif member in embedded_rows:
                result.matches[sample_id] = (EMBEDDING_MATCH, None)
            else:
                exact = any(keys[member] == keys[index_of[s]] for s in cluster if s != sample_id)
                result.matches[sample_id] = ("prompt" if exact else "prompt:near", None)
    return result


def find_clusters(
    data: pa.Table,
    max_distance: int,
    prompts: str = "off",
    workers: int = 1,
    keep: tuple[str, ...] = DEFAULT_KEEP,
    prompt_distance: int = DEFAULT_PROMPT_DISTANCE,
    **passes: Any,
) -> tuple[list[list[str]], int, int]:
    """Clusters (kept sample first, largest cluster first), image pairs, prompt groups: the
    short form of :func:`cluster_samples` (``passes``: its keyword options)."""
    found = cluster_samples(data, max_distance, prompts, workers, keep, prompt_distance, **passes)
    return found.clusters, found.image_pairs, found.prompt_groups


MARK_COLUMNS = ("duplicate_of", "cluster_id", "duplicate_match", "duplicate_distance")


def dedupe(
    workspace: Workspace,
    hash_label_: str | None,
    max_distance: int = DEFAULT_MAX_DISTANCE,
    prompts: str = "off",
    workers: int = 1,
    dry_run: bool = False,
    keep: tuple[str, ...] = DEFAULT_KEEP,
    prompt_distance: int = DEFAULT_PROMPT_DISTANCE,
    *,
    variants: bool = True,
    verify: bool = True,
    colour_distance: float = DEFAULT_COLOUR_DISTANCE,
    embedding: EmbeddingPass | None = None,
    show_progress: bool = True,
) -> DedupeReport:
    """Mark duplicates in the ``duplicates`` table: per member of a cluster ``duplicate_of`` and
    ``cluster_id`` (both the kept sample, for the kept one too), ``duplicate_match`` and
    ``duplicate_distance`` (null for the kept one). Only rows where one of these changes are
    written, so a re-run writes nothing; with ``dry_run`` only report.

    ``hash_label_`` None: no hash pass (stored hashes are not read). ``embedding``: also join
    rows whose images' CLIP embeddings are alike (:mod:`pipelines.embedding_dedupe`; embeddings
    are cached in the workspace, so a re-run loads no model)."""
    started = time.perf_counter()
    if not 0 <= max_distance <= 32:
        raise InputError("--max-distance must be 0..32 bits")
    check_colour_distance(colour_distance)
    with workspace.stage_lock("dedupe"):
        data = workspace.dataset()
        if hash_label_ is None:
            kind_ok = pa.array(np.zeros(data.num_rows, dtype=bool))
        else:
            kind_ok = pc.fill_null(pc.equal(data["hash_kind"], hash_label_), False)
        for name in ("phash", "variant_hashes", "colour_hash"):
            column = data[name]
            data = data.set_column(
                data.schema.get_field_index(name),
                name,
                pc.if_else(kind_ok, column, pa.nulls(data.num_rows, column.type)),
            )
        hashed = pc.sum(kind_ok.cast(pa.int64()), min_count=0).as_py()
        extra_edges = None
        if embedding is not None:
            from pipelines.embedding_dedupe import embedding_edges

            extra_edges = embedding_edges(
                workspace,
                data,
                embedding.scorer,
                embedding.min_cosine,
                embedding.index,
                show_progress,
            )
        found = cluster_samples(
            data,
            max_distance,
            prompts,
            workers,
            check_keep(keep),
            prompt_distance,
            variants=variants,
            verify=verify,
            colour_distance=colour_distance,
            label=hash_label_ or "",
            extra_edges=extra_edges,
        )
        report = DedupeReport(
            hashed=hashed, **{f.name: getattr(found, f.name) for f in fields(Clustering)}
        )
        wanted = {}
        for cluster in found.clusters:
            wanted[cluster[0]] = (cluster[0], cluster[0], None, None)
            for sample_id in cluster[1:]:
                wanted[sample_id] = (cluster[0], cluster[0], *found.matches[sample_id])
        nothing = (None, None, None, None)
        current = {
            r["sample_id"]: tuple(r[c] for c in MARK_COLUMNS)
            for r in workspace.read_table("duplicates", list(MARK_COLUMNS)).to_pylist()
        }
        rows = []
        for sample_id in data["sample_id"].to_pylist():
            new, old = wanted.get(sample_id, nothing), current.get(sample_id, nothing)
            if new != old:
                rows.append((sample_id, *new))
                was_duplicate = old[0] is not None and old[0] != sample_id
                is_duplicate = new[0] is not None and new[0] != sample_id
                report.marked += is_duplicate and not was_duplicate
                report.cleared += was_duplicate and not is_duplicate
        if not dry_run and rows:
            params: dict[str, Any] = {
                "hash": hash_label_,
                "max_distance": max_distance,
                "prompts": prompts,
                "keep": list(keep),
                "variants": variants,
                "verify": verify,
                "colour_distance": colour_distance,
            }
            if embedding is not None:
                params["embedding"] = embedding.params()
            run = workspace.start_run("dedupe", params, output_table="duplicates")
            columns = list(zip(*rows, strict=True))
            types = (pa.string(), pa.string(), pa.string(), pa.string(), pa.int16())
            table = pa.table(
                {
                    name: pa.array(values, type_)
                    for name, values, type_ in zip(
                        ("sample_id", *MARK_COLUMNS), columns, types, strict=True
                    )
                }
            )
            workspace.write_table_part("duplicates", table)
            report.written = len(rows)
            workspace.finish_run(
                run, "completed", {"clusters": len(found.clusters), "written": len(rows)}
            )
        report.seconds = time.perf_counter() - started
        return report
