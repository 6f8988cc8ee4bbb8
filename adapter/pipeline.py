"""Generating with the SUR-adapter: a ``StableDiffusionPipeline`` whose prompt encoding ends
with the adapter.

:class:`SURAdapterPipeline` is the diffusers pipeline with one more (optional) component,
``adapter``, and an ``encode_prompt`` that passes the text encoder's output through it, for the
prompt and the negative prompt alike (at training time every UNet condition came through it).
Everything else is diffusers': schedulers, guidance, seeds and generators, batches,
``num_images_per_prompt``, dtypes, model CPU offload. ``prompt_embeds`` /
``negative_prompt_embeds`` given by the caller are used as they are: they are what this
pipeline's ``encode_prompt`` returns, already adapted (the diffusers pattern of encoding once
and generating many times). ``use_adapter=False`` on a call generates without the adapter, for
side-by-side comparisons with the same seeds. The safety checker is not loaded.

    pipe = load_pipeline(
        "stable-diffusion-v1-5/stable-diffusion-v1-5", "runs/sur-adapter", device="cuda"
    )
    image = pipe("three dogs playing in the snow", generator=torch.manual_seed(0)).images[0]
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from adapter.stable_diffusion import stable_diffusion_pipeline_class
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


class SURAdapterPipeline(_Base):  # type: ignore[misc, valid-type]
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

    def __call__(self, *args: Any, use_adapter: bool = True, **kwargs: Any) -> Any:
        """diffusers' call; ``use_adapter=False`` leaves the adapter out of this one."""
        previous, self.use_adapter = self.use_adapter, use_adapter
        try:
            return super().__call__(*args, **kwargs)
        finally:
            self.use_adapter = previous


def load_pipeline(
    base_model: str,
    adapter: str | Path | None,
    device: str = "auto",
    dtype: str = "auto",
    scheduler: str = "dpm",
    variant: str | None = None,
) -> SURAdapterPipeline:
    """The base model's pipeline plus the adapter saved in ``adapter`` (a training output, a
    ``checkpoint-N`` folder, or any ``save_pretrained`` folder), on ``device``. The adapter is
    kept in float32 (it is small; its output is cast to the pipeline's dtype)."""
    import diffusers

    from adapter.model import SURAdapter
    from adapter.stable_diffusion import check_adapter_width

    if scheduler not in SCHEDULERS:
        raise InputError(f"--scheduler must be one of: {', '.join(SCHEDULERS)}")
    check_hub_model(base_model, "base model")  # an unreachable hub fails before any loading
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    model = None
    if adapter is not None:
        path = Path(adapter)
        if (path / "adapter" / "config.json").is_file():
            path = path / "adapter"
        if not (path / "config.json").is_file():
            raise InputError(f"--adapter {adapter}: no adapter there (config.json is missing)")
        model = SURAdapter.from_pretrained(path).eval()
    bars_were_on = diffusers.utils.logging.is_progress_bar_enabled()
    diffusers.utils.logging.disable_progress_bar()  # surd draws its own progress
    try:
        pipeline = load_pretrained(
            SURAdapterPipeline.from_pretrained,
            base_model,
            "base model",
            adapter=model,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            dtype=torch_dtype,
            variant=variant,
        )
    finally:
        if bars_were_on:
            diffusers.utils.logging.enable_progress_bar()
    if model is not None:
        from adapter.stable_diffusion import StableDiffusionParts

        parts = StableDiffusionParts(base_model, None, pipeline.text_encoder, None, None, None)
        check_adapter_width(model.config.embed_dim, parts, f"--adapter {adapter}")
    if SCHEDULERS[scheduler] is not None:
        scheduler_class = getattr(diffusers, SCHEDULERS[scheduler])
        pipeline.scheduler = scheduler_class.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    pipeline = pipeline.to(device)
    if model is not None:
        model.to(device)  # float32, as saved: it is small and its output is cast
    return pipeline
