"""The image a vision-language model sees: decoded once, turned as shown, downscaled.

Both routes that show the model the image use it: ``vlm:`` (a PIL image for the processor)
and ``openai: --with-image`` (the bytes of a base64 ``image_url`` data URL, the OpenAI vision
message format that vLLM, llama.cpp's server and Ollama accept). ``--image-max-side`` bounds
what a request costs: a VLM's image tokens grow with the pixel count, and a 6000 px photo is
megabytes of base64 per request.

A stored 8-bit RGB or greyscale JPEG, or 8-bit PNG, that is small enough and needs no turning is
sent as it is (no generation loss); anything else is re-encoded once: JPEG for photos, PNG where
the source was PNG (graphics, text), never WebP, TIFF or CMYK, which llama.cpp's image loader
cannot read. 16-bit images are scaled to 8 bits (a plain ``convert("RGB")`` clips them to
white), transparency is laid on white, an animation gives its first frame.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Any

from pipelines.rewriters.base import ItemFailed

DEFAULT_IMAGE_MAX_SIDE = 768
_PASSED_AS_IS = {"JPEG": "image/jpeg", "PNG": "image/png"}
# the modes each format is sent in as stored: 8 bits per channel, what every server decodes
_MODES_AS_IS = {"JPEG": ("RGB", "L"), "PNG": ("RGB", "L", "P")}
_ALPHA_MODES = ("RGBA", "LA", "PA", "P")
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class UploadImage:
    """An encoded image ready to send: its bytes, MIME type and size in pixels."""

    data: bytes
    mime: str
    width: int
    height: int

    def data_url(self) -> str:
        return f"data:{self.mime};base64,{base64.b64encode(self.data).decode('ascii')}"

    def content_part(self) -> dict[str, Any]:
        """The OpenAI chat content part that carries it."""
        return {"type": "image_url", "image_url": {"url": self.data_url()}}


def _open(data: bytes):
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise ItemFailed("image-unreadable", type(error).__name__) from None
    return image


def _turned(image):
    """The pixels as a viewer shows them (EXIF orientation applied), and whether that moved
    anything."""
    from PIL import ImageOps

    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 (a broken EXIF block says nothing about the pixels)
        orientation = 1
    if orientation in (None, 1):
        return image, False
    return ImageOps.exif_transpose(image), True


def _eight_bit(image):
    """16- and 32-bit greyscale scaled to 8 bits (PIL's own conversion clips at 255)."""
    if image.mode not in _WIDE_MODES:
        return image
    import numpy as np
    from PIL import Image

    values = np.asarray(image, dtype=np.float64)
    top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) <= 65535 else None
    top = top or float(values.max())
    scaled = np.clip(values * (255.0 / max(top, 1.0)), 0, 255).round().astype(np.uint8)
    return Image.fromarray(scaled, mode="L")


def _scaled(image, max_side: int):
    from PIL import Image

    if max(image.size) <= max_side:
        return image
    image = image.copy()
    image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return image


def model_image(data: bytes, max_side: int):
    """An RGB PIL image, turned as shown and at most ``max_side`` on its longer side; raises
    :class:`ItemFailed` ("image-unreadable") for bytes that are not an image."""
    image, _ = _turned(_open(data))
    return _scaled(_viewed(image), max_side)


def upload_image(data: bytes, max_side: int) -> UploadImage:
    """What to send for stored image ``data``: the original bytes when they are a JPEG or PNG
    within ``max_side`` that needs no turning, else one re-encode (see the module docstring)."""
    source = _open(data)
    image_format = source.format
    animated = getattr(source, "n_frames", 1) > 1
    image, turned = _turned(source)
    transparent = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    if (
        image_format in _PASSED_AS_IS
        and image.mode in _MODES_AS_IS[image_format]
        and not (turned or animated or transparent)
        and max(image.size) <= max_side
    ):
        return UploadImage(data, _PASSED_AS_IS[image_format], *image.size)
    image = _scaled(_viewed(image), max_side)
    buffer = io.BytesIO()
    if image_format == "PNG":  # graphics and text stay lossless
        image.save(buffer, format="PNG")
        mime = "image/png"
    else:
        image.save(buffer, format="JPEG", quality=90)
        mime = "image/jpeg"
    return UploadImage(buffer.getvalue(), mime, *image.size)


def _viewed(image):
    """8-bit RGB as a viewer shows it: 16-bit scaled, transparency on white, CMYK converted
    (the same pixels ``vlm:`` gives its model)."""
    image = _eight_bit(image)
    return _on_white(image) if image.mode in _ALPHA_MODES else image.convert("RGB")


def _on_white(image):
    """Transparent pixels on white, as a viewer shows them (JPEG has no alpha)."""
    from PIL import Image

    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
