"""Benchmark: pushing tasks to a real Label Studio and reading them back (run by hand).

    LABEL_STUDIO_API_KEY=... scripts/label-studio.sh start 8080 /tmp/ls-bench
    LABEL_STUDIO_URL=http://127.0.0.1:8080 LABEL_STUDIO_API_KEY=... \\
        .venv/bin/python bench/annotate_push.py --count 2000 --json bench-annotate.json

Builds a workspace of ``count`` demo samples with rules narratives, then times: the first push
(project creation, task import in batches), a second push (the idempotence check: ledger plus a
listing of every task on the server, nothing imported), a pull with no annotations (the export
of every task), and ``status``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from annotation.client import LabelStudioClient
from annotation.pull import project_status, pull
from annotation.push import PushOptions, push
from pipelines.ingest import IngestStage
from pipelines.rewrite import RewriteStage
from pipelines.rewriters import make_rewriter
from pipelines.runner import RunOptions, run_stage
from surd_builder.demo import make_demo_folder
from surd_builder.workspace import Workspace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    client = LabelStudioClient(os.environ["LABEL_STUDIO_URL"], os.environ["LABEL_STUDIO_API_KEY"])
    quiet = RunOptions(show_progress=False)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        make_demo_folder(root / "demo", count=args.count, seed=1, size=32)
        workspace = Workspace.create(root / "ws")
        run_stage(IngestStage(root / "demo", source="demo"), workspace, quiet)
        rewrite = RewriteStage(make_rewriter("rules"), include_source_narratives=True)
        run_stage(rewrite, workspace, quiet)
        title = f"bench-{args.count}-{int(time.time())}"
        options = PushOptions(batch_size=args.batch_size, show_progress=False)
        results = {"count": args.count, "batch_size": args.batch_size}
        for name, run in [
            ("push_s", lambda: push(workspace, client, title, options)),
            ("repush_s", lambda: push(workspace, client, title, options)),
            ("pull_s", lambda: pull(workspace, client, title)),
            ("status_s", lambda: project_status(workspace, client, title)),
        ]:
            start = time.perf_counter()
            outcome = run()
            results[name] = time.perf_counter() - start
            if name == "push_s":
                assert outcome.pushed == args.count, outcome
            if name == "repush_s":
                assert outcome.pushed == 0, outcome
            print(f"{name:>9}: {results[name]:6.2f} s")
        results["tasks_per_s"] = args.count / results["push_s"]
        print(f"push: {results['tasks_per_s']:,.0f} tasks/s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
