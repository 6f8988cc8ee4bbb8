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
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa

from pipelines.base import FAILURE_DETAIL, FAILURE_REASON, Stage
from pipelines.folder_walk import IMAGE_EXTENSIONS, FolderRoot, display_name
from pipelines.record_files import MAX_PROMPT_FILE_BYTES, decode_prompt_file, iter_records
from pipelines.records import (
    COLLECT_OUTPUT_SCHEMA,
    ItemRejected,
    clean_prompt,
    collected_row,
    default_prompt_column,
    failed_row,
    is_encodable,
    sample_fields,
)
from surd_builder.config import IngestSettings
from surd_builder.errors import InputError
from surd_builder.ids import make_sample_id
from surd_builder.workspace import Workspace

SIDECAR_EXTENSIONS = (".txt", ".caption")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
# Files larger than this are skipped as "too-large" before being read into memory.
DEFAULT_MAX_IMAGE_BYTES = int(IngestSettings.max_image_mb * 2**20)
_SOURCE_NAME = re.compile(r"[^\w.:-]+")  # \w: letters and digits of any script, and _


def default_source_name(folder: Path) -> str:
    name = _SOURCE_NAME.sub("-", Path(folder).resolve().name).strip("-")
    return name or "local"


@dataclass
class Metadata:
    """The rows of a folder's metadata file by file name, and the rows skipped (``{item id:
    (reason, why)}``, the item id ``metadata.jsonl:LINE``)."""

    path: Path | None = None
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: dict[str, tuple[str, str]] = field(default_factory=dict)


def read_metadata(folder: Path) -> Metadata:
    """The folder's metadata file, row by row: a bad row (not JSON, not an object, no usable
    ``file_name``, a second row for a file) is skipped with its line number and reason, as a
    good imagefolder tool does; only a file that is not such a file at all is refused."""
    root = FolderRoot(Path(folder))
    present = [root.path / name for name in METADATA_FILES if (root.path / name).is_file()]
    if len(present) > 1:
        raise InputError(f"{folder} has both {METADATA_FILES[0]} and {METADATA_FILES[1]}: keep one")
    if not present:
        return Metadata()
    path = present[0]
    if not root.contains(os.path.realpath(path)):
        raise InputError(f"{path} links outside {folder}: refusing to read it")
    metadata = Metadata(path)
    first_line: dict[str, int] = {}
    for record in iter_records(path):
        where = f"{path.name}:{record.line}"
        name = None if record.row is None else record.row.get("file_name")
        if record.row is None:
            problem = record.error
        elif not isinstance(name, str) or not name.strip():
            problem = "no file_name" if name in (None, "") else f"file_name {name!r} is not a path"
        elif not is_encodable(name) or "\x00" in name:
            problem = "file_name holds an unpaired surrogate or a NUL"
        elif normalise_file_name(name) is None:
            detail = f"{where}: file_name {name!r} must be a relative path in the folder"
            metadata.skipped[where] = ("bad-file-name", detail)
            continue
        else:
            problem = None
            name = normalise_file_name(name)
            if name in first_line:
                problem = f"file_name {name!r} is already named on line {first_line[name]}"
        if problem is not None:
            metadata.skipped[where] = ("bad-metadata-row", f"{where}: {problem}")
            continue
        first_line[name] = record.line
        metadata.rows[name] = {**record.row, "file_name": name}
    return metadata


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
    side_tables = ("hashes",)  # the image is hashed where it is decoded to check it

    def __init__(
        self,
        folder: Path | str,
        source: str | None = None,
        prompt_column: str | None = None,
        narrative_column: str = "narrative_prompt",
        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    ):
        self.folder = Path(folder).resolve()
        self._root = FolderRoot(self.folder)  # the one rule for reading under it
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
        metadata = read_metadata(self.folder)
        rows = metadata.rows
        columns = set().union(*(row.keys() for row in rows.values())) if rows else set()
        if self.prompt_column is not None:
            if metadata.path is None:
                raise InputError(
                    f"{self.folder} has no metadata.jsonl or metadata.csv for --prompt-column"
                )
            if self.prompt_column not in columns:
                raise InputError(f"{metadata.path} has no column {self.prompt_column!r}")
            self._prompt_key = self.prompt_column
        else:
            self._prompt_key = default_prompt_column(columns)

        found = FolderRoot(self.folder).walk()
        # a metadata row names a file by one path; the walk may have reached it by another (a
        # link inside the folder): the row's name wins, the file stays one item
        real_of_row = {name: os.path.realpath(self.folder / name) for name in rows}
        taken = set(real_of_row.values())
        images = [p for p, real in found.images.items() if p not in rows and real not in taken]
        items: dict[str, dict[str, Any]] = {}
        for relative in images:
            items[display_name(relative)] = {"path": relative, "metadata": {}}
        for name, row in rows.items():
            items[name] = {"path": name, "metadata": row}
        for relative, (reason, why) in found.refused.items():
            if relative not in rows:
                items[display_name(relative)] = {"reason": reason, "detail": why}
        for where, (reason, why) in metadata.skipped.items():
            items[where] = {"reason": reason, "detail": why}
        if not items:
            extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
            raise InputError(f"no images in {self.folder} (looked for {extensions})")
        self._claim_source(workspace)
        ids = sorted(items)
        return pa.table(
            {
                "sample_id": [make_sample_id(self.source, i) for i in ids],
                "source": [self.source] * len(ids),
                "source_item_id": ids,
                # the name's real bytes: the id above is text, a file name need not be
                "file_path": pa.array(
                    [os.fsencode(items[i]["path"]) if "path" in items[i] else None for i in ids],
                    pa.binary(),
                ),
                "metadata_json": [json.dumps(items[i].get("metadata"), default=str) for i in ids],
                FAILURE_REASON: [items[i].get("reason") for i in ids],
                FAILURE_DETAIL: [items[i].get("detail") for i in ids],
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
            if item.get(FAILURE_REASON):  # refused while walking the folder or its metadata
                raise ItemRejected(item[FAILURE_REASON], item.get(FAILURE_DETAIL))
            return self._collect(item, identity)
        except ItemRejected as rejected:
            return failed_row(identity, rejected)

    def _collect(self, item: dict[str, Any], identity: dict[str, Any]) -> dict[str, Any]:
        name = item["source_item_id"]
        # a found file's path as it is (a backslash is part of a name there); metadata names
        # were made relative when the file was read
        relative = os.fsdecode(item["file_path"])
        if os.path.isabs(relative) or ".." in PurePosixPath(relative).parts:
            raise ItemRejected("bad-file-name", "file_name must be a relative path in the folder")
        root = self._root
        real = root.resolve(relative, "the file")
        try:
            status = os.stat(real)
            size = status.st_size
            if not stat.S_ISREG(status.st_mode):  # a pipe or a device would hang or never end
                kind = "a folder" if stat.S_ISDIR(status.st_mode) else "not a regular file"
                raise ItemRejected("not-a-file", f"{name} is {kind}")
            if size > self.max_image_bytes:
                raise ItemRejected(
                    "too-large", f"{name}: {size:,} bytes > {self.max_image_bytes:,}"
                )
            with open(real, "rb") as handle:
                data = handle.read(self.max_image_bytes + 1)
        except FileNotFoundError:
            raise ItemRejected("missing-file", f"{name} does not exist") from None
        except OSError as error:
            raise ItemRejected("unreadable", f"{name}: {error.strerror or error}") from None
        if len(data) > self.max_image_bytes:  # grew since it was measured
            raise ItemRejected("too-large", f"{name}: more than {self.max_image_bytes:,} bytes")
        metadata = json.loads(item["metadata_json"]) or {}
        fields = sample_fields(metadata, self.narrative_column)
        prompt = clean_prompt(metadata.get(self._prompt_key)) if self._prompt_key else None
        if prompt is None:
            prompt = self._sidecar_prompt(root, relative)
        if prompt is None:
            raise ItemRejected("no-prompt", f"no prompt for {name} in metadata or a sidecar file")
        return collected_row(identity, fields, prompt, data, name)

    @staticmethod
    def _sidecar_prompt(root: FolderRoot, relative: str) -> str | None:
        base = PurePosixPath(relative)
        for extension in SIDECAR_EXTENSIONS:
            sidecar = base.with_suffix(extension).as_posix()
            shown = display_name(PurePosixPath(sidecar).name)
            if not os.path.lexists(root.path / sidecar):
                continue
            real = root.resolve(sidecar, "its prompt file")
            try:
                status = os.stat(real)
                if not stat.S_ISREG(status.st_mode):
                    if stat.S_ISDIR(status.st_mode):
                        continue  # a folder named like a sidecar is not one
                    raise ItemRejected("not-a-file", f"{shown} is not a regular file")
                if status.st_size > MAX_PROMPT_FILE_BYTES:
                    raise ItemRejected(
                        "prompt-too-long", f"{shown} is larger than {MAX_PROMPT_FILE_BYTES:,} bytes"
                    )
                with open(real, "rb") as handle:
                    data = handle.read(MAX_PROMPT_FILE_BYTES + 1)
            except FileNotFoundError:
                continue  # a link to nothing: as if there were no sidecar
            except OSError as error:
                raise ItemRejected("unreadable", f"{shown}: {error.strerror or error}") from None
            prompt = clean_prompt(decode_prompt_file(data, shown))
            if prompt is not None:
                return prompt
        return None
