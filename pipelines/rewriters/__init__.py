"""Rewriting backends: keyword prompt (and image) -> narrative prompt.

``--rewriter`` picks one: ``rules``, ``hf:<model>``, ``openai:<base URL>``, ``caption:<model>``.
Each module holds one backend; :mod:`.base` is the interface, :mod:`.template` the instruction,
:mod:`.cleaning` the output checks they all share. :func:`make_rewriter` is the one place that
maps a spec string to a backend.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from pipelines.rewriters.base import ItemFailed, Rewriter, RewriteRequest, RewriterUnavailable
from pipelines.rewriters.template import (
    DEFAULT_MERGE_TEMPLATE,
    DEFAULT_TEMPLATE,
    PromptTemplate,
    load_template,
)
from surd_builder.errors import InputError

__all__ = [
    "ItemFailed",
    "RewriteRequest",
    "Rewriter",
    "RewriterSettings",
    "RewriterUnavailable",
    "make_rewriter",
]

BACKENDS = ("rules", "hf", "openai", "caption")


@dataclass(frozen=True)
class RewriterSettings:
    """Backend options from the command line or ``surd.toml`` (each backend takes its own)."""

    model: str = ""  # openai: the served model name
    template: Path | None = None
    merge_template: Path | None = None
    merge_with: str = ""  # caption: an hf:/openai: spec for the merge pass
    caption_prompt: str = ""
    device: str = "auto"
    dtype: str = "auto"
    max_new_tokens: int = 64
    generation_batch_size: int = 16
    concurrency: int = 8
    api_key_env: str = "OPENAI_API_KEY"
    request_timeout: float = 120.0
    retries: int = 4


def parse_spec(spec: str) -> tuple[str, str]:
    """``"hf:Qwen/Qwen2.5-0.5B-Instruct"`` -> ``("hf", "Qwen/Qwen2.5-0.5B-Instruct")``."""
    backend, _, target = spec.partition(":")
    if backend not in BACKENDS:
        raise InputError(
            f"unknown rewriter {spec!r}: use rules, hf:<model>, openai:<base URL> or "
            "caption:<model>"
        )
    if backend == "rules":
        if target:
            raise InputError("the rules rewriter takes no model ('--rewriter rules')")
    elif not target:
        raise InputError(f"--rewriter {backend}: needs a target, e.g. {backend}:<model or URL>")
    return backend, target


def make_rewriter(
    spec: str, settings: RewriterSettings | None = None, template: PromptTemplate | None = None
) -> Rewriter:
    """The backend ``spec`` names, configured from ``settings`` (``template`` overrides the
    settings' template file). Loads nothing yet: models and connections open on first use, in
    whichever process runs the batch."""
    settings = settings or RewriterSettings()
    backend, target = parse_spec(spec)
    if template is None:
        template = load_template(settings.template) if settings.template else DEFAULT_TEMPLATE
    if backend == "rules":
        from pipelines.rewriters.rules import RulesRewriter

        return RulesRewriter()
    if backend == "hf":
        from pipelines.rewriters.hf import GenerationOptions, HFCausalLMRewriter

        options = GenerationOptions(
            max_new_tokens=settings.max_new_tokens,
            batch_size=settings.generation_batch_size,
            device=settings.device,
            dtype=settings.dtype,
        )
        return HFCausalLMRewriter(target, template, options)
    if backend == "openai":
        from pipelines.rewriters.openai_chat import ChatOptions, OpenAIChatRewriter

        options = ChatOptions(
            concurrency=settings.concurrency,
            max_tokens=settings.max_new_tokens,
            retries=settings.retries,
            read_timeout=settings.request_timeout,
            api_key_env=settings.api_key_env,
        )
        return OpenAIChatRewriter(target, settings.model, template, options)
    from pipelines.rewriters.caption import CaptionOptions, CaptionRewriter

    merge = None
    if settings.merge_with:
        if parse_spec(settings.merge_with)[0] not in ("hf", "openai"):
            raise InputError("--merge-with must be an hf:<model> or openai:<base URL> rewriter")
        merge_template = (
            load_template(settings.merge_template)
            if settings.merge_template
            else DEFAULT_MERGE_TEMPLATE
        )
        if not merge_template.uses_caption:
            raise InputError("the merge template's user message must contain {caption}")
        merge = make_rewriter(settings.merge_with, replace(settings, merge_with=""), merge_template)
    options = CaptionOptions(
        prompt=settings.caption_prompt,
        max_new_tokens=min(settings.max_new_tokens, 64),
        batch_size=settings.generation_batch_size,
        device=settings.device,
        dtype=settings.dtype,
    )
    return CaptionRewriter(target, options, merge)
