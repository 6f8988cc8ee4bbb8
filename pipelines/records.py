"""Per-item helpers shared by the stages that collect samples (ingest, scrape).

They raise :class:`ItemRejected` with a reason from a small fixed vocabulary; the stage turns it
into a failure row (``failure_reason`` / ``failure_detail``), never into a crashed batch.
"""

from __future__ import annotations

import functools
import io
import warnings
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from pipelines.base import FAILURE_DETAIL, FAILURE_REASON, IMAGE_BYTES
from pipelines.perceptual import (
    DEFAULT_KIND,
    DEFAULT_SIZE,
    ImageSignature,
    draft_decode,
    prepared,
    signature_fields,
    signature_of,
)
from surd_builder.ids import sha256_hex
from surd_builder.schema import STAGE_TABLES
from surd_builder.viewing import EXIF_ORIENTATION

# Columns of a source's metadata copied into the sample, with the type each is coerced to.
METADATA_FIELDS: dict[str, type] = {
    "negative_prompt": str,
    "narrative_prompt": str,
    "model_name": str,
    "sampler": str,
    "steps": int,
    "cfg_scale": float,
    "seed": int,
    "nsfw": bool,
    "nsfw_level": str,
    "license": str,
    "creator": str,
    "source_url": str,
    "page_url": str,
}
_INT_BITS = {"steps": 32, "seed": 64}
# Columns tried in order for the keyword prompt when the user names none (HF imagefolder and
# img2dataset inputs use ``text`` or ``caption``).
PROMPT_COLUMN_CANDIDATES = ("complex_prompt", "prompt", "text", "caption")


# NSFW levels on Civitai's scale, mildest first. Newer Civitai responses give a browsing-level
# number instead (1 PG, 2 PG-13, 4 R, 8 X, 16 XXX, 32 blocked): it maps onto the same four.
NSFW_LEVELS = ("None", "Soft", "Mature", "X")
_NSFW_LEVEL_NUMBERS = {1: "None", 2: "Soft", 4: "Mature", 8: "X", 16: "X", 32: "X"}
_NSFW_LEVEL_NAMES = {
    **{level.lower(): level for level in NSFW_LEVELS},
    **{"pg": "None", "pg-13": "Soft", "pg13": "Soft", "r": "Mature", "xxx": "X", "blocked": "X"},
}


def nsfw_marked(table: pa.Table) -> pa.Array:
    """Per row, whether the sample is marked NSFW: its ``nsfw`` is true or it has an
    ``nsfw_level`` other than "None" (the boolean is derived from the level at collection; a
    level alone still marks a sample). A table without those columns marks nothing. The one
    rule the export's ``--nsfw`` filter and its report's galleries apply."""
    import pyarrow.compute as pc

    def column(name: str, kind: pa.DataType) -> pa.ChunkedArray | pa.Array:
        return table[name] if name in table.column_names else pa.nulls(table.num_rows, kind)

    leveled = pc.not_equal(column("nsfw_level", pa.string()), "None")
    return pc.fill_null(pc.or_kleene(column("nsfw", pa.bool_()), leveled), False)


def nsfw_level(value: Any) -> str | None:
    """A source's NSFW level as one of :data:`NSFW_LEVELS` (``None`` when not given):
    Civitai's names ("None", "Soft", "Mature", "X"), its browsing-level numbers (the highest
    bit of a combined mask counts) and the rating names PG, PG-13, R, XXX. ``ValueError`` for
    anything else: a level is never guessed."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ValueError(f"not an NSFW level: {value!r}")
    text = str(value).strip()
    if text.endswith(".0") and text[:-2].isdigit():  # 4.0: a number written by pandas
        text = text[:-2]
    if text.isdigit():
        number = int(text)
        if number == 0:
            return None  # Civitai: not rated yet
        highest = 1 << (number.bit_length() - 1)  # a combined mask counts by its highest level
        if highest in _NSFW_LEVEL_NUMBERS:
            return _NSFW_LEVEL_NUMBERS[highest]
        raise ValueError(f"not an NSFW level: {value!r} (known: 1, 2, 4, 8, 16, 32)")
    level = _NSFW_LEVEL_NAMES.get(text.lower())
    if level is None:
        raise ValueError(f"not an NSFW level: {value!r} (use {', '.join(NSFW_LEVELS)})")
    return level


def default_prompt_column(columns: set[str]) -> str | None:
    return next((c for c in PROMPT_COLUMN_CANDIDATES if c in columns), None)


# What a collecting stage's ``process`` returns (see pipelines/base.py).
# Collection hashes with the hash stage's defaults (pipelines.perceptual.DEFAULT_KIND/_SIZE):
# the ``hashes`` table's columns travel in the collection output and are written there.
HASH_COLUMNS = tuple(
    c for c in STAGE_TABLES["hashes"].columns if c not in ("sample_id", "updated_at")
)
COLLECT_OUTPUT_SCHEMA = pa.schema(
    [
        *STAGE_TABLES["samples"].schema,
        *(STAGE_TABLES["hashes"].schema.field(c) for c in HASH_COLUMNS),
        pa.field(IMAGE_BYTES, pa.binary()),
        pa.field(FAILURE_REASON, pa.string()),
        pa.field(FAILURE_DETAIL, pa.string()),
    ]
)


# Beyond this a prompt is not a prompt any more (real ones are a few thousand characters): the
# item is skipped as "prompt-too-long" instead of carrying megabytes of text through every stage.
MAX_PROMPT_CHARS = 100_000

# Key of a listed item's metadata that says why its row could not be read (the item fails with
# "bad-metadata-row" and that detail).
REJECTED_ROW = "_rejected_row"


class ItemRejected(Exception):
    """One item cannot become a sample; ``reason`` is its failure reason."""

    def __init__(self, reason: str, detail: str | None = None):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@functools.cache
def _quiet_bomb_warnings() -> None:
    """Once per process: PIL's decompression-bomb warning is not shown, since
    :func:`inspect_image` refuses those images by their size itself."""
    from PIL import Image

    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def inspect_image(data: bytes, name: str, decode: bool = True) -> tuple[int, int, str]:
    """(width, height, PIL format) of encoded image ``data``, checked (:func:`inspect_and_hash`
    without the hash)."""
    return inspect_and_hash(data, name, decode, signature=False)[:3]


def inspect_and_hash(
    data: bytes, name: str, decode: bool = True, signature: bool = True, hash_up_to: int = 0
) -> tuple[int, int, str, ImageSignature | None]:
    """(width, height, PIL format, perceptual signature) of encoded image ``data``, checked.

    With ``decode`` everything is decoded to catch truncated or corrupt data, but a JPEG at a
    reduced DCT scale (which still reads every entropy-coded block): the scale the perceptual
    signature is computed at (:func:`pipelines.perceptual.draft_request`), so with ``signature``
    that decode is hashed too and the hash stage has nothing left to do for this image; without
    ``decode``, only the header and PIL's ``verify()`` (cheaper; corrupt pixel data gets
    through) and no signature. Decompression bombs are rejected either way, including those PIL
    only warns about (1x to 2x ``MAX_IMAGE_PIXELS``). An image that decodes but cannot be hashed
    (none is known) is stored without a signature: the hash stage reports it. ``hash_up_to``:
    no signature for an image larger than that on its longer side (it is stored shrunk, and the
    shrunk one is hashed).
    """
    from PIL import Image, UnidentifiedImageError

    _quiet_bomb_warnings()
    computed = None
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = stored = image.size
            image_format = image.format
            # PIL only warns between 1x and 2x its limit; checked here by size, not by turning
            # the warning into an error (warning filters are per process: not thread-safe)
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and width * height > limit:
                raise ItemRejected("too-large", f"{name}: {width}x{height} pixels > {limit:,}")
            if _rotated(image):  # stored as is; sized as shown (and as datasets decodes it)
                width, height = height, width
            if decode:
                box = draft_decode(image)
                if signature and not (hash_up_to and max(stored) > hash_up_to):
                    computed = _signature(image, box)
            else:
                image.verify()
    except Image.DecompressionBombError as error:
        raise ItemRejected("too-large", f"{name}: {error}") from None
    except UnidentifiedImageError:
        raise ItemRejected("not-an-image", f"{name}: not a recognised image format") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ItemRejected("not-an-image", f"{name}: {error}") from None
    return width, height, image_format, computed


def _signature(image, box: tuple | None) -> ImageSignature | None:
    try:
        return signature_of(*prepared(image, box), DEFAULT_KIND, DEFAULT_SIZE)
    except Exception:  # noqa: BLE001 (the hash stage decodes it again and says what failed)
        return None


def _rotated(image) -> bool:
    """Whether the image's EXIF orientation turns it by 90 degrees (values 5-8)."""
    if image.format not in ("JPEG", "MPO", "WEBP", "PNG"):  # Pillow sizes TIFF as shown already
        return False
    try:
        return image.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8)
    except Exception:  # noqa: BLE001 (a broken EXIF block says nothing about the pixels)
        return False


def shrink_image(data: bytes, max_side: int) -> bytes:
    """``data`` re-encoded with its longer side at most ``max_side`` (same format where PIL can
    write it, else PNG); unchanged when already small enough."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as image:
        if max(image.size) <= max_side:
            return data
        image_format = image.format if image.format in ("JPEG", "PNG", "WEBP") else "PNG"
        image.load()
        image = ImageOps.exif_transpose(image)  # the re-encode keeps no EXIF: turn the pixels
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        if image_format == "JPEG" and image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        buffer = io.BytesIO()
        quality = {"quality": 95} if image_format in ("JPEG", "WEBP") else {}
        image.save(buffer, format=image_format, **quality)
        return buffer.getvalue()


def exact_text(text: Any) -> str | None:
    """``text`` as the source wrote it, with only what no one means removed: a leading
    byte-order mark, the surrounding whitespace, and CR/CRLF line ends (made ``\\n``). Inner
    whitespace (tabs, repeated spaces, newlines, no-break and zero-width spaces) is data and
    stays; compare prompts through :func:`surd_builder.ids.text_key` instead. ``None`` for an
    empty text."""
    if text is None:
        return None
    if isinstance(text, dict | list | tuple | set | bytes):
        raise ItemRejected("bad-metadata", f"a prompt must be text, not a {type(text).__name__}")
    text = str(text).replace("\r\n", "\n").replace("\r", "\n").strip().removeprefix("\ufeff")
    text = text.strip()
    return text or None


def clean_prompt(text: Any) -> str | None:
    """A prompt as stored (:func:`exact_text`); :class:`ItemRejected` for one past
    :data:`MAX_PROMPT_CHARS` or with text no file can hold (unpaired surrogates)."""
    text = exact_text(text)
    if text is None:
        return None
    if len(text) > MAX_PROMPT_CHARS:
        raise ItemRejected("prompt-too-long", f"{len(text):,} characters > {MAX_PROMPT_CHARS:,}")
    _check_encodable(text, "prompt")
    return text


def is_encodable(text: str) -> bool:
    """Whether ``text`` can be stored (UTF-8 has no unpaired surrogates, which JSON escapes
    and undecodable file names can carry)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_encodable(text: str, what: str) -> None:
    if not is_encodable(text):
        raise ItemRejected("bad-metadata", f"{what} holds an unpaired surrogate")


def coerce(value: Any, kind: type) -> Any:
    """``value`` as ``kind``; ``None`` for missing or empty; ``ValueError`` if it is not one."""
    if value is None or value == "":
        return None
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes"):
            return True
        if text in ("false", "0", "no"):
            return False
        raise ValueError(f"not a boolean: {value!r}")
    if kind is int:
        if isinstance(value, bool):
            raise ValueError(f"not an integer: {value!r}")
        if isinstance(value, int):
            return value
        try:
            return int(str(value).strip())  # exact, also past 2**53 (seeds)
        except ValueError:
            number = float(value)  # "20.0"
            if not number.is_integer():
                raise ValueError(f"not an integer: {value!r}") from None
            return int(number)
    return kind(value)


def sample_fields(metadata: dict[str, Any], narrative_column: str = "narrative_prompt") -> dict:
    """The :data:`METADATA_FIELDS` of one metadata record, typed and range-checked."""
    fields: dict[str, Any] = {}
    for key, kind in METADATA_FIELDS.items():
        source_key = narrative_column if key == "narrative_prompt" else key
        try:
            if key == "nsfw_level":
                value = nsfw_level(metadata.get(source_key))
            else:
                value = coerce(metadata.get(source_key), kind)
        except (TypeError, ValueError) as error:
            raise ItemRejected("bad-metadata", f"{source_key}: {error}") from None
        if key.endswith("_prompt"):
            value = clean_prompt(value)
        elif isinstance(value, str):
            _check_encodable(value, source_key)
        fields[key] = value
    if fields["nsfw_level"] is not None:  # the level decides; a boolean beside it is derived
        fields["nsfw"] = fields["nsfw_level"] != "None"
    for key, bits in _INT_BITS.items():
        value = fields.get(key)
        if value is not None and not -(2 ** (bits - 1)) <= value < 2 ** (bits - 1):
            raise ItemRejected("bad-metadata", f"{key}: {value} is out of the int{bits} range")
    return fields


def collected_row(
    identity: dict[str, Any],
    fields: dict[str, Any],
    prompt: str,
    data: bytes,
    name: str,
    max_side: int | None = None,
    decode: bool = True,
) -> dict[str, Any]:
    """A complete output row for an item whose image ``data`` and keyword ``prompt`` are known.
    With ``max_side``, larger images are stored shrunk (by default the original is kept);
    ``decode`` chooses the image check (see :func:`inspect_and_hash`); a full check also gives
    the row its perceptual hashes (the ``hashes`` table's columns)."""
    width, height, image_format, signature = inspect_and_hash(
        data, name, decode, hash_up_to=max_side or 0
    )
    if max_side is not None and max(width, height) > max_side:
        data = shrink_image(data, max_side)
        width, height, image_format, signature = inspect_and_hash(data, name, decode)
    now = datetime.now(UTC)
    return {
        **identity,
        **fields,
        "complex_prompt": prompt,
        "narrative_origin": "source" if fields.get("narrative_prompt") else None,
        "image_sha256": sha256_hex(data),
        "width": width,
        "height": height,
        "image_format": image_format,
        "collected_at": now,
        "updated_at": now,
        IMAGE_BYTES: data,
        **signature_fields(signature),
    }


def failed_row(identity: dict[str, Any], rejected: ItemRejected) -> dict[str, Any]:
    return {**identity, FAILURE_REASON: rejected.reason, FAILURE_DETAIL: rejected.detail}
