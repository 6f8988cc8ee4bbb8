"""``hf:<model id or path>``: a transformers causal LM run in-process.

Prompts are rendered with the model's chat template when it has one (instruction-tuned models)
and as a plain few-shot completion otherwise. Generation is batched with left padding (a
decoder-only model continues from the last position, so padding must sit on the left), sorted by
length to waste little on padding, and greedy on the first attempt so the output is reproducible;
retries of invalid answers sample instead, so they can differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from pipelines.base import WorkerNeeds
from pipelines.rewriters.base import ItemFailed, Rewriter, RewriteRequest
from pipelines.rewriters.template import DEFAULT_TEMPLATE, PromptTemplate
from surd_builder.models import (
    batched,
    check_hub_model,
    check_local_model,
    load_pretrained,
    resolve_device,
    resolve_dtype,
)


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int = 64
    batch_size: int = 16  # prompts per generate() call
    retry_temperature: float = 0.7
    device: str = "auto"
    dtype: str = "auto"


class HFCausalLMRewriter(Rewriter):
    backend: ClassVar[str] = "hf"

    def __init__(
        self,
        model: str,
        template: PromptTemplate = DEFAULT_TEMPLATE,
        options: GenerationOptions | None = None,
    ):
        check_local_model(model, "language model")
        super().__init__(model)
        self.template = template
        self.options = options or GenerationOptions()
        self._loaded: tuple[Any, Any, str] | None = None
        self.generate_calls = 0  # batches passed to model.generate (read by tests and benches)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_loaded"] = None  # each worker loads its own copy
        return state

    def identity(self) -> dict[str, Any]:
        return {
            **super().identity(),
            "template": self.template.digest(),
            "max_new_tokens": self.options.max_new_tokens,
            "dtype": self.options.dtype,
        }

    def worker_needs(self) -> WorkerNeeds:
        return WorkerNeeds(device=self.options.device)

    def load(self) -> tuple[Any, Any, str]:
        """(tokenizer, model, device), loaded on first use and kept."""
        if self._loaded is None:
            check_hub_model(self.model, "language model")  # before importing torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            device = resolve_device(self.options.device)
            dtype = resolve_dtype(self.options.dtype, device)
            tokenizer = load_pretrained(AutoTokenizer.from_pretrained, self.model, "tokenizer")
            tokenizer.padding_side = "left"
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            model = load_pretrained(
                AutoModelForCausalLM.from_pretrained, self.model, "language model", dtype=dtype
            )
            model.to(device).eval()
            self._loaded = (tokenizer, model, device)
        return self._loaded

    def render(self, tokenizer: Any, complex_prompt: str, caption: str = "") -> str:
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(
                self.template.messages(complex_prompt, caption),
                tokenize=False,
                add_generation_prompt=True,
            )
        return self.template.plain_text(complex_prompt, caption)

    def generate(self, requests: list[RewriteRequest], attempt: int) -> list[str | ItemFailed]:
        tokenizer = self.load()[0]
        prompts = [self.render(tokenizer, r.complex_prompt, r.caption) for r in requests]
        return self.generate_texts(prompts, attempt)

    def generate_texts(self, prompts: list[str], attempt: int) -> list[str | ItemFailed]:
        """Continue each rendered prompt; answers in the order of ``prompts``."""
        import torch

        tokenizer, model, device = self.load()
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        answers: list[str | ItemFailed] = [ItemFailed("not-generated")] * len(prompts)
        sampling: dict[str, Any] = {"do_sample": False}
        if attempt > 0:
            sampling = {"do_sample": True, "temperature": self.options.retry_temperature}
        for chunk in batched(order, self.options.batch_size):
            # the chat template already adds the BOS token where the model wants one
            encoded = tokenizer(
                [prompts[i] for i in chunk],
                return_tensors="pt",
                padding=True,
                add_special_tokens=not getattr(tokenizer, "chat_template", None),
            ).to(device)
            with torch.inference_mode():
                output = model.generate(
                    **encoded,
                    max_new_tokens=self.options.max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                    **sampling,
                )
            self.generate_calls += 1
            new_tokens = output[:, encoded["input_ids"].shape[1] :]
            for index, text in zip(
                chunk, tokenizer.batch_decode(new_tokens, skip_special_tokens=True), strict=True
            ):
                answers[index] = text
        return answers
