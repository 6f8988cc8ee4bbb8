"""LLM features of narrative prompts, computed once and cached.

The SUR-adapter distils from one transformer block of an LLM: the released vectors are LLaMA-13B
block 40 of 40, *before* the final norm, mean-pooled over the prompt's tokens. transformers'
``output_hidden_states`` gives the last block's output *after* the final norm for Llama-style
models, so the block's output is taken with a forward hook on the block itself: block ``N`` of
any depth means the same thing for every architecture.

:class:`FeatureCache` keeps the vectors on disk keyed by (model, layer, pooling, text): a second
run computes nothing, a change of layer or pooling computes everything again, and parts are
written atomically batch by batch, so a killed run resumes with what it had.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.models import batched, load_pretrained, resolve_device, resolve_dtype
from surd_builder.atomic import write_parquet_atomic
from surd_builder.errors import InputError
from surd_builder.workspace import part_name

POOLINGS = ("mean", "last")


def decoder_blocks(model: Any) -> Any:
    """The list of transformer blocks of a causal LM (Llama/Qwen/Mistral, GPT-2 style)."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        module = model
        for name in path.split("."):
            module = getattr(module, name, None)
            if module is None:
                break
        if module is not None:
            return module
    raise InputError(f"cannot find the transformer blocks of a {type(model).__name__}")


class LLMFeatureExtractor:
    """Pooled output of block ``layer`` (1-based, 1..number of blocks) for each text."""

    def __init__(
        self,
        model: str,
        layer: int,
        pooling: str = "mean",
        batch_size: int = 32,
        device: str = "auto",
        dtype: str = "auto",
    ):
        if pooling not in POOLINGS:
            raise InputError(f"pooling must be one of: {', '.join(POOLINGS)}")
        self.model, self.layer, self.pooling, self.batch_size = model, layer, pooling, batch_size
        self.device_option, self.dtype_option = device, dtype
        self._loaded: tuple[Any, Any, str] | None = None
        self.computed = 0  # texts run through the model by this object (tests, reports)

    def cache_identity(self) -> str:
        return f"{self.model}\x1f{self.layer}\x1f{self.pooling}"

    def load(self) -> tuple[Any, Any, str]:
        if self._loaded is None:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            device = resolve_device(self.device_option)
            dtype = resolve_dtype(self.dtype_option, device)
            tokenizer = load_pretrained(AutoTokenizer.from_pretrained, self.model, "tokenizer")
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            model = load_pretrained(
                AutoModelForCausalLM.from_pretrained, self.model, "language model", dtype=dtype
            )
            blocks = decoder_blocks(model)
            if not 1 <= self.layer <= len(blocks):
                raise InputError(
                    f"--llm-layer {self.layer} is out of range: {self.model} has blocks "
                    f"1..{len(blocks)}"
                )
            self._loaded = (tokenizer, model.to(device).eval(), device)
        return self._loaded

    def __call__(self, texts: list[str]) -> np.ndarray:
        """(len(texts), hidden) float32."""
        import torch

        tokenizer, model, device = self.load()
        block = decoder_blocks(model)[self.layer - 1]
        captured: dict[str, Any] = {}

        def keep_output(_module, _inputs, output) -> None:
            captured["hidden"] = output[0] if isinstance(output, tuple) else output

        rows = []
        handle = block.register_forward_hook(keep_output)
        try:
            for chunk in batched(texts, self.batch_size):
                encoded = tokenizer(chunk, return_tensors="pt", padding=True).to(device)
                with torch.inference_mode():
                    model(**encoded)
                hidden = captured["hidden"].float()
                mask = encoded["attention_mask"].unsqueeze(-1).float()
                if self.pooling == "mean":
                    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
                else:  # the last real token, wherever padding sits
                    positions = torch.arange(mask.shape[1], device=mask.device)
                    last = (encoded["attention_mask"] * positions).argmax(dim=1)
                    pooled = hidden[torch.arange(hidden.shape[0]), last]
                rows.append(pooled.cpu().numpy())
                self.computed += len(chunk)
        finally:
            handle.remove()
        return np.concatenate(rows).astype(np.float32) if rows else np.zeros((0, 0), np.float32)


class FeatureCache:
    """Vectors on disk, keyed by sha256(identity + text); parts written atomically."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    @staticmethod
    def key(identity: str, text: str) -> str:
        return hashlib.sha256(f"{identity}\x1f{text}".encode()).hexdigest()

    def read(self, keys: set[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        for part in sorted(self.folder.glob("part-*.parquet")):
            table = pq.read_table(part)
            for key, vector in zip(
                table["key"].to_pylist(),
                table["vector"].to_numpy(zero_copy_only=False),
                strict=True,
            ):
                if key in keys:
                    found[key] = np.asarray(vector, dtype=np.float32)
        return found

    def write(self, keys: list[str], vectors: np.ndarray) -> None:
        if not keys:
            return
        table = pa.table({"key": keys, "vector": pa.array(list(vectors), pa.list_(pa.float32()))})
        write_parquet_atomic(table, self.folder / part_name("part"))


def cached_features(
    texts: list[str], extractor: LLMFeatureExtractor, cache: FeatureCache, batch_size: int = 256
) -> np.ndarray:
    """Features of ``texts`` in order, computing only what the cache lacks, batch by batch
    (each batch is written before the next starts, so a killed run keeps its work)."""
    identity = extractor.cache_identity()
    keys = [FeatureCache.key(identity, text) for text in texts]
    found = cache.read(set(keys))
    missing = list(dict.fromkeys(k for k in keys if k not in found))
    text_of = dict(zip(keys, texts, strict=True))
    for chunk in batched(missing, batch_size):
        vectors = extractor([text_of[k] for k in chunk])
        cache.write(chunk, vectors)
        found.update(zip(chunk, vectors, strict=True))
    return np.stack([found[k] for k in keys]) if keys else np.zeros((0, 0), np.float32)
