"""What the workspace last read of a project's tasks, so pull and status cost what changed.

Label Studio bumps a task's ``updated_at`` whenever one of its annotations is created, edited
or deleted (and when its data or predictions change). The mirror keeps, per task read, that
time and the decisions its annotations recorded (:func:`annotation.tasks.decision_of`), and
``since``: the server's clock when that read began, less :data:`OVERLAP` (for an annotation
stamped just before a commit that landed after the read). The next read asks only for tasks
updated since then and fetches those whose time moved. Tasks never annotated are not kept:
the project's task count says how many are pending. It also keeps that count, so a drop (tasks
deleted) sends the next read to check the tasks it holds.
``annotation/<server>-project-<id>/pulled.parquet``, rewritten atomically: a read that stops
half way leaves the previous mirror, and the next one reads again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from annotation.tasks import Decision
from surd_builder.atomic import write_parquet_atomic

OVERLAP = timedelta(seconds=5)
# the server's Date header has whole seconds; without one, the client's clock with a margin
# for clock skew
CLOCK_RESOLUTION = timedelta(seconds=1)
NO_SERVER_CLOCK_MARGIN = timedelta(hours=1)
_TIME = pa.timestamp("us", tz="UTC")
DECISION_TYPE = pa.struct(
    [
        pa.field("annotator", pa.int64()),
        pa.field("status", pa.string()),
        pa.field("narrative", pa.string()),
        pa.field("tags", pa.list_(pa.string())),
        pa.field("decided_at", _TIME),
        pa.field("annotation_id", pa.int64()),
    ]
)
MIRROR_SCHEMA = pa.schema(
    [
        pa.field("task_id", pa.int64(), nullable=False),
        pa.field("sample_id", pa.string()),
        pa.field("updated_at", _TIME),
        pa.field("decisions", pa.list_(DECISION_TYPE)),
    ]
)


@dataclass(frozen=True)
class TaskState:
    sample_id: str | None
    updated_at: datetime | None
    decisions: tuple[Decision, ...] = field(default_factory=tuple)


@dataclass
class MirrorState:
    tasks: dict[int, TaskState] = field(default_factory=dict)
    since: datetime | None = None  # None: never read, read everything
    task_count: int | None = None


class Mirror:
    def __init__(self, folder: Path):
        self.path = Path(folder) / "pulled.parquet"

    def read(self) -> MirrorState:
        if not self.path.exists():
            return MirrorState()
        table = pq.read_table(self.path)
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        table = table.select(MIRROR_SCHEMA.names).cast(MIRROR_SCHEMA)
        tasks = {}
        for row in table.to_pylist():
            sample_id = row["sample_id"]
            decisions = tuple(
                Decision(
                    sample_id=sample_id,
                    annotator=d["annotator"],
                    status=d["status"],
                    narrative=d["narrative"],
                    tags=tuple(d["tags"] or ()),
                    decided_at=d["decided_at"],
                    annotation_id=d["annotation_id"],
                )
                for d in row["decisions"] or ()
            )
            tasks[row["task_id"]] = TaskState(sample_id, row["updated_at"], decisions)
        since = meta.get("since")
        count = meta.get("task_count")
        return MirrorState(
            tasks,
            datetime.fromisoformat(since) if since else None,
            int(count) if count else None,
        )

    def write(self, state: MirrorState) -> None:
        tasks = state.tasks
        ids = sorted(tasks)
        table = pa.table(
            {
                "task_id": ids,
                "sample_id": [tasks[i].sample_id for i in ids],
                "updated_at": [tasks[i].updated_at for i in ids],
                "decisions": [
                    [
                        {
                            "annotator": d.annotator,
                            "status": d.status,
                            "narrative": d.narrative,
                            "tags": list(d.tags),
                            "decided_at": d.decided_at,
                            "annotation_id": d.annotation_id,
                        }
                        for d in tasks[i].decisions
                    ]
                    for i in ids
                ],
            },
            schema=MIRROR_SCHEMA,
        )
        meta = {"since": state.since.isoformat() if state.since else ""}
        if state.task_count is not None:
            meta["task_count"] = str(state.task_count)
        write_parquet_atomic(table.replace_schema_metadata(meta), self.path)


def next_since(server_time: datetime | None) -> datetime:
    """Where the read after one that began at ``server_time`` (the server's clock) starts."""
    if server_time is None:
        return datetime.now(UTC) - NO_SERVER_CLOCK_MARGIN
    return server_time - CLOCK_RESOLUTION - OVERLAP
