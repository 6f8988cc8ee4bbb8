"""Runs a stage over a workspace: the only module that knows about batching, workers and writes.

Two engines run the same batches through the same ``stage.process`` and :func:`commit_batch`:

- ``local`` (the default): in-process, or a process pool with ``workers > 1`` whose workers
  commit their own batches;
- ``ray``: Ray Data ``map_batches`` over a pool of actors on a Ray cluster (or a Ray started on
  this machine), each asking for what :meth:`Stage.worker_needs` says (a GPU for model stages on
  ``cuda``), committing its batches into the workspace itself (``surd_builder.ray_engine``).

Planning, skipping what is done, the stage lock, progress, counts and the manifest stay on the
driver for both, so a workspace built partly locally and partly on Ray is one workspace: the
tables are the same whichever engine wrote a batch.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.base import FAILURE_DETAIL, FAILURE_REASON, IMAGE_BYTES, Stage
from surd_builder.errors import InputError, Interrupted, ServiceError, WorkspaceError
from surd_builder.image_store import read_shard_images
from surd_builder.progress import progress_bar
from surd_builder.ray_engine import RayOptions, check_engine
from surd_builder.schema import FAILURES_SCHEMA, IMAGES_SCHEMA, SAMPLE_SCHEMA, table_spec
from surd_builder.workspace import MARKER_FILE, Workspace, utc_now


@dataclass(frozen=True)
class RunOptions:
    """How to run a stage (what to run is the stage's own parameters)."""

    batch_size: int = 256
    workers: int = 1
    force: bool = False
    limit: int | None = None
    show_progress: bool = True
    engine: str = "local"  # or "ray"
    ray: RayOptions = field(default_factory=RayOptions)  # with engine "ray"


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
    stage_counts: dict[str, int] = field(default_factory=dict)  # Stage.count, all workers
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
    stage_counts: dict[str, int] = field(default_factory=dict)


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


def _process(stage: Stage, batch: pa.Table) -> pa.Table:
    output = stage.process(batch)
    if stage.needs_images and IMAGE_BYTES in output.column_names:
        output = output.drop_columns([IMAGE_BYTES])  # input images are not new images to store
    return output


def process_batch(stage: Stage, batch: pa.Table, workspace: Workspace) -> pa.Table:
    """Run ``stage.process`` on one batch, after the input I/O the stage asked for."""
    return _process(stage, with_images(workspace, batch) if stage.needs_images else batch)


def _commit(workspace: Workspace, stage: Stage, output: pa.Table) -> BatchCounts:
    counts = commit_batch(workspace, stage.name, stage.output_table, output)
    counts.stage_counts = stage.take_counts()
    return counts


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
    return _commit(workspace, stage, process_batch(stage, batch, workspace))


def _run_batches(
    stage: Stage, items: pa.Table, options: RunOptions, workspace: Workspace
) -> Iterator[tuple[int, BatchCounts]]:
    """Process and commit every batch; yield (input size, counts) per batch as each finishes
    (in any order with several workers)."""
    if options.engine == "ray":
        yield from _run_batches_on_ray(stage, items, options, workspace)
        return
    if options.workers <= 1:
        for batch in _batches(items, options.batch_size):
            yield batch.num_rows, _commit(workspace, stage, process_batch(stage, batch, workspace))
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


class _RayStageWorker:
    """What each Ray actor runs: ``stage.process`` and the commit, in the workspace at ``root``
    (which every node must see at that path: a shared filesystem)."""

    def __init__(self, stage: Stage, root: str):
        from surd_builder.ray_engine import check_visible

        check_visible(
            Path(root) / MARKER_FILE, "the workspace marker", WorkspaceError,
            "with --engine ray the workspace must be on a filesystem every node mounts there",
        )  # fmt: skip
        self.stage, self.workspace = stage, Workspace(Path(root))

    def __call__(self, batch: pa.Table) -> tuple[int, BatchCounts]:
        return batch.num_rows, _commit(self.workspace, self.stage, _process(self.stage, batch))


def _check_ray(stage: Stage) -> None:
    """What can be said against a Ray run before it starts (and is recorded)."""
    from surd_builder import ray_engine

    ray_engine.require_ray()
    ray_engine.check_device(stage.worker_needs().device)


def _run_batches_on_ray(
    stage: Stage, items: pa.Table, options: RunOptions, workspace: Workspace
) -> Iterator[tuple[int, BatchCounts]]:
    """The batches as Ray Data blocks, mapped by actors that each process and commit theirs.
    A stage that reads images gets them from CPU tasks when its workers hold GPUs (they then
    only compute), else it reads them in the worker (no extra hop for the bytes)."""
    if not items.num_rows:
        return  # nothing to do: no cluster to join
    from surd_builder import ray_engine

    ray_engine.connect(options.ray.address)
    needs = stage.worker_needs()
    limiter = None
    if stage.host_rate() > 0:
        from pipelines.download import HostRateLimiter

        limiter = ray_engine.SharedHostLimiter(
            functools.partial(HostRateLimiter, stage.host_rate())
        )
        stage.use_host_limiter(limiter)
    batches = list(_batches(items, options.batch_size))
    root = str(workspace.root.resolve())
    if stage.needs_images:
        batches = [with_image_shards(workspace, batch) for batch in batches]
    environment = {name: os.environ[name] for name in stage.environment() if name in os.environ}
    try:
        yield from ray_engine.map_batches(
            batches,
            functools.partial(_RayStageWorker, stage, root),
            cpus=needs.cpus,
            device=needs.device,
            workers=options.ray.workers,
            default_workers=needs.default_workers,
            prepare=functools.partial(images_from_shards, root) if stage.needs_images else None,
            environment=environment,
        )
    finally:
        if limiter is not None:
            stage.use_host_limiter(None)
            limiter.close()


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
    check_engine(options.engine)
    if options.engine == "ray":
        _check_ray(stage)
    with workspace.stage_lock(stage.name):
        started = time.perf_counter()
        # other processes (local workers, Ray workers) may have stored images since it was read
        workspace.reload_image_index()
        try:
            planned_items = stage.plan(workspace)
        except ServiceError as error:  # a source that could not be reached: a failed run
            run = workspace.start_run(stage.name, stage.params(), output_table=stage.output_table)
            workspace.finish_run(run, "failed", {"error": str(error)})
            raise
        items = _without_taken_down(stage, workspace, planned_items)
        planned = items.num_rows
        if not options.force and planned:
            done = pa.array(sorted(stage.done_ids(workspace, items)), pa.string())
            items = items.filter(pc.invert(pc.is_in(items["sample_id"], value_set=done)))
        already_done = planned - items.num_rows
        if options.limit is not None:
            items = items.slice(0, options.limit)

        params = {**stage.params(), **asdict(options)}
        params.pop("show_progress")
        if options.engine != "ray":
            params.pop("ray")
        run = workspace.start_run(stage.name, params, output_table=stage.output_table)
        report = RunReport(stage.name, run["run_id"], planned=planned, already_done=already_done)
        reasons: Counter[str] = Counter()
        stage_counts: Counter[str] = Counter()
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
                    stage_counts.update(counts.stage_counts)
                    report.stage_counts = dict(sorted(stage_counts.items()))
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
