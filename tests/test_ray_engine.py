"""`--engine ray`: every batch stage on a real local Ray (started here, 2 CPUs) writes the tables
the local engine writes from the same input.

The test cluster also declares one (logical) GPU, so stages whose models may use a GPU
(``--device auto``) take the GPU route through Ray: one GPU worker, fed by CPU tasks that read
the images. Torch in that worker sees no real GPU and runs on the CPU, which is what ``auto``
does there.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipelines.dedupe import HashStage, dedupe
from pipelines.download import FetchOptions, HostRateLimiter
from pipelines.ingest import IngestStage
from pipelines.rewrite import RewriteStage
from pipelines.rewriters.rules import RulesRewriter
from pipelines.runner import RunOptions, run_stage
from pipelines.scorers import ClipScorer, TextEmbedder, resolve_text_model
from pipelines.scrape import ScrapeStage
from pipelines.screen import ScreenStage, Thresholds
from pipelines.sources.urls import UrlListSource
from surd_builder.cli import app
from surd_builder.demo import make_demo_folder
from surd_builder.ray_engine import RayOptions
from surd_builder.workspace import Workspace
from tests.conftest import REPO, reset_accelerate_state, write_image
from tests.tiny_models import save_tiny_clip

# values that record when a row was written, not what it says
VOLATILE = ("updated_at", "reviewed_at", "collected_at", "failed_at")
DEMO_COUNT = 40
LOCAL = RunOptions(batch_size=8, show_progress=False)
ON_RAY = RunOptions(batch_size=8, show_progress=False, engine="ray", ray=RayOptions(workers=2))
LOOPBACK = FetchOptions(
    allowed_hosts=("127.0.0.1",), retries=1, backoff_seconds=0.0, read_timeout=2.0
)


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray for this module: 2 CPUs and one logical GPU (see the module docstring)."""
    import ray

    ray.init(
        num_cpus=2,
        num_gpus=1,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.ERROR,
        object_store_memory=200 * 2**20,
    )
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ray-inputs")
    folder = root / "images"
    make_demo_folder(folder, count=DEMO_COUNT, size=32)
    # two items that fail, so failures travel through the engine too
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    (folder / "broken.txt").write_text("a broken image, 8k")
    write_image(folder / "no-prompt.png")
    return {"folder": folder, "clip": save_tiny_clip(root / "clip")}


def rows(workspace: Workspace, table: str) -> list[dict]:
    data = workspace.read_table(table)
    data = data.drop_columns([c for c in VOLATILE if c in data.column_names])
    return data.sort_by("sample_id").to_pylist()


def writers(workspace: Workspace, table: str) -> set[str]:
    """The pids that wrote the table's parts (part names carry the writer's pid)."""
    return {part.name.split("-")[2] for part in workspace.table_parts(table)}


def failures(workspace: Workspace) -> list[dict]:
    data = workspace.read_failures().drop_columns(["failed_at"])
    return data.sort_by([("stage", "ascending"), ("sample_id", "ascending")]).to_pylist()


def build(workspace: Workspace, inputs: dict[str, Path], options: RunOptions) -> dict:
    """Every batch stage, in the order a build runs them; returns each run's report."""
    clip = ClipScorer(str(inputs["clip"]), device="auto", batch_size=16)
    text = TextEmbedder(resolve_text_model("minilm"), device="cpu", batch_size=16)
    stages = {
        "ingest": IngestStage(inputs["folder"], source="demo"),
        "rewrite": RewriteStage(RulesRewriter(), include_source_narratives=True),
        "screen": ScreenStage(clip, text, Thresholds(min_text_similarity=0.5)),
        "hash": HashStage(),
    }
    return {name: run_stage(stage, workspace, options) for name, stage in stages.items()}


def test_every_stage_on_ray_writes_the_tables_the_local_engine_writes(
    ray_cluster, inputs, tmp_path
) -> None:
    local = Workspace.create(tmp_path / "local")
    on_ray = Workspace.create(tmp_path / "ray")
    local_reports = build(local, inputs, LOCAL)
    ray_reports = build(on_ray, inputs, ON_RAY)

    for name, report in local_reports.items():
        other = ray_reports[name]
        assert (other.planned, other.written, other.failed) == (
            report.planned,
            report.written,
            report.failed,
        ), name
        assert other.failures_by_reason == report.failures_by_reason, name
        # counts a stage keeps in its workers reach the driver's report
        assert other.stage_counts == report.stage_counts, name
    assert ray_reports["ingest"].written == DEMO_COUNT
    assert ray_reports["ingest"].failures_by_reason == {"not-an-image": 1, "no-prompt": 1}
    assert ray_reports["rewrite"].written == DEMO_COUNT
    assert ray_reports["screen"].stage_counts == {"scored": DEMO_COUNT}  # one GPU worker

    # the Ray workers wrote the rows, not this process: at most the two asked for in the CPU
    # stages (Ray Data hands each batch to whichever actor is free, so one that started first
    # may take all five small batches of a stage: "exactly two" failed now and then)
    for table in ("samples", "narratives", "screening", "hashes"):
        assert str(os.getpid()) not in writers(on_ray, table), table
    for table in ("samples", "narratives", "hashes"):
        assert 1 <= len(writers(on_ray, table)) <= 2, table
    assert writers(local, "samples") == {str(os.getpid())}

    # a forced re-run takes its answers from the cache: counted in two workers, added up
    def forced_rewrite(workspace: Workspace, options: RunOptions):
        stage = RewriteStage(RulesRewriter(), include_source_narratives=True)
        return run_stage(stage, workspace, RunOptions(**{**options.__dict__, "force": True}))

    hits_on_ray = forced_rewrite(on_ray, ON_RAY).stage_counts["cache_hits"]
    assert hits_on_ray == forced_rewrite(local, LOCAL).stage_counts["cache_hits"] > DEMO_COUNT // 2

    for table in ("samples", "narratives", "screening", "hashes"):
        assert rows(on_ray, table) == rows(local, table), table
    assert failures(on_ray) == failures(local)
    assert on_ray.image_stats()[0] == local.image_stats()[0] == DEMO_COUNT
    assert sorted(on_ray.image_index()) == sorted(local.image_index())

    # the whole-table step after the hashes agrees too
    assert dedupe(on_ray, "phash-8", 6).clusters == dedupe(local, "phash-8", 6).clusters
    assert rows(on_ray, "duplicates") == rows(local, "duplicates")

    run = [r for r in on_ray.runs() if r["stage"] == "screen"][-1]
    assert run["params"]["engine"] == "ray" and run["status"] == "completed"
    assert "ray" not in [r for r in local.runs() if r["stage"] == "screen"][-1]["params"]


def test_a_workspace_built_partly_locally_and_partly_on_ray_is_one_workspace(
    ray_cluster, inputs, tmp_path
) -> None:
    whole = Workspace.create(tmp_path / "whole")
    mixed = Workspace.create(tmp_path / "mixed")
    ingest = IngestStage(inputs["folder"], source="demo")
    rewrite = RewriteStage(RulesRewriter(), include_source_narratives=True)
    run_stage(ingest, whole, LOCAL)
    run_stage(rewrite, whole, LOCAL)

    first = run_stage(ingest, mixed, RunOptions(batch_size=8, show_progress=False, limit=20))
    rest = run_stage(ingest, mixed, ON_RAY)
    assert first.processed == 20 and 0 < first.written < DEMO_COUNT
    assert rest.already_done == first.written  # failures are retried, on Ray this time
    assert rest.written == DEMO_COUNT - first.written
    assert run_stage(rewrite, mixed, ON_RAY).written == DEMO_COUNT
    assert str(os.getpid()) not in writers(mixed, "narratives")
    # the hashes came with the collection, on Ray for most samples; and images the Ray workers
    # stored are found by this same workspace object afterwards (forced: every image re-read)
    assert run_stage(HashStage(), mixed, ON_RAY).already_done == DEMO_COUNT
    forced = RunOptions(**{**ON_RAY.__dict__, "force": True})
    hashed = run_stage(HashStage(), mixed, forced)
    assert (hashed.written, hashed.failed) == (DEMO_COUNT, 0)
    assert rows(mixed, "hashes") == rows(whole, "hashes")

    assert rows(mixed, "samples") == rows(whole, "samples")
    assert rows(mixed, "narratives") == rows(whole, "narratives")
    # and the local engine sees the Ray-written rows as done
    again = run_stage(rewrite, mixed, LOCAL)
    assert (again.already_done, again.processed) == (DEMO_COUNT, 0)


def test_scrape_on_ray_keeps_one_per_host_rate_across_workers(
    ray_cluster, tmp_path, server
) -> None:
    base = server.base
    urls = [f"{base}/img/{n}.jpg" for n in range(16)] + [f"{base}/status/404/99.jpg"]
    listing = tmp_path / "list.jsonl"
    listing.write_text(
        "".join(json.dumps({"url": u, "prompt": f"cat {n}, 8k"}) + "\n" for n, u in enumerate(urls))
    )
    rate = 20.0
    options = FetchOptions(**{**LOOPBACK.__dict__, "per_host_rate": rate})
    local, on_ray = Workspace.create(tmp_path / "local"), Workspace.create(tmp_path / "ray")
    run_stage(ScrapeStage(UrlListSource(listing), LOOPBACK, threads=4), local, LOCAL)

    server.request_times.clear()
    small = RunOptions(batch_size=4, show_progress=False, engine="ray", ray=RayOptions(workers=2))
    report = run_stage(ScrapeStage(UrlListSource(listing), options, threads=4), on_ray, small)
    assert report.written == 16 and report.failures_by_reason == {"http-404": 1}
    assert rows(on_ray, "samples") == rows(local, "samples")
    assert failures(on_ray) == failures(local)

    assert str(os.getpid()) not in writers(on_ray, "samples")
    # every request of the run, from whichever worker, took a slot of the one schedule for the
    # host: N requests span at least N - 1 slots (two limiters of their own would halve it)
    times = sorted(t for path, t in server.request_times if path != "/robots.txt")
    assert len(times) == len(urls)
    assert times[-1] - times[0] >= (len(times) - 1) / rate * 0.9, times


def test_the_shared_limiter_books_one_schedule_for_several_processes(ray_cluster) -> None:
    import ray

    from surd_builder.ray_engine import SharedHostLimiter

    rate = 40.0
    # the limiter's clock stands still: each booking is the next slot, k / rate from now
    limiter = SharedHostLimiter(lambda: HostRateLimiter(rate, clock=lambda: 100.0))

    @ray.remote(num_cpus=0)
    class Asker:  # an actor is a process of its own: two of them are two processes
        def ask(self, limiter: SharedHostLimiter, times: int) -> tuple[int, list[float]]:
            return os.getpid(), [limiter.reserve("example.org") for _ in range(times)]

    askers = [Asker.remote(), Asker.remote()]
    (first_pid, first), (second_pid, second) = ray.get([a.ask.remote(limiter, 8) for a in askers])
    assert first_pid != second_pid
    # one schedule: the 16 bookings of both processes are the first 16 slots, none shared
    assert sorted(first + second) == pytest.approx([k / rate for k in range(16)])
    assert limiter.reserve("other.org") == 0.0  # hosts are booked apart
    limiter.close()


def test_a_model_that_cannot_load_in_a_worker_is_one_line_on_the_driver(
    ray_cluster, tmp_path
) -> None:
    workspace = tmp_path / "ws"
    Workspace.create(workspace)
    folder = tmp_path / "images"
    make_demo_folder(folder, count=4, size=32)
    not_a_model = tmp_path / "empty-model"
    not_a_model.mkdir()
    runner = CliRunner()
    result = runner.invoke(
        app, ["build", "ingest", str(folder), "-w", str(workspace), "--engine", "ray"]
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        app,
        ["build", "screen", "-w", str(workspace), "--text-model", str(not_a_model)]
        + ["--engine", "ray", "--no-progress"],
    )
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert lines[-1].startswith("error: cannot load") and str(not_a_model) in lines[-1]
    assert not any("Traceback" in line for line in lines)


def test_the_cli_joins_a_running_cluster_by_address(ray_cluster, inputs, tmp_path) -> None:
    """A second driver (the real `surd` command in its own process) joins the cluster this
    test started, ships surd's code to it, and its workers write the same rows."""
    local, joined = Workspace.create(tmp_path / "local"), Workspace.create(tmp_path / "joined")
    for workspace in (local, joined):
        run_stage(IngestStage(inputs["folder"], source="demo"), workspace, LOCAL)
    run_stage(RewriteStage(RulesRewriter(), include_source_narratives=True), local, LOCAL)
    # the workspace asks for Ray itself ([engine] in surd.toml); the address comes from the
    # environment, as `ray job submit` and Ray's own tools pass it
    config = joined.root / "surd.toml"
    config.write_text(config.read_text().replace('# engine = "local"', 'engine = "ray"'))
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "COLUMNS": "120"}
    result = subprocess.run(
        [sys.executable, "-m", "surd_builder", "build", "rewrite", "-w", str(joined.root)]
        + ["--include-source-narratives", "--batch-size", "8", "--no-progress"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert rows(joined, "narratives") == rows(local, "narratives")
    run = [r for r in joined.runs() if r["stage"] == "rewrite"][-1]
    assert run["params"]["engine"] == "ray" and run["params"]["ray"]["address"] == ray_cluster
    assert str(REPO) not in result.stderr  # no traceback of surd's code


def test_train_caches_filled_by_ray_workers_equal_the_local_ones(ray_cluster, tmp_path) -> None:
    from adapter.cache import ArrayCache
    from adapter.train import TrainConfig, train
    from tests.conftest import write_demo_dataset
    from tests.tiny_models import save_tiny_causal_lm, save_tiny_stable_diffusion

    base = dict(
        data=str(write_demo_dataset(tmp_path / "demo", count=48, held_out=8)),
        base_model=str(save_tiny_stable_diffusion(tmp_path / "sd")),
        llm=str(save_tiny_causal_lm(tmp_path / "lm")),
        llm_layer=2, resolution=32, batch_size=8, max_steps=1, device="cpu",
        validation_prompts=(), show_progress=False, adapter_heads=4, adapter_feedforward=64,
        adapter_mlp=64, caches_only=True, encode_batch_size=16,
    )  # fmt: skip

    def run(name: str, **overrides) -> object:
        try:
            return train(TrainConfig(output=tmp_path / name, **{**base, **overrides}))
        finally:
            reset_accelerate_state()

    local = run("local", cache_dir=tmp_path / "local-cache")
    on_ray = run("ray", cache_dir=tmp_path / "ray-cache", cache_engine="ray", ray_workers=2)
    assert on_ray.computed == local.computed and on_ray.computed["latents"] == 96  # flips too
    assert on_ray.steps == 0 and not (tmp_path / "ray" / "config.json").exists()

    local_root, ray_root = tmp_path / "local-cache", tmp_path / "ray-cache"
    folders = sorted(p.relative_to(local_root) for p in local_root.glob("*/*"))
    # the same identities: Ray workers computed what this run's settings name, nothing else
    assert folders == sorted(p.relative_to(ray_root) for p in ray_root.glob("*/*"))
    assert {folder.parts[0] for folder in folders} == {"text", "latents", "llm"}
    # written by the Ray workers, not by this process (part names carry the writer's pid)
    writers = {part.name.split("-")[2] for part in ray_root.rglob("part-*.keys.npy")}
    assert writers and str(os.getpid()) not in writers
    for folder in folders:
        mine, theirs = ArrayCache(local_root / folder), ArrayCache(ray_root / folder)
        keys = sorted(mine.keys())
        assert keys == sorted(theirs.keys())
        assert np.array_equal(mine.load(keys), theirs.load(keys), equal_nan=True), folder

    trained = run("trained", cache_dir=tmp_path / "ray-cache", caches_only=False)
    assert trained.computed == {"text": 0, "latents": 0, "llm": 0} and trained.steps == 1


def test_engine_options_are_checked(ray_cluster, tmp_path, monkeypatch) -> None:
    from surd_builder import ray_engine
    from surd_builder.errors import InputError

    Workspace.create(tmp_path / "ws")
    result = CliRunner().invoke(
        app, ["build", "rewrite", "-w", str(tmp_path / "ws"), "--engine", "spark"]
    )
    assert result.exit_code == 2 and "--engine must be one of: local, ray" in result.output

    def cluster(cpus: float, gpus: float = 0.0, node_cpus: float | None = None) -> None:
        monkeypatch.setattr(ray_engine, "cluster_resources", lambda: {"CPU": cpus, "GPU": gpus})
        monkeypatch.setattr(ray_engine, "smallest_node_cpus", lambda: node_cpus or cpus)

    place = ray_engine.place
    cluster(8.0)
    with pytest.raises(InputError, match="has no GPU"):
        place(1.0, "cuda", batches=10)
    with pytest.raises(InputError, match="use --device cuda"):
        place(1.0, "cuda:1", batches=10)
    assert place(1.0, None, batches=100).workers == 8  # one per CPU
    assert place(1.0, None, batches=3).workers == 3  # never more than batches
    assert place(1.0, None, batches=100, workers=20).workers == 20  # a cluster may grow
    assert place(0.25, None, batches=100, default_workers=2).workers == 2
    on_cpus = place(1.0, "auto", batches=100)  # a model without a GPU: a few cores each
    assert (on_cpus.num_gpus, on_cpus.num_cpus, on_cpus.workers) == (0.0, 4.0, 2)
    cluster(8.0, gpus=2.0)
    gpu = place(1.0, "auto", batches=100, prepare=True)
    assert (gpu.num_gpus, gpu.workers, gpu.prepare_apart) == (1.0, 2, True)
    # one CPU beside one GPU: the worker reads its images itself rather than wait for a CPU
    cluster(1.0, gpus=1.0)
    assert place(1.0, "cuda", batches=10, prepare=True).prepare_apart is False
    # workers holding every CPU would starve the tasks that feed them: the pool stays smaller
    cluster(2.0, gpus=2.0)
    fed = place(1.0, "cuda", batches=10, workers=2, prepare=True)
    assert (fed.workers, fed.prepare_apart) == (1, True)

    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    with pytest.raises(InputError, match=r"pip install 'surd\[ray\]'"):
        ray_engine.connect()


def test_an_empty_plan_joins_no_cluster(ray_cluster, tmp_path, monkeypatch) -> None:
    from surd_builder import ray_engine

    def refuse(*args, **kwargs):
        raise AssertionError("joined a cluster for nothing")

    monkeypatch.setattr(ray_engine, "connect", refuse)
    workspace = Workspace.create(tmp_path / "ws")
    report = run_stage(HashStage(), workspace, ON_RAY)
    assert (report.planned, report.processed, report.status) == (0, 0, "completed")


def test_a_cluster_that_does_not_answer_is_one_line_in_seconds(inputs, tmp_path) -> None:
    workspace = Workspace.create(tmp_path / "ws")
    run_stage(IngestStage(inputs["folder"], source="demo"), workspace, LOCAL)
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    args = ["build", "rewrite", "-w", str(workspace.root), "--include-source-narratives"]
    result = subprocess.run(
        [sys.executable, "-m", "surd_builder", *args, "--engine", "ray"]
        + ["--ray-address", f"127.0.0.1:{closed}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 7, result.stderr[-2000:]
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(f"error: cannot reach the Ray cluster at 127.0.0.1:{closed}")
    )
    assert "Traceback" not in result.stderr

    local = CliRunner().invoke(app, [*args, "--ray-address", f"127.0.0.1:{closed}"])
    assert local.exit_code == 2 and "--ray-address needs --engine ray" in local.output
