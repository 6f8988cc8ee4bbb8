"""Generating with the SUR-adapter: a ``StableDiffusionPipeline`` (or, for SDXL, a
``StableDiffusionXLPipeline``) whose prompt encoding ends with the adapter.

:class:`SURAdapterPipeline` is the diffusers pipeline with one more (optional) component,
``adapter``, and an ``encode_prompt`` that passes the text encoder's output through it, for the
prompt and the negative prompt alike (at training time every UNet condition came through it).
Everything else is diffusers': schedulers, guidance, seeds and generators, batches,
``num_images_per_prompt``, dtypes, model CPU offload. ``prompt_embeds`` /
``negative_prompt_embeds`` given by the caller are used as they are: they are what this
pipeline's ``encode_prompt`` returns, already adapted (the diffusers pattern of encoding once
and generating many times). ``use_adapter=False`` on a call generates without the adapter, for
side-by-side comparisons with the same seeds. The safety checker is not loaded.

:class:`SURAdapterXLPipeline` does the same for SDXL: the adapter takes the 2048-wide token
states and the pooled embedding together and returns both adapted. An unconditional embedding
that SDXL sets to zeros (``force_zeros_for_empty_prompt`` with no negative prompt) is left at
zero: it is not a text encoding, and the UNet was trained with exactly those zeros.

    pipe = load_pipeline(
        "stable-diffusion-v1-5/stable-diffusion-v1-5", "runs/sur-adapter", device="cuda"
    )
    image = pipe("three dogs playing in the snow", generator=torch.manual_seed(0)).images[0]
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from adapter.stable_diffusion import (
    stable_diffusion_pipeline_class,
    stable_diffusion_xl_pipeline_class,
)
from surd_builder.errors import InputError
from surd_builder.models import check_hub_model, load_pretrained, resolve_device, resolve_dtype

SCHEDULERS = {
    "dpm": "DPMSolverMultistepScheduler",
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "pndm": "PNDMScheduler",
    "default": None,
}

_Base = stable_diffusion_pipeline_class()
_BaseXL = stable_diffusion_xl_pipeline_class()


class _AdapterSwitch:
    """``use_adapter=False`` on a call generates without the adapter (same seeds, same
    everything else): the side-by-side comparisons of ``generate --compare`` and ``eval``.
    Each pipeline's ``__init__`` sets ``use_adapter = True``."""

    def __call__(self, *args: Any, use_adapter: bool = True, **kwargs: Any) -> Any:
        """diffusers' call; ``use_adapter=False`` leaves the adapter out of this one."""
        previous, self.use_adapter = self.use_adapter, use_adapter
        try:
            return super().__call__(*args, **kwargs)  # type: ignore[misc]
        finally:
            self.use_adapter = previous


class SURAdapterPipeline(_AdapterSwitch, _Base):  # type: ignore[misc, valid-type]
    _optional_components = [*_Base._optional_components, "adapter"]
    model_cpu_offload_seq = "text_encoder->adapter->image_encoder->unet->vae"

    def __init__(
        self,
        vae: Any,
        text_encoder: Any,
        tokenizer: Any,
        unet: Any,
        scheduler: Any,
        safety_checker: Any = None,
        feature_extractor: Any = None,
        image_encoder: Any = None,
        requires_safety_checker: bool = False,
        adapter: Any = None,
    ):
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
            requires_safety_checker=requires_safety_checker,
        )
        self.register_modules(adapter=adapter)
        self.use_adapter = True

    def encode_prompt(self, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        """diffusers' encoding, then the adapter on what was encoded here (embeddings the caller
        passed in are returned as they are)."""
        given = inspect.signature(_Base.encode_prompt).bind(self, *args, **kwargs).arguments
        prompt_embeds, negative_embeds = super().encode_prompt(*args, **kwargs)
        if self.adapter is None or not self.use_adapter:
            return prompt_embeds, negative_embeds
        if given.get("prompt_embeds") is None:
            prompt_embeds = self.adapt(prompt_embeds)
        if given.get("negative_prompt_embeds") is None:
            negative_embeds = self.adapt(negative_embeds)
        return prompt_embeds, negative_embeds

    def adapt(self, embeds: Any) -> Any:
        """The adapter's output for text-encoder embeddings, in their dtype (the adapter runs
        in its own dtype, float32 as saved). Devices are left to ``.to`` and offload hooks."""
        if embeds is None:
            return None
        return self.adapter(embeds.to(self.adapter.dtype)).prompt_embeds.to(embeds.dtype)


class SURAdapterXLPipeline(_AdapterSwitch, _BaseXL):  # type: ignore[misc, valid-type]
    _optional_components = [*_BaseXL._optional_components, "adapter"]
    model_cpu_offload_seq = "text_encoder->text_encoder_2->adapter->image_encoder->unet->vae"

    def __init__(
        self,
        vae: Any,
        text_encoder: Any,
        text_encoder_2: Any,
        tokenizer: Any,
        tokenizer_2: Any,
        unet: Any,
        scheduler: Any,
        image_encoder: Any = None,
        feature_extractor: Any = None,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
        adapter: Any = None,
    ):
        super().__init__(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
            tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
            image_encoder=image_encoder, feature_extractor=feature_extractor,
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
            add_watermarker=add_watermarker,
        )  # fmt: skip
        self.register_modules(adapter=adapter)
        self.use_adapter = True

    def encode_prompt(self, *args: Any, **kwargs: Any) -> tuple[Any, Any, Any, Any]:
        """diffusers' SDXL encoding, then the adapter on the token states and pooled embedding
        encoded here (embeddings the caller passed in, and zeroed unconditional ones, are
        returned as they are)."""
        given = inspect.signature(_BaseXL.encode_prompt).bind(self, *args, **kwargs).arguments
        embeds, negative, pooled, negative_pooled = super().encode_prompt(*args, **kwargs)
        if self.adapter is None or not self.use_adapter:
            return embeds, negative, pooled, negative_pooled
        if given.get("prompt_embeds") is None:
            embeds, pooled = self.adapt(embeds, pooled)
        zeroed = given.get("negative_prompt") is None and self.config.force_zeros_for_empty_prompt
        guided = given.get("do_classifier_free_guidance", True)
        encoded_here = given.get("negative_prompt_embeds") is None and not zeroed
        if negative is not None and guided and encoded_here:
            negative, negative_pooled = self.adapt(negative, negative_pooled)
        return embeds, negative, pooled, negative_pooled

    def adapt(self, embeds: Any, pooled: Any) -> tuple[Any, Any]:
        """The adapter's token states and pooled embedding, in the inputs' dtype."""
        dtype = self.adapter.dtype
        output = self.adapter(embeds.to(dtype), pooled_embeds=pooled.to(dtype))
        return output.prompt_embeds.to(embeds.dtype), output.pooled_embeds.to(pooled.dtype)


def pipeline_class(family: str) -> Any:
    """The adapter pipeline of a base model family (``sd`` or ``sdxl``)."""
    return SURAdapterXLPipeline if family == "sdxl" else SURAdapterPipeline


def pipeline_from_parts(parts: Any, unet: Any, adapter: Any) -> Any:
    """An adapter pipeline over already loaded frozen parts (training's validation images),
    with the inference scheduler; progress bars off."""
    common = dict(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                  unet=unet, scheduler=parts.inference_scheduler(), adapter=adapter)  # fmt: skip
    if parts.family == "sdxl":
        common.update(text_encoder_2=parts.text_encoder_2, tokenizer_2=parts.tokenizer_2)
    pipeline = pipeline_class(parts.family)(**common)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def load_pipeline(
    base_model: str,
    adapter: str | Path | None,
    device: str = "auto",
    dtype: str = "auto",
    scheduler: str = "dpm",
    variant: str | None = None,
) -> SURAdapterPipeline:
    """The base model's pipeline (SD 1.x/2.x or SDXL, from its components) plus the adapter
    saved in ``adapter`` (a training output, a ``checkpoint-N`` folder, or any
    ``save_pretrained`` folder), on ``device``; an adapter trained for another family or other
    widths is a one-line error. The adapter is kept in float32 (it is small; its output is
    cast to the pipeline's dtype)."""
    import diffusers

    from adapter.model import SURAdapter
    from adapter.stable_diffusion import StableDiffusionParts, check_adapter_fits, detect_family

    if scheduler not in SCHEDULERS:
        raise InputError(f"--scheduler must be one of: {', '.join(SCHEDULERS)}")
    check_hub_model(base_model, "base model")  # an unreachable hub fails before any loading
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    family = detect_family(base_model)
    model = None
    if adapter is not None:
        path = Path(adapter)
        if (path / "adapter" / "config.json").is_file():
            path = path / "adapter"
        if not (path / "config.json").is_file():
            raise InputError(f"--adapter {adapter}: no adapter there (config.json is missing)")
        model = SURAdapter.from_pretrained(path).eval()
        if getattr(model.config, "family", "sd") != family:  # before loading the base model
            light = StableDiffusionParts(base_model, None, None, None, None, None, family=family)
            check_adapter_fits(model.config, light, f"--adapter {adapter}")
    options = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    if family == "sdxl":
        options = {"feature_extractor": None}
    bars_were_on = diffusers.utils.logging.is_progress_bar_enabled()
    diffusers.utils.logging.disable_progress_bar()  # surd draws its own progress
    try:
        pipeline = load_pretrained(
            pipeline_class(family).from_pretrained, base_model, "base model", adapter=model,
            dtype=torch_dtype, variant=variant, **options,
        )  # fmt: skip
    finally:
        if bars_were_on:
            diffusers.utils.logging.enable_progress_bar()
    if model is not None:
        parts = StableDiffusionParts(
            base_model, None, pipeline.text_encoder, None, None, None, family=family,
            text_encoder_2=getattr(pipeline, "text_encoder_2", None),
        )  # fmt: skip
        check_adapter_fits(model.config, parts, f"--adapter {adapter}")
    if SCHEDULERS[scheduler] is not None:
        scheduler_class = getattr(diffusers, SCHEDULERS[scheduler])
        pipeline.scheduler = scheduler_class.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    pipeline = pipeline.to(device)
    if model is not None:
        model.to(device)  # float32, as saved: it is small and its output is cast
    return pipeline
