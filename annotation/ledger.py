"""The workspace's record of which sample became which Label Studio task.

One ledger per (server, project): ``annotation/<server>-project-<id>/part-*.parquet``, rows
added, never rewritten. It holds the narrative that was pushed, so pull can tell an edited text
from an accepted one, and so push never sends a sample twice even before the server is asked.
A sample has one task; ``push --refresh`` adds a row when it gives that task a new narrative,
and the latest row counts.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq

from surd_builder.atomic import part_name, write_parquet_atomic
from surd_builder.workspace import Workspace

LEDGER_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("task_id", pa.int64(), nullable=False),
        pa.field("pushed_narrative", pa.string()),
        pa.field("pushed_at", pa.timestamp("us", tz="UTC")),
    ]
)


class Ledger:
    def __init__(self, workspace: Workspace, server_url: str, project_id: int):
        parts = urlsplit(server_url)
        server = re.sub(r"[^A-Za-z0-9.-]+", "-", f"{parts.hostname}-{parts.port or ''}").strip("-")
        self.folder = Path(workspace.root) / "annotation" / f"{server}-project-{project_id}"

    def read(self) -> dict[str, tuple[int, str | None]]:
        """sample_id -> (task_id, the narrative its task shows now); the latest row wins."""
        return self.read_with_history()[0]

    def read_with_history(
        self,
    ) -> tuple[dict[str, tuple[int, str | None]], dict[str, list[str]]]:
        """:meth:`read`, and sample_id -> every narrative its task was given, oldest first (more
        than one after ``push --refresh``)."""
        entries: dict[str, tuple[int, str | None]] = {}
        history: dict[str, list[str]] = {}
        for part in sorted(self.folder.glob("part-*.parquet")):
            table = pq.read_table(part, schema=LEDGER_SCHEMA)
            for sample_id, task_id, narrative in zip(
                table["sample_id"].to_pylist(),
                table["task_id"].to_pylist(),
                table["pushed_narrative"].to_pylist(),
                strict=True,
            ):
                entries[sample_id] = (task_id, narrative)
                if narrative is not None:
                    history.setdefault(sample_id, []).append(narrative)
        return entries, history

    def add(self, sample_ids: list[str], task_ids: list[int], narratives: list[str | None]) -> None:
        if not sample_ids:
            return
        now = datetime.now(UTC)
        table = pa.table(
            {
                "sample_id": sample_ids,
                "task_id": task_ids,
                "pushed_narrative": narratives,
                "pushed_at": [now] * len(sample_ids),
            },
            schema=LEDGER_SCHEMA,
        )
        write_parquet_atomic(table, self.folder / part_name("part"))
