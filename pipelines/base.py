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
``done_ids``; ``force`` redoes them), batching, workers, progress, atomic writes (its
``commit_batch`` can run wherever the batch was processed), ``updated_at`` when a stage leaves it
unset, counts, and the manifest.

A sample's row in a table is replaced whole by a newer one, so a stage writes every column of its
output table (see ``surd_builder/schema.py``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

import pyarrow as pa

if TYPE_CHECKING:
    from surd_builder.workspace import Workspace

# Extra columns a stage's output may carry besides its table's columns.
IMAGE_BYTES = "image_bytes"
FAILURE_REASON = "failure_reason"
FAILURE_DETAIL = "failure_detail"


class Stage(ABC):
    """Base class of build stages; see the module docstring for the contract."""

    #: name in the manifest, the failures table and the stage lock, e.g. ``"ingest"``
    name: ClassVar[str]
    #: the stage table (``surd_builder.schema.STAGE_TABLES``) its rows go to
    output_table: ClassVar[str]

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
