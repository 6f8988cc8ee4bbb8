"""Benchmark: rewriting throughput (run by hand, not a test).

    .venv/bin/python bench/rewrite.py --json bench-rewrite.json
    .venv/bin/python bench/rewrite.py --hidden 896 --layers 24 --device cuda   # ~0.5B, GPU
    .venv/bin/python bench/rewrite.py --skip hf rules openai openai-image --device cuda  # vlm only

Five parts, each printed as a table (all of it also in ``--json``):

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
4. ``vlm``: the tiny random Idefics3 (SmolVLM's architecture) from ``save_tiny_vlm``, the same
   model on a GPU: it measures the pipeline's overhead (decoding the JPEG, the processor's
   tiling, padding, ``generate``), not a real model's speed. ``--vlm-images`` photo-like
   512x384 JPEGs (smooth random colour fields plus grain, made with numpy and PIL, seeded)
   with the keyword prompts of part 1, images/s batched (``--vlm-batch-sizes``) vs one at a
   time, each answer exactly ``--new-tokens`` tokens (``min_new_tokens``, as for ``hf``);
   the judge's pairs/s (``make_judge("vlm:...")``: one forward pass per batch, no generation);
   and the CPU-side preparation per image (decode + downscale, the processor).
5. ``openai-image``: ``openai: --with-image`` against the loopback server (``--latency``):
   the client's cost per image of preparing the upload (``upload_image`` + base64, ms per image
   for 512x384 and 3000x2000 JPEGs at ``image_max_side`` 768 and 512, and the base64 KiB per
   request); requests/s per ``--concurrency`` level with 512x384 images (and one row with
   3000x2000 ones: each image is encoded on the thread that sends it); p50/p95 latency of one
   request per ``generate`` call, client side, against the server's ``--latency`` (text-only
   requests for comparison); and the ``openai`` judge (``top_logprobs`` yes/no) requests/s.
   Client and server share one Python process (and its GIL): at high concurrency the server's
   JSON parsing of megabyte bodies is part of what is measured.

On a CPU that other work shares, set ``OMP_NUM_THREADS=1``: torch's threads wait on each other
and the ``hf``/``vlm`` numbers swing tenfold otherwise.

``--row FILE`` writes ``OK<TAB>summary`` of the parts that ran (``bench/gpu_check.sh``'s row
format, used for its ``rewrite_vlm`` row).
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

from pipelines.rewriters.base import ItemFailed, RewriteRequest  # noqa: E402
from pipelines.rewriters.hf import GenerationOptions, HFCausalLMRewriter  # noqa: E402
from pipelines.rewriters.openai_chat import ChatOptions, OpenAIChatRewriter  # noqa: E402
from pipelines.rewriters.rules import rewrite_by_rules  # noqa: E402
from pipelines.rewriters.vlm import VLMOptions, VLMRewriter  # noqa: E402
from surd_builder.demo import random_scene  # noqa: E402

SUBJECTS = ["red fox", "two cats", "old wizard", "blue dragon", "small boat", "three horses"]
STYLES = ["8k", "artstation", "masterpiece", "highly detailed", "octane render", "sharp focus"]
PARTS = ["hf", "openai", "rules", "vlm", "openai-image"]


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


# ----------------------------------------------------------------------------- images


def photo_jpeg(seed: int, width: int = 512, height: int = 384) -> bytes:
    """A photo-like JPEG: a smooth random colour field (a few blobs across the frame) with
    grain, so it compresses like a photo (not a flat colour, not noise). Deterministic."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    field = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    grain = rng.standard_normal((height, width, 3), dtype=np.float32) * 6.0
    pixels = np.clip(np.asarray(field, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def narratives(keyword_prompts: list[str]) -> list[str]:
    """Sentences to judge: the rules rewriter's, one per prompt."""
    return [rewrite_by_rules(p) or p for p in keyword_prompts]


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- vlm


class FixedLengthVLMRewriter(VLMRewriter):
    """Forces every answer to ``max_new_tokens`` tokens (see the module docstring) and records
    the generated lengths and how many rows hit the end-of-answer token (should be none)."""

    lengths: set[int]
    rows_with_eos: int

    def generate(self, requests, attempt):
        model = self.load().model
        model.generation_config.min_new_tokens = self.options.max_new_tokens
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.lengths = getattr(self, "lengths", set())
        self.rows_with_eos = getattr(self, "rows_with_eos", 0)
        original = model.generate

        def counted(**kwargs):
            output = original(**kwargs)
            new = output[:, kwargs["input_ids"].shape[1] :]
            self.lengths.add(int(new.shape[1]))
            for row in new.tolist():
                self.rows_with_eos += bool(eos_ids & set(row))
            return output

        model.generate = counted
        try:
            return super().generate(requests, attempt)
        finally:
            del model.generate  # the class's method again


def check_answers(answers: list, what: str) -> None:
    """A bench that times failures measures nothing: stop at the first one."""
    failed = [a for a in answers if isinstance(a, ItemFailed)]
    if failed:
        raise SystemExit(f"{what}: {len(failed)}/{len(answers)} failed, first: {failed[0]}")


def bench_vlm(args, results: dict) -> None:
    from pipelines.judge import make_judge
    from pipelines.rewriters.vision import model_image
    from surd_builder.config import ScreenSettings
    from surd_builder.demo_models import save_tiny_vlm

    keyword_prompts = prompts(args.vlm_images)
    images = [photo_jpeg(seed) for seed in range(args.vlm_images)]
    requests = [RewriteRequest(p, image=i) for p, i in zip(keyword_prompts, images, strict=True)]
    sentences = narratives(keyword_prompts)
    single = min(len(requests), args.vlm_single)
    with tempfile.TemporaryDirectory() as scratch:
        path = save_tiny_vlm(Path(scratch) / "vlm")
        runs = []
        for batch_size in [1, *args.vlm_batch_sizes]:
            options = VLMOptions(
                max_new_tokens=args.new_tokens,
                batch_size=batch_size,
                image_max_side=args.image_max_side,
                device=args.device,
            )
            rewriter = FixedLengthVLMRewriter(str(path), options=options)
            loaded = rewriter.load()
            device = loaded.device
            parameters = sum(p.numel() for p in loaded.model.parameters())
            check_answers(rewriter.generate(requests[:batch_size], 0), "vlm warm-up")
            count = len(requests) if batch_size > 1 else single
            calls = rewriter.generate_calls
            synchronize(device)
            start = time.perf_counter()
            answers = rewriter.generate(requests[:count], 0)
            synchronize(device)
            seconds = time.perf_counter() - start
            check_answers(answers, "vlm")
            if batch_size == 1:
                alone = answers
            runs.append(
                {
                    "batch_size": batch_size,
                    "images": count,
                    "images_per_s": count / seconds,
                    "generate_calls": rewriter.generate_calls - calls,
                    "new_tokens": sorted(rewriter.lengths),
                    "rows_with_eos": rewriter.rows_with_eos,
                    # greedy: a batch should answer as each conversation alone (bf16 may not)
                    "same_as_alone": answers[: len(alone)] == alone,
                }
            )
            print(
                f"vlm   batch {batch_size:>3}: {count / seconds:8.1f} images/s "
                f"({count} images, {args.new_tokens} new tokens each"
                f"{'' if runs[-1]['same_as_alone'] else '; answers DIFFER from one at a time'})"
            )

        judge_runs = []
        for batch_size in [1, *args.vlm_batch_sizes]:
            settings = ScreenSettings(
                device=args.device, model_batch_size=batch_size, image_max_side=args.image_max_side
            )
            judge = make_judge(f"vlm:{path}", settings)
            check_answers(judge.scores(images[:batch_size], sentences[:batch_size]), "judge")
            count = len(images) if batch_size > 1 else single
            synchronize(device)
            start = time.perf_counter()
            scores = judge.scores(images[:count], sentences[:count])
            synchronize(device)
            seconds = time.perf_counter() - start
            check_answers(scores, "judge")
            judge_runs.append(
                {"batch_size": batch_size, "pairs": count, "pairs_per_s": count / seconds}
            )
            print(
                f"vlm judge batch {batch_size:>3}: {count / seconds:8.1f} pairs/s ({count} pairs)"
            )

        # the CPU side of each image: decode + downscale, then the processor's resize and tiles
        processor = loaded.processor
        repeat = min(len(images), 16)
        start = time.perf_counter()
        decoded = [model_image(data, args.image_max_side) for data in images[:repeat]]
        decode_ms = (time.perf_counter() - start) * 1000 / repeat
        text = rewriter.render(rewriter.conversation(rewriter.template, keyword_prompts[0]))
        start = time.perf_counter()
        for chunk in range(0, repeat, 8):
            batch = decoded[chunk : chunk + 8]
            processor(text=[text] * len(batch), images=[[i] for i in batch], padding=True)
        processor_ms = (time.perf_counter() - start) * 1000 / repeat
        tokens = len(processor(text=[text], images=[[decoded[0]]])["input_ids"][0])
        print(
            f"vlm prep: decode+downscale {decode_ms:.2f} ms/image, processor {processor_ms:.2f} "
            f"ms/image, {tokens} prompt tokens with the image"
        )
    results["vlm"] = {
        "parameters": parameters,
        "device": device,
        "image_size": [512, 384],
        "image_max_side": args.image_max_side,
        "new_tokens": args.new_tokens,
        "runs": runs,
        "judge": judge_runs,
        "prep_ms_per_image": {"decode_downscale": decode_ms, "processor": processor_ms},
        "prompt_tokens": tokens,
    }


# ----------------------------------------------------------------------------- openai-image


def counting_server(**kwargs):
    """The loopback server, counting the TCP connections it accepts (keep-alive reuse)."""
    from tests.chat_server import ChatCompletionsServer

    class CountingServer(ChatCompletionsServer):
        connections = 0

        def process_request(self, request, client_address):  # the serving thread, one at a time
            self.connections += 1
            super().process_request(request, client_address)

        def forget(self) -> None:  # the stored request bodies hold every image: drop them
            with self._lock:
                self.requests.clear()
                self.paths.clear()

    return CountingServer(**kwargs)


def yes_no_logprobs(body: dict) -> list[tuple[str, float]]:
    return [("Yes", -0.2), ("No", -1.8), ("The", -4.0)]


def upload_costs(sources: dict[str, list[bytes]], sides: list[int]) -> list[dict]:
    """ms per image of building the ``image_url`` part (upload_image + base64) and the data
    URL's KiB."""
    from pipelines.rewriters.vision import upload_image

    rows = []
    for name, images in sources.items():
        for side in sides:
            upload_image(images[0], side).content_part()  # warm-up: PIL's plugins
            rounds = max(1, 8 // len(images))
            start = time.perf_counter()
            for _ in range(rounds):
                for data in images:
                    upload_image(data, side)
            upload_ms = (time.perf_counter() - start) * 1000 / (rounds * len(images))
            start = time.perf_counter()
            for _ in range(rounds):
                parts = [upload_image(data, side).content_part() for data in images]
            part_ms = (time.perf_counter() - start) * 1000 / (rounds * len(images))
            kib = sum(len(p["image_url"]["url"]) for p in parts) / len(parts) / 1024
            upload = upload_image(images[0], side)
            rows.append(
                {
                    "source": name,
                    "source_kib": sum(map(len, images)) / len(images) / 1024,
                    "image_max_side": side,
                    "sent": f"{upload.width}x{upload.height}",
                    "passed_as_is": upload.data == images[0],
                    "upload_image_ms": upload_ms,
                    "image_part_ms": part_ms,
                    "base64_kib": kib,
                }
            )
            print(
                f"openai-image prep {name:>9} at max side {side}: sent {upload.width}x"
                f"{upload.height}{' (as is)' if upload.data == images[0] else ''}, "
                f"upload_image {upload_ms:6.2f} ms, with base64 {part_ms:6.2f} ms/image, "
                f"{kib:6.1f} KiB base64/request"
            )
    return rows


def timed_generate(rewriter, requests, server) -> dict:
    rewriter.check_reachable()  # as the rewrite stage does first (with_image: the 8x8 probe)
    check_answers(rewriter.generate(requests[: rewriter.options.concurrency], 0), "warm-up")
    server.forget()
    connections = server.connections
    start = time.perf_counter()
    answers = rewriter.generate(requests, 0)
    seconds = time.perf_counter() - start
    check_answers(answers, "openai-image")
    server.forget()
    return {
        "requests": len(requests),
        "requests_per_s": len(requests) / seconds,
        "connections": server.connections - connections,
    }


def latency_percentiles(rewriter, request: RewriteRequest, calls: int, server) -> dict:
    """Client-side seconds per ``generate([request])``, p50 and p95, and the connections the
    server accepted meanwhile."""
    import numpy as np

    rewriter.check_reachable()
    check_answers(rewriter.generate([request], 0), "latency warm-up")
    connections = server.connections
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        answers = rewriter.generate([request], 0)
        times.append(time.perf_counter() - start)
        check_answers(answers, "latency")
    p50, p95 = np.percentile(times, [50, 95])
    connections = server.connections - connections
    return {"calls": calls, "p50_s": float(p50), "p95_s": float(p95), "connections": connections}


def bench_openai_image(args, results: dict) -> None:
    from pipelines.judge import make_judge
    from surd_builder.config import ScreenSettings

    small = [photo_jpeg(seed) for seed in range(args.openai_image_distinct)]
    large = [photo_jpeg(10_000 + seed, 3000, 2000) for seed in range(args.openai_image_large)]
    prep = upload_costs({"512x384": small[:16], "3000x2000": large}, [768, 512])

    keyword_prompts = prompts(args.openai_image_requests)
    requests = [
        RewriteRequest(p, image=small[n % len(small)]) for n, p in enumerate(keyword_prompts)
    ]
    large_requests = [
        RewriteRequest(p, image=large[n % len(large)]) for n, p in enumerate(keyword_prompts)
    ]

    def client(concurrency: int, with_image: bool = True) -> OpenAIChatRewriter:
        options = ChatOptions(
            concurrency=concurrency,
            retries=0,
            with_image=with_image,
            image_max_side=args.image_max_side,
        )
        return OpenAIChatRewriter(server.base_url, "bench", options=options)

    runs, judge_runs = [], []
    with counting_server(latency=args.latency, first_token_logprobs=yes_no_logprobs) as server:
        for concurrency in args.concurrency:
            count = min(len(requests), max(32, concurrency * 16))
            row = {
                "concurrency": concurrency,
                **timed_generate(client(concurrency), requests[:count], server),
            }
            runs.append(row)
            print(
                f"openai-image concurrency {concurrency:>3}: {row['requests_per_s']:8.1f} "
                f"requests/s ({count} requests, 512x384, {row['connections']} new connections)"
            )
        concurrency = max(args.concurrency)
        count = min(len(large_requests), 16)
        row = {
            "concurrency": concurrency,
            "source": "3000x2000",
            **timed_generate(client(concurrency), large_requests[:count], server),
        }
        runs.append(row)
        print(
            f"openai-image concurrency {concurrency:>3}: {row['requests_per_s']:8.1f} "
            f"requests/s ({count} requests, 3000x2000)"
        )

        latency = {}
        for name, with_image in (("image", True), ("text", False)):
            latency[name] = latency_percentiles(
                client(1, with_image), requests[0], args.latency_calls, server
            )
            server.forget()
            stats = latency[name]
            print(
                f"openai-image latency ({name:>5}, 1 request per call): p50 "
                f"{stats['p50_s'] * 1000:6.1f} ms, p95 {stats['p95_s'] * 1000:6.1f} ms "
                f"(server {args.latency * 1000:.0f} ms; {stats['connections']} new connections "
                f"for {stats['calls']} calls)"
            )

        for concurrency in args.concurrency:
            count = min(len(requests), max(32, concurrency * 16))
            settings = ScreenSettings(
                judge_model="bench",
                with_image=True,
                concurrency=concurrency,
                retries=0,
                image_max_side=args.image_max_side,
            )
            judge = make_judge(f"openai:{server.base_url}", settings)
            judge.check_reachable()
            images = [r.image for r in requests[:count]]
            sentences = narratives([r.complex_prompt for r in requests[:count]])
            check_answers(judge.scores(images[:concurrency], sentences[:concurrency]), "judge")
            server.forget()
            start = time.perf_counter()
            scores = judge.scores(images, sentences)
            seconds = time.perf_counter() - start
            server.forget()
            check_answers(scores, "openai judge")
            judge_runs.append(
                {
                    "concurrency": concurrency,
                    "requests": count,
                    "requests_per_s": count / seconds,
                    "score": scores[0],
                }
            )
            print(
                f"openai-image judge concurrency {concurrency:>3}: {count / seconds:8.1f} "
                f"requests/s (score {scores[0]:.3f})"
            )
    results["openai-image"] = {
        "latency_s": args.latency,
        "image_max_side": args.image_max_side,
        "prep": prep,
        "runs": runs,
        "latency": latency,
        "judge": judge_runs,
    }


def summary(results: dict) -> str:
    """One line for ``--row``: the headline numbers of each part that ran."""
    parts = []
    if "vlm" in results:
        vlm = results["vlm"]
        rates = ", ".join(f"b{r['batch_size']} {r['images_per_s']:.1f}" for r in vlm["runs"])
        judge = ", ".join(f"b{r['batch_size']} {r['pairs_per_s']:.1f}" for r in vlm["judge"])
        differ = [str(r["batch_size"]) for r in vlm["runs"] if not r["same_as_alone"]]
        parts.append(
            f"tiny VLM on {vlm['device']}, {vlm['new_tokens']} tokens: images/s {rates}; "
            f"judge pairs/s {judge}"
            + (f" (batch {', '.join(differ)}: answers differ from one at a time)" if differ else "")
        )
    if "hf" in results:
        rates = ", ".join(
            f"b{r['batch_size']} {r['prompts_per_s']:.1f}" for r in results["hf"]["runs"]
        )
        parts.append(f"hf on {results['hf']['device']}: prompts/s {rates}")
    for name in ("openai", "openai-image"):
        if name in results:
            best = max(
                results[name]["runs"],
                key=lambda r: r.get("prompts_per_s", 0) or r.get("requests_per_s", 0),
            )
            rate = best.get("prompts_per_s") or best.get("requests_per_s")
            parts.append(f"{name}: {rate:.0f}/s at concurrency {best['concurrency']}")
    if "rules" in results:
        parts.append(f"rules: {results['rules']['prompts_per_s']:,.0f} prompts/s")
    return "; ".join(parts) or "nothing ran"


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
    parser.add_argument("--image-max-side", type=int, default=768, help="vlm and openai-image")
    parser.add_argument("--vlm-images", type=int, default=64)
    parser.add_argument("--vlm-single", type=int, default=16, help="images timed one at a time")
    parser.add_argument("--vlm-batch-sizes", type=int, nargs="+", default=[8])
    parser.add_argument("--openai-image-requests", type=int, default=1024)
    parser.add_argument("--openai-image-distinct", type=int, default=32, help="512x384 images")
    parser.add_argument("--openai-image-large", type=int, default=2, help="3000x2000 images")
    parser.add_argument("--latency-calls", type=int, default=40, help="calls timed for p50/p95")
    parser.add_argument("--skip", nargs="*", default=[], choices=PARTS)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--row", type=Path, help="also write OK<TAB>summary here (gpu_check.sh)")
    args = parser.parse_args()

    results: dict = {}
    if "rules" not in args.skip:
        bench_rules(results)
    if "openai" not in args.skip:
        bench_openai(args, results)
    if "openai-image" not in args.skip:
        bench_openai_image(args, results)
    if "hf" not in args.skip:
        bench_hf(args, results)
    if "vlm" not in args.skip:
        bench_vlm(args, results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.row:
        args.row.write_text(f"OK\t{summary(results)}\n")


if __name__ == "__main__":
    main()
