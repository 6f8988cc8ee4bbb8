"""The image a vision-language model sees: decoded once, as a viewer shows it
(:mod:`surd_builder.viewing`), downscaled.

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
from surd_builder.viewing import (
    UnreadableImage,
    as_viewed,
    open_image,
    shrunk,
    turned,
    viewed_rgb,
)

DEFAULT_IMAGE_MAX_SIDE = 768
_PASSED_AS_IS = {"JPEG": "image/jpeg", "PNG": "image/png"}
# the modes each format is sent in as stored: 8 bits per channel, what every server decodes
_MODES_AS_IS = {"JPEG": ("RGB", "L"), "PNG": ("RGB", "L", "P")}


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


def model_image(data: bytes, max_side: int):
    """An RGB PIL image as a viewer shows it (:func:`surd_builder.viewing.viewed_rgb`), at most
    ``max_side`` on its longer side; :class:`ItemFailed` ("image-unreadable") for bytes that are
    not an image."""
    try:
        return viewed_rgb(data, max_side)
    except UnreadableImage as error:
        raise ItemFailed("image-unreadable", str(error)) from None


def upload_image(data: bytes, max_side: int) -> UploadImage:
    """What to send for stored image ``data``: the original bytes when they are a JPEG or PNG
    within ``max_side`` that needs no turning, else one re-encode (see the module docstring)."""
    try:
        source, stored_size = open_image(data, max_side)
        image, was_turned = turned(source)
        image_format = source.format
        animated = source.info.get("surd_frames", 1) > 1
        transparent = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
        if (
            image_format in _PASSED_AS_IS
            and image.mode in _MODES_AS_IS[image_format]
            and not (was_turned or animated or transparent)
            and max(stored_size) <= max_side
        ):
            return UploadImage(data, _PASSED_AS_IS[image_format], *image.size)
        image = shrunk(as_viewed(image), max_side)
    except UnreadableImage as error:
        raise ItemFailed("image-unreadable", str(error)) from None
    except Exception as error:  # noqa: BLE001 (a decoder failing late, on the pixels)
        raise ItemFailed("image-unreadable", type(error).__name__) from None
    buffer = io.BytesIO()
    if image_format == "PNG":  # graphics and text stay lossless
        image.save(buffer, format="PNG")
        mime = "image/png"
    else:
        image.save(buffer, format="JPEG", quality=90)
        mime = "image/jpeg"
    return UploadImage(buffer.getvalue(), mime, *image.size)
