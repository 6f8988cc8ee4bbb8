"""A vision-language judge for screening: does the narrative say what the image shows?

``surd build screen --judge vlm:<model>`` or ``--judge openai:<base URL> --with-image`` asks the
model one yes/no question per sample (the image, then the narrative) and stores ``judge_score``:
the probability of "yes" against "no" where the backend gives it (an in-process model's first
token logits; a server's ``top_logprobs``), else 1.0 or 0.0 parsed from the answer's first word.
A CLIP cosine says whether image and text are *near*; a judge reads the sentence and catches what
CLIP misses (wrong counts, wrong colours, things the image does not show).

The judge reuses the rewriters' clients (:class:`VLMRewriter` and :class:`OpenAIChatRewriter`):
loading, devices, retries, key handling and the image check before any work are theirs.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from typing import Any

from pipelines.base import WorkerNeeds
from pipelines.rewriters import chat_options, parse_spec, vlm_options
from pipelines.rewriters.base import ItemFailed
from pipelines.rewriters.template import PromptTemplate
from surd_builder.config import ScreenSettings
from surd_builder.errors import InputError

# The question; ``{keyword_prompt}`` holds the narrative here (the template's one text slot).
JUDGE_TEMPLATE = PromptTemplate(
    system=(
        "You check image descriptions for a text-to-image dataset. Answer with one word: yes or no."
    ),
    user=(
        "{image}Sentence: {keyword_prompt}\n"
        "Does this sentence describe what the image shows (its subjects, how many, their "
        "colours, what they do, the setting) without saying anything the image does not show? "
        "Answer yes or no."
    ),
)
TOP_LOGPROBS = 10
# a few tokens, not one: servers without logprobs answer "Yes." and are parsed
JUDGE_FIELDS = {"max_tokens": 4, "logprobs": True, "top_logprobs": TOP_LOGPROBS}
_FIRST_WORD = re.compile(r"[a-z]+")


class Judge(ABC):
    """Scores (image, narrative) pairs in 0..1; a failed pair is an :class:`ItemFailed`."""

    def __init__(self, spec: str):
        self.spec = spec

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """What changes the scores (part of the screening key)."""

    @abstractmethod
    def scores(self, images: list[bytes | None], narratives: list[str]) -> list[float | ItemFailed]:
        """One score (or failure) per pair, in order."""

    def worker_needs(self) -> WorkerNeeds:
        return WorkerNeeds()

    def environment(self) -> tuple[str, ...]:
        return ()

    def check_reachable(self) -> None:
        """A server that is down or refuses images stops the run before any work."""
        return None


class VLMJudge(Judge):
    def __init__(self, spec: str, rewriter: Any):
        super().__init__(spec)
        self.rewriter = rewriter  # a VLMRewriter, for its loading, rendering and batching

    def identity(self) -> dict[str, Any]:
        return {
            "judge": "vlm",
            "model": self.rewriter.model,
            "template": JUDGE_TEMPLATE.digest(),
            "image_max_side": self.rewriter.options.image_max_side,
            "dtype": self.rewriter.options.dtype,
        }

    def worker_needs(self) -> WorkerNeeds:
        return self.rewriter.worker_needs()

    @property
    def device_option(self) -> str:
        return self.rewriter.options.device

    def scores(self, images: list[bytes | None], narratives: list[str]) -> list[float | ItemFailed]:
        conversations = [self.rewriter.conversation(JUDGE_TEMPLATE, n) for n in narratives]
        return self.rewriter.yes_probability(conversations, images)


def _word(token: Any) -> str:
    """A token as a lowercase word: whitespace and the tokenizers' space markers (SentencePiece's
    "\u2581", byte-level BPE's "\u0120" and "\u010a") and trailing punctuation removed."""
    return str(token or "").strip(" \t\n\u2581\u0120\u010a").rstrip(".!,").lower()


def logprob_score(document: dict[str, Any]) -> float:
    """P(yes) / P(yes or no) from a chat completion: the first token's ``top_logprobs`` where the
    server sent them, else the answer's first word (yes: 1.0, no: 0.0)."""
    choice = document["choices"][0]
    content = (choice.get("logprobs") or {}).get("content") or []
    # the first position that is not blank: a model may open with a space or a newline token
    first = next((entry for entry in content if _word(entry.get("token"))), None)
    if first is not None:
        candidates = first.get("top_logprobs") or [first]
        totals = {"yes": 0.0, "no": 0.0}
        for candidate in candidates:
            word = _word(candidate.get("token"))
            if word in totals and candidate.get("logprob") is not None:
                totals[word] += math.exp(float(candidate["logprob"]))
        if totals["yes"] + totals["no"] > 0:
            return totals["yes"] / (totals["yes"] + totals["no"])
    text = (choice["message"]["content"] or "").strip().lower()
    word = _FIRST_WORD.match(text)
    if word and word.group() in ("yes", "no"):
        return 1.0 if word.group() == "yes" else 0.0
    raise ItemFailed("judge-unparsed", text[:100] or "empty answer")


class OpenAIJudge(Judge):
    def __init__(self, spec: str, client: Any):
        super().__init__(spec)
        self.client = client  # an OpenAIChatRewriter with with_image: its HTTP client
        # the image check asks for logprobs too: a server refusing them (a hosted reasoning
        # model) stops the run at once instead of failing every sample
        client.probe_fields = {"logprobs": True, "top_logprobs": TOP_LOGPROBS}

    def identity(self) -> dict[str, Any]:
        return {
            "judge": "openai",
            "model": self.client.model,
            "template": JUDGE_TEMPLATE.digest(),
            "image_max_side": self.client.options.image_max_side,
        }

    @property
    def device_option(self) -> None:
        return None

    def worker_needs(self) -> WorkerNeeds:
        return self.client.worker_needs()

    def environment(self) -> tuple[str, ...]:
        return self.client.environment()

    def check_reachable(self) -> None:
        self.client.check_reachable()

    def scores(self, images: list[bytes | None], narratives: list[str]) -> list[float | ItemFailed]:
        conversations = [
            self.client.vision_conversation(JUDGE_TEMPLATE, narrative, image)
            for image, narrative in zip(images, narratives, strict=True)
        ]
        return self.client.complete_all(conversations, 0, JUDGE_FIELDS, logprob_score)


def make_judge(spec: str, settings: ScreenSettings) -> Judge:
    """The judge ``--judge`` names; loads nothing yet."""
    backend, target = parse_spec(spec)
    if backend == "vlm":
        from pipelines.rewriters.vlm import VLMRewriter

        options = vlm_options(settings, settings.judge_batch_size)
        return VLMJudge(spec, VLMRewriter(target, JUDGE_TEMPLATE, options))
    if backend == "openai":
        if not settings.judge_model:
            raise InputError("--judge openai:... needs --judge-model (the name the server serves)")
        if not settings.with_image:
            raise InputError(
                "--judge openai:... needs --with-image: the judge compares the narrative with "
                "the image, so the server's model must see it"
            )
        from pipelines.rewriters.openai_chat import OpenAIChatRewriter

        options = chat_options(settings, with_image=True)
        client = OpenAIChatRewriter(target, settings.judge_model, JUDGE_TEMPLATE, options)
        return OpenAIJudge(spec, client)
    raise InputError(f"--judge takes vlm:<model> or openai:<base URL>, not {spec!r}")
