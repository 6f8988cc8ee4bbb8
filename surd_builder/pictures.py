"""Labelled pictures: text drawn with a bundled font, wrapped or cut to fit, and grids of
images with a title, column headers and a label above each row.

Used by the adapter (validation and ``generate --compare`` grids) and the pipelines (the dedupe
cluster grid, the thumbnails of ``report.html``), so it lives in the core. Nothing needs a font
installed: text is drawn in matplotlib's bundled DejaVu Sans (accents, Greek, Cyrillic,
dashes), else Pillow's bundled ``ImageFont.load_default(size=...)`` (Pillow >= 10.1; Latin
letters without accents only), else Pillow's bitmap font, which can encode only Latin-1: with
it, the ellipsis is "..." and other characters are replaced (:func:`drawable`).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

BACKGROUND = (255, 255, 255)
BAND = (236, 236, 236)  # behind titles and column headers
INK = (20, 20, 20)
MUTED = (90, 90, 90)
ELLIPSIS = "\u2026"
MIN_FONT, MAX_FONT = 12, 32


def _dejavu_sans() -> str | None:
    """The path of matplotlib's bundled ``DejaVuSans.ttf``, None where it is not there."""
    try:
        import matplotlib

        path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    except Exception:  # noqa: BLE001 (no or a broken matplotlib: Pillow's font will do)
        return None
    return str(path) if path.is_file() else None


@lru_cache(maxsize=16)
def font(size: int) -> Any:
    """DejaVu Sans at ``size`` pixels (from matplotlib), else PIL's default font (the fixed-size
    bitmap font on a Pillow without FreeType, which ignores the size)."""
    from PIL import ImageFont

    path = _dejavu_sans()
    if path is not None:
        try:
            return ImageFont.truetype(path, size)
        except (ImportError, OSError):  # no FreeType, or an unreadable file
            pass
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def _is_freetype(face: Any) -> bool:
    from PIL import ImageFont

    return isinstance(face, ImageFont.FreeTypeFont | ImageFont.TransposedFont)


def ellipsis_for(face: Any) -> str:
    """The ellipsis character, or "..." for a bitmap font (which cannot encode it)."""
    return ELLIPSIS if _is_freetype(face) else "..."


def drawable(face: Any, text: str) -> str:
    """``text`` as ``face`` can draw it: as it is for a FreeType font; for a bitmap font (Latin-1
    only) with the ellipsis as "..." and other characters it cannot encode as "?"."""
    if _is_freetype(face):
        return text
    text = text.replace(ELLIPSIS, "...")
    return text.encode("latin-1", "replace").decode("latin-1")


def font_size_for(width: int) -> int:
    """A font size readable beside an image ``width`` pixels wide: 1/20 of it, 12 to 32 px."""
    return max(MIN_FONT, min(MAX_FONT, round(width / 20)))


def text_width(face: Any, text: str) -> int:
    return int(round(face.getlength(drawable(face, text))))


def line_height(face: Any) -> int:
    """Pixels from one line's top to the next's (ascent + descent + a little leading)."""
    try:
        ascent, descent = face.getmetrics()
    except AttributeError:
        box = face.getbbox("Ag")
        ascent, descent = box[3], 0
    return ascent + descent + max(2, (ascent + descent) // 6)


def fit(text: str, face: Any, width: int) -> str:
    """``text`` on one line of at most ``width`` pixels: as it is, or cut with an ellipsis."""
    text = drawable(face, " ".join(text.split()))
    if text_width(face, text) <= width:
        return text
    ellipsis = ellipsis_for(face)
    low, high = 0, len(text)  # the longest prefix that fits with the ellipsis
    while low < high:
        middle = (low + high + 1) // 2
        if text_width(face, text[:middle].rstrip() + ellipsis) <= width:
            low = middle
        else:
            high = middle - 1
    return text[:low].rstrip() + ellipsis


def wrap(text: str, face: Any, width: int, max_lines: int = 3) -> list[str]:
    """``text`` broken into lines of at most ``width`` pixels at spaces (a word too long for a
    line is broken inside it), at most ``max_lines`` of them, the last cut with an ellipsis when
    text is left over."""
    lines: list[str] = []
    current = ""
    words = drawable(face, text).split()
    ellipsis = ellipsis_for(face)
    for index, word in enumerate(words):
        candidate = f"{current} {word}" if current else word
        if text_width(face, candidate) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        current = word
        # an over-long word, broken into lines until there are enough (the rest is cut below)
        while len(lines) < max_lines and text_width(face, current) > width and len(current) > 1:
            cut = len(fit(current, face, width + text_width(face, ellipsis))) - len(ellipsis)
            cut = max(1, cut)
            lines.append(current[:cut])
            current = current[cut:]
        if len(lines) >= max_lines:
            rest = " ".join([current, *words[index + 1 :]])
            return [*lines[: max_lines - 1], fit(f"{lines[max_lines - 1]} {rest}", face, width)]
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        lines = [*lines[: max_lines - 1], fit(" ".join(lines[max_lines - 1 :]), face, width)]
    return lines


def draw_lines(
    draw: Any,
    xy: tuple[int, int],
    lines: Sequence[str],
    face: Any,
    fill: tuple[int, int, int] = INK,
    width: int | None = None,
) -> int:
    """Draw ``lines`` from ``xy`` down (centred in ``width`` when given); the height used."""
    x, y = xy
    step = line_height(face)
    for number, line in enumerate(lines):
        line = drawable(face, line)
        left = x if width is None else x + max(0, (width - text_width(face, line)) // 2)
        draw.text((left, y + number * step), line, font=face, fill=fill)
    return step * len(lines)


def text_band(
    lines: Sequence[str], face: Any, width: int, pad: int, fill=BACKGROUND, centred=False
) -> Any:
    """An image ``width`` wide holding ``lines`` with ``pad`` pixels around them."""
    from PIL import Image, ImageDraw

    band = Image.new("RGB", (width, line_height(face) * len(lines) + 2 * pad), fill)
    draw = ImageDraw.Draw(band)
    draw_lines(draw, (pad, pad), lines, face, INK, width - 2 * pad if centred else None)
    return band


@dataclass
class Grid:
    """A labelled grid and where each image went: ``cells[row][column]`` = (x, y, w, h) of the
    column's slot, the image centred horizontally in it at its top."""

    image: Any
    cells: list[list[tuple[int, int, int, int]]] = field(default_factory=list)
    header_height: int = 0  # title + column headers


def labelled_grid(
    rows: Sequence[Sequence[Any]],
    column_headers: Sequence[str] = (),
    row_labels: Sequence[str] = (),
    title: str | None = None,
    max_label_lines: int = 3,
    captions: Sequence[Sequence[Sequence[str]]] = (),
    max_title_lines: int = 3,
    min_width: int = 0,
) -> Grid:
    """PIL images in rows, with an optional ``title`` band (wrapped), ``column_headers`` over
    the columns, a label (wrapped, at most ``max_label_lines``, cut with an ellipsis) above
    each row and ``captions[row][column]`` (lines, each cut to the column) under each image.
    Text is sized to the images (:func:`font_size_for`); columns widen to fit their header;
    the grid is at least ``min_width`` wide (room for a long title)."""
    from PIL import Image, ImageDraw

    images = [image for row in rows for image in row]
    if not images:
        raise ValueError("a grid needs at least one image")
    cell_w = max(image.width for image in images)
    cell_h = max(image.height for image in images)
    columns = max(len(row) for row in rows)
    face = font(font_size_for(cell_w))
    pad = max(4, font_size_for(cell_w) // 3)
    column_w = max([cell_w, *(text_width(face, h) + 2 * pad for h in column_headers)])
    width = max(min_width, columns * column_w + (columns + 1) * pad)
    text_w = width - 2 * pad
    bands = []
    if title:
        bands.append(text_band(wrap(title, face, text_w, max_title_lines), face, width, pad))
    header = None
    if column_headers:
        header = Image.new("RGB", (width, line_height(face) + 2 * pad), BAND)
        draw = ImageDraw.Draw(header)
        for number, text in enumerate(column_headers[:columns]):
            x = pad + number * (column_w + pad)
            draw_lines(draw, (x, pad), [fit(text, face, column_w)], face, INK, column_w)
        bands.append(header)
    labels = [wrap(label, face, text_w, max_label_lines) if label else [] for label in row_labels]
    labels += [[]] * (len(rows) - len(labels))
    label_h = [line_height(face) * len(lines) + pad if lines else 0 for lines in labels]
    caption_lines = max((len(c) for row in captions for c in row), default=0)
    caption_h = line_height(face) * caption_lines + (pad // 2 if caption_lines else 0)
    header_height = sum(band.height for band in bands)
    height = header_height + pad + sum(label_h) + len(rows) * (cell_h + caption_h + pad)
    grid = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    y = 0
    for band in bands:
        grid.paste(band, (0, y))
        y += band.height
    y += pad
    cells = []
    for row, lines, above in zip(rows, labels, label_h, strict=True):
        if lines:
            draw_lines(draw, (pad, y), lines, face, INK)
        y += above
        slots = []
        for number, image in enumerate(row):
            x = pad + number * (column_w + pad)
            grid.paste(image.convert("RGB"), (x + (column_w - image.width) // 2, y))
            slots.append((x, y, column_w, cell_h))
            row_captions = captions[len(cells)] if len(captions) > len(cells) else ()
            lines = row_captions[number] if number < len(row_captions) else ()
            fitted = [fit(line, face, column_w) for line in lines]
            draw_lines(draw, (x, y + cell_h + pad // 2), fitted, face, INK, column_w)
        cells.append(slots)
        y += cell_h + caption_h + pad
    return Grid(grid, cells, header_height)


def thumbnail(data: bytes, max_side: int) -> Any:
    """An RGB PIL thumbnail of encoded image ``data``, at most ``max_side`` on its longer side
    (JPEGs decoded at a reduced scale)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        if image.format == "JPEG":
            image.draft("RGB", (max_side, max_side))
        small = image.convert("RGB")
    small.thumbnail((max_side, max_side))
    return small


def thumbnail_jpeg(data: bytes, max_side: int = 128, quality: int = 70) -> bytes:
    """A small JPEG of encoded image ``data``, for embedding in a page."""
    buffer = io.BytesIO()
    thumbnail(data, max_side).save(buffer, format="JPEG", quality=quality, optimize=True)
    return buffer.getvalue()
