"""``surd build ingest``: collect (image, prompt) pairs from a local folder.

Prompts come from either or both of the layouts people already use:

- sidecar text files, as SD training tools (kohya-ss, EveryDream) expect: ``cat.png`` + ``cat.txt``
  (or ``cat.caption``) holding the keyword prompt;
- a Hugging Face imagefolder metadata file at the folder's root, ``metadata.jsonl`` or
  ``metadata.csv``, with a ``file_name`` column (path relative to the folder) and a prompt column.
  Columns named like sample fields (``narrative_prompt``, ``negative_prompt``, ``model_name``,
  ``seed``...) are taken over as well.

A metadata prompt wins over a sidecar. The item id is the file's path relative to the folder, and
the source name defaults to the folder's name, so re-ingesting the same folder maps every file to
the same ``sample_id``. The images' bytes are stored unchanged (no re-encoding).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import warnings
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa

from pipelines.base import FAILURE_DETAIL, FAILURE_REASON, IMAGE_BYTES, Stage
from surd_builder.config import IngestSettings
from surd_builder.errors import InputError
from surd_builder.ids import make_sample_id, sha256_hex
from surd_builder.schema import STAGE_TABLES
from surd_builder.workspace import Workspace

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
SIDECAR_EXTENSIONS = (".txt", ".caption")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
# Tried in order when --prompt-column is not given.
PROMPT_COLUMN_CANDIDATES = ("complex_prompt", "prompt", "text", "caption")
# Metadata columns copied into the sample as they are, with the type each is coerced to.
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
# Files larger than this are skipped as "too-large" before being read into memory.
DEFAULT_MAX_IMAGE_BYTES = int(IngestSettings.max_image_mb * 2**20)
_SOURCE_NAME = re.compile(r"[^\w.:-]+")  # \w: letters and digits of any script, and _

_OUTPUT_SCHEMA = pa.schema(
    [
        *STAGE_TABLES["samples"].schema,
        pa.field(IMAGE_BYTES, pa.binary()),
        pa.field(FAILURE_REASON, pa.string()),
        pa.field(FAILURE_DETAIL, pa.string()),
    ]
)


def default_source_name(folder: Path) -> str:
    name = _SOURCE_NAME.sub("-", Path(folder).resolve().name).strip("-")
    return name or "local"


def discover_images(folder: Path) -> list[str]:
    """Image files under ``folder`` (recursively, hidden entries skipped, symlinked folders
    followed once each), as sorted posix paths relative to ``folder``."""
    found = []
    visited: set[str] = set()
    for directory, subdirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(directory)
        if real in visited:  # a symlink loop, or a second link to a folder already walked
            subdirs[:] = []
            continue
        visited.add(real)
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                found.append(Path(directory, name).relative_to(folder).as_posix())
    return found


def read_metadata(folder: Path) -> tuple[Path | None, list[dict[str, Any]]]:
    """Rows of the folder's metadata file (``None, []`` without one); malformed files raise."""
    present = [folder / name for name in METADATA_FILES if (folder / name).is_file()]
    if len(present) > 1:
        raise InputError(f"{folder} has both {METADATA_FILES[0]} and {METADATA_FILES[1]}: keep one")
    if not present:
        return None, []
    path = present[0]
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise InputError(
            f"{path} is not UTF-8 text ({error.reason} at byte {error.start})"
        ) from None
    rows: list[dict[str, Any]] = []
    if path.suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as error:
                raise InputError(f"{path}:{number}: not valid JSON ({error})") from None
            if not isinstance(row, dict):
                raise InputError(f"{path}:{number}: each line must be a JSON object")
            rows.append(row)
    else:
        try:
            rows = list(csv.DictReader(io.StringIO(text)))
        except csv.Error as error:
            raise InputError(f"{path}: not valid CSV ({error})") from None
    seen: dict[str, int] = {}
    for number, row in enumerate(rows, start=1):
        name = row.get("file_name")
        if not isinstance(name, str) or not name:
            raise InputError(f"{path}: row {number} has no file_name")
        name = row["file_name"] = normalise_file_name(name) or name
        if name in seen:
            raise InputError(
                f"{path}: file_name {name!r} appears twice (rows {seen[name]}, {number})"
            )
        seen[name] = number
    return path, rows


def _coerce(value: Any, kind: type) -> Any:
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


def _clean_prompt(text: Any) -> str | None:
    if text is None:
        return None
    cleaned = " ".join(str(text).replace("\ufeff", "").split())
    return cleaned or None


def normalise_file_name(name: str) -> str | None:
    """``./a.png``, ``sub\\a.png`` -> ``a.png``, ``sub/a.png``: one spelling per file, so the
    metadata row and the file found on disk are one item. ``None`` for paths outside the folder."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or not path.parts:
        return None
    return path.as_posix()


class IngestStage(Stage):
    """Local folder of images with prompts -> ``samples`` rows + stored images."""

    name = "ingest"
    output_table = "samples"

    def __init__(
        self,
        folder: Path | str,
        source: str | None = None,
        prompt_column: str | None = None,
        narrative_column: str = "narrative_prompt",
        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    ):
        self.folder = Path(folder).resolve()
        self.max_image_bytes = max_image_bytes
        self.source = source or default_source_name(self.folder)
        if _SOURCE_NAME.search(self.source):
            raise InputError(
                f"source name {self.source!r} may only use letters, digits and . _ : -"
            )
        self.prompt_column = prompt_column
        self.narrative_column = narrative_column
        self._prompt_key: str | None = None

    def params(self) -> dict[str, Any]:
        return {
            "folder": str(self.folder),
            "source": self.source,
            "prompt_column": self._prompt_key,
            "narrative_column": self.narrative_column,
            "max_image_bytes": self.max_image_bytes,
        }

    # ----------------------------------------------------------------- plan (driver)
    def plan(self, workspace: Workspace) -> pa.Table:
        if not self.folder.exists():
            raise InputError(f"input folder {self.folder} does not exist")
        if not self.folder.is_dir():
            raise InputError(f"{self.folder} is not a folder")
        metadata_path, rows = read_metadata(self.folder)
        columns = set().union(*(row.keys() for row in rows)) if rows else set()
        if self.prompt_column is not None:
            if metadata_path is None:
                raise InputError(
                    f"{self.folder} has no metadata.jsonl or metadata.csv for --prompt-column"
                )
            if self.prompt_column not in columns:
                raise InputError(f"{metadata_path} has no column {self.prompt_column!r}")
            self._prompt_key = self.prompt_column
        else:
            self._prompt_key = next((c for c in PROMPT_COLUMN_CANDIDATES if c in columns), None)

        items: dict[str, dict[str, Any]] = {name: {} for name in discover_images(self.folder)}
        items.update({row["file_name"]: row for row in rows})
        if not items:
            extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
            raise InputError(f"no images in {self.folder} (looked for {extensions})")
        self._claim_source(workspace)
        relpaths = sorted(items)
        return pa.table(
            {
                "sample_id": [make_sample_id(self.source, p) for p in relpaths],
                "source": [self.source] * len(relpaths),
                "source_item_id": relpaths,
                "metadata_json": [json.dumps(items[p], default=str) for p in relpaths],
            }
        )

    def _claim_source(self, workspace: Workspace) -> None:
        """Refuse to ingest a different folder under a source name already in use: the two
        folders' files would share sample ids and the second would be silently skipped."""
        state = workspace.read_state(self.name)
        roots = state.setdefault("roots", {})
        known = roots.get(self.source)
        if known is not None and known != str(self.folder):
            raise InputError(
                f"source {self.source!r} was ingested from {known}; "
                f"give {self.folder} its own name with --source NAME"
            )
        if known is None:
            roots[self.source] = str(self.folder)
            workspace.write_state(self.name, state)

    # ----------------------------------------------------------------- process (pure)
    def process(self, batch: pa.Table) -> pa.Table:
        rows = [self._ingest_one(item) for item in batch.to_pylist()]
        return pa.Table.from_pylist(rows, schema=_OUTPUT_SCHEMA)

    def _ingest_one(self, item: dict[str, Any]) -> dict[str, Any]:
        from PIL import Image, UnidentifiedImageError

        row: dict[str, Any] = {
            "sample_id": item["sample_id"],
            "source": item["source"],
            "source_item_id": item["source_item_id"],
        }

        def failed(reason: str, detail: str | None = None) -> dict[str, Any]:
            return {**row, FAILURE_REASON: reason, FAILURE_DETAIL: detail}

        relative = normalise_file_name(item["source_item_id"])
        if relative is None:
            return failed("bad-file-name", "file_name must be a relative path inside the folder")
        path = self.folder / relative
        metadata = json.loads(item["metadata_json"])
        try:
            size = path.stat().st_size
            if size > self.max_image_bytes:
                return failed("too-large", f"{relative}: {size:,} bytes > {self.max_image_bytes:,}")
            data = path.read_bytes()
        except FileNotFoundError:
            return failed("missing-file", f"{relative} does not exist")
        except OSError as error:
            return failed("unreadable", f"{relative}: {error.strerror or error}")

        try:
            with warnings.catch_warnings():
                # PIL only warns between 1x and 2x MAX_IMAGE_PIXELS: skip those as well
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data)) as image:
                    width, height = image.size
                    image_format = image.format
                    # Decode everything to catch truncated or corrupt data, but let JPEG decode
                    # at 1/8 scale (DCT scaling still reads every entropy-coded block).
                    image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))
                    image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            return failed("too-large", f"{relative}: {error}")
        except UnidentifiedImageError:
            return failed("not-an-image", f"{relative}: not a recognised image format")
        except (OSError, SyntaxError, ValueError) as error:
            return failed("not-an-image", f"{relative}: {error}")

        prompt = _clean_prompt(metadata.get(self._prompt_key)) if self._prompt_key else None
        if prompt is None:
            for extension in SIDECAR_EXTENSIONS:
                sidecar = path.with_suffix(extension)
                if not sidecar.is_file():
                    continue
                try:
                    prompt = _clean_prompt(sidecar.read_bytes().decode("utf-8"))
                except UnicodeDecodeError as error:
                    return failed("prompt-not-utf8", f"{sidecar.name}: byte {error.start}")
                except OSError as error:
                    return failed("unreadable", f"{sidecar.name}: {error.strerror or error}")
                break
        if prompt is None:
            return failed("no-prompt", f"no prompt for {relative} in metadata or a sidecar file")

        for key, kind in METADATA_FIELDS.items():
            source_key = self.narrative_column if key == "narrative_prompt" else key
            try:
                value = _coerce(metadata.get(source_key), kind)
            except (TypeError, ValueError) as error:
                return failed("bad-metadata", f"{source_key}: {error}")
            row[key] = _clean_prompt(value) if key.endswith("_prompt") else value
        for key, bits in (("steps", 32), ("seed", 64)):
            if row.get(key) is not None and not -(2 ** (bits - 1)) <= row[key] < 2 ** (bits - 1):
                return failed("bad-metadata", f"{key}: {row[key]} is out of the int{bits} range")
        now = datetime.now(UTC)
        row.update(
            complex_prompt=prompt,
            narrative_origin="source" if row.get("narrative_prompt") else None,
            image_sha256=sha256_hex(data),
            width=width,
            height=height,
            image_format=image_format,
            collected_at=now,
            updated_at=now,
            **{IMAGE_BYTES: data},
        )
        return row
