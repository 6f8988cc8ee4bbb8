"""Ingest against one big generated folder of real-world mess (the "corpus").

Everything is generated in ``tmp_path``, seeded. The corpus holds:

- prompts whose inner whitespace must survive exactly (tabs, repeated spaces, newlines, NBSP,
  ZWSP, ideographic spaces, decomposed accents), with CRLF/CR line endings and BOMs;
- sidecars in UTF-8 (with and without BOM), UTF-16/UTF-32 LE/BE with BOM and Windows-1252,
  ``.txt`` and ``.caption``; empty, whitespace-only and missing prompts; 50k / 100k / 100k+1
  character prompts and a sidecar over 1 MiB;
- images in every format and mode PIL writes (PNG, JPEG, WEBP, GIF, BMP, TIFF, TGA, PPM/PGM/PBM,
  ICO, JPEG 2000 and AVIF when supported; 1, L, LA, P, RGB, RGBA, CMYK, I;16, I, F; animated
  GIF/PNG/WEBP, multi-page TIFF), wrong and upper-case extensions, EXIF-rotated JPEGs;
- broken images (truncated, empty, random bytes, HTML) and decompression bombs;
- odd file names (emoji, leading dash, quotes, 200+ bytes, other scripts, deep nesting, names
  that are not UTF-8);
- symlinks leading outside the folder (files, folders, sidecars, metadata rows), links inside it,
  a loop and a dangling link;
- OS litter (.DS_Store, AppleDouble ``._*``, Thumbs.db, desktop.ini, __MACOSX/, @eaDir/,
  .thumbnails/), holding valid images;
- a metadata.jsonl with good rows and every kind of bad row (invalid JSON, arrays, missing or
  non-string file names, duplicates, escaping paths, missing files, bad typed fields).

Focused tests cover what the corpus cannot hold at once (metadata.csv, metadata file encodings,
unreadable metadata files) and the cases where the contract allows alternatives.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import json
import os
import random
import resource
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from PIL import Image, features

from pipelines.ingest import IngestStage
from pipelines.runner import RunOptions, run_stage
from surd_builder.errors import InputError
from surd_builder.workspace import Workspace
from tests.conftest import run_surd

QUIET = RunOptions(batch_size=8, show_progress=False)
SEED = 20240611
HAS_JP2 = features.check("jpg_2000")
HAS_AVIF = features.check("avif")


def norm(text: str) -> str:
    """The one normalisation the contract allows: a leading BOM, CRLF/CR -> LF, str.strip()."""
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n").strip()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------- image makers
def encode(image: Image.Image | list[Image.Image], fmt: str, **params) -> bytes:
    """``image`` saved as ``fmt`` (a list: all frames, animated/multi-page)."""
    buffer = io.BytesIO()
    if isinstance(image, list):
        image[0].save(buffer, format=fmt, save_all=True, append_images=image[1:], **params)
    else:
        image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def noise(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    """Incompressible pixels, so a truncated file is cut inside its image data."""
    rgb = Image.frombytes("RGB", size, random.Random(seed).randbytes(size[0] * size[1] * 3))
    return rgb.convert(mode)


def palette_with_transparency(size: tuple[int, int]) -> Image.Image:
    image = Image.new("P", size, 1)
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    image.paste(2, (0, 0, size[0] // 2, size[1]))
    image.info["transparency"] = 0
    image.paste(0, (0, 0, 2, 2))
    return image


def exif_jpeg(orientation: int, size: tuple[int, int] = (40, 30)) -> bytes:
    image = Image.new("RGB", size, (10, 120, 200))
    image.paste((250, 250, 0), (0, 0, size[0] // 4, size[1] // 4))  # mark a corner
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", exif=exif.tobytes())


def png_with_header_size(width: int, height: int) -> bytes:
    """A small 1-bit PNG whose IHDR (CRC fixed up) claims ``width`` x ``height``."""
    data = bytearray(encode(Image.new("1", (8, 8), 1), "PNG"))
    assert data[12:16] == b"IHDR"
    struct.pack_into(">II", data, 16, width, height)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def valid_png_bomb(side: int = 30000) -> bytes:
    """A real, fully decodable 1-bit ``side`` x ``side`` PNG of zeros (about 110 KB; decoding
    it would take ``side**2`` pixels), built row by row without holding the pixels."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        body = kind + payload
        return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\0" * (1 + (side + 7) // 8)
    compressor = zlib.compressobj(6)
    block = row * 512
    parts = [compressor.compress(block) for _ in range(side // 512)]
    parts += [compressor.compress(row * (side % 512)), compressor.flush()]
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", b"".join(parts))
        + chunk(b"IEND", b"")
    )


def image_cases(colour: int = 0) -> dict[str, tuple[bytes, tuple[int, int], str]]:
    """{file name: (bytes, (width, height), PIL format name)}: every format and mode."""
    s = (24, 16)  # most images
    o = (17, 13)  # odd sizes for the rest
    c = colour

    def rgb(size=s, shade=0):
        image = Image.new("RGB", size, (200 - shade, 30 + c, 30 + shade))
        image.paste((0, 90, 160), (0, 0, size[0] // 3, size[1] // 2))
        return image

    def frames(mode, size, count):
        return [
            Image.new("RGB", size, (40 * n, 200 - 30 * n, c)).convert(mode) for n in range(count)
        ]

    cases = {
        "rgb.png": (encode(rgb(), "PNG"), s, "PNG"),
        "rgba.png": (encode(rgb().convert("RGBA"), "PNG"), s, "PNG"),
        "l.png": (encode(rgb(o).convert("L"), "PNG"), o, "PNG"),
        "la.png": (encode(rgb(o).convert("LA"), "PNG"), o, "PNG"),
        "p-transparent.png": (encode(palette_with_transparency(s), "PNG"), s, "PNG"),
        "1.png": (encode(rgb(o).convert("1"), "PNG"), o, "PNG"),
        "i16.png": (encode(Image.new("I;16", s, 40000 + c), "PNG"), s, "PNG"),
        "animated.png": (encode(frames("RGBA", s, 3), "PNG", duration=40), s, "PNG"),
        "rgb.jpg": (encode(rgb(o), "JPEG", quality=90), o, "JPEG"),
        "l.jpeg": (encode(rgb().convert("L"), "JPEG"), s, "JPEG"),
        "cmyk.jpg": (encode(rgb().convert("CMYK"), "JPEG"), s, "JPEG"),
        "progressive.jpg": (encode(rgb(o), "JPEG", progressive=True), o, "JPEG"),
        "rgb.webp": (encode(rgb(), "WEBP", quality=80), s, "WEBP"),
        "rgba-lossless.webp": (encode(rgb().convert("RGBA"), "WEBP", lossless=True), s, "WEBP"),
        "animated.webp": (encode(frames("RGB", s, 3), "WEBP", duration=40), s, "WEBP"),
        "p.gif": (encode(rgb(o).convert("P"), "GIF"), o, "GIF"),
        "transparent.gif": (encode(palette_with_transparency(s), "GIF"), s, "GIF"),
        "animated.gif": (encode(frames("P", s, 4), "GIF", duration=50, loop=0), s, "GIF"),
        "rgb.bmp": (encode(rgb(o), "BMP"), o, "BMP"),
        "1.bmp": (encode(rgb().convert("1"), "BMP"), s, "BMP"),
        "p.bmp": (encode(rgb().convert("P"), "BMP"), s, "BMP"),
        "rgb.tif": (encode(rgb(), "TIFF"), s, "TIFF"),
        "lzw.tiff": (encode(rgb(o), "TIFF", compression="tiff_lzw"), o, "TIFF"),
        "cmyk.tif": (encode(rgb().convert("CMYK"), "TIFF"), s, "TIFF"),
        "i.tif": (encode(Image.new("I", s, 70000 + c), "TIFF"), s, "TIFF"),
        "f.tif": (encode(Image.new("F", o, 0.25 + c), "TIFF"), o, "TIFF"),
        "1.tif": (encode(rgb().convert("1"), "TIFF"), s, "TIFF"),
        "multipage.tif": (encode(frames("RGB", s, 2), "TIFF"), s, "TIFF"),
        "rgb.tga": (encode(rgb(o), "TGA"), o, "TGA"),
        "rgba-rle.tga": (encode(rgb().convert("RGBA"), "TGA", compression="tga_rle"), s, "TGA"),
        "rgb.ppm": (encode(rgb(o), "PPM"), o, "PPM"),
        "l.pgm": (encode(rgb().convert("L"), "PPM"), s, "PPM"),
        "1.pbm": (encode(rgb().convert("1"), "PPM"), s, "PPM"),
        "icon.ico": (
            encode(rgb((32, 32)).convert("RGBA"), "ICO", sizes=[(32, 32)]),
            (32, 32),
            "ICO",
        ),
        # the content decides, not the extension
        "jpeg-named.png": (encode(rgb(shade=9), "JPEG"), s, "JPEG"),
        "png-named.jpg": (encode(rgb(o, shade=9), "PNG"), o, "PNG"),
        "UPPER.JPG": (encode(rgb(shade=20), "JPEG"), s, "JPEG"),
        "Mixed.PnG": (encode(rgb(shade=30), "PNG"), s, "PNG"),
        # EXIF orientation: bytes unchanged, size as displayed
        "exif-6.jpg": (exif_jpeg(6), (30, 40), "JPEG"),
        "exif-8.jpg": (exif_jpeg(8), (30, 40), "JPEG"),
        "exif-1.jpg": (exif_jpeg(1), (40, 30), "JPEG"),
    }
    if HAS_JP2:
        cases["rgb.jp2"] = (encode(rgb(o), "JPEG2000"), o, "JPEG2000")
    if HAS_AVIF:
        cases["rgb.avif"] = (encode(rgb(), "AVIF", quality=60), s, "AVIF")
    for name, (data, size, fmt) in cases.items():  # the generator's own sanity check
        with Image.open(io.BytesIO(data)) as check:
            assert check.format == fmt, name
            assert check.size == size or name.startswith("exif-"), name
    return cases


# ----------------------------------------------------------------------------- the corpus
@dataclass
class Corpus:
    """A folder being generated and what ingesting it must give."""

    folder: Path
    outside: Path
    good: dict[str, str] = field(default_factory=dict)  # source_item_id -> exact prompt
    bad: dict[str, str] = field(default_factory=dict)  # source_item_id -> reason
    # ids (or "prefix/") whose failure is optional; allowed reasons (None: any)
    maybe: dict[str, frozenset[str] | None] = field(default_factory=dict)
    shapes: dict[str, tuple[int, int, str]] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)  # id -> the image file's bytes
    fields: dict[str, dict[str, str]] = field(default_factory=dict)  # id -> other exact fields
    never_stored: list[bytes] = field(default_factory=list)
    never_prompt: list[str] = field(default_factory=list)
    litter: list[str] = field(default_factory=list)
    escaping: list[str] = field(default_factory=list)  # file_names that give "bad-file-name"
    metadata_lines: list[tuple[str, str]] = field(default_factory=list)  # (text, line end)
    bad_rows: dict[int, str] = field(default_factory=dict)  # line number -> what is wrong
    rng: random.Random = field(default_factory=lambda: random.Random(SEED))

    # -- files
    def abs(self, rel: str | bytes) -> bytes:
        return os.fsencode(self.folder) + b"/" + (rel if isinstance(rel, bytes) else rel.encode())

    def put(self, rel: str | bytes, data: bytes) -> None:
        path = self.abs(rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(data)

    def link(self, rel: str, target: str | Path) -> None:
        path = self.abs(rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.symlink(target, path)

    @staticmethod
    def item_id(rel: str | bytes) -> str:
        return rel.decode("utf-8", "backslashreplace") if isinstance(rel, bytes) else rel

    @staticmethod
    def sidecar(rel: str | bytes, ext: str) -> str | bytes:
        if isinstance(rel, bytes):
            return rel.rsplit(b".", 1)[0] + ext.encode()
        return rel.rsplit(".", 1)[0] + ext

    # -- items
    def good_item(
        self,
        rel: str | bytes,
        image: bytes,
        prompt: str | bytes,
        expect: str | None = None,
        ext: str = ".txt",
        shape: tuple[int, int, str] | None = None,
    ) -> str:
        """An image with a sidecar that must become a sample with prompt ``expect``
        (default: the contract's normalisation of ``prompt``)."""
        self.put(rel, image)
        data = prompt.encode() if isinstance(prompt, str) else prompt
        assert not os.path.lexists(self.abs(self.sidecar(rel, ext))), "a shared sidecar"
        self.put(self.sidecar(rel, ext), data)
        if expect is None:
            assert isinstance(prompt, str)
            expect = norm(prompt)
        item = self.item_id(rel)
        assert item not in self.good and item not in self.bad
        self.good[item] = expect
        self.files[item] = image
        if shape is not None:
            self.shapes[item] = shape
        return item

    def bad_item(
        self, rel: str | bytes, image: bytes, reason: str, prompt: str | bytes | None = "x"
    ) -> str:
        self.put(rel, image)
        if prompt is not None:
            assert not os.path.lexists(self.abs(self.sidecar(rel, ".txt"))), "a shared sidecar"
            self.put(
                self.sidecar(rel, ".txt"), prompt.encode() if isinstance(prompt, str) else prompt
            )
        item = self.item_id(rel)
        assert item not in self.good and item not in self.bad
        self.bad[item] = reason
        return item

    def png(self, size: tuple[int, int] = (24, 16)) -> bytes:
        """A small PNG with bytes unique within the corpus."""
        colour = tuple(self.rng.randrange(256) for _ in range(3))
        image = Image.new("RGB", size, colour)
        image.putpixel((0, 0), (len(self.files) % 256, len(self.good) % 256, 7))
        return encode(image, "PNG")

    # -- metadata.jsonl
    def row(self, value: object, end: str = "\n", ascii_only: bool = True) -> int:
        """Append one metadata.jsonl line (a dict/list is dumped, a str written as is);
        returns its 1-based line number."""
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=ascii_only)
        self.metadata_lines.append((text, end))
        return len(self.metadata_lines)

    def bad_row(self, value: object, why: str) -> None:
        number = self.row(value)
        self.bad_rows[number] = why
        self.bad[f"metadata.jsonl:{number}"] = "bad-metadata-row"

    def finish(self) -> Corpus:
        if self.metadata_lines:
            text = "".join(line + end for line, end in self.metadata_lines)
            self.put("metadata.jsonl", text.encode())
        return self


def add_prompts(c: Corpus) -> None:
    """Exact prompts: inner whitespace, line endings, encodings, no prompt, huge prompts."""
    c.good_item(
        "prompts/inner-whitespace.png",
        c.png(),
        "\ufeff\t  tabs\there,  two  spaces,\nnew line,\u00a0nbsp,\u200bzwsp,"
        "\u3000ideographic, cafe\u0301, \u2028sep  \n\n",
    )
    c.good_item("prompts/wide-edges.png", c.png(), "\u00a0\u3000 wide edges, kept \u3000\u00a0")
    c.good_item("prompts/cr-only.png", c.png(), "first\rsecond\r\rfourth\r")
    c.good_item("prompts/cr-crlf.png", c.png(), "a\r\r\nb\r\n\r\nc")
    c.good_item("prompts/caption.png", c.png(), "tags,\r\nmore tags\r\n", ext=".caption")
    text = "  café, 猫, ✓ “q”\r\nline two\rline three\u00a0end \r\n"
    encodings = {
        "utf-8": text.encode("utf-8"),
        "utf-8-bom": codecs.BOM_UTF8 + text.encode("utf-8"),
        "utf-16-le": codecs.BOM_UTF16_LE + text.encode("utf-16-le"),
        "utf-16-be": codecs.BOM_UTF16_BE + text.encode("utf-16-be"),
        "utf-32-le": codecs.BOM_UTF32_LE + text.encode("utf-32-le"),  # starts like UTF-16 LE
        "utf-32-be": codecs.BOM_UTF32_BE + text.encode("utf-32-be"),
    }
    for name, data in encodings.items():
        c.good_item(f"encodings/{name}.png", c.png(), data, expect=norm(text))
    latin1 = b"caf\xe9, 8k"
    smart = "“smart” – €5, naïve\r\nok ".encode("cp1252")
    for data in (latin1, smart):
        with pytest.raises(UnicodeDecodeError):
            data.decode("utf-8")
    c.good_item("encodings/latin1.png", c.png(), latin1, expect="café, 8k")
    c.good_item("encodings/cp1252.png", c.png(), smart, expect="“smart” – €5, naïve\nok")
    c.good_item(
        "encodings/cp1252-caption.png", c.png(), b"caf\xe9\r\n", expect="café", ext=".caption"
    )

    c.bad_item("no-prompt/empty.png", c.png(), "no-prompt", prompt=b"")
    c.bad_item("no-prompt/blank.png", c.png(), "no-prompt", prompt="  \r\n\t\u3000\u00a0\n")
    c.bad_item("no-prompt/bom-only.png", c.png(), "no-prompt", prompt=codecs.BOM_UTF8 + b" \n")
    c.bad_item(
        "no-prompt/utf16-blank.png",
        c.png(),
        "no-prompt",
        prompt=codecs.BOM_UTF16_LE + " \r\n".encode("utf-16-le"),
    )
    c.bad_item("no-prompt/none.png", c.png(), "no-prompt", prompt=None)

    words = ["fox", "café", "猫", "8k", "bokeh", "a  b", "tab\there", "line\nbreak", "x\u00a0y"]
    long = ", ".join(c.rng.choice(words) for _ in range(12000))[:50_000]
    long = "S" + long[1:-1] + "E"
    assert len(long) == 50_000
    c.good_item("long/50k.png", c.png(), long)
    limit = ("abc, " * 20_001)[:100_000]
    limit = limit[:-1] + "z"
    c.good_item("long/100000.png", c.png(), limit)
    c.bad_item("long/100001.png", c.png(), "prompt-too-long", prompt=limit + "z")
    # a sidecar over 1 MiB is refused even though its stripped prompt is tiny
    c.bad_item("long/huge-file.png", c.png(), "prompt-too-long", prompt=b" " * 2**20 + b"cat")


def add_images(c: Corpus) -> None:
    for name, (data, size, fmt) in image_cases().items():
        stem, ext = name.rsplit(".", 1)  # one stem per image: each has its own sidecar
        rel = f"images/{stem}-{ext.lower()}.{ext}"
        c.good_item(rel, data, f"format case {name},  kept", shape=(*size, fmt))
    truncated_jpeg = encode(noise("RGB", (64, 64), 1), "JPEG", quality=95)
    truncated_png = encode(noise("RGB", (64, 64), 2), "PNG")
    garbage = random.Random(SEED + 1).randbytes(3000)
    html = b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>"
    html += b"<body><h1>Not Found</h1></body></html>\n"
    for name, data in {
        "truncated-jpg.jpg": truncated_jpeg[: len(truncated_jpeg) // 2],
        "truncated-png.png": truncated_png[: len(truncated_png) // 2],
        "empty.png": b"",
        "random.jpg": garbage,
        "page.jpg": html,
    }.items():
        c.bad_item(f"broken/{name}", data, "not-an-image", prompt=f"broken {name}")
    c.bad_item("broken/bomb-header.png", png_with_header_size(30000, 30000), "too-large")
    c.bad_item("broken/bomb-real.png", valid_png_bomb(), "too-large")


def add_names(c: Corpus) -> None:
    long_utf8 = "long-" + "é" * 110 + ".png"
    long_ascii = "L" * 240 + ".png"
    assert 200 < len(long_utf8.encode()) <= 255 - 4 and len(long_ascii) <= 255 - 4
    names = [
        "🦊 emoji fox 🎨.png",
        "-x.png",
        "--help.png",
        'a "q" \'s.png',
        "spaced  name .png",
        "v1.2.final.png",
        "猫の写真.png",
        "кошка.png",
        "قطة صورة.png",
        "बिल्ली.png",
        "ελληνικά & co; $HOME `x`.png",
        long_utf8,
        long_ascii,
    ]
    for number, name in enumerate(names):
        c.good_item(f"names/{name}", c.png(), f"odd name {number}:\t{name}")
    c.good_item("deep/1/2/3/4/5/6/7/8/deep.png", c.png(), "eight levels down")
    add_non_utf8_names(c)


def non_utf8_names_allowed(folder: Path) -> bool:
    """ext4 and most Linux file systems take any bytes; APFS, ZFS with utf8only, SMB refuse."""
    probe = os.fsencode(folder) + b"/probe-\xe9"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_WRONLY, 0o644))
    except OSError:
        return False
    os.unlink(probe)
    return True


def add_non_utf8_names(c: Corpus) -> bool:
    """Names that are not UTF-8: ids use backslashreplace, the bytes-named sidecar is the
    prompt. False (and nothing added) where the file system refuses such names."""
    if not non_utf8_names_allowed(c.folder):
        return False
    cafe = c.good_item(
        b"names/caf\xe9.png", c.png(), b"caf\xe9 name, na\xefve", expect="café name, naïve"
    )
    assert cafe == "names/caf\\xe9.png"
    inner = c.good_item(b"names/d\xffir/inner \xfe.png", c.png(), "in a folder that is not UTF-8")
    assert inner == "names/d\\xffir/inner \\xfe.png"
    return True


def add_symlinks(c: Corpus) -> None:
    """Links leading outside (never read), links inside (followed once), a loop, a dangling one."""
    out = c.outside
    out.mkdir(parents=True, exist_ok=True)

    def outside_image(name: str) -> Path:
        data = c.png((31, 7))
        (out / name).write_bytes(data)
        (out / name).with_suffix(".txt").write_text(f"SECRET outside prompt {name}")
        c.never_stored.append(data)
        return out / name

    c.never_prompt.append("SECRET")
    # a file link to an image outside (its own sidecar is inside and fine)
    c.link("links/out-file.png", outside_image("a.png"))
    c.put("links/out-file.txt", b"link to an outside image")
    c.bad["links/out-file.png"] = "outside-folder"
    # a folder link to a folder outside: per-file failures or one for the link
    (out / "dir").mkdir()
    for name in ("o1.png", "o2.png"):
        (out / "dir" / name).write_bytes(data := c.png((31, 7)))
        (out / "dir" / name).with_suffix(".txt").write_text("SECRET outside dir prompt")
        c.never_stored.append(data)
    c.link("links/out-dir", out / "dir")
    c.maybe["links/out-dir"] = c.maybe["links/out-dir/"] = frozenset({"outside-folder"})
    # a metadata row naming a link that leads outside
    c.link("links/meta-out.png", outside_image("b.png"))
    c.row({"file_name": "links/meta-out.png", "prompt": "metadata row for an outside link"})
    c.bad["links/meta-out.png"] = "outside-folder"
    # a sidecar that is a link to a text file outside
    (out / "secret.txt").write_text("SECRET outside text")
    c.put("links/side-out.png", c.png())
    c.link("links/side-out.txt", out / "secret.txt")
    c.bad["links/side-out.png"] = "outside-folder"

    # inside: a folder link sorted before its target, a file link, a loop, a dangling link
    real = c.good_item("links/zzz-real/inside.png", c.png(), "the real file, once")
    c.link("links/aaa-dirlink", "zzz-real")
    c.maybe["links/aaa-dirlink"] = c.maybe["links/aaa-dirlink/"] = None
    c.link("links/file-link.png", "zzz-real/inside.png")
    c.put("links/file-link.txt", b"a link with its own prompt")
    c.maybe["links/file-link.png"] = None
    c.link("links/zzz-real/loop", "../..")  # back to the corpus root
    c.maybe["links/zzz-real/loop"] = c.maybe["links/zzz-real/loop/"] = None
    c.link("links/dangling.png", "nowhere/never.png")
    c.put("links/dangling.txt", b"a prompt for a dangling link")
    c.maybe["links/dangling.png"] = frozenset({"missing-file"})
    assert real == "links/zzz-real/inside.png"


def add_litter(c: Corpus) -> None:
    """OS litter, ignored silently even where it holds valid images with prompts."""

    def litter(rel: str, data: bytes) -> None:
        c.put(rel, data)
        c.litter.append(rel)

    junk = random.Random(SEED + 2).randbytes(600)
    for rel in (".DS_Store", "images/.DS_Store", "deep/1/.DS_Store"):
        litter(rel, junk)
    apple_double = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + junk[:80]
    litter("._photo.jpg", apple_double)
    litter("images/._rgb-png.png", data := c.png())
    c.never_stored.append(data)
    litter("images/._rgb-png.txt", b"apple double of a sidecar")
    for rel in ("Thumbs.db", "images/Thumbs.db", "desktop.ini", "names/desktop.ini"):
        litter(rel, junk if rel.endswith(".db") else b"[.ShellClassInfo]\r\nIconResource=x\r\n")
    for folder in (
        "__MACOSX/images",
        "images/@eaDir/rgb-png.png",
        ".thumbnails/normal",
        "deep/1/2/.thumbnails",
        "deep/@eaDir",
    ):
        litter(f"{folder}/SYNOPHOTO_THUMB_M.jpg", data := encode(noise("RGB", (8, 8), 3), "JPEG"))
        litter(f"{folder}/SYNOPHOTO_THUMB_M.txt", b"a thumbnail's prompt")
        litter(f"{folder}/thumb.png", png := c.png())
        c.never_stored += [data, png]
    litter("__MACOSX/images/._rgb-png.png", apple_double)


def add_metadata(c: Corpus) -> None:
    """metadata.jsonl: good rows with exact fields, and every kind of bad row."""
    c.put("meta/a.png", c.png())
    c.put("meta/a.txt", b"the sidecar loses to the metadata row")
    c.row(
        {
            "file_name": "meta/a.png",
            "prompt": "\ufeff  meta a,\ttabbed  two  spaces \n",
            "negative_prompt": "  blurry,\r\n\r\nlow  ",
            "narrative_prompt": "A cat\r\nsits.\u00a0 ",
        },
        end="\r\n",
    )
    c.good["meta/a.png"] = "meta a,\ttabbed  two  spaces"
    c.fields["meta/a.png"] = {
        "negative_prompt": "blurry,\n\nlow",
        "narrative_prompt": "A cat\nsits.",
    }
    c.row("")  # blank lines are ignored
    c.bad_row('{"file_name": "meta/never.png", "prompt": "unterminated', "invalid JSON")
    c.bad_row(["meta/a.png", "an array"], "a JSON array")
    c.bad_row({"prompt": "a row without a file name"}, "no file_name")
    c.bad_row({"file_name": None, "prompt": "null name"}, "file_name null")
    c.bad_row({"file_name": 17, "prompt": "number name"}, "file_name a number")
    c.put("meta/c.png", c.png())
    c.row({"file_name": "meta/c.png", "prompt": "  first row wins "})
    c.good["meta/c.png"] = "first row wins"
    c.bad_row({"file_name": "meta/c.png", "prompt": "second row"}, "duplicate file_name")
    c.row("")
    escape = c.folder.parent / "escape.png"
    escape.write_bytes(data := c.png())
    c.never_stored.append(data)
    for name in ("../escape.png", "/etc/passwd"):
        c.row({"file_name": name, "prompt": "escaping"})
        c.escaping.append(name)
    c.row({"file_name": "meta/missing.png", "prompt": "no such file"})
    c.bad["meta/missing.png"] = "missing-file"
    c.put("meta/seed.png", c.png())
    c.row({"file_name": "meta/seed.png", "prompt": "bad seed", "seed": "abc"})
    c.bad["meta/seed.png"] = "bad-metadata"
    c.put("meta/long.png", c.png())
    c.row({"file_name": "meta/long.png", "prompt": "y" * 100_001})
    c.bad["meta/long.png"] = "prompt-too-long"
    c.put("meta/blank.png", c.png())
    c.row({"file_name": "meta/blank.png", "prompt": " \t\u3000\r\n "})
    c.bad["meta/blank.png"] = "no-prompt"
    c.put("meta/50k.png", c.png())
    c.row({"file_name": "meta/50k.png", "prompt": "m" * 25_000 + " \n\t " + "n" * 24_996})
    c.good["meta/50k.png"] = "m" * 25_000 + " \n\t " + "n" * 24_996
    # last: raw (not escaped) separators that str.splitlines() would split a line at
    name = "meta/🦊 fox – ünï.png"
    c.put(name, c.png())
    prompt = " fox\u2028line sep\x85nel\x0cff\x1dgs\u2029para, cr\r\nlf "
    c.row({"file_name": name, "prompt": prompt}, ascii_only=False)
    c.good[name] = norm(prompt)


def build_corpus(root: Path) -> Corpus:
    corpus = Corpus(folder=root / "corpus", outside=root / "outside")
    corpus.folder.mkdir(parents=True)
    for add in (add_prompts, add_images, add_names, add_symlinks, add_litter, add_metadata):
        add(corpus)
    return corpus.finish()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    return build_corpus(tmp_path_factory.mktemp("corpus-root"))


# ----------------------------------------------------------------------------- checks
def samples_of(workspace: Workspace) -> dict[str, dict]:
    rows = workspace.read_table("samples").to_pylist()
    ids = [row["source_item_id"] for row in rows]
    assert len(ids) == len(set(ids)), "an item was stored twice"
    return {row["source_item_id"]: row for row in rows}


def failures_of(workspace: Workspace) -> dict[str, dict]:
    rows = workspace.read_failures("ingest").to_pylist()
    ids = [row["source_item_id"] for row in rows]
    assert len(ids) == len(set(ids)), "an item has two failures"
    return {row["source_item_id"]: row for row in rows}


def short(text: str | None) -> str:
    return repr(text if text is None or len(text) < 90 else text[:60] + f"...({len(text)})")


def allowed_maybe(corpus: Corpus, item: str, reason: str) -> bool:
    for key, reasons in corpus.maybe.items():
        if item == key or (key.endswith("/") and item.startswith(key)):
            return reasons is None or reason in reasons
    return False


def check_samples(corpus: Corpus, samples: dict[str, dict]) -> None:
    problems = {
        "missing": sorted(set(corpus.good) - set(samples)),
        "unexpected": sorted(set(samples) - set(corpus.good)),
        "wrong prompt": {
            item: (short(samples[item]["complex_prompt"]), short(prompt))
            for item, prompt in corpus.good.items()
            if item in samples and samples[item]["complex_prompt"] != prompt
        },
    }
    assert problems == {"missing": [], "unexpected": [], "wrong prompt": {}}


def check_failures(corpus: Corpus, failures: dict[str, dict]) -> None:
    got = {item: row["reason"] for item, row in failures.items()}
    escaping = {item: row for item, row in failures.items() if row["reason"] == "bad-file-name"}
    problems = {
        "missing": {i: r for i, r in corpus.bad.items() if i not in got},
        "wrong reason": {i: (got[i], r) for i, r in corpus.bad.items() if i in got and got[i] != r},
        "unexpected": {
            i: r
            for i, r in got.items()
            if i not in corpus.bad and i not in escaping and not allowed_maybe(corpus, i, r)
        },
    }
    assert problems == {"missing": {}, "wrong reason": {}, "unexpected": {}}
    # rows whose file_name leaves the folder: one "bad-file-name" each, naming the file_name
    assert len(escaping) == len(corpus.escaping)
    for name in corpus.escaping:
        assert any(name in f"{i} {row['detail']}" for i, row in escaping.items()), name


@pytest.fixture(scope="module")
def ingested(corpus, tmp_path_factory):
    """The corpus ingested once with run_stage: (workspace, report)."""
    workspace = Workspace.create(tmp_path_factory.mktemp("corpus-ws") / "ws")
    report = run_stage(IngestStage(corpus.folder), workspace, QUIET)
    return workspace, report


# ----------------------------------------------------------------------------- tests
def test_corpus_every_good_item_once_with_its_exact_prompt(corpus, ingested):
    workspace, report = ingested
    samples = samples_of(workspace)
    check_samples(corpus, samples)
    assert report.written == len(corpus.good)
    for item, fields in corpus.fields.items():
        assert {k: samples[item][k] for k in fields} == fields, item
    assert samples["meta/a.png"]["narrative_origin"] == "source"
    for item in corpus.good:
        for secret in corpus.never_prompt:
            assert secret not in samples[item]["complex_prompt"], item


def test_corpus_images_are_stored_unchanged_with_their_size_and_format(corpus, ingested):
    workspace, _ = ingested
    samples = samples_of(workspace)
    shapes = {
        item: (samples[item]["width"], samples[item]["height"], samples[item]["image_format"])
        for item in corpus.shapes
        if item in samples
    }
    assert shapes == corpus.shapes
    hashes = {item: samples[item]["image_sha256"] for item in corpus.files if item in samples}
    assert hashes == {item: sha(data) for item, data in corpus.files.items()}
    some = ["images/animated-gif.gif", "images/exif-6-jpg.jpg", "images/cmyk-tif.tif"]
    stored = workspace.read_images([samples[item]["image_sha256"] for item in some])
    assert [stored[samples[item]["image_sha256"]] for item in some] == [
        corpus.files[item] for item in some
    ]
    # only the samples' images are stored: nothing from outside, from litter or from failures
    index = workspace.image_index()
    assert [sha(data) in index for data in corpus.never_stored] == [False] * len(
        corpus.never_stored
    )
    assert set(index) == {row["image_sha256"] for row in samples.values()}


def test_corpus_every_bad_item_is_one_failure_with_its_reason(corpus, ingested):
    workspace, report = ingested
    failures = failures_of(workspace)
    check_failures(corpus, failures)
    assert report.failed == len(failures)
    assert sum(report.failures_by_reason.values()) == len(failures)
    for number in corpus.bad_rows:
        detail = failures[f"metadata.jsonl:{number}"]["detail"] or ""
        assert f"metadata.jsonl:{number}" in detail
        assert len(detail.replace(f"metadata.jsonl:{number}", "").strip(" :-")) > 3  # says why
    duplicate = next(n for n, why in corpus.bad_rows.items() if why == "duplicate file_name")
    assert "meta/c.png" in failures[f"metadata.jsonl:{duplicate}"]["detail"]


def test_corpus_litter_is_ignored_silently(corpus, ingested):
    workspace, _ = ingested
    seen = [*samples_of(workspace), *failures_of(workspace)]
    markers = ("__MACOSX", "@eaDir", ".thumbnails", ".DS_Store", "Thumbs.db", "desktop.ini")
    assert [i for i in seen if any(m in i for m in markers) or "/._" in f"/{i}"] == []
    assert len(corpus.litter) > 20


def test_rerun_writes_nothing_new_and_fails_the_same(corpus, tmp_path):
    workspace = Workspace.create(tmp_path / "ws")
    first = run_stage(IngestStage(corpus.folder), workspace, QUIET)
    parts = workspace.table_parts("samples")
    failures = {i: (r["reason"], r["detail"]) for i, r in failures_of(workspace).items()}
    second = run_stage(IngestStage(corpus.folder), workspace, QUIET)
    assert (second.written, second.new_images) == (0, 0)
    assert second.already_done == first.written == len(corpus.good)
    assert second.failed == first.failed == len(failures)
    assert workspace.table_parts("samples") == parts
    assert {i: (r["reason"], r["detail"]) for i, r in failures_of(workspace).items()} == failures
    check_samples(corpus, samples_of(workspace))


def test_cli_ingests_the_corpus(corpus, tmp_path):
    ws_root = tmp_path / "ws"
    created = run_surd("init", str(ws_root))
    assert created.returncode == 0, created.stderr
    result = run_surd("build", "ingest", str(corpus.folder), "-w", str(ws_root), "--no-progress")
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    assert result.returncode == 0, output[-3000:]
    workspace = Workspace.open(ws_root)
    check_samples(corpus, samples_of(workspace))
    check_failures(corpus, failures_of(workspace))


def test_symlinks_never_read_outside_and_inside_links_give_one_sample(tmp_path, workspace):
    c = Corpus(folder=tmp_path / "in", outside=tmp_path / "outside")
    c.folder.mkdir()
    c.good_item("plain.png", c.png(), "a plain file")
    add_symlinks(c)
    # a metadata row reaching outside through a folder link
    (c.outside / "dir2").mkdir()
    (c.outside / "dir2" / "o3.png").write_bytes(data := c.png((31, 7)))
    c.never_stored.append(data)
    c.link("links/out-dir2", c.outside / "dir2")
    c.row({"file_name": "links/out-dir2/o3.png", "prompt": "through a folder link"})
    c.finish()
    run_stage(IngestStage(c.folder), workspace, QUIET)

    samples = samples_of(workspace)
    check_samples(c, samples)
    failures = {i: r["reason"] for i, r in failures_of(workspace).items()}
    for item in ("links/out-file.png", "links/meta-out.png", "links/side-out.png"):
        assert failures.get(item) == "outside-folder", item
    assert failures.get("links/out-dir2/o3.png") == "outside-folder"
    through_dir = {i: r for i, r in failures.items() if i.startswith("links/out-dir")}
    through_dir.pop("links/out-dir2/o3.png")
    through_dir.pop("links/out-dir2", None)
    per_file = {"links/out-dir/o1.png": "outside-folder", "links/out-dir/o2.png": "outside-folder"}
    assert through_dir in ({"links/out-dir": "outside-folder"}, per_file)
    assert failures.get("links/dangling.png", "missing-file") == "missing-file"
    assert [i for i in samples if "loop" in i or "aaa-dirlink" in i or "file-link" in i] == []
    index = workspace.image_index()
    assert [sha(d) in index for d in c.never_stored] == [False] * len(c.never_stored)
    assert all("SECRET" not in row["complex_prompt"] for row in samples.values())


def test_file_names_that_are_not_utf8(tmp_path, workspace):
    c = Corpus(folder=tmp_path / "in", outside=tmp_path / "outside")
    c.folder.mkdir()
    if not add_non_utf8_names(c):
        pytest.skip("this file system refuses file names that are not UTF-8")
    c.good_item("plain.png", c.png(), "a plain neighbour")
    run_stage(IngestStage(c.folder), workspace, QUIET)
    samples = samples_of(workspace)
    assert {i: r["complex_prompt"] for i, r in samples.items()} == {
        "names/caf\\xe9.png": "café name, naïve",
        "names/d\\xffir/inner \\xfe.png": "in a folder that is not UTF-8",
        "plain.png": "a plain neighbour",
    }
    assert failures_of(workspace) == {}
    cafe = samples["names/caf\\xe9.png"]
    written = c.files["names/caf\\xe9.png"]
    assert cafe["image_sha256"] == sha(written)
    assert workspace.read_images([cafe["image_sha256"]]) == {cafe["image_sha256"]: written}


def test_decompression_bombs_are_too_large_and_cheap(tmp_path, workspace):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "header.png").write_bytes(png_with_header_size(30000, 30000))
    (folder / "real.png").write_bytes(valid_png_bomb())
    (folder / "fine.png").write_bytes(encode(Image.new("RGB", (8, 8), (1, 2, 3)), "PNG"))
    for name in ("header", "real", "fine"):
        (folder / f"{name}.txt").write_text(f"{name} prompt")
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    started = time.monotonic()
    report = run_stage(IngestStage(folder), workspace, QUIET)
    seconds = time.monotonic() - started
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert {i: r["reason"] for i, r in failures_of(workspace).items()} == {
        "header.png": "too-large",
        "real.png": "too-large",
    }
    assert list(samples_of(workspace)) == ["fine.png"]
    assert report.written == 1
    assert seconds < 5, f"{seconds:.1f} s"
    assert grown_mib < 300, f"peak memory grew by {grown_mib:.0f} MiB"


@pytest.mark.parametrize(
    ("kind", "supported", "fmt"),
    [("jp2", HAS_JP2, "JPEG2000"), ("avif", HAS_AVIF, "AVIF")],
    ids=["jp2", "avif"],
)
def test_optional_formats(tmp_path, workspace, kind, supported, fmt):
    if not supported:
        pytest.skip(f"this PIL cannot write {fmt}")
    folder = tmp_path / "in"
    folder.mkdir()
    image = Image.new("RGB", (20, 12), (90, 10, 200))
    data = encode(image, fmt)
    (folder / f"pic.{kind}").write_bytes(data)
    (folder / "PIC2.txt").write_text(" second ")
    (folder / f"PIC2.{kind.upper()}").write_bytes(data)
    (folder / "pic.txt").write_text(f"a {kind} picture")
    run_stage(IngestStage(folder), workspace, QUIET)
    samples = samples_of(workspace)
    assert {i: r["complex_prompt"] for i, r in samples.items()} == {
        f"pic.{kind}": f"a {kind} picture",
        f"PIC2.{kind.upper()}": "second",
    }
    row = samples[f"pic.{kind}"]
    assert (row["width"], row["height"], row["image_format"], row["image_sha256"]) == (
        20,
        12,
        fmt,
        sha(data),
    )


CSV_LINES = [
    "file_name,prompt,negative_prompt,seed",  # 1
    "gone.png,dog,,2,EXTRA",  # 2: too many fields
    'a.png,"  cat,\tstriped  two  spaces ",blurry,1',  # 3
    ",an orphan prompt,,",  # 4: empty file_name
    "c.png,first c,,",  # 5
    "c.png,second c,,",  # 6: duplicate
    "e.png,seedy,,abc",  # 7: bad seed
    "",  # 8: blank
    'd.png,"multi\r\nline ""quoted"" ",,',  # 9-10
    "f.png,café ✓ 猫\u00a0,,",  # 11
    "missing.png,x,,",  # 12
    "../up.png,x,,",  # 13
    "g.png,x,,1,EXTRA,MORE",  # 14: too many fields, after a row of two lines
]


def test_metadata_csv_rows(tmp_path, workspace):
    folder = tmp_path / "in"
    folder.mkdir()
    images = {}
    for name in ("a.png", "c.png", "d.png", "e.png", "f.png"):
        images[name] = encode(Image.new("RGB", (9, 9), (len(images) * 40, 5, 5)), "PNG")
        (folder / name).write_bytes(images[name])
    (tmp_path / "up.png").write_bytes(outside := encode(Image.new("L", (5, 5), 77), "PNG"))
    # as Excel writes "CSV UTF-8": a BOM and CRLF line ends
    text = "\r\n".join(CSV_LINES) + "\r\n"
    (folder / "metadata.csv").write_bytes(codecs.BOM_UTF8 + text.encode())
    run_stage(IngestStage(folder), workspace, QUIET)

    samples = samples_of(workspace)
    assert {i: r["complex_prompt"] for i, r in samples.items()} == {
        "a.png": "cat,\tstriped  two  spaces",
        "c.png": "first c",
        "d.png": 'multi\nline "quoted"',
        "f.png": "café ✓ 猫",
    }
    assert (samples["a.png"]["negative_prompt"], samples["a.png"]["seed"]) == ("blurry", 1)
    failures = failures_of(workspace)
    escaping = [i for i, r in failures.items() if r["reason"] == "bad-file-name"]
    assert len(escaping) == 1
    assert "../up.png" in f"{escaping[0]} {failures[escaping[0]]['detail']}"
    assert {i: r["reason"] for i, r in failures.items() if i not in escaping} == {
        "metadata.csv:2": "bad-metadata-row",
        "metadata.csv:4": "bad-metadata-row",
        "metadata.csv:6": "bad-metadata-row",
        "metadata.csv:14": "bad-metadata-row",
        "e.png": "bad-metadata",
        "missing.png": "missing-file",
    }
    for number in (2, 4, 6, 14):
        assert f"metadata.csv:{number}" in (failures[f"metadata.csv:{number}"]["detail"] or "")
    assert sha(outside) not in workspace.image_index()


METADATA_PROMPT = "  café – “quoted” €5,\r\nnaïve\tcrème \r\n"
METADATA_ENCODINGS = {
    "utf-8-bom": lambda text: codecs.BOM_UTF8 + text.encode("utf-8"),
    "utf-16-le": lambda text: codecs.BOM_UTF16_LE + text.encode("utf-16-le"),
    "utf-16-be": lambda text: codecs.BOM_UTF16_BE + text.encode("utf-16-be"),
    "utf-32-le": lambda text: codecs.BOM_UTF32_LE + text.encode("utf-32-le"),
    "cp1252": lambda text: text.encode("cp1252"),
}


@pytest.mark.parametrize("encoding", sorted(METADATA_ENCODINGS))
@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_metadata_file_encodings(tmp_path, workspace, kind, encoding):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("café.png", "plain.png"):
        (folder / name).write_bytes(encode(Image.new("RGB", (6, 6), (len(name), 0, 0)), "PNG"))
    if kind == "jsonl":
        rows = [
            {"file_name": "café.png", "prompt": METADATA_PROMPT},
            {"file_name": "plain.png", "prompt": "plain", "negative_prompt": " crème\r\n"},
        ]
        text = "\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\r\n"
    else:
        quoted = METADATA_PROMPT.replace('"', '""')
        text = (
            "file_name,prompt,negative_prompt\r\n"
            f'café.png,"{quoted}",\r\n'
            'plain.png,plain," crème\r\n"\r\n'
        )
    data = METADATA_ENCODINGS[encoding](text)
    if encoding == "cp1252":
        with pytest.raises(UnicodeDecodeError):
            data.decode("utf-8")
    (folder / f"metadata.{kind}").write_bytes(data)
    run_stage(IngestStage(folder), workspace, QUIET)
    samples = samples_of(workspace)
    assert failures_of(workspace) == {}
    assert {i: (r["complex_prompt"], r["negative_prompt"]) for i, r in samples.items()} == {
        "café.png": ("café – “quoted” €5,\nnaïve\tcrème", None),
        "plain.png": ("plain", "crème"),
    }


@pytest.mark.parametrize("case", ["png-as-jsonl", "garbage-jsonl", "png-as-csv", "both-files"])
def test_a_metadata_file_that_is_no_metadata_is_an_input_error(tmp_path, workspace, case):
    folder = tmp_path / "in"
    folder.mkdir()
    png = encode(Image.new("RGB", (16, 16), (3, 4, 5)), "PNG")
    (folder / "a.png").write_bytes(png)
    (folder / "a.txt").write_text("a prompt")
    good_jsonl = json.dumps({"file_name": "a.png", "prompt": "p"}) + "\n"
    files = {
        "png-as-jsonl": {"metadata.jsonl": png},
        "garbage-jsonl": {"metadata.jsonl": random.Random(SEED + 3).randbytes(2048)},
        "png-as-csv": {"metadata.csv": png},
        "both-files": {
            "metadata.jsonl": good_jsonl.encode(),
            "metadata.csv": b"file_name\na.png\n",
        },
    }[case]
    for name, data in files.items():
        (folder / name).write_bytes(data)
    with pytest.raises(InputError) as raised:
        run_stage(IngestStage(folder), workspace, QUIET)
    message = str(raised.value)
    for name in files:
        assert name in message
    assert workspace.read_table("samples").num_rows == 0
