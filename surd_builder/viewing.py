"""An image's pixels as a viewer shows them: what every model in surd is given.

Stored images come as galleries serve them: EXIF-rotated phone photos, 16-bit PNGs, transparent
graphics, CMYK JPEGs, animated GIFs. A plain ``Image.open(...).convert("RGB")`` gets several of
them wrong: 16-bit values clip to white, transparent pixels show whatever colour lies under
them (often black), a rotated photo lies on its side. Captioners, CLIP screening, the
vision-language rewriters and judges all decode through :func:`viewed_rgb`, so they see one
picture: turned as EXIF says, 16-bit scaled to 8 bits, transparency on white, an animation's
first frame.

:func:`open_image` also decodes a large JPEG at a reduced scale when the caller will shrink it
anyway (libjpeg's DCT-domain 1/2, 1/4, 1/8 scaling).
"""

from __future__ import annotations

import io
import math
from typing import Any

EXIF_ORIENTATION = 0x0112
ALPHA_MODES = ("RGBA", "LA", "PA", "P")
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


class UnreadableImage(Exception):
    """The bytes are not an image Pillow can decode; ``str()`` is the error's type name."""


def open_image(data: bytes, max_side: int | None = None) -> tuple[Any, tuple[int, int]]:
    """(the decoded PIL image, its stored size). With ``max_side``, a JPEG larger than that is
    decoded at the smallest of 1/2, 1/4 or 1/8 scale still at least ``max_side`` on its longer
    side (a 3000x2000 photo for 768 px costs a third of a full decode). Any decoding failure,
    including Pillow's less usual ones (a TIFF's broken second frame raises ``TypeError``), is
    :class:`UnreadableImage`."""
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        stored_size = image.size
        longest = max(stored_size)
        if max_side is not None and image.format == "JPEG" and longest > max_side:
            scale = max_side / longest
            image.draft(image.mode, tuple(math.ceil(side * scale) for side in stored_size))
        image.load()
        image.info["surd_frames"] = getattr(image, "n_frames", 1)  # reads every frame's header
    except Exception as error:  # noqa: BLE001 (whatever the decoder raises, this image is bad)
        raise UnreadableImage(type(error).__name__) from None
    return image, stored_size


def turned(image: Any) -> tuple[Any, bool]:
    """The image turned as its EXIF orientation says, and whether that moved anything."""
    from PIL import ImageOps

    try:
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 (a broken EXIF block says nothing about the pixels)
        orientation = 1
    if orientation in (None, 1):
        return image, False
    try:
        return ImageOps.exif_transpose(image), True
    except Exception as error:  # noqa: BLE001
        raise UnreadableImage(type(error).__name__) from None


def eight_bit(image: Any) -> Any:
    """16- and 32-bit greyscale scaled to 8 bits (Pillow's own conversion clips at 255)."""
    if image.mode not in WIDE_MODES:
        return image
    import numpy as np
    from PIL import Image

    values = np.asarray(image, dtype=np.float64)
    top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) <= 65535 else None
    top = top or float(values.max())
    scaled = np.clip(values * (255.0 / max(top, 1.0)), 0, 255).round().astype(np.uint8)
    return Image.fromarray(scaled, mode="L")


def on_white(image: Any) -> Any:
    """Transparent pixels on white, as a viewer shows them; RGB."""
    from PIL import Image

    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def as_viewed(image: Any) -> Any:
    """8-bit RGB of a decoded (and turned) image: 16-bit scaled, transparency on white, CMYK
    and palettes converted."""
    image = eight_bit(image)
    return on_white(image) if image.mode in ALPHA_MODES else image.convert("RGB")


def shrunk(image: Any, max_side: int | None) -> Any:
    """``image`` with its longer side at most ``max_side`` (LANCZOS), aspect kept."""
    if max_side is None or max(image.size) <= max_side:
        return image
    from PIL import Image

    image = image.copy()
    image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return image


def viewed_rgb(data: bytes, max_side: int | None = None) -> Any:
    """The RGB PIL image a viewer shows for ``data``, at most ``max_side`` on its longer side
    when given; raises :class:`UnreadableImage`."""
    image, _ = open_image(data, max_side)
    try:
        return shrunk(as_viewed(turned(image)[0]), max_side)
    except UnreadableImage:
        raise
    except Exception as error:  # noqa: BLE001 (a decoder failing late, on the pixels)
        raise UnreadableImage(type(error).__name__) from None
