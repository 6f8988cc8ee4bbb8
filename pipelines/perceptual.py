"""An image's perceptual signature: its pHash, the hashes of its mirror image and of five fixed
crops, and colour layouts, all from one decode (what ``surd build dedupe`` compares).

Computed where the image is first decoded: collection (ingest, scrape) checks every image by
decoding it, and :func:`signature_of` hashes that decoded image, so the hash stage only has the
images collected without a full check, before this version (``hash_settings``) or with other
settings left to do.

**Speed.** A JPEG is decoded at the smallest DCT scale still at least :data:`DRAFT_SIDE` px on
both sides (libjpeg's 1/2, 1/4, 1/8 scaling still reads every entropy-coded block, so a corrupt
file still fails); any larger image is then reduced by whole factors (exact box means) to about
:data:`WORK_SIDE`. imagehash's pHash resizes with Pillow's LANCZOS filter to 32x32 and takes a
DCT; six more such resizes for the variants would cost more than the decode. Here Pillow's
LANCZOS weights for each region are matrices: one product for the regions' few distinct column
ranges, rounded to 8 bits as Pillow's first pass is, one per region for the rows, rounded, then
the DCT rows; the mirror is the primary's columns reversed. On the same pixels the hash is
imagehash's (98% identical on photo-like images, the rest a bit at the median: the DCT here is
not scipy's); a crop with fractional edges takes the pixels it touches, where Pillow's crop
rounds them. Colour layouts are exact area means, for the whole image and the five crops at
once: two matrix products over the pixels (distinct column ranges, then row ranges).

**What is hashed** is what a viewer shows (:mod:`surd_builder.viewing`): turned as EXIF says,
16-bit scaled to 8 bits, transparency on white, an animation's first frame. A re-post saved with
its rotation applied, or flattened on white, hashes like the original.
"""

from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from surd_builder.viewing import EXIF_ORIENTATION

if TYPE_CHECKING:
    from PIL import Image as PILImage

HASH_KINDS = ("phash", "dhash", "ahash", "whash")
# What collection computes and the hash stage does by default (``surd build dedupe``'s --hash
# and --hash-size): rows of another kind or size count as not done.
DEFAULT_KIND, DEFAULT_SIZE = "phash", 8
# Bumped whenever a stored signature would come out differently: rows of another version count
# as not done (hash_settings). 2: pHash as matrices, exact-area layouts, what a viewer shows.
SIGNATURE_VERSION = 2
# The colour layout: COLOUR_GRID x COLOUR_GRID mean colours (sRGB bytes, hex).
COLOUR_GRID = 8
LAYOUT_CHARS = COLOUR_GRID * COLOUR_GRID * 3 * 2  # hex characters of one layout
# Fixed crops keep this fraction of each side (of 80%, 85% and 90%, 90% found the most re-posts).
VARIANT_CROP = 0.9
FULL = (0.0, 0.0, 1.0, 1.0)
# JPEGs are decoded at the smallest DCT scale still at least this side on both sides: a 512 px
# photo at 1/8, where each pixel is the exact mean of an 8x8 block (the DCT's DC term), in about
# 65% of a full decode's time. Measured with bench/dedupe_quality.py, layouts of true copies
# (resized, re-encoded, blurred, brightened) move no more than when decoded at 1/4 or 1/2
# (99th percentile delta E 1.8 / 1.8 / 1.7 on photo-like copies, equal on flat ones), and the
# crop and mirror recall is the same: the layouts are exact area means of the decoded pixels.
DRAFT_SIDE = 64
# The signature is computed from the decoded image reduced (exact box means, Image.reduce) by the
# largest whole factor that keeps its shorter side at least this: a PNG of 512 px hashes at 64.
WORK_SIDE = 64


def hash_label(kind: str, size: int) -> str:
    """``hash_kind`` of a hash: kind and side, e.g. ``phash-8`` (64 bits)."""
    return f"{kind}-{size}"


def hash_settings(draft: bool = True) -> str:
    """``hash_settings`` of a signature: its version and how JPEGs were decoded."""
    return f"v{SIGNATURE_VERSION} {'draft' if draft else 'full'}"


def variant_regions(crop: float = VARIANT_CROP) -> tuple[tuple[str, tuple, bool], ...]:
    """(match suffix, region (x0, y0, x1, y1) as fractions, mirrored) of each variant hash, in
    the order of ``variant_hashes``: the mirrored image, then the centre and four corner crops."""
    margin, rest = (1 - crop) / 2, 1 - crop
    return (
        ("mirror", FULL, True),
        ("crop", (margin, margin, 1 - margin, 1 - margin), False),
        ("crop", (0.0, 0.0, crop, crop), False),
        ("crop", (rest, 0.0, 1.0, crop), False),
        ("crop", (0.0, rest, crop, 1.0), False),
        ("crop", (rest, rest, 1.0, 1.0), False),
    )


VARIANTS = variant_regions()


@dataclass(frozen=True)
class ImageSignature:
    """What the hash stage stores for one image (the ``hashes`` table's columns)."""

    phash: str
    variant_hashes: list[str]
    colour_hash: str


class UnhashableImage(Exception):
    """The image could not be decoded for hashing; ``str()`` is the error's type name."""


def signature_fields(
    signature: ImageSignature | None,
    kind: str = DEFAULT_KIND,
    size: int = DEFAULT_SIZE,
    draft: bool = True,
) -> dict:
    """The ``hashes`` table's columns of one sample (none without a signature)."""
    if signature is None:
        return {}
    return {
        "phash": signature.phash,
        "hash_kind": hash_label(kind, size),
        "variant_hashes": signature.variant_hashes,
        "colour_hash": signature.colour_hash,
        "hash_settings": hash_settings(draft),
    }


# ------------------------------------------------------------------------------ decoding
def _turn_box(box: tuple, size: tuple[int, int], orientation: int) -> tuple:
    """Where ``box`` (the content of a draft-decoded image of ``size``, padding to the right and
    bottom) lies once the image is turned for EXIF ``orientation``."""
    x0, y0, x1, y1 = box
    width, height = size
    flips = {
        2: (width - x1, y0, width - x0, y1),  # mirrored
        3: (width - x1, height - y1, width - x0, height - y0),  # 180
        4: (x0, height - y1, x1, height - y0),  # flipped
        5: (y0, x0, y1, x1),  # transposed
        6: (height - y1, x0, height - y0, x1),  # turned clockwise
        7: (height - y1, width - x1, height - y0, width - x0),  # transversed
        8: (y0, width - x1, y1, width - x0),  # turned anticlockwise
    }
    return flips.get(orientation, box)


def prepared(image: PILImage.Image, box: tuple | None = None) -> tuple[PILImage.Image, tuple]:
    """The RGB image as viewed (turned as EXIF says, 8-bit, on white), reduced to about
    :data:`WORK_SIDE` (exact box means, before any conversion where the mode allows: a 4000 px
    RGBA PNG is not copied at full size), and the box its content fills: a JPEG decoded at a
    reduced DCT scale gets a partial block of padding at the right and bottom edges (a 435 px
    side decodes to 55 px at 1/8, of which 54.375 are the image)."""
    from surd_builder.viewing import as_viewed

    box = tuple(box or (0, 0, image.size[0], image.size[1]))
    try:
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 (a broken EXIF block says nothing about the pixels)
        orientation = 1
    if image.mode in REDUCIBLE_MODES:
        image, box = _reduced(image, box)
    method = _TRANSPOSES.get(orientation)
    if method is not None:
        size = image.size
        image, box = image.transpose(method), _turn_box(box, size, orientation)
    return _reduced(as_viewed(image), box)  # modes not reducible before (palettes, 16-bit)


# Modes Image.reduce takes as they are (transparency is reduced premultiplied, so laying the
# reduced image on white equals reducing the image laid on white).
REDUCIBLE_MODES = ("RGB", "RGBA", "L", "LA", "CMYK")
# What a viewer applies for EXIF orientations 2-8 (as ImageOps.exif_transpose does).
_TRANSPOSES = {2: 0, 3: 3, 4: 1, 5: 5, 6: 4, 7: 6, 8: 2}  # PIL.Image.Transpose values


def _reduced(image: PILImage.Image, box: tuple) -> tuple[PILImage.Image, tuple]:
    """The image reduced by the largest whole factor keeping its content's shorter side at
    least :data:`WORK_SIDE`, and the box scaled with it (the image itself when that is 1)."""
    factor = int(min(box[2] - box[0], box[3] - box[1]) // WORK_SIDE)
    if factor < 2:
        return image, box
    return image.reduce(factor), tuple(v / factor for v in box)


def draft_request(size: tuple[int, int], side: int | None = None) -> tuple[int, int]:
    """The size to ask ``Image.draft`` for so a JPEG is decoded at the smallest DCT scale still
    at least ``side`` (default :data:`DRAFT_SIDE`) px on both sides (whole when smaller)."""
    side = side or DRAFT_SIDE
    return (min(size[0], side), min(size[1], side))


def draft_decode(image: PILImage.Image, draft: bool = True) -> tuple | None:
    """Load an opened image, a JPEG (or MPO) at the smallest DCT scale still at least
    :data:`DRAFT_SIDE` px on both sides when ``draft``: the box its content fills then, or
    None (all of it). One place for collection and the hash stage, so both hash alike."""
    box = None
    if draft:
        drafted = image.draft(image.mode, draft_request(image.size))
        box = drafted[1] if drafted else None
    image.load()
    return box


def decode(data: bytes, draft: bool = True) -> tuple[PILImage.Image, tuple]:
    """The image to hash (:func:`prepared`) and its content box, from encoded ``data``."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            return prepared(image, draft_decode(image, draft))
    except UnhashableImage:
        raise
    except Exception as error:  # noqa: BLE001 (whatever the decoder raises, this image is bad)
        raise UnhashableImage(type(error).__name__) from None


# ------------------------------------------------------------------------------ fast pHash
def _lanczos(x: np.ndarray) -> np.ndarray:
    return np.where(np.abs(x) < 3.0, np.sinc(x) * np.sinc(x / 3.0), 0.0)


@functools.lru_cache(maxsize=512)
def resample_weights(in_size: int, low: float, high: float, out_size: int) -> np.ndarray:
    """``(out_size, in_size)``: Pillow's LANCZOS resampling of pixels ``[low, high)`` of a row
    of ``in_size`` pixels to ``out_size`` (Pillow's ``precompute_coeffs``, in float), as if the
    region were cropped first: only pixels the region touches take part, as a cropped re-post
    has none beyond its edge (Pillow clamps taps at an image's edges the same way)."""
    scale = (high - low) / out_size
    filter_scale = max(scale, 1.0)
    support = 3.0 * filter_scale
    centre = low + (np.arange(out_size) + 0.5) * scale
    first = np.maximum(np.trunc(centre - support + 0.5), max(math.floor(low), 0))
    last = np.minimum(np.trunc(centre + support + 0.5), min(math.ceil(high), in_size))
    pixels = np.arange(in_size)[None, :]
    taps = _lanczos((pixels - centre[:, None] + 0.5) / filter_scale)
    taps = np.where((pixels >= first[:, None]) & (pixels < last[:, None]), taps, 0.0)
    total = taps.sum(axis=1, keepdims=True)
    return np.divide(taps, total, out=taps, where=total != 0)


@functools.lru_cache(maxsize=8)
def dct_rows(size: int, taps: int) -> np.ndarray:
    """The first ``size`` rows of the (unnormalised) DCT-II of ``taps`` points."""
    k, n = np.arange(size)[:, None], np.arange(taps)[None, :]
    return np.cos(np.pi * k * (2 * n + 1) / (2 * taps))


@functools.lru_cache(maxsize=64)
def _resamplers(
    width: int, height: int, box: tuple, regions: tuple, taps: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The LANCZOS resampling of each region to ``taps x taps``: column weights ``(width,
    columns * taps)`` of the regions' distinct column ranges, row weights ``(regions, taps,
    height)``, which column range each region uses, and whether it is mirrored (a mirror
    image's region is the mirrored region with its columns reversed)."""
    left, top, right, bottom = box
    span_x, span_y = right - left, bottom - top
    ranges: list[tuple[float, float]] = []
    uses, mirrored, rows = [], [], []
    for x0, y0, x1, y1, mirror in regions:
        if mirror:
            x0, x1 = 1.0 - x1, 1.0 - x0
        if (x0, x1) not in ranges:
            ranges.append((x0, x1))
        uses.append(ranges.index((x0, x1)))
        mirrored.append(mirror)
        rows.append(resample_weights(height, top + y0 * span_y, top + y1 * span_y, taps))
    cols = [
        resample_weights(width, left + a * span_x, left + b * span_x, taps).T for a, b in ranges
    ]
    return (
        np.concatenate(cols, axis=1).astype(np.float32),
        np.stack(rows).astype(np.float32),
        np.array(uses),
        np.array(mirrored),
    )


def _rounded(values: np.ndarray) -> np.ndarray:
    """To 8 bits as Pillow's resampling passes store them (round half up, clipped)."""
    return np.clip(np.floor(values + 0.5), 0, 255)


def phashes(
    grey: np.ndarray, box: tuple, regions: tuple[tuple[float, float, float, float, bool], ...],
    size: int = 8,
) -> list[str]:  # fmt: skip
    """Hex pHashes (imagehash's: its bit order, its meaning) of ``regions`` (fractions of
    ``box``; mirrored where flagged) of a greyscale image ``(height, width)`` of 8-bit values.
    Each region is resampled as Pillow's LANCZOS resize of that crop does (horizontal pass,
    rounded to 8 bits, vertical pass, rounded), so the hash is imagehash's on that crop (up to a
    bit at the median, and for fractional crop edges, see the module docstring); then the DCT's
    low frequencies against their median."""
    height, width = grey.shape
    taps = size * 4
    cols, rows, uses, mirrored = _resamplers(
        width, height, tuple(float(v) for v in box), regions, taps
    )
    # the horizontal pass once per distinct column range: (height, ranges * taps)
    across = grey.astype(np.float32) @ cols
    np.floor(across + 0.5, out=across)
    np.clip(across, 0, 255, out=across)
    across = across.reshape(height, -1, taps).transpose(1, 0, 2)[uses]  # (regions, h, taps)
    across[mirrored] = across[mirrored][:, :, ::-1]
    small = rows @ across  # (regions, taps, taps)
    np.floor(small + 0.5, out=small)
    np.clip(small, 0, 255, out=small)
    dct = dct_rows(size, taps)
    # dct @ small @ dct.T, as two flat products: (regions * taps, taps) @ (taps, size), ...
    half = (small.astype(np.float64).reshape(-1, taps) @ dct.T).reshape(len(regions), taps, size)
    flat = (half.transpose(0, 2, 1).reshape(-1, taps) @ dct.T).reshape(len(regions), size, size)
    flat = flat.transpose(0, 2, 1).reshape(len(regions), -1)  # (regions, size * size), rows first
    # rounding noise is not structure: a flat region's AC terms are 0, as imagehash's are
    flat = np.where(np.abs(flat) <= 1e-9 * np.abs(flat[:, :1]), 0.0, flat)
    ordered = np.sort(flat, axis=1)  # the median, as numpy's: the mean of the middle two
    middle = flat.shape[1] // 2
    median = (ordered[:, middle - 1 : middle] + ordered[:, middle : middle + 1]) / 2
    if flat.shape[1] % 2:
        median = ordered[:, middle : middle + 1]
    bits = flat > median
    packed = np.packbits(bits, axis=1)
    digits = math.ceil(size * size / 4)
    if size * size % 8 == 0:
        return [row.tobytes().hex() for row in packed]
    return [f"{int(''.join('1' if b else '0' for b in row), 2):0{digits}x}" for row in bits]


def _imagehash_function(kind: str):
    import imagehash

    return {
        "phash": imagehash.phash,
        "dhash": imagehash.dhash,
        "ahash": imagehash.average_hash,
        "whash": imagehash.whash,
    }[kind]


def _within(content: tuple, region: tuple) -> tuple:
    """``region`` (fractions) of the ``content`` box, in pixels, not rounded."""
    left, top, right, bottom = content
    x0, y0, x1, y1 = region
    width, height = right - left, bottom - top
    return (left + x0 * width, top + y0 * height, left + x1 * width, top + y1 * height)


def _other_hashes(
    image: PILImage.Image, box: tuple, regions: tuple, kind: str, size: int
) -> list[str]:
    """dHash, aHash, wHash (imagehash) of each region: the region resampled to its own size."""
    from PIL import Image

    function = _imagehash_function(kind)
    hashes = []
    for x0, y0, x1, y1, mirror in regions:
        part_box = _within(box, (x0, y0, x1, y1))
        part_size = (
            max(1, round(part_box[2] - part_box[0])),
            max(1, round(part_box[3] - part_box[1])),
        )
        part = image.resize(part_size, Image.Resampling.BICUBIC, box=part_box)
        if mirror:
            part = part.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        hashes.append(str(function(part, hash_size=size)))
    return hashes


# ------------------------------------------------------------------------------ colour layouts
def area_weights(low: float, high: float, cells: int, source: int) -> np.ndarray:
    """``(cells, source)``: row i holds the share of each of ``source`` equal parts of [0, 1]
    in the i-th of ``cells`` equal parts of ``[low, high]``."""
    edges = np.linspace(low, high, cells + 1)
    grid = np.linspace(0.0, 1.0, source + 1)
    overlap = np.minimum(edges[1:, None], grid[None, 1:]) - np.maximum(
        edges[:-1, None], grid[None, :-1]
    )
    return np.clip(overlap, 0.0, None) / (edges[1:] - edges[:-1])[:, None]


@functools.lru_cache(maxsize=512)
def pixel_weights(in_size: int, low: float, high: float, cells: int = COLOUR_GRID) -> np.ndarray:
    """``(cells, in_size)`` float32: the share of each pixel in each of ``cells`` equal parts
    of ``[low, high]`` (in pixels, not rounded): exact area means, partial pixels included."""
    return (area_weights(low / in_size, high / in_size, cells, in_size)).astype(np.float32)


def layouts_of(pixels: np.ndarray, box: tuple, regions: list[tuple]) -> str:
    """Hex colour layouts (sRGB bytes, rows first) of ``regions`` (fractions of ``box``, in
    pixels) of RGB ``pixels`` ``(height, width, 3)``: each cell the exact area mean of the
    pixels it covers. Computed separably for all regions at once (their distinct column
    ranges, then row ranges)."""
    height, width = pixels.shape[:2]
    columns, rows, pick_y, pick_x = _layout_plan(
        width, height, tuple(float(v) for v in box), tuple(tuple(r) for r in regions)
    )
    by_column = pixels.transpose(0, 2, 1).reshape(-1, width) @ columns  # (height * 3, xs * 8)
    grids = rows @ by_column.reshape(height, -1)  # (ys * 8, 3 * xs * 8)
    grids = grids.reshape(-1, COLOUR_GRID, 3, columns.shape[1] // COLOUR_GRID, COLOUR_GRID)
    chosen = grids[pick_y, :, :, pick_x].transpose(0, 1, 3, 2)  # (regions, 8, 8, 3)
    return np.clip(np.rint(chosen), 0, 255).astype(np.uint8).tobytes().hex()


@functools.lru_cache(maxsize=64)
def _layout_plan(
    width: int, height: int, box: tuple, regions: tuple
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`layouts_of`'s weights: columns ``(width, xs * 8)`` and rows ``(ys * 8, height)``
    of the regions' distinct column and row ranges, and which of them each region takes."""
    left, top, right, bottom = box
    span_x, span_y = right - left, bottom - top
    x_ranges = sorted({(r[0], r[2]) for r in regions})
    y_ranges = sorted({(r[1], r[3]) for r in regions})
    columns = np.concatenate(
        [pixel_weights(width, left + a * span_x, left + b * span_x) for a, b in x_ranges]
    )
    rows = np.concatenate(
        [pixel_weights(height, top + a * span_y, top + b * span_y) for a, b in y_ranges]
    )
    pick_y = np.array([y_ranges.index((r[1], r[3])) for r in regions])
    pick_x = np.array([x_ranges.index((r[0], r[2])) for r in regions])
    return np.ascontiguousarray(columns.T), rows, pick_y, pick_x


# ------------------------------------------------------------------------------ signature
def signature_of(
    image: PILImage.Image,
    box: tuple | None = None,
    kind: str = "phash",
    size: int = 8,
    variants: tuple[tuple[str, tuple, bool], ...] = VARIANTS,
) -> ImageSignature:
    """Primary hash, variant hashes and colour layouts of a decoded, :func:`prepared` RGB image
    whose content fills ``box`` (default: all of it)."""
    image, box = _reduced(image, tuple(box or (0, 0, image.width, image.height)))
    regions = ((*FULL, False), *((*region, mirror) for _, region, mirror in variants))
    pixels = np.asarray(image, dtype=np.float32)
    if kind == "phash":
        hashes = phashes(np.asarray(image.convert("L")), box, regions, size)
    else:
        hashes = _other_hashes(image, box, regions, kind, size)
    crops = [region for _, region, mirror in variants if not mirror and region != FULL]
    layouts = layouts_of(pixels, box, [FULL, *crops])
    return ImageSignature(hashes[0], hashes[1:], layouts)


def image_signature(
    data: bytes,
    kind: str = "phash",
    size: int = 8,
    draft: bool = True,
    variants: tuple[tuple[str, tuple, bool], ...] = VARIANTS,
) -> ImageSignature:
    """:func:`signature_of` an encoded image, from one decode; raises :class:`UnhashableImage`
    (whatever fails: one image never stops a batch)."""
    image, box = decode(data, draft)
    try:
        return signature_of(image, box, kind, size, variants)
    except Exception as error:  # noqa: BLE001 (a failure row, not a traceback)
        raise UnhashableImage(type(error).__name__) from None


def image_hash(data: bytes, kind: str = "phash", size: int = 8, draft: bool = True) -> str:
    """The hex perceptual hash of an encoded image (its primary hash alone)."""
    return image_signature(data, kind, size, draft, variants=()).phash
