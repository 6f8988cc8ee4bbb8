"""What a workspace holds: rows per stage table, stored images, outstanding failures, last runs."""

from __future__ import annotations

import os
import socket
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from surd_builder.schema import STAGE_TABLES
from surd_builder.workspace import Workspace


@dataclass
class WorkspaceStatus:
    tables: dict[str, int] = field(default_factory=dict)
    images: int = 0
    image_bytes: int = 0
    failures: dict[tuple[str, str], int] = field(default_factory=dict)
    last_runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    review_status: dict[str, int] = field(default_factory=dict)
    sources: dict[str, int] = field(default_factory=dict)


def _run_alive(run: dict[str, Any]) -> bool:
    if run.get("host") != socket.gethostname():
        return True  # cannot tell from here
    try:
        os.kill(int(run["pid"]), 0)
    except (ProcessLookupError, ValueError, TypeError, KeyError):
        return False
    except PermissionError:
        return True
    return True


def workspace_status(workspace: Workspace) -> WorkspaceStatus:
    status = WorkspaceStatus()
    samples = workspace.sample_ids("samples")
    for name in STAGE_TABLES:
        if workspace.table_parts(name):  # rows of ids that are not samples do not count
            status.tables[name] = len(workspace.sample_ids(name) & samples)
    status.images, status.image_bytes = workspace.image_stats()
    for run in workspace.runs():
        if run["status"] == "running" and not _run_alive(run):
            run = {**run, "status": "killed"}
        status.last_runs[run["stage"]] = run
    failures = workspace.read_failures()
    if failures.num_rows:
        counter: Counter[tuple[str, str]] = Counter()
        for stage in sorted(set(failures["stage"].to_pylist())):
            # a failure is outstanding until a later attempt lands in the stage's output table
            output_table = status.last_runs.get(stage, {}).get("output_table")
            outstanding = workspace.read_failures(stage, outstanding_in=output_table)
            counter.update((stage, reason) for reason in outstanding["reason"].to_pylist())
        status.failures = dict(sorted(counter.items()))
    if "samples" in status.tables:
        dataset = workspace.dataset()
        status.review_status = dict(sorted(Counter(dataset["review_status"].to_pylist()).items()))
        status.sources = dict(sorted(Counter(dataset["source"].to_pylist()).items()))
    return status
