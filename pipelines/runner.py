"""Runs a stage over a workspace: the only module that knows about batching, workers and writes.

The local engine is the default (in-process, or a process pool with ``workers > 1`` whose workers
commit their own batches). A distributed engine (Ray Data) plugs in at :func:`_run_batches`: it
needs only ``stage.process`` and :func:`commit_batch`.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.base import FAILURE_DETAIL, FAILURE_REASON, IMAGE_BYTES, Stage
from surd_builder.errors import InputError, Interrupted
from surd_builder.progress import progress_bar
from surd_builder.schema import FAILURES_SCHEMA, IMAGES_SCHEMA, SAMPLE_SCHEMA, table_spec
from surd_builder.workspace import Workspace, utc_now


@dataclass(frozen=True)
class RunOptions:
    """How to run a stage (what to run is the stage's own parameters)."""

    batch_size: int = 256
    workers: int = 1
    force: bool = False
    limit: int | None = None
    show_progress: bool = True


@dataclass
class RunReport:
    """Counts of one stage run; also what the manifest records."""

    stage: str
    run_id: str
    status: str = "running"
    planned: int = 0
    already_done: int = 0
    processed: int = 0
    written: int = 0
    failed: int = 0
    new_images: int = 0
    image_bytes: int = 0
    failures_by_reason: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def counts(self) -> dict:
        data = asdict(self)
        for key in ("stage", "run_id", "status"):
            data.pop(key)
        return data


def split_output(stage_name: str, output: pa.Table, output_table: str) -> tuple[pa.Table, ...]:
    """Split a stage's output batch into (table rows, images to store, failure rows). Pure."""
    spec = table_spec(output_table)
    names = output.column_names
    if "sample_id" not in names:
        raise ValueError(f"stage {stage_name!r} returned rows without sample_id")
    if FAILURE_REASON in names:
        failed_mask = pc.is_valid(output[FAILURE_REASON])
    else:
        failed_mask = pa.array([False] * output.num_rows)
    good = output.filter(pc.invert(failed_mask))
    bad = output.filter(failed_mask)

    images = IMAGES_SCHEMA.empty_table()
    if IMAGE_BYTES in names:
        images = pa.table(
            {"image_sha256": good["image_sha256"], "image_bytes": good[IMAGE_BYTES]},
            schema=IMAGES_SCHEMA,
        )
    records = good.select([c for c in names if c in spec.columns])
    if "updated_at" in spec.columns:
        stamp = pa.array([utc_now()] * records.num_rows, SAMPLE_SCHEMA.field("updated_at").type)
        if "updated_at" in records.column_names:
            stamped = pc.coalesce(records["updated_at"], stamp)
            records = records.set_column(
                records.column_names.index("updated_at"), "updated_at", stamped
            )
        else:
            records = records.append_column(SAMPLE_SCHEMA.field("updated_at"), stamp)

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


def commit_batch(
    workspace: Workspace, stage_name: str, output_table: str, output: pa.Table
) -> BatchCounts:
    """Write one processed batch: images first, then the rows that reference them, then the
    failures. Each write is atomic and part names are unique per process, so batches can be
    committed from several processes (e.g. Ray workers) into one workspace."""
    records, images, failures = split_output(stage_name, output, output_table)
    new_images = workspace.write_images(images)
    workspace.write_table_part(output_table, records)
    workspace.write_failures(failures)
    image_bytes = pc.sum(pc.binary_length(images["image_bytes"]), min_count=0).as_py()
    return BatchCounts(
        records.num_rows, failures.num_rows, new_images, image_bytes, failures["reason"].to_pylist()
    )


def with_images(workspace: Workspace, batch: pa.Table) -> pa.Table:
    """``batch`` plus an ``image_bytes`` column read from the image store (by ``image_sha256``;
    null where a row has none or the store lacks it: the stage fails that item, not the run),
    for stages with ``needs_images``."""
    shas = batch["image_sha256"].to_pylist()
    stored = workspace.image_index()
    found = workspace.read_images(sha for sha in shas if sha in stored)
    column = pa.array([found.get(sha) for sha in shas], pa.binary())
    return batch.append_column(IMAGE_BYTES, column)


def process_batch(stage: Stage, batch: pa.Table, workspace: Workspace) -> pa.Table:
    """Run ``stage.process`` on one batch, after the input I/O the stage asked for."""
    if stage.needs_images:
        batch = with_images(workspace, batch)
    output = stage.process(batch)
    if stage.needs_images and IMAGE_BYTES in output.column_names:
        output = output.drop_columns([IMAGE_BYTES])  # input images are not new images to store
    return output


def _batches(items: pa.Table, batch_size: int) -> Iterator[pa.Table]:
    for offset in range(0, items.num_rows, batch_size):
        yield items.slice(offset, batch_size)


_worker_workspaces: dict[str, Workspace] = {}


def _process_and_commit(stage: Stage, batch: pa.Table, root: str) -> BatchCounts:
    """A worker process's task: process one batch and commit it itself, so image bytes never
    travel back through a pipe to the parent (atomic writes with unique part names make several
    writers safe; the workspace object, with its image index, is kept per process)."""
    workspace = _worker_workspaces.get(root)
    if workspace is None:
        workspace = _worker_workspaces[root] = Workspace(root)
    output = process_batch(stage, batch, workspace)
    return commit_batch(workspace, stage.name, stage.output_table, output)


def _run_batches(
    stage: Stage, items: pa.Table, options: RunOptions, workspace: Workspace
) -> Iterator[tuple[int, BatchCounts]]:
    """Process and commit every batch; yield (input size, counts) per batch as each finishes
    (in any order with several workers)."""
    if options.workers <= 1:
        for batch in _batches(items, options.batch_size):
            output = process_batch(stage, batch, workspace)
            yield batch.num_rows, commit_batch(workspace, stage.name, stage.output_table, output)
        return
    # spawn, not fork: the parent may hold threads (progress bar) and loaded native libraries.
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=options.workers, mp_context=context)
    pending: dict[Future, int] = {}
    batches = _batches(items, options.batch_size)

    def top_up() -> None:
        while len(pending) < 2 * options.workers:
            batch = next(batches, None)
            if batch is None:
                return
            task = pool.submit(_process_and_commit, stage, batch, str(workspace.root))
            pending[task] = batch.num_rows

    try:
        # Workers start during the first submits. Started while Ctrl-C is ignored, they inherit
        # that: Ctrl-C reaches the parent only, which records the interruption and stops them
        # (no worker tracebacks on the terminal).
        with _sigint_ignored():
            top_up()
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                yield pending.pop(future), future.result()
            top_up()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may change signal handlers; it owns Ctrl-C anyway
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _without_taken_down(stage: Stage, workspace: Workspace, items: pa.Table) -> pa.Table:
    """Stages that work on collected samples (rewrite, screen, hash...) leave removed ones alone:
    a taken-down sample's prompt is never sent to a rewriter again. Collection stages (output
    ``samples``) apply takedown requests themselves (``pipelines.takedown``)."""
    if stage.output_table == "samples" or not items.num_rows:
        return items
    from pipelines.takedown import removed_ids

    removed = removed_ids(workspace)
    if not removed:
        return items
    value_set = pa.array(sorted(removed), pa.string())
    return items.filter(pc.invert(pc.is_in(items["sample_id"], value_set=value_set)))


def run_stage(stage: Stage, workspace: Workspace, options: RunOptions | None = None) -> RunReport:
    """Run ``stage`` on every planned item not yet in its output table; return the counts.

    Each batch is written as soon as it is processed (images, then rows, then failures), so an
    interrupted run keeps everything finished before the interruption and a re-run skips it.
    """
    options = options or RunOptions()
    if options.batch_size < 1 or options.workers < 1:
        raise InputError("batch size and workers must be at least 1")
    with workspace.stage_lock(stage.name):
        started = time.perf_counter()
        items = _without_taken_down(stage, workspace, stage.plan(workspace))
        planned = items.num_rows
        if not options.force and planned:
            done = pa.array(sorted(stage.done_ids(workspace, items)), pa.string())
            items = items.filter(pc.invert(pc.is_in(items["sample_id"], value_set=done)))
        already_done = planned - items.num_rows
        if options.limit is not None:
            items = items.slice(0, options.limit)

        params = {**stage.params(), **asdict(options)}
        params.pop("show_progress")
        run = workspace.start_run(stage.name, params, output_table=stage.output_table)
        report = RunReport(stage.name, run["run_id"], planned=planned, already_done=already_done)
        reasons: Counter[str] = Counter()
        report.status = "failed"  # until the loop completes or is interrupted
        try:
            bar = progress_bar(stage.name, items.num_rows, options.show_progress, show_failed=True)
            with bar as advance:
                for size, counts in _run_batches(stage, items, options, workspace):
                    report.processed += size
                    report.written += counts.written
                    report.failed += counts.failed
                    report.new_images += counts.new_images
                    report.image_bytes += counts.image_bytes
                    reasons.update(counts.failure_reasons)
                    report.failures_by_reason = dict(sorted(reasons.items()))
                    mib_per_s = (
                        report.image_bytes / 2**20 / max(time.perf_counter() - started, 1e-9)
                    )
                    advance(size, failed=report.failed, bytes_rate=f"{mib_per_s:,.1f} MiB/s")
            report.status = "completed"
        except KeyboardInterrupt:
            report.status = "interrupted"
            raise Interrupted(
                f"interrupted: {report.written} samples written by this run are kept; "
                "run the same command again to continue"
            ) from None
        finally:
            report.seconds = time.perf_counter() - started
            workspace.finish_run(run, report.status, report.counts())
        return report
