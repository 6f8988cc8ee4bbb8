"""``vlm:<model id or path>``: a vision-language chat model run in-process.

One call sees the image and the keyword prompt (Qwen2-VL/Qwen2.5-VL, SmolVLM/Idefics3,
LLaVA-style models: whatever transformers loads with ``AutoProcessor`` and
``AutoModelForImageTextToText``). The user turn is the template's, with the image where
``{image}`` stands, rendered by the processor's own chat template, so each family gets its image
tokens where it expects them.

Batches are padded on the left (generation continues from the last position of every row) and
sorted by prompt length; the first attempt decodes greedily, so it is reproducible, and retries of
invalid answers sample. A batch of several conversations gives the same tokens as each one alone:
the attention mask hides the padding, and the models compute their (multimodal) position ids from
it.

:meth:`VLMRewriter.yes_probability` is the judge's route (``surd build screen --judge vlm:...``):
one forward pass, the first answer token's probability of "yes" against "no".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from pipelines.base import WorkerNeeds
from pipelines.rewriters.base import ItemFailed, Rewriter, RewriteRequest
from pipelines.rewriters.template import DEFAULT_VISION_TEMPLATE, PromptTemplate
from pipelines.rewriters.vision import DEFAULT_IMAGE_MAX_SIDE, model_image
from surd_builder.errors import InputError
from surd_builder.models import (
    batched,
    check_hub_model,
    check_local_model,
    load_pretrained,
    resolve_device,
    resolve_dtype,
)

YES_WORDS = ("yes", "Yes", "YES")
# what a processor raises for an input it cannot take (one image; the others still can)
PROCESSOR_ERRORS = (ValueError, TypeError, IndexError, RuntimeError)
NO_WORDS = ("no", "No", "NO")


@dataclass(frozen=True)
class VLMOptions:
    max_new_tokens: int = 64
    batch_size: int = 8  # conversations per generate() call (images cost many tokens each)
    retry_temperature: float = 0.7
    image_max_side: int = DEFAULT_IMAGE_MAX_SIDE
    device: str = "auto"
    dtype: str = "auto"


@dataclass
class _Loaded:
    processor: Any
    model: Any
    device: str
    dtype: Any


class VLMRewriter(Rewriter):
    backend: ClassVar[str] = "vlm"
    uses_image: ClassVar[bool] = True

    def __init__(
        self,
        model: str,
        template: PromptTemplate = DEFAULT_VISION_TEMPLATE,
        options: VLMOptions | None = None,
    ):
        check_local_model(model, "vision-language model")
        super().__init__(model)
        self.template = template
        self.options = options or VLMOptions()
        self._loaded: _Loaded | None = None
        self.generate_calls = 0  # batches passed to model.generate (read by tests and benches)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_loaded": None}  # each worker loads its own copy

    def identity(self) -> dict[str, Any]:
        return {
            **super().identity(),
            "template": self.template.digest(),
            "max_new_tokens": self.options.max_new_tokens,
            "image_max_side": self.options.image_max_side,
            "dtype": self.options.dtype,
        }

    def worker_needs(self) -> WorkerNeeds:
        return WorkerNeeds(device=self.options.device)

    def load(self) -> _Loaded:
        """Processor and model, loaded on first use and kept. A model without an image
        processor (a text-only LM) is a one-line error."""
        if self._loaded is None:
            check_hub_model(self.model, "vision-language model")  # before importing torch
            from transformers import AutoModelForImageTextToText, AutoProcessor

            device = resolve_device(self.options.device)
            dtype = resolve_dtype(self.options.dtype, device)
            processor = self._load_processor(AutoProcessor)
            tokenizer = getattr(processor, "tokenizer", None)
            if getattr(processor, "image_processor", None) is None or tokenizer is None:
                raise InputError(
                    f"vlm:{self.model} has no image processor: it is not a vision-language "
                    "model (use hf:<model> for a text-only language model)"
                )
            if not getattr(processor, "chat_template", None):
                raise InputError(
                    f"vlm:{self.model} has no chat template: give an instruction-tuned "
                    "vision-language chat model (or caption:<model> for a plain captioner)"
                )
            tokenizer.padding_side = "left"
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            model = load_pretrained(
                AutoModelForImageTextToText.from_pretrained,
                self.model,
                "vision-language model",
                dtype=dtype,
            )
            model.to(device).eval()
            self._loaded = _Loaded(processor, model, device, dtype)
        return self._loaded

    def _load_processor(self, auto_processor: Any) -> Any:
        try:
            return load_pretrained(auto_processor.from_pretrained, self.model, "processor")
        except InputError as error:
            if "torchvision" not in str(error).lower():
                raise
            import torch

            # Qwen2-VL/2.5-VL, SmolVLM and other processors with a video part need it
            raise InputError(
                f"vlm:{self.model}: its processor needs torchvision, which is not installed "
                f"(pip install the torchvision build that matches torch {torch.__version__})"
            ) from None

    # ----------------------------------------------------------------- rendering
    def render(self, messages: list[dict[str, Any]]) -> str:
        return self.load().processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )

    def conversation(self, keyword_prompt: str) -> list[dict[str, Any]]:
        # processors' chat templates want every content as a list of parts
        return self.template.vision_messages(keyword_prompt, {"type": "image"}, True)

    def _images(self, images: list[bytes | None]) -> tuple[dict[int, Any], dict[int, ItemFailed]]:
        decoded: dict[int, Any] = {}
        failed: dict[int, ItemFailed] = {}
        for index, data in enumerate(images):
            if data is None:
                failed[index] = ItemFailed("no-image", "the sample has no stored image")
                continue
            try:
                decoded[index] = model_image(data, self.options.image_max_side)
            except ItemFailed as failure:
                failed[index] = failure
        return decoded, failed

    def _encode_chunk(
        self, chunk: list[int], prompts: dict[int, str], images: dict[int, Any]
    ) -> tuple[Any, list[int], dict[int, ItemFailed]]:
        """(model inputs, the indices they hold, failures) for one batch. A processor that
        refuses one image (Qwen2-VL: an aspect ratio over 200; a size its tiling cannot take)
        fails that item alone: the batch is encoded again without it."""
        try:
            return self._encode([prompts[i] for i in chunk], [images[i] for i in chunk]), chunk, {}
        except PROCESSOR_ERRORS:
            pass
        failed: dict[int, ItemFailed] = {}
        for index in chunk:
            try:
                self._encode([prompts[index]], [images[index]])
            except PROCESSOR_ERRORS as error:
                detail = f"{type(error).__name__}: {error}"[:300]
                failed[index] = ItemFailed("image-unprocessable", detail)
        kept = [index for index in chunk if index not in failed]
        if not kept:
            return None, [], failed
        return self._encode([prompts[i] for i in kept], [images[i] for i in kept]), kept, failed

    def _encode(self, prompts: list[str], images: list[Any]):
        loaded = self.load()
        encoded = loaded.processor(
            text=prompts, images=[[image] for image in images], padding=True, return_tensors="pt"
        ).to(loaded.device)
        for name in ("pixel_values", "pixel_values_videos"):
            if name in encoded and encoded[name].is_floating_point():
                encoded[name] = encoded[name].to(loaded.dtype)
        return encoded

    # ----------------------------------------------------------------- rewriting
    def generate(self, requests: list[RewriteRequest], attempt: int) -> list[str | ItemFailed]:
        answers: list[str | ItemFailed] = [ItemFailed("not-generated")] * len(requests)
        decoded, failed = self._images([r.image for r in requests])
        for index, failure in failed.items():
            answers[index] = failure
        prompts = {i: self.render(self.conversation(requests[i].complex_prompt)) for i in decoded}
        texts = self.generate_texts(prompts, decoded, attempt)
        for index, text in texts.items():
            answers[index] = text
        return answers

    def generate_texts(
        self, prompts: dict[int, str], images: dict[int, Any], attempt: int
    ) -> dict[int, str | ItemFailed]:
        """Continue each rendered prompt with its image; answers by the same keys (a failure
        for an image the processor refuses)."""
        import torch

        loaded = self.load()
        tokenizer = loaded.processor.tokenizer
        order = sorted(prompts, key=lambda i: (len(prompts[i]), i))
        sampling: dict[str, Any] = {"do_sample": False}
        if attempt > 0:
            sampling = {"do_sample": True, "temperature": self.options.retry_temperature}
        answers: dict[int, str | ItemFailed] = {}
        for chunk in batched(order, self.options.batch_size):
            encoded, chunk, failed = self._encode_chunk(chunk, prompts, images)
            answers.update(failed)
            if not chunk:
                continue
            with torch.inference_mode():
                output = loaded.model.generate(
                    **encoded,
                    max_new_tokens=self.options.max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                    **sampling,
                )
            self.generate_calls += 1
            new_tokens = output[:, encoded["input_ids"].shape[1] :]
            texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for index, text in zip(chunk, texts, strict=True):
                answers[index] = text
        return answers

    # ----------------------------------------------------------------- judging
    def answer_token_ids(self) -> tuple[list[int], list[int]]:
        """Token ids that start a "yes" and a "no" answer (each spelling, with and without a
        leading space, as the tokenizer splits them)."""
        tokenizer = self.load().processor.tokenizer

        def first_ids(words: tuple[str, ...]) -> list[int]:
            ids = set()
            for word in words:
                for spelling in (word, " " + word):
                    encoded = tokenizer.encode(spelling, add_special_tokens=False)
                    if encoded:
                        ids.add(encoded[0])
            return sorted(ids)

        yes, no = first_ids(YES_WORDS), first_ids(NO_WORDS)
        if not yes or not no or set(yes) & set(no):
            raise InputError(f"vlm:{self.model}: its tokenizer cannot tell 'yes' from 'no'")
        return yes, no

    def yes_probability(
        self, conversations: list[list[dict[str, Any]]], images: list[bytes | None]
    ) -> list[float | ItemFailed]:
        """P(first answer token is "yes") / P("yes" or "no"), one forward pass per batch."""
        import torch

        loaded = self.load()
        yes_ids, no_ids = self.answer_token_ids()
        scores: list[float | ItemFailed] = [ItemFailed("not-judged")] * len(conversations)
        decoded, failed = self._images(images)
        for index, failure in failed.items():
            scores[index] = failure
        prompts = {i: self.render(conversations[i]) for i in decoded}
        order = sorted(prompts, key=lambda i: (len(prompts[i]), i))
        for chunk in batched(order, self.options.batch_size):
            encoded, chunk, failed = self._encode_chunk(chunk, prompts, decoded)
            for index, failure in failed.items():
                scores[index] = failure
            if not chunk:
                continue
            with torch.inference_mode():
                logits = loaded.model(**encoded).logits[:, -1, :].float()
            probabilities = logits.softmax(-1)
            yes = probabilities[:, yes_ids].sum(-1)
            no = probabilities[:, no_ids].sum(-1)
            for index, p_yes, p_no in zip(chunk, yes.tolist(), no.tolist(), strict=True):
                total = p_yes + p_no
                scores[index] = p_yes / total if total > 0 else 0.5
        return scores
