"""``caption:<model id or path>``: the narrative written from the image alone.

This is the route SURD itself took: an image-captioning model (BLIP, BLIP-2 and the other
``image-text-to-text`` models transformers loads with ``AutoModelForImageTextToText``) describes
what is visible, which the keyword prompt often does not (it names styles and artists, not the
content). With ``--merge-with hf:...`` or ``--merge-with openai:...`` a language model then merges
the caption with the keyword prompt (template placeholders ``{caption}`` and ``{keyword_prompt}``),
keeping the caption's facts and the prompt's names and details that agree with it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

from pipelines.base import WorkerNeeds, shared_device
from pipelines.rewriters.base import ItemFailed, Rewriter, RewriteRequest
from surd_builder.models import (
    batched,
    check_hub_model,
    check_local_model,
    decode_rgb,
    load_pretrained,
    resolve_device,
    resolve_dtype,
)


@dataclass(frozen=True)
class CaptionOptions:
    prompt: str = ""  # conditional captioning text, e.g. "a picture of" (BLIP)
    max_new_tokens: int = 64
    batch_size: int = 16
    retry_temperature: float = 0.7
    device: str = "auto"
    dtype: str = "auto"


class CaptionRewriter(Rewriter):
    backend: ClassVar[str] = "caption"
    uses_image: ClassVar[bool] = True

    def __init__(
        self, model: str, options: CaptionOptions | None = None, merge: Rewriter | None = None
    ):
        check_local_model(model, "captioning model")
        super().__init__(model)
        self.options = options or CaptionOptions()
        if merge is not None and merge.uses_image:
            raise ValueError("the merge pass must be a language model, not another captioner")
        self.merge = merge
        self._loaded: tuple[Any, Any, str, Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_loaded"] = None
        return state

    @property
    def origin(self) -> str:
        if self.merge is None:
            return super().origin
        return f"{super().origin}+{self.merge.origin}"

    def worker_needs(self) -> WorkerNeeds:
        merge_device = self.merge.worker_needs().device if self.merge is not None else None
        return WorkerNeeds(device=shared_device(self.options.device, merge_device))

    def environment(self) -> tuple[str, ...]:
        return self.merge.environment() if self.merge is not None else ()

    def identity(self) -> dict[str, Any]:
        return {
            **super().identity(),
            "prompt": self.options.prompt,
            "max_new_tokens": self.options.max_new_tokens,
            "dtype": self.options.dtype,
            "merge": self.merge.identity() if self.merge is not None else None,
        }

    def check_reachable(self) -> None:
        if self.merge is not None:
            self.merge.check_reachable()

    def load(self) -> tuple[Any, Any, str, Any]:
        if self._loaded is None:
            self.check_reachable()  # a merge server that is down fails before minutes of loading
            check_hub_model(self.model, "captioning model")  # before importing torch
            from transformers import AutoModelForImageTextToText, AutoProcessor

            device = resolve_device(self.options.device)
            dtype = resolve_dtype(self.options.dtype, device)
            processor = load_pretrained(AutoProcessor.from_pretrained, self.model, "processor")
            model = load_pretrained(
                AutoModelForImageTextToText.from_pretrained,
                self.model,
                "captioning model",
                dtype=dtype,
            )
            model.to(device).eval()
            self._loaded = (processor, model, device, dtype)
        return self._loaded

    def caption(self, images: list[bytes], attempt: int) -> list[str | ItemFailed]:
        """One caption per encoded image (an undecodable image fails alone)."""
        processor, model, device, dtype = self.load()  # first: fails before importing torch
        import torch

        captions: list[str | ItemFailed] = [ItemFailed("not-captioned")] * len(images)
        decoded, failed = decode_rgb(images)
        for index, error in failed.items():
            captions[index] = ItemFailed("image-unreadable", error)
        sampling: dict[str, Any] = {"do_sample": False}
        if attempt > 0:
            sampling = {"do_sample": True, "temperature": self.options.retry_temperature}
        for chunk in batched(decoded, self.options.batch_size):
            inputs: dict[str, Any] = {"images": [image for _, image in chunk]}
            if self.options.prompt:
                inputs["text"] = [self.options.prompt] * len(chunk)
            encoded = processor(**inputs, return_tensors="pt").to(device)
            encoded["pixel_values"] = encoded["pixel_values"].to(dtype)
            with torch.inference_mode():
                output = model.generate(
                    **encoded, max_new_tokens=self.options.max_new_tokens, **sampling
                )
            texts = processor.batch_decode(output, skip_special_tokens=True)
            for (index, _), text in zip(chunk, texts, strict=True):
                captions[index] = self._without_prompt(text.strip())
        return captions

    def _without_prompt(self, caption: str) -> str:
        """Conditional captioners repeat their prompt ("a picture of ..."): drop it."""
        prompt = self.options.prompt.strip()
        if prompt and caption.lower().startswith(prompt.lower()):
            return caption[len(prompt) :].strip()
        return caption

    def generate(self, requests: list[RewriteRequest], attempt: int) -> list[str | ItemFailed]:
        missing = [i for i, r in enumerate(requests) if r.image is None]
        captions = self.caption([r.image or b"" for r in requests], attempt)
        for index in missing:
            captions[index] = ItemFailed("no-image", "the sample has no stored image")
        if self.merge is None:
            return captions
        answers: list[str | ItemFailed] = list(captions)
        captioned = [i for i, c in enumerate(captions) if isinstance(c, str)]
        merge_requests = [replace(requests[i], image=None, caption=captions[i]) for i in captioned]
        if merge_requests:
            merged = self.merge.generate(merge_requests, attempt)
            for index, answer in zip(captioned, merged, strict=True):
                answers[index] = answer
        return answers
