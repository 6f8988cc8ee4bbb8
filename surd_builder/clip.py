"""A CLIP model by path or hub id: normalised image and text embeddings, image-text cosines.

Shared by screening (``pipelines.screen``) and the adapter's evaluation (``adapter.evaluate``).
The checkpoint's ``model_type`` is checked first: ``CLIPModel.from_pretrained`` would load
another architecture with random weights where the names differ.
"""

from __future__ import annotations

from typing import Any

from surd_builder.errors import InputError
from surd_builder.models import (
    batched,
    check_hub_model,
    check_local_model,
    decode_rgb,
    load_pretrained,
    resolve_device,
    resolve_dtype,
)


def _features(output: Any):
    """transformers 5 returns a model output from ``get_*_features``; 4.x a tensor."""
    return output if hasattr(output, "norm") else output.pooler_output


class ClipScorer:
    def __init__(self, model: str, device: str = "auto", dtype: str = "auto", batch_size: int = 64):
        check_local_model(model, "CLIP model")
        self.model, self.device_option, self.dtype_option = model, device, dtype
        self.batch_size = batch_size
        self._loaded: tuple[Any, Any, str, Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_loaded": None}

    def load(self) -> tuple[Any, Any, str, Any]:
        if self._loaded is None:
            check_hub_model(self.model, "CLIP model")  # before importing torch
            from transformers import AutoConfig, AutoProcessor, CLIPModel

            device = resolve_device(self.device_option)
            dtype = resolve_dtype(self.dtype_option, device)
            config = load_pretrained(AutoConfig.from_pretrained, self.model, "CLIP model")
            if config.model_type != "clip":
                # CLIPModel would load it anyway, with random weights where the names differ
                raise InputError(
                    f"--clip-model {self.model} is a {config.model_type!r} model, not CLIP"
                )
            processor = load_pretrained(AutoProcessor.from_pretrained, self.model, "CLIP processor")
            model = load_pretrained(
                CLIPModel.from_pretrained, self.model, "CLIP model", dtype=dtype
            )
            self._loaded = (processor, model.to(device).eval(), device, dtype)
        return self._loaded

    def image_features(self, images: list[Any]) -> Any:
        """L2-normalised image embeddings (float32 tensor on the CPU) of RGB PIL images."""
        processor, model, device, dtype = self.load()  # first: fails before importing torch
        import torch

        rows = []
        for chunk in batched(images, self.batch_size):
            pixels = processor(images=chunk, return_tensors="pt")["pixel_values"]
            with torch.inference_mode():
                features = _features(
                    model.get_image_features(pixel_values=pixels.to(device, dtype))
                )
            rows.append(torch.nn.functional.normalize(features.float(), dim=-1).cpu())
        return torch.cat(rows) if rows else torch.zeros(0)

    def text_features(self, texts: list[str]) -> Any:
        """L2-normalised text embeddings (float32 tensor on the CPU), truncated to 77 tokens."""
        processor, model, device, _dtype = self.load()
        import torch

        rows = []
        for chunk in batched(texts, self.batch_size):
            tokens = processor(
                text=chunk, return_tensors="pt", padding=True, truncation=True, max_length=77
            )
            with torch.inference_mode():
                features = _features(
                    model.get_text_features(
                        input_ids=tokens["input_ids"].to(device),
                        attention_mask=tokens["attention_mask"].to(device),
                    )
                )
            rows.append(torch.nn.functional.normalize(features.float(), dim=-1).cpu())
        return torch.cat(rows) if rows else torch.zeros(0)

    def scores(self, images: list[bytes], texts: list[str]) -> list[float | None]:
        """Cosine similarity of each image with its text; None where the image cannot be read."""
        return self.scores_and_image_features(images, texts)[0]

    def scores_and_image_features(
        self, images: list[bytes], texts: list[str]
    ) -> tuple[list[float | None], list[Any]]:
        """:meth:`scores` and each image's L2-normalised embedding (a float32 CPU tensor; None
        where the image cannot be read): one pass over the images for the cosine and for what
        else reads the embedding (an aesthetic head, ``pipelines.aesthetic``)."""
        results: list[float | None] = [None] * len(images)
        embeddings: list[Any] = [None] * len(images)
        readable, _ = decode_rgb(images)  # unreadable images keep None
        for chunk in batched(readable, self.batch_size):
            image_features = self.image_features([image for _, image in chunk])
            text_features = self.text_features([texts[index] for index, _ in chunk])
            cosine = (image_features * text_features).sum(-1).tolist()
            for row, ((index, _), value) in enumerate(zip(chunk, cosine, strict=True)):
                results[index] = value
                embeddings[index] = image_features[row]
        return results, embeddings
