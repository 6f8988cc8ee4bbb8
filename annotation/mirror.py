"""What the workspace last read of a project's tasks, so pull and status cost what changed.

Label Studio bumps a task's ``updated_at`` whenever one of its annotations is created, edited
or deleted (and when its data or predictions change). The mirror keeps, per task read, that
time and the decisions its annotations recorded (:func:`annotation.tasks.decision_of`), and
``since``: where the next read starts, the server's clock when this read began (or the newest
task time it listed, if earlier: that is the database's own clock), less :data:`OVERLAP` for
a write stamped before a commit that landed after the read. The next read lists tasks updated
since then and fetches those whose time moved. Tasks with no annotation are kept only while
they are inside that overlap (so they are not fetched twice); the project's task count says
how many are pending. The count and the highest task id are kept too: fewer tasks than the
last count plus the ones created since means tasks were deleted, and the next read checks the
tasks it holds.

It is a cache: ``annotation/<server>-project-<id>/pulled.parquet``, rewritten atomically (a
read that stops half way leaves the previous one). One that cannot be read, or was written by
other decision rules (:data:`annotation.tasks.DECISION_RULES`), is ignored and everything is
read again, as ``pull --full`` does. Writes Label Studio makes without touching a task's time
(its "Propagate annotations" action) are seen only by a full read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from annotation.tasks import DECISION_RULES, Decision
from surd_builder.atomic import write_parquet_atomic

# Label Studio stamps a task's time in Python just before its UPDATE; the commit may follow
# after waiting for SQLite's write lock (Django's default busy timeout: 5 s) and the rest of the
# request. Three times that; each second of overlap re-lists the tasks changed in it.
OVERLAP = timedelta(seconds=15)
FORMAT = "1"
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
    max_task_id: int = 0


class Mirror:
    def __init__(self, folder: Path):
        self.path = Path(folder) / "pulled.parquet"

    def read(self) -> MirrorState:
        """The last read's state; an empty one (read everything) when there is none, or it is
        damaged, of another format, or made by other decision rules."""
        try:
            return self._read()
        except (OSError, ValueError, KeyError, TypeError, pa.ArrowException):
            return MirrorState()

    def _read(self) -> MirrorState:
        if not self.path.exists():
            return MirrorState()
        table = pq.read_table(self.path)
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        if meta.get("format") != FORMAT or meta.get("rules") != DECISION_RULES:
            return MirrorState()
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
            int(meta.get("max_task_id") or 0),
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
        meta = {
            "format": FORMAT,
            "rules": DECISION_RULES,
            "since": state.since.isoformat() if state.since else "",
            "max_task_id": str(state.max_task_id),
        }
        if state.task_count is not None:
            meta["task_count"] = str(state.task_count)
        write_parquet_atomic(table.replace_schema_metadata(meta), self.path)


def next_since(server_time: datetime | None, newest_listed: datetime | None = None) -> datetime:
    """Where the read after this one starts: this read's start on the server's clock, or the
    newest task time it listed if that is earlier (the database's clock: a proxy's Date may
    differ), less the overlap. Without a server clock, the client's less a margin for skew."""
    if server_time is None:
        start = datetime.now(UTC) - NO_SERVER_CLOCK_MARGIN
    else:
        start = server_time - CLOCK_RESOLUTION
    if newest_listed is not None:
        start = min(start, newest_listed)
    return start - OVERLAP
