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
``adapter.train.build_cached_sets`` with a one-process stand-in for the accelerator (the caches
are complete, so it only computes the keys and maps the files: the least fragile way to get the
very ``CachedSet`` training uses). The in-RAM set is the same rows gathered once into NumPy
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
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

ACCELERATE_CONFIG = REPO / "configs" / "accelerate" / "one-node-8-gpus.yaml"
RESOLUTION = 512
ROW_GROUP_ROWS = 100  # as surd build export writes them
LLM_LAYER = 2
SMALL_ADAPTER = ["--adapter-heads", "4", "--adapter-feedforward", "64", "--adapter-mlp", "64"]
MIB = 1024 * 1024
# the tiny base model: latents at real size, as little compute as diffusers allows around them
VAE = dict(
    in_channels=3, out_channels=3, block_out_channels=(1, 1, 1, 1), layers_per_block=0,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4, norm_num_groups=1, sample_size=RESOLUTION, mid_block_add_attention=False,
)  # fmt: skip
UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=(8, 16, 16),
    layers_per_block=1, norm_num_groups=4, attention_head_dim=8,
    down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
)  # fmt: skip


# ---------------------------------------------------------------- models


def save_models(root: Path) -> tuple[Path, Path]:
    """(base model, LLM) folders, built once and reused."""
    spec = hashlib.sha256(json.dumps([VAE, UNET]).encode()).hexdigest()[:8]
    sd, lm = root / f"sd-512-{spec}", root / "lm"  # another architecture: another folder
    if not (sd / "model_index.json").is_file():
        save_stable_diffusion_512(sd)
    if not (lm / "config.json").is_file():
        from tests.tiny_models import save_tiny_causal_lm

        save_tiny_causal_lm(lm)
    return sd, lm


def save_stable_diffusion_512(directory: Path) -> None:
    """tests.tiny_models.save_tiny_stable_diffusion with latents at real size: a VAE of 4 down
    blocks (512 px -> 4x64x64) of 1 channel and no resnet each, no mid-block attention (4096
    tokens), so a CPU encodes an image in ~30 ms; a UNet of sample_size 64 whose attention
    starts at 16x16 (~0.4 s a step of 8 on a CPU). Written to a temporary folder, renamed."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from tests.tiny_models import _clip_bpe, _clip_text_config

    text_width = 32
    vocab, merges = _clip_bpe()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET, cross_attention_dim=text_width)
    text_encoder = CLIPTextModel(CLIPTextConfig(**_clip_text_config(vocab, text_width)))
    vae = AutoencoderKL(**VAE)
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDPMScheduler(steps_offset=1, clip_sample=False), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    temp = directory.with_name(directory.name + ".partial")
    shutil.rmtree(temp, ignore_errors=True)
    pipeline.save_pretrained(temp)
    temp.rename(directory)


# ---------------------------------------------------------------- data


def make_image(index: int) -> bytes:
    """A 512x512 JPEG (quality 90) of its own per index: a random 8x8 RGB image upscaled
    bilinearly, 3-6 filled shapes, a little noise (so it compresses like a photo: ~45 KB)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng([19, index])
    small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    image = small.resize((RESOLUTION, RESOLUTION), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 7))):
        x, y = (int(v) for v in rng.integers(0, RESOLUTION - 64, 2))
        width, height = (int(v) for v in rng.integers(32, 256, 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x, y, x + width, y + height], fill=colour)
    noisy = np.asarray(image, dtype=np.int16) + rng.integers(-7, 8, (RESOLUTION, RESOLUTION, 3))
    image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def make_prompts(index: int) -> tuple[str, str]:
    """(narrative, keyword) prompts of their own per index, from the tiny tokenizers' words."""
    from tests.tiny_models import PROMPT_WORDS

    rng = np.random.default_rng([20, index])
    narrative = " ".join(rng.choice(PROMPT_WORDS, int(rng.integers(12, 30))))
    keyword = " , ".join(rng.choice(PROMPT_WORDS, int(rng.integers(8, 20))))
    return f"{narrative} {index}", keyword


def export_schema() -> Any:
    """The four columns surd train reads, typed as the export types them, with the
    ``huggingface`` metadata ``surd build export`` writes (surd_builder.schema.export_schema's
    recipe on these columns)."""
    import pyarrow as pa

    from surd_builder.schema import IMAGE_FIELD, SAMPLE_SCHEMA, hf_features

    fields = [SAMPLE_SCHEMA.field("narrative_prompt"), SAMPLE_SCHEMA.field("complex_prompt"),
              IMAGE_FIELD, SAMPLE_SCHEMA.field("image_sha256")]  # fmt: skip
    schema = pa.schema(fields)
    features = hf_features(schema)
    return schema.with_metadata(
        {"huggingface": json.dumps({"info": {"features": features.to_dict()}})}
    )


def make_dataset(folder: Path, samples: int, shard_rows: int) -> Path:
    """``folder`` as an export (``data/train-*.parquet``), written once: a ``.complete`` marker
    names the sample count, a folder without it is written again."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    marker = folder / ".complete"
    if marker.is_file() and marker.read_text().strip() == str(samples):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    data = folder / "data"
    data.mkdir(parents=True)
    schema = export_schema()
    shards = max(1, -(-samples // shard_rows))
    started, done = time.monotonic(), 0
    print(f"writing {samples:,} samples of {RESOLUTION} px into {folder} ...", flush=True)
    for shard in range(shards):
        rows = range(shard * shard_rows, min(samples, (shard + 1) * shard_rows))
        path = data / f"train-{shard:05d}-of-{shards:05d}.parquet"
        with pq.ParquetWriter(path, schema) as writer:
            for start in range(rows.start, rows.stop, ROW_GROUP_ROWS):
                chunk = range(start, min(rows.stop, start + ROW_GROUP_ROWS))
                images = [make_image(index) for index in chunk]
                prompts = [make_prompts(index) for index in chunk]
                table = pa.table(
                    {
                        "narrative_prompt": [narrative for narrative, _ in prompts],
                        "complex_prompt": [keyword for _, keyword in prompts],
                        "image": [
                            {"bytes": image, "path": f"{index:08d}.jpg"}
                            for index, image in zip(chunk, images, strict=True)
                        ],
                        "image_sha256": [hashlib.sha256(image).hexdigest() for image in images],
                    },  # fmt: skip
                    schema=schema,
                )
                writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
                done += len(chunk)
                if done % 1000 == 0 or done == samples:
                    elapsed = time.monotonic() - started
                    print(f"  {done:,}/{samples:,} samples ({elapsed:.0f} s)", flush=True)
    marker.write_text(f"{samples}\n")
    return folder


# ---------------------------------------------------------------- memory of a process tree


def _smaps(pid: int) -> dict[str, int]:
    """The kB fields of ``/proc/<pid>/smaps_rollup`` (empty if the process is gone)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return {}
    values = {}
    for line in text.splitlines()[1:]:
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[name] = int(parts[0])
    return values


def _tree(root: int) -> list[int]:
    """``root`` and its descendants, from every process's parent in ``/proc/*/stat``."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        parent = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _mapped_under(pid: int, prefix: str) -> tuple[int, int]:
    """(Rss, Pss) in kB of ``pid``'s mappings of files under ``prefix``, from
    ``/proc/<pid>/smaps`` ((0, 0) if the process is gone)."""
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return 0, 0
    rss = pss = 0
    inside = False
    for line in text.splitlines():
        head = line.split(None, 5)
        if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):
            inside = len(head) == 6 and head[5].startswith(prefix)  # a mapping's header line
        elif inside and line.startswith("Rss:"):
            rss += int(line.split()[1])
        elif inside and line.startswith("Pss:"):
            pss += int(line.split()[1])
    return rss, pss


class TreeSampler(threading.Thread):
    """Polls a process tree's smaps_rollup every ``interval`` s, keeping each sum's peak; about
    once a second also its full smaps, for what it maps of the files under ``mapped_prefix``
    (the cache folder)."""

    SUMS = ("Rss", "Pss", "Pss_Anon", "Pss_File", "Anonymous")

    def __init__(self, root: int, interval: float, mapped_prefix: str | None = None):
        super().__init__(daemon=True)
        self.root, self.interval, self.prefix = root, interval, mapped_prefix
        self.stop = threading.Event()
        self.peaks = dict.fromkeys(self.SUMS, 0)
        self.peak_single_rss, self.peak_processes, self.samples = 0, 0, 0
        # at the once-a-second samples: the cache's mapped pages, and PSS without them
        self.peak_cache_rss = self.peak_cache_pss = self.peak_pss_without_cache = 0
        # [s, Rss, Pss, Pss_Anon, cache Rss, cache Pss] (kB), about once a second
        self.timeline: list[list[float]] = []
        self.per_process: dict[int, dict[str, Any]] = {}  # pid -> its command and peaks
        self.started = time.monotonic()

    def run(self) -> None:
        last_detail = -1.0
        while not self.stop.is_set():
            sums = dict.fromkeys(self.SUMS, 0)
            pids = _tree(self.root)
            for pid in pids:
                values = _smaps(pid)
                for name in self.SUMS:
                    sums[name] += values.get(name, 0)
                self.peak_single_rss = max(self.peak_single_rss, values.get("Rss", 0))
                self._per_process(pid, values)
            for name in self.SUMS:
                self.peaks[name] = max(self.peaks[name], sums[name])
            self.peak_processes = max(self.peak_processes, len(pids))
            self.samples += 1
            now = time.monotonic() - self.started
            if now - last_detail >= 1.0:
                cache_rss = cache_pss = 0
                if self.prefix:
                    for pid in pids:
                        rss, pss = _mapped_under(pid, self.prefix)
                        cache_rss, cache_pss = cache_rss + rss, cache_pss + pss
                self.peak_cache_rss = max(self.peak_cache_rss, cache_rss)
                self.peak_cache_pss = max(self.peak_cache_pss, cache_pss)
                self.peak_pss_without_cache = max(
                    self.peak_pss_without_cache, sums["Pss"] - cache_pss
                )
                self.timeline.append([round(now, 1), sums["Rss"], sums["Pss"], sums["Pss_Anon"],
                                      cache_rss, cache_pss])  # fmt: skip
                last_detail = now
            self.stop.wait(self.interval)

    def _per_process(self, pid: int, values: dict[str, int]) -> None:
        if not values:
            return
        if pid not in self.per_process:
            try:
                words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                words = []
            command = " ".join(word.decode(errors="replace") for word in words[:4])
            self.per_process[pid] = {"command": command, "rss_mib": 0.0, "pss_mib": 0.0,
                                     "pss_anon_mib": 0.0}  # fmt: skip
        entry = self.per_process[pid]
        for key, name in (("rss_mib", "Rss"), ("pss_mib", "Pss"), ("pss_anon_mib", "Pss_Anon")):
            entry[key] = max(entry[key], values.get(name, 0) / 1024)

    def result(self) -> dict[str, Any]:
        return {
            "peak_rss_mib": self.peaks["Rss"] / 1024,
            "peak_pss_mib": self.peaks["Pss"] / 1024,
            "peak_pss_anon_mib": self.peaks["Pss_Anon"] / 1024,
            "peak_pss_file_mib": self.peaks["Pss_File"] / 1024,
            "peak_anonymous_mib": self.peaks["Anonymous"] / 1024,
            "peak_single_process_rss_mib": self.peak_single_rss / 1024,
            "peak_cache_mapped_rss_mib": self.peak_cache_rss / 1024,
            "peak_cache_mapped_pss_mib": self.peak_cache_pss / 1024,
            "peak_pss_without_cache_mib": self.peak_pss_without_cache / 1024,
            "peak_processes": self.peak_processes,
            "per_process_peaks": [
                entry for entry in self.per_process.values() if entry["rss_mib"] >= 20
            ],  # fmt: skip
            "memory_samples": self.samples,
            "timeline_kib": self.timeline,
        }


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


# ---------------------------------------------------------------- step time: mapped vs RAM


class _OneProcess:
    """What build_cached_sets asks of the accelerator, for one process."""

    num_processes, process_index, is_main_process = 1, 0, True

    def wait_for_everyone(self) -> None:
        pass


def _self_memory() -> dict[str, float]:
    values = _smaps(os.getpid())
    return {f"{name}_mib": values.get(name, 0) / 1024 for name in TreeSampler.SUMS}


def _in_ram(rows: Any) -> Any:
    """The records of a CacheRows gathered into one array, through a mapping of its own
    (closed afterwards: the CacheRows' mapping stays untouched)."""
    if rows is None:
        return None
    from adapter.cache import CacheRows

    files = [np.load(mapped.filename, mmap_mode="r", allow_pickle=False) for mapped in rows.files]
    array = CacheRows(files, rows.file_of, rows.row_of).gather(np.arange(len(rows)))
    del files  # the last references: unmapped
    return array


def step_timing(args: argparse.Namespace, samples: int, sd: Path, lm: Path) -> dict[str, Any]:
    import torch

    from adapter.data import load_split
    from adapter.features import LLMFeatureExtractor
    from adapter.stable_diffusion import load_stable_diffusion
    from adapter.step import CachedSet, LossSettings, compute_losses
    from adapter.train import TrainConfig, build_cached_sets, make_adapter

    data, cache = args.work / f"data-{samples}", args.work / "caches" / f"cache-{samples}"
    config = TrainConfig(
        data=str(data), base_model=str(sd), llm=str(lm), llm_layer=LLM_LAYER,
        output=args.work / "runs" / "step-timing", cache_dir=cache, resolution=RESOLUTION,
        batch_size=args.batch_size, device="cpu", validation_split="none",
        validation_prompts=(), show_progress=False, adapter_heads=4, adapter_feedforward=64,
        adapter_mlp=64, encode_batch_size=args.encode_batch_size,
    )  # fmt: skip
    torch.set_num_threads(args.threads)
    dtype, device = torch.float32, torch.device("cpu")  # what surd train uses on a CPU
    parts = load_stable_diffusion(str(sd), dtype)
    llm = LLMFeatureExtractor(str(lm), LLM_LAYER, config.llm_pooling, config.llm_batch_size,
                              device="cpu", dtype=config.llm_dtype)  # fmt: skip
    rows = load_split(str(data), "train")
    computed: dict[str, int] = {}
    started = time.perf_counter()
    ((mapped, unreadable),) = build_cached_sets(
        [rows], parts, llm, config, device, dtype, computed, False, _OneProcess()
    )
    build_s = time.perf_counter() - started
    del rows, llm
    memory_mapped = _self_memory()
    ram = CachedSet(**{field.name: _in_ram(getattr(mapped, field.name))
                       for field in dataclasses.fields(CachedSet)})  # fmt: skip
    memory_ram = _self_memory()

    torch.manual_seed(0)
    adapter = make_adapter(config, parts.text_width, mapped.llm_dim, parts).train()
    trainable = [param for param in adapter.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    unet, scheduler = parts.unet, parts.noise_scheduler
    settings = LossSettings(prediction_type=parts.prediction_type)
    scaling = parts.vae.config.scaling_factor
    shift = getattr(parts.vae.config, "shift_factor", None)
    rng = np.random.default_rng(0)
    batch = args.batch_size

    def draw(count: int) -> list[tuple[np.ndarray, torch.Tensor]]:
        return [(rng.integers(0, len(mapped), batch), torch.from_numpy(rng.random(batch) < 0.5))
                for _ in range(count)]  # fmt: skip

    def train_step(cached: CachedSet, indices: np.ndarray, flips: torch.Tensor, seed: int):
        begun = time.perf_counter()
        tensors = cached.batch(torch.from_numpy(indices), flips, device)
        gathered = time.perf_counter()
        generator = torch.Generator().manual_seed(seed)
        terms = compute_losses(adapter, unet, scheduler, tensors, generator, settings, scaling,
                               shift)  # fmt: skip
        terms.total.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - begun, gathered - begun

    sets = {"mapped": mapped, "in RAM": ram}
    steps = {name: [] for name in sets}
    gathers = {name: [] for name in sets}
    faults = {name: [0, 0, 0] for name in sets}  # minor, major, steps
    for indices, flips in draw(2):  # warm-up (allocator, first calls), not timed
        train_step(ram, indices, flips, 0)
    print(f"step timing on {len(mapped):,} samples: {args.rounds} rounds x "
          f"{args.round_steps} steps each way ...", flush=True)  # fmt: skip
    for round_number in range(args.rounds):
        plan = draw(args.round_steps)  # the same batches and noise both ways
        order = list(sets)[round_number % 2 :] + list(sets)[: round_number % 2]
        for name in order:
            before = resource.getrusage(resource.RUSAGE_SELF)
            for number, (indices, flips) in enumerate(plan):
                total, gather = train_step(sets[name], indices, flips, round_number * 1000 + number)
                steps[name].append(total)
                gathers[name].append(gather)
            after = resource.getrusage(resource.RUSAGE_SELF)
            faults[name][0] += after.ru_minflt - before.ru_minflt
            faults[name][1] += after.ru_majflt - before.ru_majflt
            faults[name][2] += len(plan)
        print(f"  round {round_number + 1}: "
              + ", ".join(f"{n} {statistics.median(steps[n][-len(plan):]) * 1e3:.1f} ms"
                          for n in sets), flush=True)  # fmt: skip

    batch_us = {name: [] for name in sets}
    for round_number in range(args.rounds):
        plan = draw(args.batch_calls)
        order = list(sets)[round_number % 2 :] + list(sets)[: round_number % 2]
        for name in order:
            for indices, flips in plan:
                begun = time.perf_counter()
                sets[name].batch(torch.from_numpy(indices), flips, device)
                batch_us[name].append((time.perf_counter() - begun) * 1e6)

    medians = {name: statistics.median(values) for name, values in steps.items()}
    return {
        "samples": len(mapped),
        "unreadable": unreadable,
        "computed_while_building": computed,
        "build_cached_sets_s": build_s,
        "batch_size": batch,
        "rounds": args.rounds,
        "steps_per_round": args.round_steps,
        "torch_threads": torch.get_num_threads(),
        "step_ms_median": {name: value * 1e3 for name, value in medians.items()},
        "step_ms_min_max": {name: [min(v) * 1e3, max(v) * 1e3] for name, v in steps.items()},
        "step_ratio_mapped_over_ram": medians["mapped"] / medians["in RAM"],
        "gather_in_step_us_median": {n: statistics.median(v) * 1e6 for n, v in gathers.items()},
        "batch_us_median": {name: statistics.median(v) for name, v in batch_us.items()},
        "batch_calls": len(batch_us["mapped"]),
        "page_faults_per_step": {
            name: {"minor": minor / count, "major": major / count}
            for name, (minor, major, count) in faults.items()
        },
        "process_memory_with_mapped_set": memory_mapped,
        "process_memory_with_ram_copy": memory_ram,
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
