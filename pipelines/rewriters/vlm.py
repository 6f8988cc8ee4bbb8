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

from collections.abc import Iterator
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
_SPACE_MARKERS = " \t\n\u2581\u0120\u010a"  # whitespace, SentencePiece's "▁", byte-BPE's "Ġ" "Ċ"
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

    def conversation(self, template: PromptTemplate, text: str) -> list[dict[str, Any]]:
        """``template``'s messages for ``text`` with the image part, every content a list of
        parts (what processors' chat templates want). The model's own special tokens are taken
        out of ``text``: a keyword prompt with ``<image>`` in it would otherwise claim a second
        image (the processor refuses the count) or steer the chat format."""
        return template.vision_messages(self._without_special_tokens(text), {"type": "image"}, True)

    def _without_special_tokens(self, text: str) -> str:
        tokenizer = self.load().processor.tokenizer
        cleaned = text
        for token in sorted(set(tokenizer.all_special_tokens), key=len, reverse=True):
            if len(token) > 1:
                cleaned = cleaned.replace(token, " ")
        return text if cleaned == text else " ".join(cleaned.split())

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

    def _encode(self, prompts: list[str], images: list[Any]):
        """Model inputs for a batch: padded on the left, on the device; float inputs (pixel
        values, whatever else a family adds) in the model's dtype, integer ones (ids, masks,
        image grids and sizes) as they are."""
        loaded = self.load()
        encoded = loaded.processor(
            text=prompts, images=[[image] for image in images], padding=True, return_tensors="pt"
        )
        return encoded.to(loaded.device, dtype=loaded.dtype)

    def _batches(
        self, conversations: list[list[dict[str, Any]]], images: list[bytes | None]
    ) -> Iterator[tuple[list[int], Any, dict[int, ItemFailed]]]:
        """(indices, model inputs, failures) per batch of ``batch_size`` conversations, sorted by
        rendered length (less padding). Images that do not decode, and images the processor
        refuses (Qwen2-VL: an aspect ratio over 200, with a ``ValueError``), fail alone: the
        batch is encoded again without them. Anything else the processor raises (a bug, out of
        memory) stops the run."""
        decoded, failed = self._images(images)
        if failed:
            yield [], None, failed
        prompts = {i: self.render(conversations[i]) for i in decoded}
        order = sorted(prompts, key=lambda i: (len(prompts[i]), i))
        for chunk in batched(order, self.options.batch_size):
            refused: dict[int, ItemFailed] = {}
            try:
                encoded = self._encode([prompts[i] for i in chunk], [decoded[i] for i in chunk])
            except ValueError:
                for index in chunk:
                    try:
                        self._encode([prompts[index]], [decoded[index]])
                    except ValueError as error:
                        detail = f"the processor refused it: {error}"[:300]
                        refused[index] = ItemFailed("image-unprocessable", detail)
                chunk = [index for index in chunk if index not in refused]
                if not refused:
                    raise  # no one image is at fault: not the data's problem
                encoded = None
                if chunk:
                    encoded = self._encode([prompts[i] for i in chunk], [decoded[i] for i in chunk])
            yield chunk, encoded, refused

    # ----------------------------------------------------------------- rewriting
    def generate(self, requests: list[RewriteRequest], attempt: int) -> list[str | ItemFailed]:
        """One answer per request, greedy on the first attempt, sampled on retries."""
        import torch

        loaded = self.load()
        tokenizer = loaded.processor.tokenizer
        conversations = [self.conversation(self.template, r.complex_prompt) for r in requests]
        answers: list[str | ItemFailed] = [ItemFailed("not-generated")] * len(requests)
        sampling: dict[str, Any] = {"do_sample": False}
        if attempt > 0:
            sampling = {"do_sample": True, "temperature": self.options.retry_temperature}
        for chunk, encoded, failed in self._batches(conversations, [r.image for r in requests]):
            for index, failure in failed.items():
                answers[index] = failure
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
        """Token ids that start a "yes" and a "no" answer (see :func:`answer_token_ids`)."""
        ids = answer_token_ids(self.load().processor.tokenizer)
        if ids is None:
            raise InputError(f"vlm:{self.model}: its tokenizer cannot tell 'yes' from 'no'")
        return ids

    def yes_probability(
        self, conversations: list[list[dict[str, Any]]], images: list[bytes | None]
    ) -> list[float | ItemFailed]:
        """P(first answer token is "yes") / P("yes" or "no"), one forward pass per batch that
        keeps the last position's logits only (all of them would be batch x length x vocab:
        gigabytes for a 150k vocabulary)."""
        import torch

        loaded = self.load()
        yes_ids, no_ids = self.answer_token_ids()
        scores: list[float | ItemFailed] = [ItemFailed("not-judged")] * len(conversations)
        for chunk, encoded, failed in self._batches(conversations, images):
            for index, failure in failed.items():
                scores[index] = failure
            if not chunk:
                continue
            with torch.inference_mode():
                logits = self._last_logits(loaded.model, encoded).float()
            probabilities = logits.softmax(-1)
            yes = probabilities[:, yes_ids].sum(-1)
            no = probabilities[:, no_ids].sum(-1)
            for index, p_yes, p_no in zip(chunk, yes.tolist(), no.tolist(), strict=True):
                total = p_yes + p_no
                scores[index] = p_yes / total if total > 0 else 0.5
        return scores

    @staticmethod
    def _last_logits(model: Any, encoded: Any):
        try:
            output = model(**encoded, logits_to_keep=1)
        except TypeError:  # a model whose forward has no logits_to_keep
            output = model(**encoded)
        return output.logits[:, -1, :]


def answer_token_ids(tokenizer: Any) -> tuple[list[int], list[int]] | None:
    """(ids that start "yes", ids that start "no"): each spelling with and without a leading
    space, the first token of each that is not blank (SentencePiece tokenizers such as
    Llama-2's and Mistral's split " yes" into a bare "▁" and "▁yes"); None when the two sets
    are empty or share an id."""

    def first_ids(words: tuple[str, ...]) -> set[int]:
        ids = set()
        for word in words:
            for spelling in (word, " " + word):
                for token_id in tokenizer.encode(spelling, add_special_tokens=False):
                    piece = tokenizer.convert_ids_to_tokens(token_id) or ""
                    if tokenizer.decode([token_id]).strip() and piece.strip(_SPACE_MARKERS):
                        ids.add(token_id)
                        break
        return ids

    yes, no = first_ids(YES_WORDS), first_ids(NO_WORDS)
    if not yes or not no or yes & no:
        return None
    return sorted(yes), sorted(no)
