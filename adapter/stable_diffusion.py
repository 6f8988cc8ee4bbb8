"""The frozen Stable Diffusion parts the adapter trains against, loaded by path or hub id.

A base model is a diffusers folder (``model_index.json`` and one subfolder per component), given
as users give it to ``from_pretrained``. Two families (:data:`FAMILIES`), told apart by the
pipeline's components (:func:`detect_family`):

- ``sd``, Stable Diffusion 1.x / 2.x: one CLIP text encoder; the UNet is conditioned on its last
  hidden state (768 wide for 1.x, 1024 for 2.x, whose checkpoints already end one block early);
  epsilon or v-prediction, as the scheduler's config says.
- ``sdxl``, Stable Diffusion XL: two text encoders (CLIP-L, 768, and OpenCLIP-bigG with a
  projection, 1280); the UNet is conditioned on their *penultimate* hidden states concatenated
  (2048 wide), and through its ``text_time`` added embedding on the second encoder's projected,
  pooled embedding (1280) and six size numbers per image (``add_time_ids``: original size, crop
  offset, target size).

Everything here is frozen: ``requires_grad_(False)``, eval mode, in the weight dtype of the run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surd_builder.errors import InputError
from surd_builder.models import check_hub_model, load_pretrained

FAMILIES = {"sd": "Stable Diffusion 1.x/2.x", "sdxl": "Stable Diffusion XL"}
SD_PARTS = ("tokenizer", "text_encoder", "vae", "unet", "scheduler")
SDXL_PARTS = (*SD_PARTS, "tokenizer_2", "text_encoder_2")
ALL_PARTS = SDXL_PARTS  # what each family has of these is loaded
TEXT_PARTS = {"sd": ("tokenizer", "text_encoder"),
              "sdxl": ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")}  # fmt: skip


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
    family: str = "sd"
    tokenizer_2: Any = None
    text_encoder_2: Any = None
    vae_model: str | None = None  # a VAE loaded from its own folder instead of the base model's

    def fingerprint(self, subfolders: tuple[str, ...]) -> str:
        """The cache identity of the parts in ``subfolders`` (the VAE's own folder, when one
        replaces the base model's, is fingerprinted instead of ``vae``)."""
        from adapter.cache import model_fingerprint

        if self.vae_model is not None and "vae" in subfolders:
            rest = tuple(name for name in subfolders if name != "vae")
            own = model_fingerprint(self.vae_model, (), None, None)
            return own if not rest else f"{own}+{self.fingerprint(rest)}"
        return model_fingerprint(self.base_model, subfolders, self.revision, self.variant)

    @property
    def text_encoders(self) -> list[Any]:
        """The text encoders whose hidden states the UNet is conditioned on, in order."""
        encoders = [self.text_encoder]
        return encoders + [self.text_encoder_2] if self.family == "sdxl" else encoders

    @property
    def text_width(self) -> int:
        """The width of the UNet's text condition: SDXL's two encoders side by side."""
        return sum(int(encoder.config.hidden_size) for encoder in self.text_encoders)

    @property
    def pooled_width(self) -> int:
        """The width of SDXL's pooled text embedding (the second encoder's projection); 0 for
        Stable Diffusion 1.x/2.x, which has none."""
        if self.family != "sdxl":
            return 0
        return int(self.text_encoder_2.config.projection_dim)

    @property
    def prediction_type(self) -> str:
        return str(self.noise_scheduler.config.prediction_type)

    def inference_scheduler(self) -> Any:
        """DPM-Solver++ from the training scheduler's config: good images in 20-25 steps."""
        from diffusers import DPMSolverMultistepScheduler

        return DPMSolverMultistepScheduler.from_config(self.noise_scheduler.config)


def _model_index(base_model: str, revision: str | None) -> dict[str, Any] | None:
    """The pipeline's ``model_index.json`` (None for a local folder without one)."""
    path = Path(base_model).expanduser()
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            return None
        try:
            return json.loads(index.read_text())
        except (OSError, ValueError) as error:
            raise InputError(f"{base_model}: unreadable model_index.json ({error})") from None
    from diffusers import DiffusionPipeline

    return load_pretrained(
        DiffusionPipeline.load_config, base_model, "base model index", revision=revision
    )


def detect_family(base_model: str, revision: str | None = None) -> str:
    """``sd`` or ``sdxl`` from the pipeline's components (``model_index.json``; a local folder
    without one by its subfolders). Anything else, an SDXL refiner (no first text encoder) or
    a transformer-based model (SD3, Flux, PixArt), is a one-line error."""
    index = _model_index(base_model, revision)
    if index is None:
        root = Path(base_model).expanduser()
        present = {name: [None, "?"] for name in ALL_PARTS if (root / name).is_dir()}
    else:
        present = {name: value for name, value in index.items() if not name.startswith("_")}

    def has(name: str) -> bool:
        value = present.get(name)
        return value is not None and not (isinstance(value, list) and value[-1] is None)

    if has("transformer") or not has("unet"):
        kind = index.get("_class_name", "this pipeline") if index else "this folder"
        raise InputError(
            f"{base_model}: {kind} is not a UNet Stable Diffusion model (surd trains the adapter "
            f"for {' and '.join(FAMILIES.values())})"
        )
    if has("text_encoder_2"):
        if not has("text_encoder"):
            raise InputError(
                f"{base_model}: an SDXL refiner (one text encoder) is not supported: give the "
                "SDXL base model"
            )
        return "sdxl"
    if not has("text_encoder"):
        raise InputError(f"{base_model}: no text_encoder in the pipeline")
    return "sd"


def native_resolution(base_model: str, revision: str | None = None) -> int:
    """The image side the base model was trained at: the UNet's sample size times the VAE's
    downscaling (512 for SD 1.x and 2.x-base, 768 for SD 2.x-v, 1024 for SDXL)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    where = {"subfolder": "unet", "revision": revision}
    unet = load_pretrained(UNet2DConditionModel.load_config, base_model, "base model UNet", **where)
    where["subfolder"] = "vae"
    vae = load_pretrained(AutoencoderKL.load_config, base_model, "base model VAE", **where)
    sample = unet.get("sample_size") or 64
    sample = sample[0] if isinstance(sample, list | tuple) else sample
    return int(sample) * 2 ** (len(vae.get("block_out_channels", (0,) * 4)) - 1)


def load_stable_diffusion(
    base_model: str,
    dtype: Any = None,
    variant: str | None = None,
    revision: str | None = None,
    components: tuple[str, ...] = ALL_PARTS,
    family: str | None = None,
    vae_model: str | None = None,
) -> StableDiffusionParts:
    """The parts in ``components`` that the model's family has (default all; the others are
    ``None``) in ``dtype`` (default float32) on the CPU (the caller moves them), frozen, with
    the text width checked against the UNet's cross-attention width and, for SDXL, the pooled
    width against the UNet's added embedding, when both are loaded. A worker filling one
    cache loads only what it needs (the text encoders, or the VAE). ``family`` is detected
    when not given; ``vae_model``: a VAE folder or hub id to use instead of the base model's
    (e.g. a VAE fixed to run in float16)."""
    check_hub_model(base_model, "base model")  # an unreachable hub fails before the imports
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    family = family or detect_family(base_model, revision)
    where = {"revision": revision}
    weights = {**where, "variant": variant, "dtype": dtype or torch.float32}
    loaders = {
        "tokenizer": (CLIPTokenizer, "base model tokenizer", where),
        "text_encoder": (CLIPTextModel, "base model text encoder", weights),
        "tokenizer_2": (CLIPTokenizer, "base model second tokenizer", where),
        "text_encoder_2": (CLIPTextModelWithProjection, "base model second text encoder", weights),
        "vae": (AutoencoderKL, "base model VAE", weights),
        "unet": (UNet2DConditionModel, "base model UNet", weights),
        "scheduler": (DDPMScheduler, "base model scheduler", where),
    }
    own_parts = SDXL_PARTS if family == "sdxl" else SD_PARTS
    loaded = {}
    for name in components:
        if name not in own_parts:
            continue
        cls, what, options = loaders[name]
        if name == "vae" and vae_model is not None:
            loaded[name] = load_pretrained(
                cls.from_pretrained, vae_model, "VAE", variant=variant, dtype=weights["dtype"]
            )
            continue
        loaded[name] = load_pretrained(
            cls.from_pretrained, base_model, what, subfolder=name, **options
        )
    parts = StableDiffusionParts(
        base_model, loaded.get("tokenizer"), loaded.get("text_encoder"), loaded.get("vae"),
        loaded.get("unet"), loaded.get("scheduler"), revision, variant, family,
        loaded.get("tokenizer_2"), loaded.get("text_encoder_2"), vae_model,
    )  # fmt: skip
    if parts.unet is not None and all(encoder is not None for encoder in parts.text_encoders):
        check_unet_fits(parts)
    for module in (parts.text_encoder, parts.text_encoder_2, parts.vae, parts.unet):
        if module is not None:
            module.requires_grad_(False).eval()
    return parts


def check_unet_fits(parts: StableDiffusionParts) -> None:
    """The UNet takes what the text encoders give: the sequence's width, and for SDXL the
    pooled width plus six time ids in its added embedding."""
    config, name = parts.unet.config, parts.base_model
    if config.cross_attention_dim != parts.text_width:
        raise InputError(
            f"{name}: the text encoders' width {parts.text_width} does not match the UNet's "
            f"cross-attention width {config.cross_attention_dim} (not a "
            f"{FAMILIES[parts.family]} model?)"
        )
    if parts.family != "sdxl":
        return
    added = getattr(config, "addition_embed_type", None)
    expected = parts.pooled_width + 6 * (getattr(config, "addition_time_embed_dim", None) or 0)
    if added != "text_time" or config.projection_class_embeddings_input_dim != expected:
        raise InputError(
            f"{name}: the UNet does not take SDXL's pooled text embedding and time ids "
            f"(addition_embed_type {added!r}, added input width "
            f"{config.projection_class_embeddings_input_dim}, expected {expected})"
        )


def check_adapter_fits(adapter_config: Any, parts: StableDiffusionParts, where: str) -> None:
    """An adapter is for one family and its widths (its config records both): anything else
    is a one-line error naming what differs."""
    family = getattr(adapter_config, "family", "sd")
    if family != parts.family:
        raise InputError(
            f"{where} was trained for {FAMILIES.get(family, family)}, but {parts.base_model} is "
            f"{FAMILIES[parts.family]}: use a matching base model"
        )
    if adapter_config.embed_dim != parts.text_width:
        raise InputError(
            f"{where} is for text width {adapter_config.embed_dim}, but {parts.base_model}'s "
            f"text encoders give {parts.text_width} (SD 1.x is 768, SD 2.x is 1024, SDXL is "
            "2048): use a matching base model"
        )
    pooled = getattr(adapter_config, "pooled_dim", 0)
    if pooled != parts.pooled_width:
        raise InputError(
            f"{where} is for a pooled text embedding of width {pooled}, but "
            f"{parts.base_model}'s is {parts.pooled_width}: use a matching base model"
        )


def _muted_import(name: str) -> Any:
    """A diffusers pipeline class, imported with transformers' warnings muted: the import names
    ``CLIPImageProcessor``, which without torchvision logs a fallback warning that has nothing
    to do with surd's use (no safety checker, no feature extractor)."""
    from transformers.utils import logging

    previous = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        import diffusers

        return getattr(diffusers, name)
    finally:
        logging.set_verbosity(previous)


def stable_diffusion_pipeline_class() -> Any:
    """``diffusers.StableDiffusionPipeline`` (see :func:`_muted_import`)."""
    return _muted_import("StableDiffusionPipeline")


def stable_diffusion_xl_pipeline_class() -> Any:
    """``diffusers.StableDiffusionXLPipeline`` (see :func:`_muted_import`)."""
    return _muted_import("StableDiffusionXLPipeline")
