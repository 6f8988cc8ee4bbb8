"""Benchmark: the local engine against Ray Data on this machine (run by hand, not a test).

    .venv/bin/python bench/engines.py --json bench-engines.json

Two stages, each on the same input, timed end to end as `surd build ...` runs them (plan,
skip what is done, process, write every batch):

1. dedupe's hashing (:class:`pipelines.dedupe.HashStage`): ``--images`` photo-like JPEGs of
   ``--size`` px in the workspace's image store, decode (draft) + pHash, CPU-bound;
2. the rules rewriter (:class:`pipelines.rewrite.RewriteStage`): ``--prompts`` keyword prompts,
   pure Python, CPU-bound.

Engines: ``local`` with 1 worker process, ``local`` with ``--workers`` processes (hashing only:
the rewrite stage runs in-process), and ``ray`` with ``--workers`` actors on a Ray started
here with ``--workers`` CPUs. Ray's own start is timed apart (a cluster is started once and
serves many runs); each run includes starting its workers (processes or actors). Every engine
runs a quarter of the items and then all of them, which separates the fixed cost of a run
(starting workers) from the marginal rate (items/s once running): the per-item costs that the
10M-sample estimate in the closing note is built from.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pyarrow as pa  # noqa: E402

from bench.dedupe import photo  # noqa: E402
from bench.rewrite import prompts  # noqa: E402
from pipelines.dedupe import HashStage  # noqa: E402
from pipelines.rewrite import RewriteStage  # noqa: E402
from pipelines.rewriters.rules import RulesRewriter  # noqa: E402
from pipelines.runner import RunOptions, run_stage  # noqa: E402
from surd_builder.ids import make_sample_id, sha256_hex  # noqa: E402
from surd_builder.ray_engine import RayOptions  # noqa: E402
from surd_builder.workspace import Workspace  # noqa: E402


def samples(count: int, shas: list[str] | None) -> pa.Table:
    texts = prompts(count)
    ids = [make_sample_id("bench", str(n)) for n in range(count)]
    return pa.table(
        {
            "sample_id": ids,
            "source": ["bench"] * count,
            "source_item_id": [str(n) for n in range(count)],
            "complex_prompt": texts,
            "image_sha256": shas or [None] * count,
        }
    )


def image_workspace(root: Path, count: int, size: int, distinct: int = 256) -> Workspace:
    """``count`` stored JPEGs: ``distinct`` photo-like pictures (slow to draw), each stored as
    several files that differ after the end-of-image marker (decoders ignore it), so every
    sample has its own image and every hash its own full decode."""
    workspace = Workspace.create(root)
    pictures = [photo(seed, size) for seed in range(min(distinct, count))]
    shas = []
    for start in range(0, count, 256):
        numbers = range(start, min(start + 256, count))
        data = [pictures[n % len(pictures)] + n.to_bytes(4, "big") for n in numbers]
        batch_shas = [sha256_hex(item) for item in data]
        workspace.write_images(pa.table({"image_sha256": batch_shas, "image_bytes": data}))
        shas += batch_shas
    workspace.write_table_part("samples", samples(count, shas))
    return workspace


def timed(stage, workspace: Workspace, options: RunOptions) -> dict:
    start = time.perf_counter()
    report = run_stage(stage, workspace, options)
    seconds = time.perf_counter() - start
    assert report.processed == min(options.limit or report.planned, report.planned), report
    return {
        "items": report.processed,
        "written": report.written,
        "failed": report.failed,
        "seconds": seconds,
        "items_per_s": report.processed / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=8000)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--prompts", type=int, default=200_000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": []}
    quiet = {"batch_size": args.batch_size, "show_progress": False}
    local_one = RunOptions(workers=1, **quiet)
    local_many = RunOptions(workers=args.workers, **quiet)
    on_ray = RunOptions(engine="ray", ray=RayOptions(workers=args.workers), **quiet)

    with tempfile.TemporaryDirectory() as temp:
        root = Path(temp)
        print(f"writing {args.images} images of {args.size} px ...", flush=True)
        images = image_workspace(root / "images", args.images, args.size)

        import ray

        start = time.perf_counter()
        ray.init(num_cpus=args.workers, include_dashboard=False, logging_level=logging.ERROR)
        results["ray_start_seconds"] = time.perf_counter() - start

        def run(stage_name: str, engine: str, make_stage, workspace_for, options, total: int):
            timings = []
            for count in (total // 4, total):
                limited = RunOptions(**{**options.__dict__, "force": True, "limit": count})
                timings.append(timed(make_stage(), workspace_for(count), limited))
            (small, large) = timings
            marginal = (large["items"] - small["items"]) / (large["seconds"] - small["seconds"])
            fixed = max(0.0, large["seconds"] - large["items"] / marginal)
            results["runs"].append(
                {"stage": stage_name, "engine": engine, "runs": timings,
                 "marginal_items_per_s": marginal, "fixed_seconds": fixed}
            )  # fmt: skip

        engines = [("local x1", local_one), (f"local x{args.workers}", local_many),
                   (f"ray x{args.workers}", on_ray)]  # fmt: skip
        for engine, options in engines:
            run("hash", engine, HashStage, lambda _count: images, options, args.images)

        fresh = iter(range(1000))

        def prompt_workspace(count: int) -> Workspace:
            workspace = Workspace.create(root / f"rewrite-{next(fresh)}")  # no cached answers
            workspace.write_table_part("samples", samples(count, None))
            return workspace

        for engine, options in (engines[0], engines[2]):
            rewrite = lambda: RewriteStage(RulesRewriter())  # noqa: E731
            run("rewrite (rules)", engine, rewrite, prompt_workspace, options, args.prompts)
        ray.shutdown()

    print(f"\nRay start: {results['ray_start_seconds']:.1f} s (once per cluster)")
    header = f"{'stage':<17}{'engine':<11}{'items':>9}{'seconds':>9}{'items/s':>9}"
    print(header + f"{'marginal/s':>12}{'ms/item':>9}{'fixed s':>9}")
    for entry in results["runs"]:
        full = entry["runs"][-1]
        marginal = entry["marginal_items_per_s"]
        print(
            f"{entry['stage']:<17}{entry['engine']:<11}{full['items']:>9,}{full['seconds']:>9.2f}"
            f"{full['items_per_s']:>9,.0f}{marginal:>12,.0f}{1000 / marginal:>9.3f}"
            f"{entry['fixed_seconds']:>9.2f}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
