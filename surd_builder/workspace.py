"""The on-disk workspace every stage reads and writes.

Layout (all Parquet is zstd-compressed; every file is written atomically, see ``atomic.py``)::

    WS/
      surd-workspace.json        marker: format name and version, creation time
      surd.toml                  settings (see ``config.py``); commented defaults at first
      manifest.json              every stage run: stage, status, params, counts, times
      tables/<table>/part-*.parquet   stage tables keyed by sample_id (see schema.STAGE_TABLES)
      failures/part-*.parquet    per-item failures: stage, sample_id, reason, detail
      images/shard-*.parquet     image bytes, stored once, content-addressed by sha256
      listings/<source>/part-*.parquet   items a scrape source listed (downloaded or not)
      state/<stage>.json         small resumable state of a stage (cursors, input roots)
      locks/                     one lock file per stage: one run of a stage at a time

A table is the union of its part files; when a sample appears in several parts (a ``--force``
re-run), the part written last wins. Part files are only ever added, never rewritten, so a killed
run loses at most the batch it was writing, and a re-run skips every sample already in a part.
Images are written before the table rows that reference them, so no row ever points at a missing
image (an image without a row is harmless: the re-run finds it already stored).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from surd_builder import __version__
from surd_builder.atomic import (
    atomic_path,
    part_name,
    remove_stale_temp_files,
    write_json_atomic,
    write_parquet_atomic,
)
from surd_builder.config import CONFIG_FILE
from surd_builder.config import TEMPLATE as CONFIG_TEMPLATE
from surd_builder.errors import WorkspaceError
from surd_builder.image_store import ImageStore
from surd_builder.schema import (
    COLUMN_GROUPS,
    FAILURES_SCHEMA,
    LISTING_SCHEMA,
    SAMPLE_SCHEMA,
    STAGE_TABLES,
    conform,
    table_spec,
)

MARKER_FILE = "surd-workspace.json"
FORMAT_NAME = "surd-workspace"
FORMAT_VERSION = 1


def utc_now() -> datetime:
    return datetime.now(UTC)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise WorkspaceError(f"{path} is damaged or unreadable ({error})") from None


def _latest_by_key(table: pa.Table, keys: list[str], order_by: str | None = None) -> pa.Table:
    """Keep the current row of each key: the last in write order, or, with ``order_by``, the
    one with the newest ``order_by`` value (nulls oldest; ties go to the last written)."""
    if table.num_rows == 0:
        return table
    if order_by is not None:
        oldest_first = pc.fill_null(table[order_by].cast(pa.int64()), -(2**63))  # null: oldest
        ranked = pa.table({"t": oldest_first, "row": pa.array(range(table.num_rows))})
        table = table.take(ranked.sort_by([("t", "ascending"), ("row", "ascending")])["row"])
    indexed = table.append_column("__row", pa.array(range(table.num_rows), pa.int64()))
    last = indexed.group_by(keys).aggregate([("__row", "max")])["__row_max"]
    return table.take(last.take(pc.sort_indices(last)))  # the kept rows, in (re)ordered order


def _read_parts(paths: list[Path], schema: pa.Schema, columns: list[str] | None) -> pa.Table:
    wanted = schema if columns is None else pa.schema([schema.field(c) for c in columns])
    if not paths:
        return wanted.empty_table()
    tables = []
    for path in paths:
        # Parts written before a column was added to the schema lack it: read what the file has
        # and let `conform` fill the rest with nulls, so old workspaces keep working.
        present = set(pq.read_schema(path).names)
        table = pq.read_table(path, columns=[n for n in wanted.names if n in present])
        tables.append(conform(table, wanted))
    return pa.concat_tables(tables)


class Workspace:
    """A surd workspace folder. Use :meth:`create` or :meth:`open`, not the constructor."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.images = ImageStore(self.root / "images")

    # ----------------------------------------------------------------- create / open
    @classmethod
    def create(cls, root: Path | str) -> Workspace:
        """Make a new workspace at ``root`` (which must be missing or empty)."""
        root = Path(root)
        if (root / MARKER_FILE).exists():
            return cls.open(root)
        if root.exists() and not root.is_dir():
            raise WorkspaceError(f"{root} exists and is not a folder")
        if root.exists() and any(root.iterdir()):
            raise WorkspaceError(f"{root} is a non-empty folder that is not a surd workspace")
        for sub in ("tables", "failures", "images", "state", "locks"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        marker = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "created_at": utc_now().isoformat(),
            "created_by": f"surd {__version__}",
        }
        write_json_atomic([], root / "manifest.json")
        with atomic_path(root / CONFIG_FILE) as temp:
            temp.write_text(CONFIG_TEMPLATE)
        write_json_atomic(marker, root / MARKER_FILE)  # last: only a complete workspace is marked
        return cls(root)

    @classmethod
    def open(cls, root: Path | str) -> Workspace:
        """Open an existing workspace, with a clear error when ``root`` is not one."""
        root = Path(root)
        if not root.exists():
            raise WorkspaceError(
                f"workspace {root} does not exist (create it with: surd init {root})"
            )
        marker_path = root / MARKER_FILE
        if not marker_path.is_file():
            raise WorkspaceError(
                f"{root} is not a surd workspace (no {MARKER_FILE}); run: surd init DIR"
            )
        marker = _read_json(marker_path)
        if not isinstance(marker, dict) or marker.get("format") != FORMAT_NAME:
            raise WorkspaceError(f"{marker_path} is not a surd workspace marker")
        if marker.get("format_version") != FORMAT_VERSION:
            raise WorkspaceError(
                f"workspace format {marker.get('format_version')} is not supported by surd "
                f"{__version__} (expects {FORMAT_VERSION})"
            )
        remove_stale_temp_files(root)
        return cls(root)

    # ----------------------------------------------------------------- stage tables
    def table_dir(self, name: str) -> Path:
        table_spec(name)
        return self.root / "tables" / name

    def table_parts(self, name: str) -> list[Path]:
        return sorted(self.table_dir(name).glob("part-*.parquet"))

    def write_table_part(self, name: str, table: pa.Table) -> Path | None:
        """Append ``table`` (rows of stage table ``name``) as a new part; ``None`` if empty."""
        spec = table_spec(name)
        if table.num_rows == 0:
            return None
        table = conform(table, spec.schema)
        return write_parquet_atomic(table, self.table_dir(name) / part_name("part"))

    def read_table(self, name: str, columns: list[str] | None = None) -> pa.Table:
        """Stage table ``name``, one row per sample_id (the most recently written one)."""
        spec = table_spec(name)
        if columns is not None and "sample_id" not in columns:
            columns = ["sample_id", *columns]
        if columns is not None and spec.order_by and spec.order_by not in columns:
            table = _read_parts(self.table_parts(name), spec.schema, [*columns, spec.order_by])
            return _latest_by_key(table, ["sample_id"], spec.order_by).select(columns)
        table = _read_parts(self.table_parts(name), spec.schema, columns)
        return _latest_by_key(table, ["sample_id"], spec.order_by)

    def read_table_history(self, name: str, columns: list[str] | None = None) -> pa.Table:
        """Every row ever written to stage table ``name``, oldest part first: superseded rows
        too, which is what a cache keyed by inputs (not by sample) wants."""
        return _read_parts(self.table_parts(name), table_spec(name).schema, columns)

    def sample_ids(self, name: str) -> set[str]:
        """Ids of the samples stage table ``name`` holds: what a re-run skips."""
        ids: set[str] = set()
        for part in self.table_parts(name):
            ids.update(pq.read_table(part, columns=["sample_id"])["sample_id"].to_pylist())
        return ids

    def dataset(self) -> pa.Table:
        """The current dataset: every stage table joined onto ``samples`` by ``sample_id``.

        Tables are applied in :data:`schema.STAGE_TABLES` order and a later table's non-null value
        replaces an earlier one's, except that the columns of a :data:`schema.COLUMN_GROUPS` group
        all come from the table that set the group's first column (null where it has none);
        ``updated_at`` is the latest of all. Columns no table has written yet are null, except
        ``review_status``, which is ``pending`` until a human decides.
        """
        group_of = {column: group for group in COLUMN_GROUPS for column in group}
        merged = self.read_table("samples")
        for name, spec in list(STAGE_TABLES.items())[1:]:
            if not self.table_parts(name):
                continue
            other = self.read_table(name)
            positions = pc.index_in(merged["sample_id"], value_set=other["sample_id"])
            aligned = {column: other[column].take(positions) for column in spec.columns[1:]}
            for group in COLUMN_GROUPS:
                # a table that sets a group's first column sets the whole group: columns of the
                # group it does not have become null there (a human's narrative has no
                # rewrite_key), never a stale value from an earlier table
                if group[0] in aligned:
                    for column in group[1:]:
                        if column not in aligned:
                            field = SAMPLE_SCHEMA.field(column)
                            aligned[column] = pa.nulls(merged.num_rows, field.type)
            for column, values in aligned.items():
                if column not in merged.column_names:
                    merged = merged.append_column(SAMPLE_SCHEMA.field(column), values)
                    continue
                current = merged[column]
                if column == "updated_at":
                    # no timestamp kernel for max_element_wise: compare as int64 microseconds
                    value = pc.max_element_wise(
                        values.cast(pa.int64()), current.cast(pa.int64()), skip_nulls=True
                    ).cast(current.type)
                elif column in group_of and group_of[column][0] in aligned:
                    value = pc.if_else(pc.is_valid(aligned[group_of[column][0]]), values, current)
                else:
                    value = pc.coalesce(values, current)
                merged = merged.set_column(merged.schema.get_field_index(column), column, value)
        merged = conform(merged, SAMPLE_SCHEMA)
        status_index = SAMPLE_SCHEMA.get_field_index("review_status")
        status = pc.fill_null(merged["review_status"], "pending")
        return merged.set_column(status_index, SAMPLE_SCHEMA.field("review_status"), status)

    # ----------------------------------------------------------------- failures
    def write_failures(self, failures: pa.Table) -> Path | None:
        if failures.num_rows == 0:
            return None
        failures = conform(failures, FAILURES_SCHEMA)
        return write_parquet_atomic(failures, self.root / "failures" / part_name("part"))

    def read_failures(
        self, stage: str | None = None, outstanding_in: str | None = None
    ) -> pa.Table:
        """Latest failure per (stage, sample_id).

        With ``outstanding_in`` (a stage table name), failures of samples that a later attempt
        did store in that table are left out.
        """
        parts = sorted((self.root / "failures").glob("part-*.parquet"))
        failures = _latest_by_key(_read_parts(parts, FAILURES_SCHEMA, None), ["stage", "sample_id"])
        if stage is not None:
            failures = failures.filter(pc.equal(failures["stage"], stage))
        if outstanding_in is not None and failures.num_rows:
            done = pa.array(sorted(self.sample_ids(outstanding_in)), pa.string())
            failures = failures.filter(pc.invert(pc.is_in(failures["sample_id"], value_set=done)))
        return failures

    # ----------------------------------------------------------------- images
    def image_shards(self) -> list[Path]:
        return self.images.shards()

    def image_index(self) -> dict[str, Path]:
        return self.images.index()

    def write_images(self, images: pa.Table) -> int:
        return self.images.write(images)

    def read_images(self, shas: Iterable[str]) -> dict[str, bytes]:
        return self.images.read(shas)

    def reload_image_index(self) -> None:
        self.images.reload()

    def image_stats(self) -> tuple[int, int]:
        return self.images.stats()

    # ----------------------------------------------------------------- scrape listings
    def _listing_dir(self, source: str) -> Path:
        return self.root / "listings" / source

    def write_listing(self, source: str, items: pa.Table) -> Path | None:
        """Append items a source listed (one API page, typically) as a new part."""
        if items.num_rows == 0:
            return None
        items = conform(items, LISTING_SCHEMA)
        return write_parquet_atomic(items, self._listing_dir(source) / part_name("part"))

    def read_listing(self, source: str) -> pa.Table:
        """Every item ``source`` has listed, once each (an item seen on two pages: the later)."""
        parts = sorted(self._listing_dir(source).glob("part-*.parquet"))
        return _latest_by_key(_read_parts(parts, LISTING_SCHEMA, None), ["sample_id"])

    def clear_listing(self, source: str) -> None:
        for part in self._listing_dir(source).glob("part-*.parquet"):
            part.unlink()

    # ----------------------------------------------------------------- stage state
    def read_state(self, stage: str) -> dict[str, Any]:
        path = self.root / "state" / f"{stage}.json"
        if not path.exists():
            return {}
        return _read_json(path)

    def write_state(self, stage: str, state: dict[str, Any]) -> None:
        write_json_atomic(state, self.root / "state" / f"{stage}.json")

    @contextlib.contextmanager
    def stage_lock(self, stage: str) -> Iterator[None]:
        """Hold the lock of ``stage``: a second concurrent run of it fails with a clear error."""
        path = self.root / "locks" / f"{stage}.lock"
        path.parent.mkdir(exist_ok=True)
        with open(path, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise WorkspaceError(
                    f"stage {stage!r} is already running in workspace {self.root}"
                ) from None
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # ----------------------------------------------------------------- manifest
    @contextlib.contextmanager
    def _manifest_lock(self) -> Iterator[None]:
        with open(self.root / "locks" / "manifest.lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def runs(self) -> list[dict[str, Any]]:
        """Every recorded stage run, oldest first."""
        return _read_json(self.root / "manifest.json")

    def record_run(self, run: dict[str, Any]) -> None:
        """Insert or update (by ``run_id``) one run in the manifest."""
        with self._manifest_lock():
            runs = [r for r in self.runs() if r["run_id"] != run["run_id"]]
            runs.append(run)
            runs.sort(key=lambda r: r["started_at"])
            write_json_atomic(runs, self.root / "manifest.json")

    def start_run(
        self, stage: str, params: dict[str, Any], output_table: str | None = None
    ) -> dict[str, Any]:
        started = utc_now()
        run = {
            "run_id": f"{stage}-{started.strftime('%Y%m%dT%H%M%S%fZ')}-{os.getpid()}",
            "stage": stage,
            "output_table": output_table,
            "status": "running",
            "started_at": started.isoformat(),
            "finished_at": None,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "surd_version": __version__,
            "params": params,
            "counts": {},
        }
        self.record_run(run)
        return run

    def finish_run(self, run: dict[str, Any], status: str, counts: dict[str, Any]) -> None:
        run = {**run, "status": status, "finished_at": utc_now().isoformat(), "counts": counts}
        self.record_run(run)
