"""Encoders of the frozen inputs: CLIP embeddings of prompts and VAE latents of images.

Each encoder has a ``cache_identity`` (model + every setting that changes the values) and is
called on a batch, returning a NumPy array, so :func:`adapter.cache.fill_cache` can run it once
per content and keep the result.

- Text: the text encoder's last hidden state over ``model_max_length`` (77) padded tokens, as
  Stable Diffusion conditions on it (attention mask only where the encoder's config asks).
- Images: resized so the short side is ``resolution``, centre-cropped (a random crop could not be
  cached), optionally mirrored, then encoded. The cache keeps the latent *distribution* (mean and
  log-variance), not one sample of it, so every step draws a fresh sample exactly as encoding on
  the fly would. An image that cannot be decoded is stored as NaN and left out of training.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable
from typing import Any

import numpy as np

from adapter.stable_diffusion import StableDiffusionParts, load_stable_diffusion
from surd_builder.models import dtype_name, resolve_device


def _parts_here(parts: StableDiffusionParts, components: tuple[str, ...], dtype: str):
    import torch

    return load_stable_diffusion(
        parts.base_model, getattr(torch, dtype), parts.variant, parts.revision, components
    )


def preprocess_image(data: bytes, resolution: int, flip: bool) -> np.ndarray | None:
    """(3, resolution, resolution) float32 in [-1, 1], or None if ``data`` is not an image."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as opened:  # as shown: EXIF orientation applied
            image = ImageOps.exif_transpose(opened).convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return None  # one bad or oversized image is left out, never the whole build
    scale = resolution / min(image.size)
    size = (
        max(resolution, round(image.width * scale)),
        max(resolution, round(image.height * scale)),
    )
    image = image.resize(size, Image.Resampling.BILINEAR)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = (np.asarray(image, dtype=np.float32) / 127.5 - 1.0).transpose(2, 0, 1)
    return mirrored(pixels) if flip else pixels


def mirrored(pixels: np.ndarray) -> np.ndarray:
    """``pixels`` (:func:`preprocess_image`'s output) mirrored left to right, in the same memory
    layout (channels last in memory: the VAE's convolutions take another path, with other
    rounding, for another layout), so latents of a mirrored copy equal those of the image
    mirrored before preprocessing, bit for bit."""
    channels_last = pixels.transpose(1, 2, 0)
    return np.ascontiguousarray(channels_last[:, ::-1]).transpose(2, 0, 1)


class TextEmbeddings:
    """The base model's CLIP text embeddings, (batch, 77, width) float16."""

    def __init__(self, parts: StableDiffusionParts, device: str, dtype: Any):
        self.parts, self.device, self.dtype = parts, device, dtype

    def cache_identity(self) -> str:
        model = self.parts.fingerprint(("tokenizer", "text_encoder"))
        return f"clip-text\x1f{model}\x1f{self.dtype}"

    def remote_factory(self) -> Callable[[], TextEmbeddings]:
        """A picklable recipe for this encoder in another process (a Ray worker): the same
        model and dtype, so the values its cache identity promises, on that worker's GPU."""
        return functools.partial(_text_embeddings_here, _light(self.parts), dtype_name(self.dtype))

    def __call__(self, texts: list[str]) -> np.ndarray:
        import torch

        tokenizer, encoder = self.parts.tokenizer, self.parts.text_encoder
        tokens = tokenizer(
            texts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        mask = None
        if getattr(encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(self.device)
        with torch.inference_mode():
            hidden = encoder(tokens.input_ids.to(self.device), attention_mask=mask)[0]
        return hidden.float().cpu().numpy().astype(np.float16)


class LatentMoments:
    """The VAE's latent mean and log-variance, (batch, 2 x latent channels, r/8, r/8) float16."""

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
        parts.base_model, None, None, None, None, None, parts.revision, parts.variant
    )


def _text_embeddings_here(parts: StableDiffusionParts, dtype: str) -> TextEmbeddings:
    loaded = _parts_here(parts, ("tokenizer", "text_encoder"), dtype)
    device = resolve_device("auto")  # the GPU Ray gave this worker, else the CPU
    loaded.text_encoder.to(device)
    return TextEmbeddings(loaded, device, loaded.text_encoder.dtype)


def _latent_moments_here(
    parts: StableDiffusionParts, resolution: int, flip: bool, dtype: str
) -> LatentMoments:
    loaded = _parts_here(parts, ("vae",), dtype)
    device = resolve_device("auto")  # the GPU Ray gave this worker, else the CPU
    loaded.vae.to(device)
    return LatentMoments(loaded, resolution, flip, device, loaded.vae.dtype)
