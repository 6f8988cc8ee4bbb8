"""bench/train_memory.py's step timing: a training step gathering its batch from the
memory-mapped caches against the same rows held in RAM, in this process, on the very
``CachedSet`` ``surd train`` builds (through ``adapter.train_caches.build_cached_sets``).
A module of its own: unlike the measured runs (subprocesses), it runs torch in this process."""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.memory_bench_data import LLM_LAYER, RESOLUTION
from bench.process_memory import TreeSampler, smaps_rollup


class _OneProcess:
    """What build_cached_sets asks of the accelerator, for one process."""

    num_processes, process_index, is_main_process = 1, 0, True

    def wait_for_everyone(self) -> None:
        pass


def _self_memory() -> dict[str, float]:
    values = smaps_rollup(os.getpid())
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
    from adapter.train_caches import build_cached_sets
    from adapter.train_config import TrainConfig
    from adapter.train_setup import make_adapter

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
