"""Benchmark: push and pull against a real Label Studio, with its own export as the reference
(run by hand).

    LABEL_STUDIO_API_KEY=... scripts/label-studio.sh start 8080 /tmp/ls-bench
    LABEL_STUDIO_URL=http://127.0.0.1:8080 LABEL_STUDIO_API_KEY=... \\
        .venv/bin/python bench/annotate_push.py --count 2000 --project-size 20000 \\
        --json bench-annotate.json

Two workspaces of demo samples with rules narratives, and in one run:

1. a ``count``-task project: push ``count`` new tasks; re-push with nothing new; annotate every
   task through the API (what annotators' submits do; not timed); pull the ``count``
   annotated tasks; Label Studio's own JSON export of the same project (annotated tasks, as
   ``/api/projects/<id>/export`` gives them), the reference.
2. a ``project_size``-task project with ``count`` of them annotated: push all; re-push with
   nothing new; the first pull; pull with nothing new; status with nothing new; Label Studio's
   export of that project (annotated tasks, and every task).

Targets (issue 18): push and pull of 2,000 <= 5 s on 2 cores or <= 1.2x Label Studio's export,
re-push and an empty pull <= 1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from annotation.client import LabelStudioClient, Project
from annotation.ledger import Ledger
from annotation.pull import project_status, pull
from annotation.push import PushOptions, push
from pipelines.ingest import IngestStage
from pipelines.rewrite import RewriteStage
from pipelines.rewriters import make_rewriter
from pipelines.runner import RunOptions, run_stage
from surd_builder.demo import make_demo_folder
from surd_builder.workspace import Workspace

ACCEPT = [
    {
        "from_name": "decision",
        "to_name": "image",
        "type": "choices",
        "value": {"choices": ["accept"]},
    }
]


def workspace_of(root: Path, count: int) -> Workspace:
    make_demo_folder(root / "demo", count=count, seed=1, size=16)
    workspace = Workspace.create(root / "ws")
    quiet = RunOptions(show_progress=False)
    run_stage(IngestStage(root / "demo", source="demo"), workspace, quiet)
    run_stage(
        RewriteStage(make_rewriter("rules"), include_source_narratives=True), workspace, quiet
    )
    return workspace


def annotate(client: LabelStudioClient, task_ids: list[int], threads: int = 4) -> None:
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda task_id: client.create_annotation(task_id, ACCEPT), task_ids))


def label_studio_export(client: LabelStudioClient, project: Project, all_tasks: bool) -> float:
    start = time.perf_counter()
    client.export_tasks(project, annotated_only=not all_tasks)
    return time.perf_counter() - start


def timed(results: dict, name: str, run):
    start = time.perf_counter()
    outcome = run()
    results[name] = round(time.perf_counter() - start, 3)
    print(f"{name:>32}: {results[name]:7.2f} s", flush=True)
    return outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--project-size", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    client = LabelStudioClient(os.environ["LABEL_STUDIO_URL"], os.environ["LABEL_STUDIO_API_KEY"])
    options = PushOptions(batch_size=args.batch_size, show_progress=False)
    results: dict = {
        "count": args.count,
        "project_size": args.project_size,
        "cores": os.cpu_count(),
    }
    stamp = int(time.time())
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        small = workspace_of(root / "small", args.count)
        title = f"bench-{args.count}-{stamp}"
        report = timed(
            results, f"push {args.count} new", lambda: push(small, client, title, options)
        )
        assert report.pushed == args.count, report
        again = timed(results, "re-push, nothing new", lambda: push(small, client, title, options))
        assert again.pushed == 0 and not again.listed_server, again
        ledger = Ledger(small, client.url, report.project.id).read()
        annotate(client, [task_id for task_id, _ in ledger.values()])
        pulled = timed(results, f"pull {args.count} annotated", lambda: pull(small, client, title))
        assert pulled.written == {"accepted": args.count}, pulled
        timed(
            results,
            "Label Studio export (same project)",
            lambda: label_studio_export(client, report.project, all_tasks=False),
        )

        large = workspace_of(root / "large", args.project_size)
        title = f"bench-{args.project_size}-{stamp}"
        report = timed(
            results, f"push {args.project_size} new", lambda: push(large, client, title, options)
        )
        again = timed(
            results,
            f"re-push, {args.project_size} tasks",
            lambda: push(large, client, title, options),
        )
        assert again.pushed == 0 and not again.listed_server, again
        ledger = Ledger(large, client.url, report.project.id).read()
        annotate(client, sorted(task_id for task_id, _ in ledger.values())[: args.count])
        first = timed(
            results,
            f"first pull, {args.project_size} tasks",
            lambda: pull(large, client, title),
        )
        assert first.written == {"accepted": args.count}, first
        empty = timed(
            results, f"pull, nothing new, {args.project_size}", lambda: pull(large, client, title)
        )
        assert empty.read == 0 and empty.written == {}, empty
        status = timed(
            results,
            f"status, nothing new, {args.project_size}",
            lambda: project_status(large, client, title),
        )
        assert status.by_status["accepted"] == args.count, status
        timed(
            results,
            f"LS export, {args.project_size} (annotated)",
            lambda: label_studio_export(client, report.project, all_tasks=False),
        )
        timed(
            results,
            f"LS export, {args.project_size} (all)",
            lambda: label_studio_export(client, report.project, all_tasks=True),
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
