"""Benchmark: SDXL's pooled text embedding adapted by the pooled head, or passed through (run by
hand, not a test).

    .venv/bin/python bench/pooled_head.py [--steps 200] [--seeds 3] [--work DIR] [--json FILE]

On the tiny SDXL of :func:`surd_builder.demo_models.save_tiny_sdxl` (random weights: two tiny
CLIP text encoders, 80-wide token states, a 24-wide pooled embedding), a tiny random Llama with the
demo's words, and the 160 demo shape images (:func:`surd_builder.demo.write_demo_dataset`: 128
train, 32 held out), it trains the adapter with :func:`adapter.train.train` twice per seed,
identical except ``pooled_head``:

- ``head``: ``p' = w * MLP([p, mean of the encoder's output]) + (1 - w) * p``, trained by the
  quality loss through the UNet and by the pooled KL inside ``prompt_alignment``;
- ``passthrough``: ``p' = p``.

Everything else is ``surd train``'s defaults (the ``surd`` objective's etas and learning rate,
batch 16, dropout 0.1, gradient checkpointing on for SDXL) on the CPU at 32 px, with the tests'
small adapter sizes. Reported per choice, mean +- sample standard deviation over the seeds:

- the held-out losses (``history.jsonl``) at step 0 and at the end: quality, distillation,
  prompt_alignment (the sequence KL plus, for SDXL, the pooled KL as one more token), total;
- measured here on the held-out split with the saved adapter (``SURAdapter.from_pretrained``):
  the sequence KL (adapted narrative token states vs the keyword prompt's) and the pooled KL
  (adapted pooled vs the keyword prompt's pooled), each against the baseline of the narrative
  embeddings as they are, and the fresh adapter's (``(1 - w) x``; the head's ``(1 - w) p``), all
  with :func:`adapter.losses.kl_per_token`;
- the wall time of each training run (the caches are filled before, by a ``caches_only`` run;
  the wall time includes loading the models and the two held-out evaluations).

Weights are random, so the numbers say whether each design moves what the method says it moves
(towards the keyword prompt's embeddings, at no cost in quality loss), nothing about images.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

SMALL_ADAPTER = dict(adapter_heads=4, adapter_feedforward=64, adapter_mlp=64)
CHOICES = {"head": True, "passthrough": False}
TERMS = ("quality", "distillation", "prompt_alignment", "total")


def build(work: Path) -> dict[str, Path]:
    """The tiny SDXL, the tiny LLM and the demo dataset in ``work`` (kept if already there)."""
    from surd_builder.demo import write_demo_dataset
    from surd_builder.demo_models import demo_words, save_tiny_causal_lm, save_tiny_sdxl

    paths = {"sdxl": work / "sdxl", "llm": work / "llm", "demo": work / "demo"}
    if not (paths["sdxl"] / "model_index.json").is_file():
        save_tiny_sdxl(paths["sdxl"])
    if not (paths["llm"] / "config.json").is_file():
        save_tiny_causal_lm(paths["llm"], extra_words=demo_words())
    data = paths["demo"] / "export"
    if not (data / "data" / "test-00000-of-00001.parquet").is_file():
        shutil.rmtree(paths["demo"], ignore_errors=True)
        data = write_demo_dataset(paths["demo"])
    return {**paths, "data": data, "cache": work / "cache", "runs": work / "runs"}


def reset_accelerate_state() -> None:
    """accelerate keeps one state per process; each run here gets a fresh one (as the tests)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()


def make_config(
    paths: dict[str, Path], output: Path, seed: int, head: bool, steps: int, **extra: Any
) -> Any:
    from adapter.train import TrainConfig
    from surd_builder.demo_models import DEMO_IMAGE_SIZE, DEMO_LLM_LAYER

    return TrainConfig(
        data=str(paths["data"]), base_model=str(paths["sdxl"]), llm=str(paths["llm"]),
        llm_layer=DEMO_LLM_LAYER, output=output, cache_dir=paths["cache"],
        resolution=DEMO_IMAGE_SIZE, device="cpu", max_steps=steps, seed=seed, pooled_head=head,
        validation_prompts=(), show_progress=False, **SMALL_ADAPTER, **extra,
    )  # fmt: skip


def fill_caches(paths: dict[str, Path]) -> dict[str, int]:
    """The frozen inputs cached before any timed run (``--caches-only``), so every run's wall
    time is training alone (with model loading and the two held-out evaluations)."""
    from adapter.train import train

    output = paths["runs"] / "caches-only"
    try:
        report = train(make_config(paths, output, 0, True, 1, caches_only=True))
    finally:
        reset_accelerate_state()
    return report.computed


def train_once(paths: dict[str, Path], seed: int, head: bool, steps: int) -> dict[str, Any]:
    from adapter.train import train

    output = paths["runs"] / f"seed-{seed}-{'head' if head else 'passthrough'}"
    shutil.rmtree(output, ignore_errors=True)  # a checkpoint left there would be resumed
    config = make_config(paths, output, seed, head, steps)
    started = time.perf_counter()
    try:
        report = train(config)
    finally:
        reset_accelerate_state()
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in (output / "history.jsonl").read_text().splitlines()]
    held = [row for row in rows if row["kind"] == "held_out"]
    summary = json.loads((output / "train-summary.json").read_text())
    return {
        "output": str(output),
        "wall_s": wall,
        "steps": report.steps,
        "computed": report.computed,
        "samples_per_second": report.samples_per_second,
        "held_out_start": {term: held[0][term] for term in TERMS},
        "held_out_end": {term: held[-1][term] for term in TERMS},
        "held_out_steps": [held[0]["step"], held[-1]["step"]],
        "summary_last_held_out": summary["last_held_out"],
        "eta_llm": config.eta_llm,
        "eta_prompt": config.eta_prompt,
        "learning_rate": config.learning_rate,
    }


class HeldOutEmbeddings:
    """The held-out split's narrative and keyword embeddings (token states and pooled), as the
    cache holds them (float16 records from :class:`adapter.frozen_inputs.TextEmbeddings`)."""

    def __init__(self, paths: dict[str, Path]):
        import torch

        from adapter.data import load_split
        from adapter.frozen_inputs import TextEmbeddings, split_text_record
        from adapter.stable_diffusion import TEXT_PARTS, load_stable_diffusion

        parts = load_stable_diffusion(str(paths["sdxl"]), components=TEXT_PARTS["sdxl"])
        encode = TextEmbeddings(parts, "cpu", torch.float32)
        rows = load_split(str(paths["data"]), "test")
        self.count = len(rows)

        def tensors(texts: list[str]) -> tuple[Any, Any]:
            sequence, pooled = split_text_record(encode(texts), parts.pooled_width)
            return torch.from_numpy(sequence).float(), torch.from_numpy(pooled).float()

        self.narrative, self.narrative_pooled = tensors(rows.narrative_prompts)
        self.keyword, self.keyword_pooled = tensors(rows.keyword_prompts)

    def kls(self, sequence: Any, pooled: Any) -> dict[str, float]:
        from adapter.losses import kl_per_token

        return {
            "sequence_kl": float(kl_per_token(sequence, self.keyword)),
            "pooled_kl": float(kl_per_token(pooled[:, None], self.keyword_pooled[:, None])),
        }

    def baseline(self) -> dict[str, float]:
        return self.kls(self.narrative, self.narrative_pooled)

    def measure(self, output: Path) -> dict[str, dict[str, float]]:
        """KLs of the trained adapter at ``output``, and of the same adapter with its output
        layers zeroed (what a fresh one returns: ``(1 - w) x``, the head's ``(1 - w) p``)."""
        import torch

        from adapter.model import SURAdapter

        adapter = SURAdapter.from_pretrained(output).eval()
        with torch.no_grad():
            out = adapter(self.narrative, pooled_embeds=self.narrative_pooled)
            trained = self.kls(out.prompt_embeds, out.pooled_embeds)
            layers = [adapter.out] + ([adapter.pooled_mlp[2]] if adapter.pooled_mlp else [])
            for layer in layers:
                layer.weight.zero_()
                layer.bias.zero_()
            out = adapter(self.narrative, pooled_embeds=self.narrative_pooled)
            fresh = self.kls(out.prompt_embeds, out.pooled_embeds)
        return {"trained": trained, "fresh": fresh}


def spread(values: list[float]) -> dict[str, float]:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "sd": sd, "min": min(values), "max": max(values)}


def fmt(stats: dict[str, float]) -> str:
    value, sd = stats["mean"], stats["sd"]
    digits = 4 if abs(value) < 10 else 2
    return f"{value:.{digits}f} ± {sd:.{digits}f}"


def aggregate(runs: list[dict[str, Any]], baseline: dict[str, float]) -> dict[str, Any]:
    """Mean and spread over the seeds of everything the table shows."""
    out: dict[str, Any] = {}
    for when in ("held_out_start", "held_out_end"):
        out[when] = {term: spread([run[when][term] for run in runs]) for term in TERMS}
    for kind in ("sequence_kl", "pooled_kl"):
        out[kind] = {
            "baseline": baseline[kind],
            "fresh": spread([run["kl"]["fresh"][kind] for run in runs]),
            "trained": spread([run["kl"]["trained"][kind] for run in runs]),
        }
    out["wall_s"] = spread([run["wall_s"] for run in runs])
    return out


def print_table(results: dict[str, Any]) -> None:
    rows = results["aggregate"]
    print(
        f"\n{results['seeds']} seeds x {results['steps']} steps, held-out split "
        f"({results['held_out_samples']} prompts); mean ± sd over seeds\n"
    )
    print(
        "| pooled | held-out quality (start → end) | held-out prompt_alignment (start → end) "
        "| pooled KL (baseline → trained) | sequence KL (baseline → trained) | wall s |"
    )
    print("|---|---|---|---|---|---|")
    for name, row in rows.items():
        start, end = row["held_out_start"], row["held_out_end"]
        pooled, sequence = row["pooled_kl"], row["sequence_kl"]
        print(
            f"| {name} | {fmt(start['quality'])} → {fmt(end['quality'])} "
            f"| {fmt(start['prompt_alignment'])} → {fmt(end['prompt_alignment'])} "
            f"| {pooled['baseline']:.4f} → {fmt(pooled['trained'])} "
            f"| {sequence['baseline']:.2f} → {fmt(sequence['trained'])} "
            f"| {fmt(row['wall_s'])} |"
        )
    print("\nalso (start → end): distillation, total; fresh adapter's KLs ((1 - w) x)")
    for name, row in rows.items():
        start, end = row["held_out_start"], row["held_out_end"]
        print(
            f"- {name}: distillation {fmt(start['distillation'])} → {fmt(end['distillation'])}, "
            f"total {fmt(start['total'])} → {fmt(end['total'])}; fresh pooled KL "
            f"{fmt(row['pooled_kl']['fresh'])}, fresh sequence KL "
            f"{fmt(row['sequence_kl']['fresh'])}"
        )
    paired = results["paired_head_minus_passthrough"]
    print(
        "- paired per seed, head - passthrough: end quality "
        f"{fmt(paired['quality_end'])}, end prompt_alignment "
        f"{fmt(paired['prompt_alignment_end'])}, trained pooled KL {fmt(paired['pooled_kl'])}, "
        f"trained sequence KL {fmt(paired['sequence_kl'])}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="build and train here (default: a temp dir)")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per run")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="pooled-head-") as temp:
        work = args.work or Path(temp)
        work.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        paths = build(work)
        print(f"models and data in {work} ({time.perf_counter() - started:.1f} s)", flush=True)
        computed = fill_caches(paths)
        print(f"caches filled (computed {computed}) at {time.perf_counter() - started:.1f} s",
              flush=True)  # fmt: skip
        embeddings = HeldOutEmbeddings(paths)
        baseline = embeddings.baseline()
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in CHOICES}
        for seed in range(args.seeds):
            for name, head in CHOICES.items():
                run = train_once(paths, seed, head, args.steps)
                run["seed"] = seed
                run["kl"] = embeddings.measure(Path(run["output"]))
                runs[name].append(run)
                trained = run["kl"]["trained"]
                print(
                    f"seed {seed} {name}: {run['wall_s']:.1f} s, held-out quality "
                    f"{run['held_out_start']['quality']:.4f} -> "
                    f"{run['held_out_end']['quality']:.4f}, prompt_alignment "
                    f"{run['held_out_start']['prompt_alignment']:.4f} -> "
                    f"{run['held_out_end']['prompt_alignment']:.4f}, pooled KL "
                    f"{baseline['pooled_kl']:.4f} -> {trained['pooled_kl']:.4f}, sequence KL "
                    f"{baseline['sequence_kl']:.3f} -> {trained['sequence_kl']:.3f}",
                    flush=True,
                )

        def paired(pick: Any) -> dict[str, float]:
            pairs = zip(runs["head"], runs["passthrough"], strict=True)
            return spread([pick(head) - pick(passthrough) for head, passthrough in pairs])

        results = {
            "steps": args.steps,
            "seeds": args.seeds,
            "threads": args.threads,
            "held_out_samples": embeddings.count,
            "caches_computed": computed,
            "baseline": baseline,
            "aggregate": {name: aggregate(choice, baseline) for name, choice in runs.items()},
            "paired_head_minus_passthrough": {
                "quality_end": paired(lambda run: run["held_out_end"]["quality"]),
                "prompt_alignment_end": paired(lambda run: run["held_out_end"]["prompt_alignment"]),
                "pooled_kl": paired(lambda run: run["kl"]["trained"]["pooled_kl"]),
                "sequence_kl": paired(lambda run: run["kl"]["trained"]["sequence_kl"]),
            },
            "runs": runs,
            "total_s": time.perf_counter() - started,
        }
        print_table(results)
        print(f"\ntotal {results['total_s']:.0f} s")
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
