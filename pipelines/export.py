"""``surd build export``: the finished dataset as Parquet that HF ``datasets`` loads as-is.

Layout of ``OUT`` (the naming ``datasets`` infers splits from)::

    OUT/data/train-00000-of-00002.parquet
    OUT/data/train-00001-of-00002.parquet
    OUT/data/test-00000-of-00001.parquet

Each shard carries the ``huggingface`` schema metadata (see ``schema.export_schema``), so
``load_dataset("parquet", data_files=...)`` returns ``image`` as a decoded ``Image`` with no glue.
Images are embedded as bytes, never as local paths, so the files work on any machine.
The whole folder is built under a temporary name and renamed into place: ``OUT`` is either the old
export or the complete new one.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from surd_builder.atomic import TEMP_PREFIX
from surd_builder.errors import InputError, OutputExistsError
from surd_builder.ids import split_for
from surd_builder.progress import progress_bar
from surd_builder.schema import EXPORT_COLUMNS, REVIEW_STATUSES, SPLITS, export_schema
from surd_builder.workspace import Workspace

# Hugging Face's guidance for image datasets: ~100 rows per row group keeps random access cheap.
ROW_GROUP_ROWS = 100
READ_CHUNK_ROWS = 256


@dataclass(frozen=True)
class ExportOptions:
    """Which samples to export and how to cut the files."""

    statuses: tuple[str, ...] = ("pending", "accepted", "corrected")
    drop_duplicates: bool = True
    test_fraction: float = 0.05
    validation_fraction: float = 0.0
    max_shard_bytes: int = 256 * 2**20
    overwrite: bool = False
    show_progress: bool = True

    def __post_init__(self) -> None:
        unknown = set(self.statuses) - set(REVIEW_STATUSES)
        if unknown:
            raise InputError(
                f"unknown review status {sorted(unknown)[0]!r} "
                f"(known: {', '.join(REVIEW_STATUSES)})"
            )
        if not self.statuses:
            raise InputError("choose at least one review status to export")
        if (
            self.test_fraction < 0
            or self.validation_fraction < 0
            or self.test_fraction + self.validation_fraction >= 1
        ):
            raise InputError("split fractions must be >= 0 and sum to less than 1")
        if self.max_shard_bytes < 1:
            raise InputError("the shard size limit must be positive")


@dataclass
class ExportReport:
    out: Path
    in_workspace: int = 0
    exported: int = 0
    by_split: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    bytes_written: int = 0


def select_samples(dataset: pa.Table, options: ExportOptions) -> tuple[pa.Table, Counter[str]]:
    """The samples to export, with their ``split``, and counts of those left out by reason. Pure."""
    skipped: Counter[str] = Counter()

    def keep(mask: pa.ChunkedArray | pa.Array, reason: str) -> None:
        nonlocal dataset
        mask = pc.fill_null(mask, False)
        skipped[reason] += dataset.num_rows - pc.sum(mask.cast(pa.int64())).as_py()
        dataset = dataset.filter(mask)

    keep(pc.is_valid(dataset["image_sha256"]), "no-image")
    status_ok = pc.is_in(dataset["review_status"], value_set=pa.array(options.statuses))
    keep(status_ok, "review-status")
    if options.drop_duplicates:
        unique = pc.or_kleene(
            pc.is_null(dataset["duplicate_of"]),
            pc.equal(dataset["duplicate_of"], dataset["sample_id"]),
        )
        keep(unique, "duplicate")
    splits = [
        split_for(sid, options.test_fraction, options.validation_fraction)
        for sid in dataset["sample_id"].to_pylist()
    ]
    dataset = dataset.set_column(
        dataset.schema.get_field_index("split"), "split", pa.array(splits, pa.string())
    )
    return dataset, Counter({k: v for k, v in skipped.items() if v})


def _compression(schema: pa.Schema) -> dict[str, str]:
    """zstd for every column but the encoded image bytes, which do not compress."""
    paths = []
    for field_ in schema:
        if pa.types.is_struct(field_.type):
            paths += [f"{field_.name}.{child.name}" for child in field_.type]
        else:
            paths.append(field_.name)
    return {path: "none" if path == "image.bytes" else "zstd" for path in paths}


class _ShardWriter:
    """Writes rows of one split into numbered files of at most ``max_bytes`` of image data."""

    def __init__(self, folder: Path, split: str, schema: pa.Schema, max_bytes: int):
        self.folder, self.split, self.schema, self.max_bytes = folder, split, schema, max_bytes
        self.paths: list[Path] = []
        self._writer: pq.ParquetWriter | None = None
        self._bytes = 0

    def write(self, table: pa.Table, row_bytes: list[int]) -> None:
        """Append rows, starting a new file whenever the next row would pass the bound (a single
        row larger than the bound gets a file of its own)."""
        start = 0
        while start < table.num_rows:
            if self._writer is not None and self._bytes + row_bytes[start] > self.max_bytes:
                self.close()
            if self._writer is None:
                path = self.folder / f"{self.split}-{len(self.paths):05d}.parquet"
                self.paths.append(path)
                self._writer = pq.ParquetWriter(
                    path, self.schema, compression=_compression(self.schema)
                )
                self._bytes = 0
            end = start
            while end < table.num_rows and (
                end == start or self._bytes + row_bytes[end] <= self.max_bytes
            ):
                self._bytes += row_bytes[end]
                end += 1
            self._writer.write_table(table.slice(start, end - start), row_group_size=ROW_GROUP_ROWS)
            start = end

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def export_dataset(
    workspace: Workspace, out: Path | str, options: ExportOptions | None = None
) -> ExportReport:
    """Write the workspace's current dataset to ``out``; see the module docstring."""
    options = options or ExportOptions()
    out = Path(out)
    if out.exists() and not options.overwrite:
        raise OutputExistsError(f"{out} already exists (pass --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a folder")

    dataset = workspace.dataset()
    report = ExportReport(out=out, in_workspace=dataset.num_rows)
    if dataset.num_rows == 0:
        raise InputError("the workspace has no samples yet: run `surd build ingest` first")
    selected, skipped = select_samples(dataset, options)
    report.skipped = dict(skipped)
    if selected.num_rows == 0:
        raise InputError(f"no sample passes the export filters (left out: {dict(skipped)})")

    schema = export_schema()
    index = workspace.image_index()
    shard_rank = {path: rank for rank, path in enumerate(workspace.image_shards())}
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f"{TEMP_PREFIX}{os.getpid()}-{out.name}"
    shutil.rmtree(staging, ignore_errors=True)
    data_dir = staging / "data"
    data_dir.mkdir(parents=True)
    try:
        with progress_bar("export", selected.num_rows, options.show_progress) as advance:
            for split in SPLITS:
                rows = selected.filter(pc.equal(selected["split"], split))
                if rows.num_rows == 0:
                    continue
                # Visit rows in image-shard order so each shard is read about once per split.
                ranks = [shard_rank[index[sha]] for sha in rows["image_sha256"].to_pylist()]
                rows = rows.take(pc.sort_indices(pa.array(ranks)))
                writer = _ShardWriter(data_dir, split, schema, options.max_shard_bytes)
                for offset in range(0, rows.num_rows, READ_CHUNK_ROWS):
                    chunk = rows.slice(offset, READ_CHUNK_ROWS)
                    table, row_bytes = _export_chunk(workspace, chunk, schema)
                    writer.write(table, row_bytes)
                    advance(chunk.num_rows)
                writer.close()
                report.by_split[split] = rows.num_rows
                report.files.extend(_number_shards(writer.paths))
        report.exported = selected.num_rows
        report.bytes_written = sum(p.stat().st_size for p in report.files)
        _swap_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report.files = [out / "data" / p.name for p in report.files]
    return report


def _export_chunk(
    workspace: Workspace, chunk: pa.Table, schema: pa.Schema
) -> tuple[pa.Table, list[int]]:
    shas = chunk["image_sha256"].to_pylist()
    images = workspace.read_images(shas)
    extensions = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp"}
    names = [
        f"{sid}.{extensions.get(fmt or '', (fmt or 'bin').lower())}"
        for sid, fmt in zip(
            chunk["sample_id"].to_pylist(), chunk["image_format"].to_pylist(), strict=True
        )
    ]
    image_column = pa.array(
        [{"bytes": images[sha], "path": name} for sha, name in zip(shas, names, strict=True)],
        type=schema.field("image").type,
    )
    columns = [image_column if c == "image" else chunk[c] for c in EXPORT_COLUMNS]
    table = pa.Table.from_arrays(columns, schema=schema)
    return table, [len(images[sha]) for sha in shas]


def _number_shards(paths: list[Path]) -> list[Path]:
    """Rename ``train-00000.parquet`` to ``train-00000-of-00003.parquet``: the count is known
    only at the end."""
    total = len(paths)
    renamed = []
    for path in paths:
        target = path.with_name(f"{path.stem}-of-{total:05d}.parquet")
        path.rename(target)
        renamed.append(target)
    return renamed


def _swap_into_place(staging: Path, out: Path) -> None:
    if out.exists():
        retired = out.parent / f"{TEMP_PREFIX}{os.getpid()}-old-{out.name}"
        out.rename(retired)
        staging.rename(out)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(out)
