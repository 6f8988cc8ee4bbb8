"""The frozen Stable Diffusion parts the adapter trains against, loaded by path or hub id.

A base model is a diffusers folder (``model_index.json`` with ``tokenizer/``, ``text_encoder/``,
``vae/``, ``unet/``, ``scheduler/``), given as users give it to ``from_pretrained``. Everything
here is frozen: ``requires_grad_(False)``, eval mode, in the weight dtype of the run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from surd_builder.errors import InputError
from surd_builder.models import check_hub_model, load_pretrained


@dataclass
class StableDiffusionParts:
    base_model: str
    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    noise_scheduler: Any
    revision: str | None = None
    variant: str | None = None

    def fingerprint(self, subfolders: tuple[str, ...]) -> str:
        """The cache identity of the parts in ``subfolders``."""
        from adapter.cache import model_fingerprint

        return model_fingerprint(self.base_model, subfolders, self.revision, self.variant)

    @property
    def text_width(self) -> int:
        return int(self.text_encoder.config.hidden_size)

    @property
    def prediction_type(self) -> str:
        return str(self.noise_scheduler.config.prediction_type)

    def inference_scheduler(self) -> Any:
        """DPM-Solver++ from the training scheduler's config: good images in 20-25 steps."""
        from diffusers import DPMSolverMultistepScheduler

        return DPMSolverMultistepScheduler.from_config(self.noise_scheduler.config)


ALL_PARTS = ("tokenizer", "text_encoder", "vae", "unet", "scheduler")


def load_stable_diffusion(
    base_model: str,
    dtype: Any = None,
    variant: str | None = None,
    revision: str | None = None,
    components: tuple[str, ...] = ALL_PARTS,
) -> StableDiffusionParts:
    """The parts in ``components`` (default all five; the others are ``None``) in ``dtype``
    (default float32) on the CPU (the caller moves them), frozen, with the text width checked
    against the UNet's cross-attention width when both are loaded. A worker filling one cache
    loads only what it needs (the text encoder, or the VAE)."""
    check_hub_model(base_model, "base model")  # an unreachable hub fails before the imports
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    where = {"revision": revision}
    weights = {**where, "variant": variant, "dtype": dtype or torch.float32}
    loaders = {
        "tokenizer": (CLIPTokenizer, "base model tokenizer", where),
        "text_encoder": (CLIPTextModel, "base model text encoder", weights),
        "vae": (AutoencoderKL, "base model VAE", weights),
        "unet": (UNet2DConditionModel, "base model UNet", weights),
        "scheduler": (DDPMScheduler, "base model scheduler", where),
    }
    loaded = {}
    for name in components:
        cls, what, options = loaders[name]
        loaded[name] = load_pretrained(
            cls.from_pretrained, base_model, what, subfolder=name, **options
        )
    parts = StableDiffusionParts(
        base_model,
        loaded.get("tokenizer"),
        loaded.get("text_encoder"),
        loaded.get("vae"),
        loaded.get("unet"),
        loaded.get("scheduler"),
        revision,
        variant,
    )
    if parts.unet is not None and parts.text_encoder is not None:
        cross_width = parts.unet.config.cross_attention_dim
        if cross_width != parts.text_width:
            raise InputError(
                f"{base_model}: the text encoder's width {parts.text_width} does not match the "
                f"UNet's cross-attention width {cross_width} (not a Stable Diffusion 1.x/2.x "
                "model?)"
            )
    for module in (parts.text_encoder, parts.vae, parts.unet):
        if module is not None:
            module.requires_grad_(False).eval()
    return parts


def check_adapter_width(adapter_width: int, parts: StableDiffusionParts, where: str) -> None:
    if adapter_width != parts.text_width:
        raise InputError(
            f"{where} is for text width {adapter_width}, but {parts.base_model}'s text encoder "
            f"gives {parts.text_width} (SD 1.x is 768, SD 2.x is 1024): use a matching base model"
        )


def stable_diffusion_pipeline_class() -> Any:
    """``diffusers.StableDiffusionPipeline``, imported with transformers' warnings muted: the
    import names ``CLIPImageProcessor``, which without torchvision logs a fallback warning that
    has nothing to do with surd's use (no safety checker, no feature extractor)."""
    from transformers.utils import logging

    previous = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        from diffusers import StableDiffusionPipeline
    finally:
        logging.set_verbosity(previous)
    return StableDiffusionPipeline
