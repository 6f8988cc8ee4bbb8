"""Rewriting backends: keyword prompt (and image) -> narrative prompt.

``--rewriter`` picks one: ``rules``, ``hf:<model>``, ``openai:<base URL>`` (``--with-image``:
the server's model sees the image too), ``caption:<model>``, ``vlm:<model>``.
Each module holds one backend; :mod:`.base` is the interface, :mod:`.template` the instruction,
:mod:`.cleaning` the output checks they all share. :func:`make_rewriter` is the one place that
maps a spec string to a backend.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from pipelines.rewriters.base import ItemFailed, Rewriter, RewriteRequest, RewriterUnavailable
from pipelines.rewriters.template import (
    DEFAULT_MERGE_TEMPLATE,
    DEFAULT_TEMPLATE,
    DEFAULT_VISION_TEMPLATE,
    PromptTemplate,
    load_template,
)
from surd_builder.config import RewriteSettings, ScreenSettings
from surd_builder.errors import InputError

__all__ = [
    "ItemFailed",
    "RewriteRequest",
    "Rewriter",
    "RewriterUnavailable",
    "make_rewriter",
]

BACKENDS = ("rules", "hf", "openai", "caption", "vlm")


def parse_spec(spec: str) -> tuple[str, str]:
    """``"hf:Qwen/Qwen2.5-0.5B-Instruct"`` -> ``("hf", "Qwen/Qwen2.5-0.5B-Instruct")``."""
    backend, _, target = spec.partition(":")
    if backend not in BACKENDS:
        raise InputError(
            f"unknown rewriter {spec!r}: use rules, hf:<model>, openai:<base URL>, "
            "caption:<model> or vlm:<model>"
        )
    if backend == "rules":
        if target:
            raise InputError("the rules rewriter takes no model ('--rewriter rules')")
    elif not target:
        raise InputError(f"--rewriter {backend}: needs a target, e.g. {backend}:<model or URL>")
    return backend, target


def make_rewriter(
    spec: str,
    settings: RewriteSettings | None = None,
    template: PromptTemplate | None = None,
    base_dir: Path | None = None,
) -> Rewriter:
    """The backend ``spec`` names, configured from ``settings``. ``template`` overrides the
    settings' template file; relative template paths are read from ``base_dir`` (the workspace,
    for paths from ``surd.toml``). Loads nothing yet: models and connections open on first use,
    in whichever process runs the batch."""
    settings = settings or RewriteSettings()
    backend, target = parse_spec(spec)
    sees_image = backend == "vlm" or (backend == "openai" and settings.with_image)
    if settings.with_image and backend != "openai":
        raise InputError(
            "--with-image is for openai:<base URL> (vlm: and caption: always see the image)"
        )
    if template is None:
        if settings.template:
            template = load_template(_path(settings.template, base_dir))
        else:
            template = DEFAULT_VISION_TEMPLATE if sees_image else DEFAULT_TEMPLATE
    if template.places_image and not sees_image:
        raise InputError(
            f"the template places an {{image}}, but --rewriter {backend} does not see images "
            "(use vlm:<model> or openai:<base URL> --with-image)"
        )
    if sees_image and template.uses_caption:
        raise InputError("a rewriter that sees the image takes no {caption} in its template")
    if backend == "vlm":
        from pipelines.rewriters.vlm import VLMRewriter

        options = vlm_options(settings, settings.generation_batch_size, settings.max_new_tokens)
        return VLMRewriter(target, template, options)
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
        from pipelines.rewriters.openai_chat import OpenAIChatRewriter

        options = chat_options(settings, settings.with_image, settings.max_new_tokens)
        return OpenAIChatRewriter(target, settings.model, template, options)
    from pipelines.rewriters.caption import CaptionOptions, CaptionRewriter

    merge = None
    if settings.merge_with:
        if parse_spec(settings.merge_with)[0] not in ("hf", "openai"):
            raise InputError("--merge-with must be an hf:<model> or openai:<base URL> rewriter")
        merge_template = (
            load_template(_path(settings.merge_template, base_dir))
            if settings.merge_template
            else DEFAULT_MERGE_TEMPLATE
        )
        if not merge_template.uses_caption:
            raise InputError("the merge template's user message must contain {caption}")
        merge = make_rewriter(settings.merge_with, replace(settings, merge_with=""), merge_template)
    options = CaptionOptions(
        prompt=settings.caption_prompt,
        max_new_tokens=settings.max_new_tokens,
        batch_size=settings.generation_batch_size,
        device=settings.device,
        dtype=settings.dtype,
    )
    return CaptionRewriter(target, options, merge)


def chat_options(
    settings: RewriteSettings | ScreenSettings, with_image: bool, max_tokens: int | None = None
):
    """The openai client's options from either command's settings (they share the server
    fields: concurrency, retries, timeout, key variable, image size)."""
    from pipelines.rewriters.openai_chat import ChatOptions

    return ChatOptions(
        concurrency=settings.concurrency,
        retries=settings.retries,
        read_timeout=settings.request_timeout,
        api_key_env=settings.api_key_env,
        with_image=with_image,
        image_max_side=settings.image_max_side,
        **({"max_tokens": max_tokens} if max_tokens is not None else {}),
    )


def vlm_options(
    settings: RewriteSettings | ScreenSettings, batch_size: int, max_new_tokens: int | None = None
):
    """The in-process VLM's options from either command's settings."""
    from pipelines.rewriters.vlm import VLMOptions

    return VLMOptions(
        batch_size=batch_size,
        image_max_side=settings.image_max_side,
        device=settings.device,
        dtype=settings.dtype,
        **({"max_new_tokens": max_new_tokens} if max_new_tokens is not None else {}),
    )


def _path(name: str, base_dir: Path | None) -> Path:
    path = Path(name).expanduser()
    return path if path.is_absolute() or base_dir is None else base_dir / path
