"""Benchmark: ingest and export throughput on this machine (run by hand, not a test).

    .venv/bin/python bench/ingest_export.py --count 2000 --size 512 --json bench-ingest.json

Makes ``count`` photo-like JPEGs (smooth colour fields plus noise, ~quality 90) with sidecar
prompts, then times: ingest with 1 and N worker processes, a no-op re-run (resume check), the
dataset join, and export. Prints a table and optionally writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.export import ExportOptions, export_dataset
from pipelines.ingest import IngestStage
from pipelines.runner import RunOptions, run_stage
from surd_builder.workspace import Workspace


def make_images(folder: Path, count: int, size: int, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    total = 0
    ramp = np.linspace(0, 1, size)[None, :, None]
    for number in range(count):
        base = rng.uniform(0, 255, 3) * ramp + rng.uniform(0, 255, 3) * ramp.transpose(1, 0, 2)
        pixels = np.clip(base / 2 + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
        path = folder / f"photo-{number:06d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        path.with_suffix(".txt").write_text(f"{number} foxes, snowy forest, 8k, artstation")
        total += path.stat().st_size
    return total


def timed(function, *args):
    start = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        input_bytes = make_images(root / "in", args.count, args.size)
        results = {"count": args.count, "size": args.size, "input_mib": input_bytes / 2**20}
        quiet = {"show_progress": False, "batch_size": 256}
        for workers in sorted({1, args.workers}):
            workspace = Workspace.create(root / f"ws-{workers}")
            options = RunOptions(workers=workers, **quiet)
            report, seconds = timed(run_stage, IngestStage(root / "in"), workspace, options)
            assert report.written == args.count
            results[f"ingest_workers_{workers}_items_per_s"] = args.count / seconds
            results[f"ingest_workers_{workers}_mib_per_s"] = input_bytes / 2**20 / seconds
        rerun, seconds = timed(run_stage, IngestStage(root / "in"), workspace, options)
        assert rerun.processed == 0
        results["noop_rerun_s"] = seconds
        dataset, seconds = timed(workspace.dataset)
        results["dataset_join_s"] = seconds
        export_options = ExportOptions(show_progress=False)
        report, seconds = timed(export_dataset, workspace, root / "out", export_options)
        results["export_items_per_s"] = report.exported / seconds
        results["export_mib"] = report.bytes_written / 2**20

    width = max(map(len, results))
    for key, value in results.items():
        print(
            f"{key:<{width}}  {value:>12,.2f}"
            if isinstance(value, float)
            else f"{key:<{width}}  {value:>12,}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
