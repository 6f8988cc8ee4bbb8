"""Processing one batch of a stage and committing it: what runs wherever the batch is processed.

A batch is processed and written by whichever process ran it (this one, a local pool worker, or
a Ray actor), so image bytes never travel back to the driver; everything such a worker needs to
do for one batch is here: reading the stored images the stage asked for, running
``stage.process``, and writing its output (images, then rows, then failures) atomically with
part names unique per process. It is its own module so that this worker side stays apart from
the driver side in :mod:`pipelines.runner` (planning, the engines' loops, progress, the
manifest), which imports it and is never imported by it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.base import FAILURE_DETAIL, FAILURE_REASON, IMAGE_BYTES, Stage
from surd_builder.image_store import read_shard_images
from surd_builder.schema import FAILURES_SCHEMA, IMAGES_SCHEMA, SAMPLE_SCHEMA, table_spec
from surd_builder.workspace import Workspace, utc_now


def side_rows(output: pa.Table, table: str) -> pa.Table:
    """The rows of stage table ``table`` in a stage's output batch: its columns, for the rows
    that did not fail and have a value in its first column after ``sample_id``. Pure."""
    spec = table_spec(table)
    names = output.column_names
    key = spec.columns[1]
    if key not in names:
        return spec.schema.empty_table()
    wanted = pc.is_valid(output[key])
    if FAILURE_REASON in names:
        wanted = pc.and_(wanted, pc.is_null(output[FAILURE_REASON]))
    return _stamped(output.select([c for c in names if c in spec.columns]).filter(wanted))


def _stamped(records: pa.Table) -> pa.Table:
    """``records`` with ``updated_at`` set where the stage left it unset: now. A side row keeps
    the time its stage gave the row (a collected sample's), so it is never older than the
    output table's row of the same sample."""
    stamp = pa.array([utc_now()] * records.num_rows, SAMPLE_SCHEMA.field("updated_at").type)
    if "updated_at" not in records.column_names:
        return records.append_column(SAMPLE_SCHEMA.field("updated_at"), stamp)
    stamped = pc.coalesce(records["updated_at"], stamp)
    return records.set_column(records.column_names.index("updated_at"), "updated_at", stamped)


def split_output(stage_name: str, output: pa.Table, output_table: str) -> tuple[pa.Table, ...]:
    """Split a stage's output batch into (table rows, images to store, failure rows). Pure."""
    spec = table_spec(output_table)
    names = output.column_names
    if "sample_id" not in names:
        raise ValueError(f"stage {stage_name!r} returned rows without sample_id")
    if FAILURE_REASON in names and output[FAILURE_REASON].null_count < output.num_rows:
        failed_mask = pc.is_valid(output[FAILURE_REASON])
        good = output.filter(pc.invert(failed_mask))
        bad = output.filter(failed_mask)
    else:  # nothing failed: no filter (it would copy every image's bytes)
        good, bad = output, output.slice(0, 0)

    images = IMAGES_SCHEMA.empty_table()
    if IMAGE_BYTES in names:
        images = pa.table(
            {"image_sha256": good["image_sha256"], "image_bytes": good[IMAGE_BYTES]},
            schema=IMAGES_SCHEMA,
        )
    records = good.select([c for c in names if c in spec.columns])
    if "updated_at" in spec.columns:
        records = _stamped(records)

    def column(name: str) -> pa.ChunkedArray | pa.Array:
        return bad[name] if name in names else pa.nulls(bad.num_rows, pa.string())

    failures = pa.table(
        {
            "stage": pa.array([stage_name] * bad.num_rows, pa.string()),
            "sample_id": bad["sample_id"],
            "source": column("source"),
            "source_item_id": column("source_item_id"),
            "reason": column(FAILURE_REASON),
            "detail": column(FAILURE_DETAIL),
            "failed_at": pa.array(
                [utc_now()] * bad.num_rows, FAILURES_SCHEMA.field("failed_at").type
            ),
        }
    ).cast(FAILURES_SCHEMA)
    return records, images, failures


@dataclass
class BatchCounts:
    written: int
    failed: int
    new_images: int
    image_bytes: int
    failure_reasons: list[str]
    stage_counts: dict[str, int] = field(default_factory=dict)


def commit_batch(
    workspace: Workspace,
    stage_name: str,
    output_table: str,
    output: pa.Table,
    side_tables: tuple[str, ...] = (),
) -> BatchCounts:
    """Write one processed batch: images first, then the rows that reference them (the output
    table's, then each side table's), then the failures. Each write is atomic and part names
    are unique per process, so batches can be committed from several processes (e.g. Ray
    workers) into one workspace."""
    records, images, failures = split_output(stage_name, output, output_table)
    new_images = workspace.write_images(images)
    workspace.write_table_part(output_table, records)
    for table in side_tables:
        workspace.write_table_part(table, side_rows(output, table))
    workspace.write_failures(failures)
    image_bytes = pc.sum(pc.binary_length(images["image_bytes"]), min_count=0).as_py()
    return BatchCounts(
        records.num_rows, failures.num_rows, new_images, image_bytes, failures["reason"].to_pylist()
    )


def with_images(workspace: Workspace, batch: pa.Table) -> pa.Table:
    """``batch`` plus an ``image_bytes`` column read from the image store (by ``image_sha256``;
    null where a row has none or the store lacks it: the stage fails that item, not the run),
    for stages with ``needs_images``."""
    return images_from_shards(str(workspace.root), with_image_shards(workspace, batch))


# Where each item's image is, added by the driver for workers that read images themselves.
IMAGE_SHARD = "__image_shard"


def with_image_shards(workspace: Workspace, batch: pa.Table) -> pa.Table:
    """``batch`` plus the name of the image shard holding each row's image (null: none), so a
    worker reads the images it needs without building an index of the whole store."""
    stored = workspace.image_index()
    shards = [stored.get(sha) for sha in batch["image_sha256"].to_pylist()]
    names = [shard.name if shard is not None else None for shard in shards]
    return batch.append_column(IMAGE_SHARD, pa.array(names, pa.string()))


def images_from_shards(root: str, batch: pa.Table) -> pa.Table:
    """A batch carrying :data:`IMAGE_SHARD` with ``image_bytes`` in its place, each shard read
    once (the half of :func:`with_images` a worker without the store's index can do)."""
    shas, shards = batch["image_sha256"].to_pylist(), batch[IMAGE_SHARD].to_pylist()
    wanted: dict[str, list[str]] = {}
    for sha, shard in zip(shas, shards, strict=True):
        if shard is not None:
            wanted.setdefault(shard, []).append(sha)
    found: dict[str, bytes] = {}
    for shard, shard_shas in wanted.items():
        found.update(read_shard_images(Path(root) / "images" / shard, shard_shas))
    column = pa.array([found.get(sha) for sha in shas], pa.binary())
    return batch.drop_columns([IMAGE_SHARD]).append_column(IMAGE_BYTES, column)


def process_loaded(stage: Stage, batch: pa.Table) -> pa.Table:
    """``stage.process`` on a batch that already carries the images it needs (if any)."""
    output = stage.process(batch)
    if stage.needs_images and IMAGE_BYTES in output.column_names:
        output = output.drop_columns([IMAGE_BYTES])  # input images are not new images to store
    return output


def process_batch(stage: Stage, batch: pa.Table, workspace: Workspace) -> pa.Table:
    """Run ``stage.process`` on one batch, after the input I/O the stage asked for."""
    return process_loaded(stage, with_images(workspace, batch) if stage.needs_images else batch)


def commit_output(workspace: Workspace, stage: Stage, output: pa.Table) -> BatchCounts:
    """:func:`commit_batch` for ``stage``, with the counts the stage kept for this batch."""
    counts = commit_batch(workspace, stage.name, stage.output_table, output, stage.side_tables)
    counts.stage_counts = stage.take_counts()
    return counts


_worker_workspaces: dict[str, Workspace] = {}


def process_and_commit(stage: Stage, batch: pa.Table, root: str) -> BatchCounts:
    """A worker process's task: process one batch and commit it itself, so image bytes never
    travel back through a pipe to the parent (atomic writes with unique part names make several
    writers safe; the workspace object, with its image index, is kept per process)."""
    workspace = _worker_workspaces.get(root)
    if workspace is None:
        workspace = _worker_workspaces[root] = Workspace(root)
    return commit_output(workspace, stage, process_batch(stage, batch, workspace))
