"""Benchmark: the memory of ``surd train`` from memory-mapped caches (run by hand, not a test).

    .venv/bin/python bench/train_memory.py --samples 200 --processes 1   # a quick check
    .venv/bin/python bench/train_memory.py --samples 2000 --json /tmp/train-memory-2k.json
    .venv/bin/python bench/train_memory.py                    # 2,000 and 20,000, 1 and 2 procs

What it shows (issue 19): the resident memory of ``surd train`` does not grow with the number
of samples beyond file-backed pages (the page cache the mapped ``.npy`` caches are read
through), two processes do not double it (their PSS: the mapped pages are shared), and a step
gathering its batch from the mapped caches is as fast as one from arrays held in RAM.

The models are tiny random ones with latents at real size: a Stable Diffusion in diffusers
layout whose VAE has 4 down blocks (factor 8: 512 px images give 4x64x64 latents) of 1
channel (``VAE``), so encoding on a CPU is cheap, and a UNet of ``sample_size`` 64 (``UNET``;
float16 moments of 8x64x64 are 64 KiB a record, as for SD 1.x/2.x); the LLM is
``tests.tiny_models.save_tiny_causal_lm``'s. The data is an export-shaped dataset:
``data/train-0000i-of-0000K.parquet`` with ``narrative_prompt``, ``complex_prompt``, ``image``
(HF Image struct ``{bytes, path}``), ``image_sha256`` and the ``huggingface`` schema metadata,
row groups of 100 rows, 512x512 JPEGs (quality 90) that differ per sample (a random 8x8 image
upscaled, a few shapes, a little noise: ~49 KB each), ``--shard-rows`` 5000 a file (~245 MB,
about the export's 256 MB ``max_shard_mb``). Models and data are kept under
``--work`` (default /tmp/surd-train-memory) and reused by a rerun; caches and outputs are made
afresh every run.

Per ``--samples`` N, three subprocesses (each in its own session; its whole process tree is
sampled every ``--interval`` s from ``/proc/<pid>/smaps_rollup``):

1. ``surd train --caches-only``, one process, on an empty cache folder: fills the caches;
2. ``surd train --max-steps 20``, one process, on the filled caches;
3. the same with ``--processes`` 2 through ``accelerate launch`` (``configs/accelerate/
   one-node-8-gpus.yaml``, ``--num_processes 2``, gloo on the CPU, the environment cleaned as
   tests/test_adapter_distributed.py cleans it); ``--batch-size`` is per process.

Every process runs ``--threads`` torch threads (``OMP_NUM_THREADS``, default 1: on a small
shared CPU, steps split over threads that wait for one another run several times slower).

Reported per run: wall time, and the peaks over the run of the tree's summed RSS, summed PSS,
summed ``Pss_Anon`` (the private + shared-anonymous part: what cannot be dropped), summed
``Pss_File`` (mapped file pages, shared by the processes), summed ``Anonymous`` (anon RSS),
and the largest single process's RSS; from the full ``smaps`` read about once a second, what
the tree maps of the cache folder's files (RSS and PSS: "cache RSS/PSS") and the peak of PSS
less that ("PSS w/o cache": what does not come from the mapped caches). Each peak is taken on
its own (they need not coincide). A mapped record's fault may map more than the record (the
kernel maps around it, a whole large folio on recent kernels), so "cache RSS" runs ahead of the
rows read. Also the data's size and the cache folder's (``du``: allocated blocks, per kind of
input).

Then, in this process, for the largest N: the step time from mapped caches against arrays in
RAM. The train set is built as ``surd train`` builds it, by calling
``adapter.train_caches.build_cached_sets`` with a one-process stand-in for the accelerator (the
caches are complete, so it only computes the keys and maps the files: the least fragile way to
get the very ``CachedSet`` training uses). The in-RAM set is the same rows gathered once into NumPy
arrays, read through a second mapping of the same files that is then closed, so the mapped
set's own mapping is still untouched when it is timed. Identical steps
(``adapter.step.compute_losses`` with the tiny UNet at 64x64 latents, backward, gradient
clipping, AdamW) on random batches drawn from the whole set are interleaved over ``--rounds``
rounds (the order rotating), then ``CachedSet.batch()`` alone the same way, on ``--threads``
torch threads (1 by default: a step split over threads all waiting for one that another
program's work preempted is what makes timings on a shared CPU jump tenfold). Reported: median
step time of each, mapped/in-RAM, median µs per ``batch()``, page faults per step, and this
process's RSS/PSS with the mapped set and with the in-RAM copy.

Everything is printed as markdown tables at the end; ``--json PATH`` writes all the numbers.
A ``surd train`` that fails is retried once after ``--retry-wait`` seconds (the code may be
mid-edit); its log is under ``--work``/logs.

Here: the CLI, the measured ``surd train`` runs and the tables. Beside it in bench/:
``memory_bench_data`` (the models and the dataset), ``process_memory`` (``TreeSampler``, the
sampling from ``/proc``) and ``mapped_step_timing`` (``step_timing``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.mapped_step_timing import step_timing  # noqa: E402
from bench.memory_bench_data import LLM_LAYER, RESOLUTION, make_dataset, save_models  # noqa: E402
from bench.process_memory import TreeSampler  # noqa: E402

ACCELERATE_CONFIG = REPO / "configs" / "accelerate" / "one-node-8-gpus.yaml"
SMALL_ADAPTER = ["--adapter-heads", "4", "--adapter-feedforward", "64", "--adapter-mlp", "64"]
MIB = 1024 * 1024


# ---------------------------------------------------------------- surd train runs


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def clean_env(threads: int) -> dict[str, str]:
    """This environment without launcher state (as the distributed tests clean it), offline,
    ``threads`` torch threads a process."""
    launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                "MASTER_PORT")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env = {k: v for k, v in env.items() if k not in launcher}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["OMP_NUM_THREADS"] = str(threads)
    return env


def train_command(
    args: argparse.Namespace, data: Path, sd: Path, lm: Path, cache: Path, output: Path,
    processes: int, caches_only: bool,
) -> list[str]:  # fmt: skip
    surd = [
        "-m", "surd_builder", "train", "--data", str(data), "--base-model", str(sd),
        "--llm", str(lm), "--llm-layer", str(LLM_LAYER), "--output", str(output),
        "--cache-dir", str(cache), "--resolution", str(RESOLUTION), "--batch-size",
        str(args.batch_size), "--device", "cpu", "--no-validation-images", "--no-progress",
        "--validation-split", "none", "--encode-batch-size", str(args.encode_batch_size),
        *SMALL_ADAPTER,
    ]  # fmt: skip
    surd += ["--caches-only"] if caches_only else ["--max-steps", str(args.steps)]
    if processes == 1:
        return [sys.executable, *surd]
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(ACCELERATE_CONFIG), "--num_processes", str(processes), "--mixed_precision", "no",
        "--main_process_port", str(free_port()), *surd,
    ]  # fmt: skip


def run_measured(
    command: list[str], env: dict[str, str], log: Path, interval: float, timeout: float,
    cache: Path,
) -> dict[str, Any]:  # fmt: skip
    """Run ``command`` in its own session, its tree's memory sampled; its output into ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as handle:
        handle.write(" ".join(command) + "\n\n")
        handle.flush()
        started = time.monotonic()
        process = subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=REPO,
            start_new_session=True,
        )  # fmt: skip
        sampler = TreeSampler(process.pid, interval, str(cache.resolve()) + os.sep)
        sampler.start()
        try:
            code: int | str = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = "timed out"
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)  # the session started here
                process.wait()
            sampler.stop.set()
            sampler.join()
        wall = time.monotonic() - started
    return {"rc": code, "wall_s": wall, "log": str(log), **sampler.result()}


def run_with_retry(
    args: argparse.Namespace, command: list[str], env: dict[str, str], log: Path,
    output: Path, cache: Path, fresh_cache: bool,
) -> dict[str, Any]:  # fmt: skip
    for attempt in (1, 2):
        shutil.rmtree(output, ignore_errors=True)
        if fresh_cache:
            shutil.rmtree(cache, ignore_errors=True)
        result = run_measured(command, env, log, args.interval, args.timeout, cache)
        result["attempt"] = attempt
        if result["rc"] == 0 or attempt == 2 or args.retry_wait < 0:
            break
        tail = log.read_text()[-3000:]
        print(f"  failed ({result['rc']}), again in {args.retry_wait:.0f} s:\n{tail}", flush=True)
        time.sleep(args.retry_wait)
    if result["rc"] != 0:
        result["error_tail"] = log.read_text()[-4000:]
        print(f"  FAILED ({result['rc']}):\n{result['error_tail']}", flush=True)
    return result


def disk_usage(folder: Path) -> dict[str, int]:
    """Allocated bytes (``du``'s blocks) and apparent bytes under ``folder``."""
    allocated = apparent = 0
    for path in folder.rglob("*") if folder.exists() else []:
        if path.is_file() and not path.is_symlink():
            stat = path.stat()
            allocated += stat.st_blocks * 512
            apparent += stat.st_size
    return {"du_bytes": allocated, "apparent_bytes": apparent}


def measure_samples(args: argparse.Namespace, samples: int, sd: Path, lm: Path) -> dict[str, Any]:
    work = args.work
    data = make_dataset(work / f"data-{samples}", samples, args.shard_rows)
    cache = work / "caches" / f"cache-{samples}"
    runs: list[dict[str, Any]] = []
    kinds = [("caches-only", 1)] if not args.reuse_caches or not cache.exists() else []
    kinds += [(f"{args.steps} steps", processes) for processes in args.processes]
    for kind, processes in kinds:
        caches_only = kind == "caches-only"
        name = f"{samples}-{'caches' if caches_only else 'steps'}-{processes}p"
        output = work / "runs" / name
        command = train_command(args, data, sd, lm, cache, output, processes, caches_only)
        print(f"[{samples:,}] {kind}, {processes} process(es) ...", flush=True)
        result = run_with_retry(
            args, command, clean_env(args.threads), work / "logs" / f"{name}.log", output, cache,
            caches_only,
        )  # fmt: skip
        result.update(kind=kind, processes=processes, command=command)
        print(
            f"  rc {result['rc']}, {result['wall_s']:.0f} s, peak RSS "
            f"{result['peak_rss_mib']:.0f} MiB, PSS {result['peak_pss_mib']:.0f} MiB, "
            f"PSS anon {result['peak_pss_anon_mib']:.0f} MiB, cache mapped RSS "
            f"{result['peak_cache_mapped_rss_mib']:.0f} MiB, PSS without the cache "
            f"{result['peak_pss_without_cache_mib']:.0f} MiB",
            flush=True,
        )
        runs.append(result)
    kinds_usage = {
        sub.name: disk_usage(sub) for sub in sorted(cache.iterdir()) if sub.is_dir()
    } if cache.exists() else {}  # fmt: skip
    return {
        "samples": samples,
        "data": str(data),
        "data_bytes": sum(p.stat().st_size for p in (data / "data").glob("*.parquet")),
        "cache": str(cache),
        "cache_usage": disk_usage(cache),
        "cache_usage_by_kind": kinds_usage,
        "runs": runs,
    }


# ---------------------------------------------------------------- report


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"surd train memory, {RESOLUTION} px images (4x64x64 latents), batch "
        f"{results['batch_size']} per process, CPU ({results['cpus']} cores), MiB",
        "",
        "| samples | run | procs | wall s | RSS sum | PSS sum | PSS anon | PSS file | anon RSS "
        "| max 1-proc RSS | cache RSS | cache PSS | PSS w/o cache | rc |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for entry in results["by_samples"]:
        for run in entry["runs"]:
            lines.append(
                f"| {entry['samples']:,} | {run['kind']} | {run['processes']} | "
                f"{run['wall_s']:.0f} | {run['peak_rss_mib']:.0f} | {run['peak_pss_mib']:.0f} | "
                f"{run['peak_pss_anon_mib']:.0f} | {run['peak_pss_file_mib']:.0f} | "
                f"{run['peak_anonymous_mib']:.0f} | {run['peak_single_process_rss_mib']:.0f} | "
                f"{run['peak_cache_mapped_rss_mib']:.0f} | "
                f"{run['peak_cache_mapped_pss_mib']:.0f} | "
                f"{run['peak_pss_without_cache_mib']:.0f} | {run['rc']} |"
            )
    for entry in results["by_samples"]:
        for run in entry["runs"]:
            if run["processes"] > 1 and run.get("per_process_peaks"):
                each = "; ".join(
                    f"{p['command'].split(' -m ')[-1][:40]}: PSS {p['pss_mib']:.0f} "
                    f"(anon {p['pss_anon_mib']:.0f})"
                    for p in run["per_process_peaks"]
                )  # fmt: skip
                lines.append(f"\n{entry['samples']:,}, {run['kind']}, {run['processes']} "
                             f"processes, each one's peak MiB: {each}")  # fmt: skip
    lines += ["", "| samples | data (Parquet) | cache du | of which latents | text | llm |",
              "|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for entry in results["by_samples"]:
        kinds = entry["cache_usage_by_kind"]

        def size(kind: str, kinds: dict = kinds) -> str:
            return f"{kinds[kind]['du_bytes'] / MIB:.0f}" if kind in kinds else "-"

        lines.append(
            f"| {entry['samples']:,} | {entry['data_bytes'] / MIB:.0f} | "
            f"{entry['cache_usage']['du_bytes'] / MIB:.0f} | {size('latents')} | {size('text')} "
            f"| {size('llm')} |"
        )
    timing = results.get("step_timing")
    if timing:
        steps, batches = timing["step_ms_median"], timing["batch_us_median"]
        spread, faults = timing["step_ms_min_max"], timing["page_faults_per_step"]
        lines += [
            "",
            f"Step time on {timing['samples']:,} samples, batch {timing['batch_size']}, "
            f"{timing['rounds']} rounds x {timing['steps_per_round']} steps each way "
            f"(interleaved), {timing['torch_threads']} torch threads:",
            "",
            "| train set | step ms (median) | min-max | batch() µs (median) | "
            "minor faults/step | this process RSS / PSS MiB |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        memory = {"mapped": timing["process_memory_with_mapped_set"],
                  "in RAM": timing["process_memory_with_ram_copy"]}  # fmt: skip
        for name in ("mapped", "in RAM"):
            lines.append(
                f"| {name} | {steps[name]:.1f} | {spread[name][0]:.1f}-{spread[name][1]:.1f} | "
                f"{batches[name]:.0f} | {faults[name]['minor']:.0f} | "
                f"{memory[name]['Rss_mib']:.0f} / {memory[name]['Pss_mib']:.0f} |"
            )
        lines += ["", f"mapped / in RAM (median step): {timing['step_ratio_mapped_over_ram']:.3f}"]
        if any(timing["computed_while_building"].values()):
            lines.append(f"(caches were incomplete: {timing['computed_while_building']} computed)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument(
        "--processes",
        type=int,
        nargs="+",
        default=[1, 2],
        help="process counts of the training runs (2: accelerate launch)",
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=Path("/tmp/surd-train-memory"),
        help="models, data, caches, runs and logs (models and data reused)",
    )
    parser.add_argument("--steps", type=int, default=20, help="steps of each training run")
    parser.add_argument("--batch-size", type=int, default=8, help="per process")
    parser.add_argument("--encode-batch-size", type=int, default=32)
    parser.add_argument("--shard-rows", type=int, default=5000, help="rows per Parquet file")
    parser.add_argument("--interval", type=float, default=0.1, help="memory sampling period (s)")
    parser.add_argument("--timeout", type=float, default=4 * 3600, help="per surd train run (s)")
    parser.add_argument(
        "--retry-wait",
        type=float,
        default=60,
        help="seconds before retrying a failed run once (negative: no retry)",
    )
    parser.add_argument(
        "--reuse-caches",
        action="store_true",
        help="skip the caches-only run where the cache folder exists",
    )
    parser.add_argument("--rounds", type=int, default=10, help="step timing rounds")
    parser.add_argument("--round-steps", type=int, default=10, help="steps per round each way")
    parser.add_argument(
        "--batch-calls", type=int, default=100, help="CachedSet.batch() calls per round each way"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the step timing (1: steadier on a shared CPU)",
    )
    parser.add_argument("--no-step-timing", action="store_true")
    parser.add_argument("--json", type=Path, help="write every number here")
    args = parser.parse_args()
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)

    sd, lm = save_models(args.work / "models")
    results: dict[str, Any] = {
        "batch_size": args.batch_size, "steps": args.steps, "resolution": RESOLUTION,
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "load_average_at_start": os.getloadavg(), "by_samples": [],
    }  # fmt: skip
    for samples in args.samples:
        results["by_samples"].append(measure_samples(args, samples, sd, lm))
    if not args.no_step_timing:
        results["step_timing"] = step_timing(args, max(args.samples), sd, lm)
    results["load_average_at_end"] = os.getloadavg()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print()
    print(markdown(results))


if __name__ == "__main__":
    main()
