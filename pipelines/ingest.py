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

import json
import os
import re
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa

from pipelines.base import Stage
from pipelines.records import (
    COLLECT_OUTPUT_SCHEMA,
    ItemRejected,
    clean_prompt,
    collected_row,
    default_prompt_column,
    failed_row,
    read_records,
    sample_fields,
)
from surd_builder.config import IngestSettings
from surd_builder.errors import InputError
from surd_builder.ids import make_sample_id
from surd_builder.workspace import Workspace

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
SIDECAR_EXTENSIONS = (".txt", ".caption")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
# Files larger than this are skipped as "too-large" before being read into memory.
DEFAULT_MAX_IMAGE_BYTES = int(IngestSettings.max_image_mb * 2**20)
_SOURCE_NAME = re.compile(r"[^\w.:-]+")  # \w: letters and digits of any script, and _


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
    rows = read_records(path)
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
            self._prompt_key = default_prompt_column(columns)

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
        return pa.Table.from_pylist(rows, schema=COLLECT_OUTPUT_SCHEMA)

    def _ingest_one(self, item: dict[str, Any]) -> dict[str, Any]:
        identity = {k: item[k] for k in ("sample_id", "source", "source_item_id")}
        try:
            return self._collect(item, identity)
        except ItemRejected as rejected:
            return failed_row(identity, rejected)

    def _collect(self, item: dict[str, Any], identity: dict[str, Any]) -> dict[str, Any]:
        relative = normalise_file_name(item["source_item_id"])
        if relative is None:
            raise ItemRejected("bad-file-name", "file_name must be a relative path in the folder")
        path = self.folder / relative
        try:
            size = path.stat().st_size
            if size > self.max_image_bytes:
                raise ItemRejected(
                    "too-large", f"{relative}: {size:,} bytes > {self.max_image_bytes:,}"
                )
            data = path.read_bytes()
        except FileNotFoundError:
            raise ItemRejected("missing-file", f"{relative} does not exist") from None
        except OSError as error:
            raise ItemRejected("unreadable", f"{relative}: {error.strerror or error}") from None
        metadata = json.loads(item["metadata_json"])
        fields = sample_fields(metadata, self.narrative_column)
        prompt = clean_prompt(metadata.get(self._prompt_key)) if self._prompt_key else None
        if prompt is None:
            prompt = self._sidecar_prompt(path)
        if prompt is None:
            raise ItemRejected(
                "no-prompt", f"no prompt for {relative} in metadata or a sidecar file"
            )
        return collected_row(identity, fields, prompt, data, relative)

    @staticmethod
    def _sidecar_prompt(path: Path) -> str | None:
        for extension in SIDECAR_EXTENSIONS:
            sidecar = path.with_suffix(extension)
            if not sidecar.is_file():
                continue
            try:
                return clean_prompt(sidecar.read_bytes().decode("utf-8"))
            except UnicodeDecodeError as error:
                raise ItemRejected(
                    "prompt-not-utf8", f"{sidecar.name}: byte {error.start}"
                ) from None
            except OSError as error:
                raise ItemRejected(
                    "unreadable", f"{sidecar.name}: {error.strerror or error}"
                ) from None
        return None
