"""``surd build export``: the finished dataset as Parquet that HF ``datasets`` loads as-is.

Layout of ``OUT`` (the naming ``datasets`` infers splits from)::

    OUT/data/train-00000-of-00002.parquet
    OUT/data/train-00001-of-00002.parquet
    OUT/data/test-00000-of-00001.parquet

Each shard carries the ``huggingface`` schema metadata (see ``schema.export_schema``), so
``load_dataset("parquet", data_files=...)`` returns ``image`` as a decoded ``Image`` with no glue.
Images are embedded as bytes, never as local paths, so the files work on any machine.
Near-duplicate marks of ``surd build dedupe`` travel with every row, whether duplicates are left
out (the default) or kept (``--keep-duplicates``): ``cluster_id`` (the cluster's kept sample),
``duplicate_of`` (null for the kept sample, so a sample never points at itself),
``duplicate_match`` and ``duplicate_distance``; see :func:`cluster_marks`.
``OUT/surd-export.json`` records the counts and options. The whole folder is built under a
temporary name and renamed into place, so ``OUT`` never holds a partial export; ``--overwrite``
replaces only a folder that holds a previous surd export.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.card import write_card
from pipelines.records import nsfw_marked
from surd_builder import __version__
from surd_builder.atomic import TEMP_PREFIX, is_stale_temp, write_json_atomic
from surd_builder.config import ExportSettings
from surd_builder.errors import InputError, OutputError, OutputExistsError
from surd_builder.ids import check_split_fractions, split_for
from surd_builder.progress import progress_bar
from surd_builder.schema import EXPORT_COLUMNS, REVIEW_STATUSES, SPLITS, export_schema
from surd_builder.workspace import Workspace, utc_now

# Hugging Face's guidance for image datasets: ~100 rows per row group keeps random access cheap.
ROW_GROUP_ROWS = 100
READ_CHUNK_ROWS = 256
EXPORT_MARKER = "surd-export.json"
# What to do with samples marked nsfw (unmarked ones always count as safe).
NSFW_POLICIES = ("include", "exclude", "only")


@dataclass(frozen=True)
class ExportOptions:
    """Which samples to export and how to cut the files."""

    statuses: tuple[str, ...] = ExportSettings.status
    drop_duplicates: bool = not ExportSettings.keep_duplicates
    test_fraction: float = ExportSettings.test_fraction
    validation_fraction: float = ExportSettings.validation_fraction
    max_shard_bytes: int = ExportSettings.max_shard_mb * 2**20
    min_side: int = ExportSettings.min_side
    nsfw: str = ExportSettings.nsfw
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
        try:
            check_split_fractions(self.test_fraction, self.validation_fraction)
        except ValueError as error:
            raise InputError(str(error)) from None
        if self.max_shard_bytes < 1:
            raise InputError("the shard size limit must be positive")
        if self.nsfw not in NSFW_POLICIES:
            raise InputError(f"--nsfw must be one of: {', '.join(NSFW_POLICIES)}")
        if self.min_side < 0:
            raise InputError("--min-side must not be negative")


@dataclass
class ExportReport:
    out: Path
    in_workspace: int = 0
    exported: int = 0
    by_split: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    bytes_written: int = 0
    # near-duplicate clusters among the samples that passed every other filter (cluster_summary)
    clusters: dict = field(default_factory=dict)


def select_samples(
    dataset: pa.Table,
    options: ExportOptions,
    stored_images: Iterable[str] | None = None,
    removed: Iterable[str] = (),
) -> tuple[pa.Table, Counter[str]]:
    """The samples to export, with their ``split`` and duplicate marks as exports show them
    (:func:`cluster_marks`), and counts of those left out by reason. Pure.

    With ``stored_images`` (the sha256s in the image store), rows whose image is not stored are
    left out as ``image-missing`` instead of failing the export. ``removed``: sample ids taken
    down (``pipelines.takedown``), always left out as ``taken-down``."""
    selected, skipped, _ = select_with_clusters(dataset, options, stored_images, removed)
    return selected, skipped


def select_with_clusters(
    dataset: pa.Table,
    options: ExportOptions,
    stored_images: Iterable[str] | None = None,
    removed: Iterable[str] = (),
) -> tuple[pa.Table, Counter[str], dict]:
    """:func:`select_samples`, plus the :func:`cluster_summary` of the samples that passed every
    filter but the duplicate one. Pure."""
    skipped: Counter[str] = Counter()
    dataset = cluster_marks(dataset)

    def keep(mask: pa.ChunkedArray | pa.Array, reason: str) -> None:
        nonlocal dataset
        mask = pc.fill_null(mask, False)
        skipped[reason] += dataset.num_rows - pc.sum(mask.cast(pa.int64()), min_count=0).as_py()
        dataset = dataset.filter(mask)

    removed = pa.array(sorted(removed), pa.string())
    keep(pc.invert(pc.is_in(dataset["sample_id"], value_set=removed)), "taken-down")
    keep(pc.is_valid(dataset["image_sha256"]), "no-image")
    if stored_images is not None:
        stored = pa.array(list(stored_images), pa.string())
        keep(pc.is_in(dataset["image_sha256"], value_set=stored), "image-missing")
    status_ok = pc.is_in(dataset["review_status"], value_set=pa.array(options.statuses))
    keep(status_ok, "review-status")
    if options.min_side:
        smaller = pc.min_element_wise(dataset["width"], dataset["height"])
        keep(pc.greater_equal(smaller, options.min_side), "too-small")
    marked = nsfw_marked(dataset)
    if options.nsfw == "exclude":
        keep(pc.invert(marked), "nsfw")
    elif options.nsfw == "only":
        keep(marked, "not-nsfw")
    exported = _not_a_duplicate(dataset) if options.drop_duplicates else None
    clusters = cluster_summary(dataset, exported)
    if exported is not None:
        keep(exported, "duplicate")
    splits = [
        split_for(sid, options.test_fraction, options.validation_fraction)
        for sid in dataset["sample_id"].to_pylist()
    ]
    dataset = dataset.set_column(
        dataset.schema.get_field_index("split"), "split", pa.array(splits, pa.string())
    )
    return dataset, Counter({k: v for k, v in skipped.items() if v}), clusters


def cluster_marks(dataset: pa.Table) -> pa.Table:
    """The duplicates columns as exports show them. Pure.

    ``cluster_id`` is the cluster's kept sample for every member, the kept one included;
    ``duplicate_of`` is that sample for the *other* members only, null for the kept sample
    itself (the workspace marks it as its own duplicate) and outside clusters. Marks written
    before ``cluster_id`` existed (only ``duplicate_of``) give the same columns.
    ``duplicate_match`` and ``duplicate_distance`` pass through as dedupe wrote them."""
    ids = dataset["sample_id"]
    keeper = pc.coalesce(dataset["duplicate_of"], dataset["cluster_id"])
    cluster = pc.coalesce(dataset["cluster_id"], dataset["duplicate_of"])
    own = pc.fill_null(pc.equal(keeper, ids), False)
    duplicate_of = pc.if_else(own, pa.nulls(dataset.num_rows, pa.string()), keeper)
    for name, values in (("duplicate_of", duplicate_of), ("cluster_id", cluster)):
        index = dataset.schema.get_field_index(name)
        dataset = dataset.set_column(index, dataset.schema.field(index), values)
    return dataset


def cluster_summary(candidates: pa.Table, exported: pa.Array | None = None) -> dict:
    """Counts of near-duplicate clusters among ``candidates`` (rows with :func:`cluster_marks`
    that passed every other filter); ``exported``: which of them the export keeps (all when
    duplicates are kept). Pure.

    ``clusters``: distinct clusters; ``samples_in_clusters``: their members, kept samples
    included; ``duplicates``: members other than the kept sample, ``duplicates_dropped`` and
    ``duplicates_kept`` of them; ``kept_sample_left_out``: clusters whose kept sample another
    filter left out (with duplicates dropped, one member stands in, see
    :func:`_not_a_duplicate`); ``by_match``: per ``duplicate_match`` ('unknown' where none),
    ``duplicates`` and ``dropped``."""
    ids = candidates["sample_id"].to_pylist()
    cluster_ids = candidates["cluster_id"].to_pylist()
    keepers = candidates["duplicate_of"].to_pylist()
    matches = candidates["duplicate_match"].to_pylist()
    kept = [True] * len(ids) if exported is None else exported.to_pylist()
    clusters = {c for c in cluster_ids if c is not None}
    by_match: dict[str, dict[str, int]] = {}
    dropped = 0
    for keeper, match, is_kept in zip(keepers, matches, kept, strict=True):
        if keeper is None:
            continue
        counts = by_match.setdefault(match or "unknown", {"duplicates": 0, "dropped": 0})
        counts["duplicates"] += 1
        counts["dropped"] += not is_kept
        dropped += not is_kept
    duplicates = sum(k is not None for k in keepers)
    return {
        "clusters": len(clusters),
        "samples_in_clusters": sum(c is not None for c in cluster_ids),
        "duplicates": duplicates,
        "duplicates_dropped": dropped,
        "duplicates_kept": duplicates - dropped,
        "kept_sample_left_out": len(clusters - set(ids)),
        "by_match": dict(
            sorted(by_match.items(), key=lambda item: (-item[1]["duplicates"], item[0]))
        ),
    }


def _not_a_duplicate(dataset: pa.Table) -> pa.Array:
    """Rows (with :func:`cluster_marks`) that are no one's duplicate, or whose cluster lost its
    kept sample to another filter (too small, NSFW, status...): then the first remaining member
    by ``sample_id`` stands in, so a filter never removes a whole cluster."""
    ids = dataset["sample_id"].to_pylist()
    keepers = dataset["duplicate_of"].to_pylist()
    present = set(ids)
    stand_in: dict[str, str] = {}
    for sample_id, keeper in sorted(zip(ids, keepers, strict=True)):
        if keeper is not None and keeper not in present:
            stand_in.setdefault(keeper, sample_id)
    return pa.array(
        [
            keeper is None or stand_in.get(keeper) == sample_id
            for sample_id, keeper in zip(ids, keepers, strict=True)
        ],
        pa.bool_(),
    )


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
    _check_target(workspace, out, options.overwrite)

    dataset = workspace.dataset()
    report = ExportReport(out=out, in_workspace=dataset.num_rows)
    if dataset.num_rows == 0:
        raise InputError("the workspace has no samples yet: run `surd build ingest` first")
    from pipelines.takedown import apply_takedowns, removed_ids

    apply_takedowns(workspace)  # samples that arrived after a request are removed now
    selected, skipped, report.clusters = select_with_clusters(
        dataset, options, workspace.image_index(), removed_ids(workspace)
    )
    report.skipped = dict(skipped)
    if selected.num_rows == 0:
        raise InputError(f"no sample passes the export filters (left out: {dict(skipped)})")

    staging = out.parent / f"{TEMP_PREFIX}{os.getpid()}-{out.name}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_staging(out)
        shutil.rmtree(staging, ignore_errors=True)
        (staging / "data").mkdir(parents=True)
        _write_splits(workspace, selected, staging / "data", options, report)
        marker = _marker(report, options)  # once: the card and the marker share created_at
        write_json_atomic(marker, staging / EXPORT_MARKER)
        from pipelines.takedown import collection_summary

        marker = {**marker, "collection": collection_summary(workspace)}
        write_card(staging, selected, report, marker, workspace.read_images)
        _swap_into_place(staging, out)
    except OSError as error:
        raise OutputError(f"cannot write the export to {out}: {error.strerror or error}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report.files = [out / "data" / p.name for p in report.files]
    return report


def _check_target(workspace: Workspace, out: Path, overwrite: bool) -> None:
    """Refuse targets whose replacement would destroy something that is not an old export."""
    target, root = out.resolve(), workspace.root.resolve()
    if target == root or root.is_relative_to(target) or target.is_relative_to(root):
        raise OutputExistsError(
            f"{out} is (or holds, or is inside) the workspace: export elsewhere"
        )
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a folder")
    if not overwrite:
        raise OutputExistsError(f"{out} already exists (pass --overwrite to replace it)")
    if any(out.iterdir()) and not (out / EXPORT_MARKER).is_file():
        raise OutputExistsError(
            f"{out} is not a surd export (no {EXPORT_MARKER}): "
            "not replacing it, even with --overwrite"
        )


def _write_splits(
    workspace: Workspace,
    selected: pa.Table,
    data_dir: Path,
    options: ExportOptions,
    report: ExportReport,
) -> None:
    schema = export_schema()
    index = workspace.image_index()
    shard_rank = {path: rank for rank, path in enumerate(workspace.image_shards())}
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


def _marker(report: ExportReport, options: ExportOptions) -> dict:
    """What ``surd-export.json`` records: enough to tell how the export was made (no local paths,
    no secrets: the folder may be published as it is)."""
    return {
        "format": "surd-export",
        "surd_version": __version__,
        "created_at": utc_now().isoformat(),
        "samples": report.exported,
        "splits": report.by_split,
        "left_out": report.skipped,
        "clusters": report.clusters,
        "options": {
            "statuses": list(options.statuses),
            "drop_duplicates": options.drop_duplicates,
            "test_fraction": options.test_fraction,
            "validation_fraction": options.validation_fraction,
            "max_shard_bytes": options.max_shard_bytes,
            "min_side": options.min_side,
            "nsfw": options.nsfw,
        },
        "files": [p.name for p in report.files],
    }


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


def _remove_stale_staging(out: Path) -> None:
    """Remove staging folders of earlier exports to ``out`` whose process died (kill -9)."""
    for leftover in out.parent.glob(f"{TEMP_PREFIX}*-{out.name}"):
        if leftover.is_dir() and is_stale_temp(leftover):
            shutil.rmtree(leftover, ignore_errors=True)


def _swap_into_place(staging: Path, out: Path) -> None:
    """Rename the finished export to ``out``. Replacing an old export takes two renames; if the
    process dies between them, the old export is in ``.tmp-<pid>-old-<name>`` next to ``out``."""
    if out.exists():
        retired = out.parent / f"{TEMP_PREFIX}{os.getpid()}-old-{out.name}"
        out.rename(retired)
        staging.rename(out)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(out)
