"""Benchmark: rewriting throughput (run by hand, not a test).

    .venv/bin/python bench/rewrite.py --json bench-rewrite.json
    .venv/bin/python bench/rewrite.py --hidden 896 --layers 24 --device cuda   # ~0.5B, GPU

Three parts, each printed as prompts/s:

1. ``hf``: a random-weight Llama built in code (no download; ``--hidden``/``--layers`` set its
   size, the defaults make a ~4M-parameter model for CPU) generating ``--new-tokens`` tokens
   per prompt with the default few-shot template, batched (``--batch-sizes``) vs one at a time.
   ``min_new_tokens`` is set so every prompt generates the same number of tokens: random
   weights would otherwise stop at random lengths and make batches look faster or slower.
2. ``openai``: the loopback chat-completions server from the test suite, answering each request
   after ``--latency`` seconds (standing in for a model server's time per request), with N
   requests in flight (``--concurrency``); this is the client side's throughput and how well
   it hides server latency.
3. ``rules``: the offline rewriter, for scale.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for tests.tiny_models and tests.chat_server

from pipelines.rewriters.base import RewriteRequest  # noqa: E402
from pipelines.rewriters.hf import GenerationOptions, HFCausalLMRewriter  # noqa: E402
from pipelines.rewriters.openai_chat import ChatOptions, OpenAIChatRewriter  # noqa: E402
from pipelines.rewriters.rules import rewrite_by_rules  # noqa: E402
from surd_builder.demo import random_scene  # noqa: E402

SUBJECTS = ["red fox", "two cats", "old wizard", "blue dragon", "small boat", "three horses"]
STYLES = ["8k", "artstation", "masterpiece", "highly detailed", "octane render", "sharp focus"]


def prompts(count: int) -> list[str]:
    import random

    rng = random.Random(0)
    out = []
    for number in range(count):
        if number % 2:
            out.append(random_scene(rng).complex_prompt(rng))
        else:
            words = [rng.choice(SUBJECTS), "snowy forest", *rng.sample(STYLES, k=rng.randint(1, 5))]
            out.append(", ".join(words))
    return out


class FixedLengthRewriter(HFCausalLMRewriter):
    """Forces every answer to ``max_new_tokens`` tokens (see the module docstring)."""

    def generate_texts(self, texts, attempt):
        tokenizer, model, _ = self.load()
        model.generation_config.min_new_tokens = self.options.max_new_tokens
        return super().generate_texts(texts, attempt)


def bench_hf(args, results: dict) -> None:
    import torch

    from tests.tiny_models import save_tiny_causal_lm

    with tempfile.TemporaryDirectory() as scratch:
        path = save_tiny_causal_lm(
            Path(scratch) / "lm",
            hidden_size=args.hidden,
            num_layers=args.layers,
            max_positions=2048,
        )
        requests = [RewriteRequest(p) for p in prompts(args.hf_prompts)]
        rows = []
        for batch_size in [1, *args.batch_sizes]:
            options = GenerationOptions(
                max_new_tokens=args.new_tokens, batch_size=batch_size, device=args.device
            )
            rewriter = FixedLengthRewriter(str(path), options=options)
            _, model, device = rewriter.load()
            parameters = sum(p.numel() for p in model.parameters())
            rewriter.generate(requests[:batch_size], 0)  # warm-up
            count = len(requests) if batch_size > 1 else min(len(requests), args.hf_single)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            rewriter.generate(requests[:count], 0)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            rows.append(
                {"batch_size": batch_size, "prompts": count, "prompts_per_s": count / seconds}
            )
            print(f"hf  batch {batch_size:>3}: {count / seconds:8.1f} prompts/s ({count} prompts)")
        results["hf"] = {
            "parameters": parameters,
            "device": device,
            "new_tokens": args.new_tokens,
            "runs": rows,
        }


def bench_openai(args, results: dict) -> None:
    from tests.chat_server import ChatCompletionsServer

    requests = [RewriteRequest(p) for p in prompts(args.openai_prompts)]
    rows = []
    with ChatCompletionsServer(latency=args.latency) as server:
        for concurrency in args.concurrency:
            count = min(len(requests), max(32, concurrency * 16))
            rewriter = OpenAIChatRewriter(
                server.base_url, "bench", options=ChatOptions(concurrency=concurrency, retries=0)
            )
            rewriter.generate(requests[:concurrency], 0)  # warm-up: connections
            start = time.perf_counter()
            rewriter.generate(requests[:count], 0)
            seconds = time.perf_counter() - start
            rows.append(
                {"concurrency": concurrency, "prompts": count, "prompts_per_s": count / seconds}
            )
            print(f"openai concurrency {concurrency:>3}: {count / seconds:8.1f} prompts/s")
    results["openai"] = {"latency_s": args.latency, "runs": rows}


def bench_rules(results: dict) -> None:
    batch = prompts(20_000)
    start = time.perf_counter()
    for prompt in batch:
        rewrite_by_rules(prompt)
    rate = len(batch) / (time.perf_counter() - start)
    print(f"rules: {rate:,.0f} prompts/s")
    results["rules"] = {"prompts_per_s": rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--hf-prompts", type=int, default=64)
    parser.add_argument("--hf-single", type=int, default=16, help="prompts timed one at a time")
    parser.add_argument("--openai-prompts", type=int, default=1024)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--skip", nargs="*", default=[], choices=["hf", "openai", "rules"])
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    results: dict = {}
    if "rules" not in args.skip:
        bench_rules(results)
    if "openai" not in args.skip:
        bench_openai(args, results)
    if "hf" not in args.skip:
        bench_hf(args, results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
