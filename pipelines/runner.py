"""Runs a stage over a workspace: the only module that knows about batching and workers.

Two engines run the same batches through the same ``stage.process`` and commit
(:mod:`pipelines.batch_commit`, which does the writes):

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

from pipelines.base import Stage
from pipelines.batch_commit import (
    BatchCounts,
    commit_output,
    images_from_shards,
    process_and_commit,
    process_batch,
    process_loaded,
    with_image_shards,
)
from surd_builder.errors import InputError, Interrupted, ServiceError, WorkspaceError
from surd_builder.progress import progress_bar
from surd_builder.ray_engine import RayOptions, check_engine
from surd_builder.workspace import MARKER_FILE, Workspace


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


def _batches(items: pa.Table, batch_size: int) -> Iterator[pa.Table]:
    for offset in range(0, items.num_rows, batch_size):
        yield items.slice(offset, batch_size)


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
            output = process_batch(stage, batch, workspace)
            yield batch.num_rows, commit_output(workspace, stage, output)
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
            task = pool.submit(process_and_commit, stage, batch, str(workspace.root))
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
        output = process_loaded(self.stage, batch)
        return batch.num_rows, commit_output(self.workspace, self.stage, output)


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
