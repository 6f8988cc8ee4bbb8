"""Encoders of the frozen inputs: CLIP embeddings of prompts and VAE latents of images.

Each encoder has a ``cache_identity`` (model + every setting that changes the values) and is
called on a batch, returning a NumPy array, so :func:`adapter.cache.fill_cache` can run it once
per content and keep the result.

- Text: the text encoder's last hidden state over ``model_max_length`` (77) padded tokens, as
  Stable Diffusion conditions on it (attention mask only where the encoder's config asks). For
  SDXL, as its pipeline's ``encode_prompt`` does: both encoders' penultimate hidden states side by
  side (77 x 2048), and the second encoder's projected pooled embedding (1280), kept in one
  record of 78 rows, the last holding the pooled vector (zero-padded to the row width): one
  cache, one pass over the prompts.
- Images: resized so the short side is ``resolution``, centre-cropped (a random crop could not be
  cached), optionally mirrored, then encoded. The cache keeps the latent *distribution* (mean and
  log-variance), not one sample of it, so every step draws a fresh sample exactly as encoding on
  the fly would. An image that cannot be decoded is stored as NaN and left out of training. The
  VAE runs in float32 where its config asks (``force_upcast``: SDXL's VAE overflows in float16).
- SDXL time ids: per image, (original height, width, crop top, crop left, target height,
  width) for the crop actually taken, as diffusers' SDXL training script computes them, for the
  image and its mirrored copy (whose crop offset is measured from the other side).
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from adapter.stable_diffusion import TEXT_PARTS, StableDiffusionParts, load_stable_diffusion
from surd_builder.models import dtype_name, resolve_device


def _parts_here(parts: StableDiffusionParts, components: tuple[str, ...], dtype: str):
    import torch

    return load_stable_diffusion(
        parts.base_model, getattr(torch, dtype), parts.variant, parts.revision, components,
        parts.family, parts.vae_model,
    )  # fmt: skip


@dataclass(frozen=True)
class CropGeometry:
    """Where the training crop of an image comes from: its size as shown (EXIF orientation
    applied), the size it is resized to (short side = resolution) and the crop's offset."""

    original_height: int
    original_width: int
    resized_width: int
    resized_height: int
    top: int
    left: int
    resolution: int

    @classmethod
    def of(cls, width: int, height: int, resolution: int) -> CropGeometry:
        scale = resolution / min(width, height)
        resized = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
        left, top = (resized[0] - resolution) // 2, (resized[1] - resolution) // 2
        return cls(height, width, resized[0], resized[1], top, left, resolution)

    def time_ids(self) -> np.ndarray:
        """(2, 6) float32: SDXL's ``add_time_ids`` of the crop, then of the mirrored crop."""
        size, side = (self.original_height, self.original_width), self.resolution
        mirrored_left = self.resized_width - side - self.left
        plain = [*size, self.top, self.left, side, side]
        flipped = [*size, self.top, mirrored_left, side, side]
        return np.array([plain, flipped], dtype=np.float32)


@dataclass
class PreparedImage:
    pixels: np.ndarray  # (3, resolution, resolution) float32 in [-1, 1], not mirrored
    geometry: CropGeometry


def prepare_image(data: bytes, resolution: int) -> PreparedImage | None:
    """The centre crop of ``data`` and where it came from, or None if it is not an image."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as opened:  # as shown: EXIF orientation applied
            image = ImageOps.exif_transpose(opened).convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return None  # one bad or oversized image is left out, never the whole build
    geometry = CropGeometry.of(image.width, image.height, resolution)
    image = image.resize((geometry.resized_width, geometry.resized_height),
                         Image.Resampling.BILINEAR)  # fmt: skip
    left, top = geometry.left, geometry.top
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = (np.asarray(image, dtype=np.float32) / 127.5 - 1.0).transpose(2, 0, 1)
    return PreparedImage(pixels, geometry)


def preprocess_image(data: bytes, resolution: int, flip: bool) -> np.ndarray | None:
    """(3, resolution, resolution) float32 in [-1, 1], or None if ``data`` is not an image."""
    prepared = prepare_image(data, resolution)
    if prepared is None:
        return None
    return mirrored(prepared.pixels) if flip else prepared.pixels


def mirrored(pixels: np.ndarray) -> np.ndarray:
    """``pixels`` (:func:`preprocess_image`'s output) mirrored left to right, in the same memory
    layout (channels last in memory: the VAE's convolutions take another path, with other
    rounding, for another layout), so latents of a mirrored copy equal those of the image
    mirrored before preprocessing, bit for bit."""
    channels_last = pixels.transpose(1, 2, 0)
    return np.ascontiguousarray(channels_last[:, ::-1]).transpose(2, 0, 1)


class TextEmbeddings:
    """The base model's CLIP text embeddings, (batch, 77, width) float16; for SDXL (batch, 78,
    2048): both encoders' penultimate states, then the pooled embedding in the last row (see
    :func:`split_text_record`)."""

    cache_kind = "text"  # the cache folder's name (adapter.train_caches)

    def __init__(self, parts: StableDiffusionParts, device: str, dtype: Any):
        self.parts, self.device, self.dtype = parts, device, dtype

    def cache_identity(self) -> str:
        model = self.parts.fingerprint(TEXT_PARTS[self.parts.family])
        kind = "clip-text-xl" if self.parts.family == "sdxl" else "clip-text"
        return f"{kind}\x1f{model}\x1f{self.dtype}"

    def remote_factory(self) -> Callable[[], TextEmbeddings]:
        """A picklable recipe for this encoder in another process (a Ray worker): the same
        model and dtype, so the values its cache identity promises, on that worker's GPU."""
        return functools.partial(_text_embeddings_here, _light(self.parts), dtype_name(self.dtype))

    def __call__(self, texts: list[str]) -> np.ndarray:
        if self.parts.family == "sdxl":
            return self.sdxl_record(texts)
        import torch

        tokenizer, encoder = self.parts.tokenizer, self.parts.text_encoder
        tokens = _padded_tokens(tokenizer, texts)
        mask = None
        if getattr(encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(self.device)
        with torch.inference_mode():
            hidden = encoder(tokens.input_ids.to(self.device), attention_mask=mask)[0]
        return hidden.float().cpu().numpy().astype(np.float16)

    def sdxl_record(self, texts: list[str]) -> np.ndarray:
        """What ``StableDiffusionXLPipeline.encode_prompt`` computes (no clip skip), as one
        (batch, 78, 2048) float16 record per text."""
        import torch

        sequences, pooled = [], None
        pairs = ((self.parts.tokenizer, self.parts.text_encoder),
                 (self.parts.tokenizer_2, self.parts.text_encoder_2))  # fmt: skip
        for tokenizer, encoder in pairs:
            tokens = _padded_tokens(tokenizer, texts)
            with torch.inference_mode():
                output = encoder(tokens.input_ids.to(self.device), output_hidden_states=True)
            if output[0].ndim == 2:  # the projected pooled embedding (the second encoder's)
                pooled = output[0]
            sequences.append(output.hidden_states[-2])
        sequence = torch.cat(sequences, dim=-1).float()
        record = torch.zeros(sequence.shape[0], sequence.shape[1] + 1, sequence.shape[2])
        record[:, :-1] = sequence.cpu()
        record[:, -1, : pooled.shape[-1]] = pooled.float().cpu()
        return record.numpy().astype(np.float16)


def _padded_tokens(tokenizer: Any, texts: list[str]) -> Any:
    """``texts`` tokenized as Stable Diffusion's pipelines do: padded (and cut) to the
    tokenizer's ``model_max_length`` (77)."""
    return tokenizer(
        texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    )  # fmt: skip


def split_text_record(record: np.ndarray, pooled_width: int) -> tuple[np.ndarray, np.ndarray]:
    """An SDXL text record (batch, tokens + 1, width) -> (sequence (batch, tokens, width),
    pooled (batch, pooled_width))."""
    return record[:, :-1], record[:, -1, :pooled_width]


def vae_dtype(vae: Any, dtype: Any) -> Any:
    """The dtype to encode in: float32 instead of float16 where the VAE's config asks
    (``force_upcast``, as diffusers' pipelines do: SDXL's VAE overflows in float16; a VAE
    fixed for float16 sets it false)."""
    import torch

    if dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        return torch.float32
    return dtype


class TimeIds:
    """SDXL's ``add_time_ids`` of each image's crop and its mirrored crop, (batch, 2, 6)
    float32 (NaN for an image that does not decode). Computed from the image as shown, so they
    match the crop :class:`LatentMoments` encodes."""

    cache_kind = "time-ids"
    flip = False

    def __init__(self, resolution: int):
        self.resolution = resolution

    def cache_identity(self) -> str:
        return f"time-ids\x1f{self.resolution}\x1fcenter-crop"

    def remote_factory(self) -> Callable[[], TimeIds]:
        return functools.partial(TimeIds, self.resolution)

    def __call__(self, images: list[Any]) -> np.ndarray:
        from adapter.data import read_images

        prepared = [
            None if data is None else prepare_image(data, self.resolution)
            for data in read_images(images)
        ]
        return self.encode_prepared(prepared)

    def encode_prepared(self, prepared: list[PreparedImage | None]) -> np.ndarray:
        out = np.full((len(prepared), 2, 6), np.nan, np.float32)
        for row, image in enumerate(prepared):
            if image is not None:
                out[row] = image.geometry.time_ids()
        return out


class LatentMoments:
    """The VAE's latent mean and log-variance, (batch, 2 x latent channels, r/8, r/8) float16."""

    cache_kind = "latents"

    def __init__(
        self, parts: StableDiffusionParts, resolution: int, flip: bool, device: str, dtype: Any
    ):
        self.parts, self.resolution, self.flip = parts, resolution, flip
        self.device, self.dtype = device, dtype

    def cache_identity(self) -> str:
        return (
            f"vae\x1f{self.parts.fingerprint(('vae',))}\x1f{self.resolution}\x1fcenter-crop\x1f"
            f"flip={self.flip}\x1f{self.dtype}"
        )

    def remote_factory(self) -> Callable[[], LatentMoments]:
        """See :meth:`TextEmbeddings.remote_factory`."""
        return functools.partial(
            _latent_moments_here, _light(self.parts), self.resolution, self.flip,
            dtype_name(self.dtype),
        )  # fmt: skip

    def __call__(self, images: list[Any]) -> np.ndarray:
        """Moments of each image: bytes, or :class:`adapter.data.ImageRef` read here."""
        from adapter.data import read_images

        pixels = [
            None if data is None else preprocess_image(data, self.resolution, self.flip)
            for data in read_images(images)
        ]
        return self.encode_pixels(pixels)

    def encode_prepared(self, prepared: list[PreparedImage | None]) -> np.ndarray:
        """Moments of :func:`prepare_image`'s outputs (mirrored here for a flipping encoder)."""
        pixels = [None if image is None else image.pixels for image in prepared]
        if self.flip:
            pixels = [None if array is None else mirrored(array) for array in pixels]
        return self.encode_pixels(pixels)

    def encode_pixels(self, pixels: list[np.ndarray | None]) -> np.ndarray:
        """Moments of preprocessed images (:func:`preprocess_image`'s output, already mirrored
        for a flipping encoder); NaN rows where an image is None."""
        import torch

        vae = self.parts.vae
        readable = [index for index, array in enumerate(pixels) if array is not None]
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        side = self.resolution // factor
        out = np.full((len(pixels), 2 * vae.config.latent_channels, side, side), np.nan, np.float16)
        if readable:
            batch = torch.from_numpy(np.stack([pixels[index] for index in readable]))
            with torch.inference_mode():
                dist = vae.encode(batch.to(self.device, self.dtype)).latent_dist
                moments = torch.cat([dist.mean, dist.logvar], dim=1).float().cpu().numpy()
            out[readable] = moments.astype(np.float16)
        return out


def _light(parts: StableDiffusionParts) -> StableDiffusionParts:
    """Where ``parts`` came from, without the loaded models (what a recipe ships)."""
    return StableDiffusionParts(
        parts.base_model, None, None, None, None, None, parts.revision, parts.variant,
        parts.family, vae_model=parts.vae_model,
    )  # fmt: skip


def _text_embeddings_here(parts: StableDiffusionParts, dtype: str) -> TextEmbeddings:
    loaded = _parts_here(parts, TEXT_PARTS[parts.family], dtype)
    device = resolve_device("auto")  # the GPU Ray gave this worker, else the CPU
    for encoder in loaded.text_encoders:
        encoder.to(device)
    return TextEmbeddings(loaded, device, loaded.text_encoder.dtype)


def _latent_moments_here(
    parts: StableDiffusionParts, resolution: int, flip: bool, dtype: str
) -> LatentMoments:
    loaded = _parts_here(parts, ("vae",), dtype)
    device = resolve_device("auto")  # the GPU Ray gave this worker, else the CPU
    loaded.vae.to(device)
    return LatentMoments(loaded, resolution, flip, device, loaded.vae.dtype)
