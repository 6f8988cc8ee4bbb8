"""The stage contract. Read this before writing a stage.

A stage turns work items into rows of one stage table. It has two parts:

``plan(workspace) -> pa.Table``
    Thin input I/O, run once on the driver. Lists every work item the stage *could* process, one
    row per item, with at least ``sample_id`` (see ``surd_builder.ids.make_sample_id``),
    ``source`` and ``source_item_id``, plus whatever else ``process`` needs (keep values simple:
    strings, numbers, or JSON text). The runner, not the stage, removes the items already done.

``process(batch: pa.Table) -> pa.Table``
    The work, as a function of the batch alone: no workspace access, no global state, no writes.
    Because it is pure and its input and output are Arrow tables, the same method runs in-process,
    in a process pool, or as a Ray Data ``map_batches`` function, unchanged. Load models or HTTP
    sessions lazily on first use and keep them on ``self`` (once per worker, not per batch); keep
    the constructor cheap and the object picklable.

    It returns one row per input item, with the columns of ``output_table`` (any subset that
    includes ``sample_id``) and, optionally:

    - ``image_bytes`` (binary): the image, for stages that collect images, next to its
      ``image_sha256`` (``surd_builder.ids.sha256_hex``). The runner stores the bytes once in the
      content-addressed image store before writing the row, which keeps only the sha256.
    - ``failure_reason`` (string) and ``failure_detail`` (string): a non-null reason marks the item
      as failed. Failed items are written to the workspace's failures table, not to the output
      table, and are retried by the next run. A per-item problem is never an exception.

The runner (``pipelines/runner.py``) owns everything else: skipping items already done (see
``done_ids``; ``force`` redoes them), batching, workers, progress, atomic writes
(``pipelines/batch_commit.py``, run wherever the batch was processed), ``updated_at`` when a
stage leaves it unset, counts, and the manifest. It runs the same ``process`` on one of two
engines: ``local`` (in-process or a process pool) or ``ray`` (Ray Data ``map_batches`` over
actors on a cluster).
A stage never knows which; it only says what one worker needs (``worker_needs``) and, if it
sends requests to other people's hosts, the per-host rate it keeps (``host_rate``).

State a stage keeps on ``self`` during ``process`` lives in the worker that processed the batch.
What the report should show (answers taken from a cache, items scored) goes through
:meth:`Stage.count`: the runner adds those counts up from every worker, on either engine.

A sample's row in a table is replaced whole by a newer one, so a stage writes every column of its
output table (see ``surd_builder/schema.py``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import pyarrow as pa

if TYPE_CHECKING:
    from surd_builder.workspace import Workspace

# Extra columns a stage's output may carry besides its table's columns.
IMAGE_BYTES = "image_bytes"
FAILURE_REASON = "failure_reason"
FAILURE_DETAIL = "failure_detail"


@dataclass(frozen=True)
class WorkerNeeds:
    """What one worker of a stage asks a cluster engine for (the local engine ignores it)."""

    #: CPU cores one worker keeps busy (a thread pool waiting on the network needs few)
    cpus: float = 1.0
    #: the device option of the models the stage runs (``auto``, ``cpu``, ``cuda``...), ``None``
    #: when it runs none: the engine gives each worker a GPU for ``cuda``, and for ``auto`` when
    #: the cluster has GPUs (a model on CPUs gets a few cores)
    device: str | None = None
    #: workers when the user names no number (``None``: as many as the cluster fits); a stage
    #: whose work waits on one server says how many that server should see
    default_workers: int | None = None


def shared_device(*devices: str | None) -> str | None:
    """The device one worker needs for several models: a GPU if any model asks for one
    (``cuda``), else ``auto`` if any may use one, else the CPU; ``None`` without models."""
    given = [device for device in devices if device is not None]
    if not given:
        return None
    if any(device.startswith("cuda") for device in given):
        return "cuda"
    return "auto" if "auto" in given else given[0]


class HostLimiter(Protocol):
    """Hands out request slots per host; ``wait`` returns when this request may be sent."""

    def wait(self, host: str) -> None: ...


class Stage(ABC):
    """Base class of build stages; see the module docstring for the contract."""

    #: name in the manifest, the failures table and the stage lock, e.g. ``"ingest"``
    name: ClassVar[str]
    #: the stage table (``surd_builder.schema.STAGE_TABLES``) its rows go to
    output_table: ClassVar[str]
    #: other stage tables its output rows also fill, where a row has their columns (collection
    #: hashes the image it decodes to check: ``hashes``); written after ``output_table``, so a
    #: side row never names a sample that is not there, and an interruption between the two
    #: only leaves work for the stage owning the side table
    side_tables: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def plan(self, workspace: Workspace) -> pa.Table:
        """All work items this stage could process (done ones included)."""

    @abstractmethod
    def process(self, batch: pa.Table) -> pa.Table:
        """Pure function: work items in, output rows (or failures) out, one per item."""

    #: the runner adds each item's stored image as ``image_bytes`` (binary) to the batch before
    #: ``process``, for stages that look at images (captioning, screening). Loading is the
    #: runner's I/O, so ``process`` stays a pure function of its batch.
    needs_images: bool = False

    def done_ids(self, workspace: Workspace, items: pa.Table) -> set[str]:
        """Ids among the planned ``items`` that a run skips (unless ``force``): by default every
        sample already in the output table. Override when "done" depends on more, e.g. a
        rewriter redoing samples whose narrative came from another model or template."""
        return workspace.sample_ids(self.output_table)

    def params(self) -> dict[str, Any]:
        """What this run was asked to do, recorded in the manifest (never secrets)."""
        return {}

    def worker_needs(self) -> WorkerNeeds:
        """Resources of one worker on a cluster engine; see :class:`WorkerNeeds`."""
        return WorkerNeeds()

    def environment(self) -> tuple[str, ...]:
        """Names of environment variables ``process`` reads (an API key): an engine running it
        on other machines gives their values from here to its workers, in memory."""
        return ()

    def host_rate(self) -> float:
        """Requests per second per host this stage promises to keep (0: no limit). An engine
        that runs it in several processes gives it one limiter they all share
        (:meth:`use_host_limiter`), so the rate holds for the whole run, not per process."""
        return 0.0

    def use_host_limiter(self, limiter: HostLimiter | None) -> None:
        """Take ``limiter`` for every request to other hosts (stages with a ``host_rate``);
        ``None`` goes back to the stage's own one."""
        raise NotImplementedError(f"stage {self.name!r} sends no requests to limit")

    # ----------------------------------------------------------------- counts for the report
    def count(self, name: str, amount: int = 1) -> None:
        """Add ``amount`` to this stage's count ``name`` (reported as the run's stage counts)."""
        self.counts[name] += amount

    @property
    def counts(self) -> Counter[str]:
        """Every count this stage object kept, in this process."""
        return self.__dict__.setdefault("_counts", Counter())

    def take_counts(self) -> dict[str, int]:
        """The counts kept since the last call: what a worker sends back with each batch."""
        taken = self.__dict__.setdefault("_taken", Counter())
        new = self.counts - taken
        taken.update(new)
        return dict(new)
