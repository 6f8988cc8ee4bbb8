"""Per-item helpers shared by the stages that collect samples (ingest, scrape).

They raise :class:`ItemRejected` with a reason from a small fixed vocabulary; the stage turns it
into a failure row (``failure_reason`` / ``failure_detail``), never into a crashed batch.
"""

from __future__ import annotations

import csv
import io
import json
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipelines.base import FAILURE_DETAIL, FAILURE_REASON, IMAGE_BYTES
from surd_builder.errors import InputError
from surd_builder.ids import sha256_hex
from surd_builder.schema import STAGE_TABLES

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
    "license": str,
    "creator": str,
    "source_url": str,
    "page_url": str,
}
_INT_BITS = {"steps": 32, "seed": 64}
# Columns tried in order for the keyword prompt when the user names none (HF imagefolder and
# img2dataset inputs use ``text`` or ``caption``).
PROMPT_COLUMN_CANDIDATES = ("complex_prompt", "prompt", "text", "caption")


def default_prompt_column(columns: set[str]) -> str | None:
    return next((c for c in PROMPT_COLUMN_CANDIDATES if c in columns), None)


# What a collecting stage's ``process`` returns (see pipelines/base.py).
COLLECT_OUTPUT_SCHEMA = pa.schema(
    [
        *STAGE_TABLES["samples"].schema,
        pa.field(IMAGE_BYTES, pa.binary()),
        pa.field(FAILURE_REASON, pa.string()),
        pa.field(FAILURE_DETAIL, pa.string()),
    ]
)


def read_records(path: Path) -> list[dict[str, Any]]:
    """Rows of a user's CSV, JSONL or Parquet file; a malformed file is an :class:`InputError`
    naming the file (and the line, for JSONL)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except (pa.ArrowInvalid, OSError) as error:
            raise InputError(f"{path} is not a readable Parquet file ({error})") from None
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise InputError(
            f"{path} is not UTF-8 text ({error.reason} at byte {error.start})"
        ) from None
    if suffix == ".csv":
        try:
            return list(csv.DictReader(io.StringIO(text)))
        except csv.Error as error:
            raise InputError(f"{path}: not valid CSV ({error})") from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                row = json.loads(line)
            except ValueError as error:
                raise InputError(f"{path}:{number}: not valid JSON ({error})") from None
            if not isinstance(row, dict):
                raise InputError(f"{path}:{number}: each line must be a JSON object")
            rows.append(row)
    return rows


class ItemRejected(Exception):
    """One item cannot become a sample; ``reason`` is its failure reason."""

    def __init__(self, reason: str, detail: str | None = None):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def inspect_image(data: bytes, name: str, decode: bool = True) -> tuple[int, int, str]:
    """(width, height, PIL format) of encoded image ``data``, checked.

    With ``decode`` everything is decoded to catch truncated or corrupt data, but JPEG at 1/8
    scale (DCT scaling still reads every entropy-coded block); without, only the header and
    PIL's ``verify()`` (cheaper; corrupt pixel data gets through). Decompression bombs are
    rejected either way, including those PIL only warns about (1x to 2x ``MAX_IMAGE_PIXELS``).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                image_format = image.format
                if decode:
                    image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))
                    image.load()
                else:
                    image.verify()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ItemRejected("too-large", f"{name}: {error}") from None
    except UnidentifiedImageError:
        raise ItemRejected("not-an-image", f"{name}: not a recognised image format") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ItemRejected("not-an-image", f"{name}: {error}") from None
    return width, height, image_format


def shrink_image(data: bytes, max_side: int) -> bytes:
    """``data`` re-encoded with its longer side at most ``max_side`` (same format where PIL can
    write it, else PNG); unchanged when already small enough."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        if max(image.size) <= max_side:
            return data
        image_format = image.format if image.format in ("JPEG", "PNG", "WEBP") else "PNG"
        image.load()
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        if image_format == "JPEG" and image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        buffer = io.BytesIO()
        quality = {"quality": 95} if image_format in ("JPEG", "WEBP") else {}
        image.save(buffer, format=image_format, **quality)
        return buffer.getvalue()


def clean_prompt(text: Any) -> str | None:
    """Whitespace collapsed, BOM dropped; ``None`` for an empty prompt."""
    if text is None:
        return None
    cleaned = " ".join(str(text).replace("\ufeff", "").split())
    return cleaned or None


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
            value = coerce(metadata.get(source_key), kind)
        except (TypeError, ValueError) as error:
            raise ItemRejected("bad-metadata", f"{source_key}: {error}") from None
        fields[key] = clean_prompt(value) if key.endswith("_prompt") else value
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
    ``decode`` chooses the image check (see :func:`inspect_image`)."""
    width, height, image_format = inspect_image(data, name, decode)
    if max_side is not None and max(width, height) > max_side:
        data = shrink_image(data, max_side)
        width, height, image_format = inspect_image(data, name)
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
    }


def failed_row(identity: dict[str, Any], rejected: ItemRejected) -> dict[str, Any]:
    return {**identity, FAILURE_REASON: rejected.reason, FAILURE_DETAIL: rejected.detail}
