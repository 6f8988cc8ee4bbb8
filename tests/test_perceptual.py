"""The perceptual signature (issue 24): the fast pHash against imagehash, exact colour layouts,
what a viewer sees (EXIF turns, transparency), and hashing at collection: ingest fills the
``hashes`` table from the decode that checks the image, so the hash stage has nothing left."""

from __future__ import annotations

import io

import imagehash
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipelines.batch_commit import side_rows
from pipelines.dedupe import HashStage, colour_distance, colour_distances, colour_grids
from pipelines.ingest import IngestStage
from pipelines.perceptual import (
    FULL,
    VARIANTS,
    _turn_box,
    decode,
    draft_decode,
    image_hash,
    image_signature,
    layouts_of,
    phashes,
)
from pipelines.runner import run_stage
from tests.test_dedupe import QUIET, encode, photo


def bits(a: str, b: str) -> int:
    return (int(a, 16) ^ int(b, 16)).bit_count()


def grey_of(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L"), dtype=np.float32)


def test_the_fast_phash_is_imagehash_up_to_rounding() -> None:
    """Same decoded image, same hash: the full image, its mirror and a crop, against imagehash
    on that image, that image mirrored and that crop (the float DCT can still flip a bit that
    sits at the median)."""
    regions = ((*FULL, False), (*FULL, True), (0.0, 0.0, 0.5, 0.5, False))
    distances = {"full": [], "mirror": [], "crop": []}
    for seed in range(30):
        image = photo(seed)
        box = (0, 0, *image.size)
        full, mirror, crop = phashes(grey_of(image), box, regions)
        flipped = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        distances["full"].append(bits(full, str(imagehash.phash(image))))
        distances["mirror"].append(bits(mirror, str(imagehash.phash(flipped))))
        distances["crop"].append(bits(crop, str(imagehash.phash(image.crop((0, 0, 128, 128))))))
    for kind, found in distances.items():
        assert np.mean(found) <= 0.2 and max(found) <= 2, (kind, found)
        assert np.mean(np.array(found) == 0) >= 0.9, (kind, found)


def test_a_flat_image_hashes_as_imagehash_does() -> None:
    """Rounding noise in a flat image's DCT is not structure (imagehash gives it one bit)."""
    flat = Image.new("RGB", (200, 120), (200, 30, 30))
    expected = str(imagehash.phash(flat))
    assert image_hash(encode(flat, "PNG")) == expected
    assert bin(int(expected, 16)).count("1") <= 1


def exact_area_means(pixels: np.ndarray, box: tuple, cells: int = 8) -> np.ndarray:
    """By brute force: every pixel split into 20 x 20 sub-pixels, cells summed over the
    sub-pixels inside them (box edges on multiples of 1/20 px)."""
    fine = np.repeat(np.repeat(pixels.astype(np.float64), 20, axis=0), 20, axis=1)
    x0, y0, x1, y1 = (round(v * 20) for v in box)
    xs, ys = np.linspace(x0, x1, cells + 1), np.linspace(y0, y1, cells + 1)
    out = np.zeros((cells, cells, 3))
    for i in range(cells):
        for j in range(cells):
            part = fine[round(ys[i]) : round(ys[i + 1]), round(xs[j]) : round(xs[j + 1])]
            out[i, j] = part.mean(axis=(0, 1))
    return out


@pytest.mark.parametrize("box", [(0, 0, 96, 80), (4.8, 0, 91.2, 72), (9.6, 8.0, 96, 80)])
def test_colour_layouts_are_exact_area_means(box) -> None:
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (80, 96, 3)).astype(np.uint8)
    pixels[:, :37] = (250, 10, 10)  # a sharp edge off the cell grid
    layout = layouts_of(pixels.astype(np.float32), box, [FULL])
    found = np.frombuffer(bytes.fromhex(layout), np.uint8).reshape(8, 8, 3).astype(float)
    # cells hold whole numbers in 1/20 px steps here (all cell edges are multiples of 1/20)
    assert np.abs(found - exact_area_means(pixels, box)).max() <= 0.51


def rotated_jpeg(image: Image.Image, orientation: int) -> bytes:
    """``image`` stored so that a viewer applying EXIF ``orientation`` shows ``image``."""
    undo = {
        3: Image.Transpose.ROTATE_180,
        6: Image.Transpose.ROTATE_90,  # shown turned clockwise, so stored anticlockwise
        8: Image.Transpose.ROTATE_270,
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        5: Image.Transpose.TRANSPOSE,
        7: Image.Transpose.TRANSVERSE,
        4: Image.Transpose.FLIP_TOP_BOTTOM,
    }[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.transpose(undo).save(buffer, "JPEG", quality=100, subsampling=0, exif=exif)
    return buffer.getvalue()


@pytest.mark.parametrize("orientation", [2, 3, 4, 5, 6, 7, 8])
def test_an_exif_rotated_photo_hashes_like_the_photo_shown(orientation: int) -> None:
    """613x405: drafted at 1/2 with a partial block at the right and bottom, whose padding the
    turn moves to another edge (the content box goes with it). Nearly lossless JPEGs: turned,
    the 8x8 blocks fall elsewhere on the picture, which at normal qualities moves a pHash of a
    smooth photo a few bits by itself."""
    image = photo(4, size=613).crop((0, 0, 613, 405))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=100, subsampling=0)
    shown = image_signature(buffer.getvalue())
    stored = image_signature(rotated_jpeg(image, orientation))
    # turned the other way round, resampling rounds in another order: a few bits move
    assert bits(shown.phash, stored.phash) <= 4
    assert all(
        bits(a, b) <= 4 for a, b in zip(shown.variant_hashes, stored.variant_hashes, strict=True)
    )
    unturned = image_signature(encode(Image.open(io.BytesIO(rotated_jpeg(image, orientation)))))
    assert bits(shown.phash, unturned.phash) > 12  # the pixels as stored are another picture
    for crop in range(6):  # the whole image's layout and each crop's
        a, b = colour_grids([shown.colour_hash], crop), colour_grids([stored.colour_hash], crop)
        assert colour_distances(a, b)[0] <= 1.5


@pytest.mark.parametrize("orientation", [2, 3, 4, 5, 6, 7, 8])
def test_turned_boxes_hold_the_turned_content(orientation: int) -> None:
    """A 10x6 decode whose content is its top-left 9x5 (padding right and bottom), turned as a
    viewer turns it: the turned box holds exactly the turned content."""
    from pipelines.perceptual import _TRANSPOSES

    rng = np.random.default_rng(orientation)
    decoded = Image.fromarray(rng.integers(0, 256, (6, 10), dtype=np.uint8), "L")
    content = decoded.crop((0, 0, 9, 5))
    method = Image.Transpose(_TRANSPOSES[orientation])
    box = _turn_box((0, 0, 9, 5), decoded.size, orientation)
    turned = decoded.transpose(method)
    assert all(float(v).is_integer() for v in box)
    shown = turned.crop(tuple(int(v) for v in box))
    assert np.array_equal(np.asarray(shown), np.asarray(content.transpose(method)))


def test_transparency_is_hashed_on_white() -> None:
    image = photo(5).convert("RGBA")
    pixels = np.asarray(image).copy()
    pixels[:, :100, 3] = 0  # the left part transparent
    pixels[:, :100, :3] = 0  # over black, as many encoders leave it
    transparent = Image.fromarray(pixels, "RGBA")
    on_white = Image.new("RGB", image.size, (255, 255, 255))
    on_white.paste(transparent, mask=transparent.split()[3])
    a, b = image_signature(encode(transparent, "PNG")), image_signature(encode(on_white, "PNG"))
    assert a.phash == b.phash and colour_distance(a.colour_hash, b.colour_hash) < 0.5


def photo_folder(tmp_path, count: int = 6):
    folder = tmp_path / "photos"
    folder.mkdir()
    for seed in range(count):
        (folder / f"p{seed}.jpg").write_bytes(encode(photo(seed, size=300 + seed)))
        (folder / f"p{seed}.txt").write_text(f"a photo, seed {seed}")
    (folder / "broken.jpg").write_bytes(encode(photo(9))[:-4000])  # truncated
    (folder / "broken.txt").write_text("a broken photo")
    return folder


def test_ingest_hashes_what_it_decodes_and_the_hash_stage_has_nothing_left(
    workspace, tmp_path, monkeypatch
) -> None:
    folder = photo_folder(tmp_path)
    opened: list[int] = []
    real_open = Image.open

    def counting(*args, **kwargs):
        opened.append(1)
        return real_open(*args, **kwargs)

    monkeypatch.setattr(Image, "open", counting)
    report = run_stage(IngestStage(folder, source="photos"), workspace, QUIET)
    assert report.written == 6 and report.failed == 1  # the truncated one is refused
    hashes = workspace.read_table("hashes").to_pylist()
    samples = {
        r["sample_id"]: r["image_sha256"] for r in workspace.read_table("samples").to_pylist()
    }
    stored = workspace.images.read(list(samples.values()))
    assert len(hashes) == 6 and {r["sample_id"] for r in hashes} == set(samples)
    monkeypatch.setattr(Image, "open", real_open)
    for row in hashes:  # the same signature the hash stage computes from the stored bytes
        again = image_signature(stored[samples[row["sample_id"]]])
        assert row["hash_kind"] == "phash-8" and row["phash"] == again.phash
        assert row["variant_hashes"] == again.variant_hashes
        assert row["colour_hash"] == again.colour_hash
    assert len(opened) == 7  # one decode per file: checked and hashed together
    monkeypatch.setattr(Image, "open", counting)
    hashed = run_stage(HashStage(), workspace, QUIET)
    assert hashed.already_done == 6 and hashed.processed == 0 and len(opened) == 7


def test_samples_without_collection_hashes_are_hashed_by_the_stage(workspace, tmp_path) -> None:
    """An interruption between the samples part and the hashes part (or a check without a
    decode) leaves samples without hashes: the hash stage does exactly those."""
    folder = photo_folder(tmp_path, count=4)
    run_stage(IngestStage(folder, source="photos"), workspace, QUIET)
    parts = workspace.table_parts("hashes")
    rows = workspace.read_table("hashes")
    for part in parts:
        part.unlink()
    workspace.write_table_part("hashes", rows.slice(0, 1))
    report = run_stage(HashStage(), workspace, QUIET)
    assert report.already_done == 1 and report.written == 3
    after = {r["sample_id"]: r["phash"] for r in workspace.read_table("hashes").to_pylist()}
    assert after == {r["sample_id"]: r["phash"] for r in rows.to_pylist()}


def test_side_rows_are_the_good_rows_with_the_side_tables_columns() -> None:
    output = pa.table(
        {
            "sample_id": ["a", "b", "c"],
            "source": ["s", "s", "s"],
            "phash": ["00ff", None, "0f0f"],
            "hash_kind": ["phash-8", None, "phash-8"],
            "variant_hashes": pa.array([["01"], None, ["02"]], pa.list_(pa.string())),
            "colour_hash": ["aa", None, "bb"],
            "failure_reason": [None, None, "not-an-image"],
        }
    )
    rows = side_rows(output, "hashes")
    assert rows["sample_id"].to_pylist() == ["a"]
    assert set(rows.column_names) == {
        "sample_id",
        "phash",
        "hash_kind",
        "variant_hashes",
        "colour_hash",
        "updated_at",
    }
    assert side_rows(output.drop_columns(["phash"]), "hashes").num_rows == 0


def test_a_drafted_signature_stays_close_to_the_full_decode() -> None:
    for seed in range(8):
        data = encode(photo(seed, size=512))
        drafted, full = image_signature(data), image_signature(data, draft=False)
        assert bits(drafted.phash, full.phash) <= 4
        assert colour_distance(drafted.colour_hash, full.colour_hash) <= 2.0
        for crop in range(1, 6):  # each crop's own layout
            a, b = colour_grids([drafted.colour_hash], crop), colour_grids([full.colour_hash], crop)
            assert colour_distances(a, b)[0] <= 2.0
        assert len(drafted.variant_hashes) == len(VARIANTS)
    image, box = decode(encode(photo(1, size=512)))  # at 1/8: 64 px
    assert image.size == (64, 64) and box == (0, 0, 64, 64)
    image, box = decode(encode(photo(1, size=515)))  # 64.375 px of content in 65
    assert image.size == (65, 65) and box == (0, 0, 64.375, 64.375)


def test_a_sample_collected_again_without_its_hashes_is_hashed_again(workspace, tmp_path) -> None:
    """A re-collected sample (a new image, say from a scrape with --no-decode-check, or a
    collection interrupted between its samples part and its hashes part) keeps an older hashes
    row: older than the sample's own row, so it is not done."""
    from datetime import UTC, datetime

    from tests.test_dedupe import add_samples

    folder = photo_folder(tmp_path, count=3)
    run_stage(IngestStage(folder, source="photos"), workspace, QUIET)
    first = workspace.read_table("samples").to_pylist()[0]
    old_phash = {r["sample_id"]: r["phash"] for r in workspace.read_table("hashes").to_pylist()}
    new_image = encode(photo(42))
    add_samples(
        workspace,
        {first["sample_id"]: new_image},
        **{first["sample_id"]: {"updated_at": datetime.now(UTC)}},
    )
    report = run_stage(HashStage(), workspace, QUIET)
    assert report.already_done == 2 and report.written == 1
    hashes = {r["sample_id"]: r["phash"] for r in workspace.read_table("hashes").to_pylist()}
    assert hashes[first["sample_id"]] == image_signature(new_image).phash
    assert hashes[first["sample_id"]] != old_phash[first["sample_id"]]


def test_rows_of_another_version_or_decoding_are_hashed_again(workspace, tmp_path) -> None:
    folder = photo_folder(tmp_path, count=3)
    run_stage(IngestStage(folder, source="photos"), workspace, QUIET)
    rows = workspace.read_table("hashes")
    assert set(rows["hash_settings"].to_pylist()) == {"v2 draft"}
    # --no-draft: every image decoded in full, so every row is redone, once
    full = run_stage(HashStage(draft=False), workspace, QUIET)
    assert full.written == 3 and run_stage(HashStage(draft=False), workspace, QUIET).written == 0
    # a row from before hash_settings existed (an older signature) is redone too
    old = rows.set_column(
        rows.schema.get_field_index("hash_settings"), "hash_settings", pa.nulls(3, pa.string())
    )
    workspace.write_table_part("hashes", old.drop_columns(["updated_at"]))
    assert run_stage(HashStage(), workspace, QUIET).written == 3


def test_collection_and_the_hash_stage_hash_an_mpo_alike(workspace, tmp_path) -> None:
    """A two-frame MPO (a phone's JPEG-based format) is drafted at collection and in the hash
    stage alike (both draft any format the decoder can: not only "JPEG")."""
    from pipelines.records import inspect_and_hash

    first, second = photo(6, size=512), photo(7, size=512)
    buffer = io.BytesIO()
    first.save(buffer, "MPO", save_all=True, append_images=[second], quality=90)
    data = buffer.getvalue()
    assert Image.open(io.BytesIO(data)).format == "MPO"
    collected = inspect_and_hash(data, "photo.mpo")[3]
    assert collected == image_signature(data)
    with Image.open(io.BytesIO(data)) as image:  # decoded at 1/8, not in full and reduced
        assert draft_decode(image) == (0, 0, 64, 64) and image.size == (64, 64)


def odd_images() -> dict[str, bytes]:
    """Shapes and modes a gallery serves: a single pixel, extreme aspect ratios, a palette with
    transparency, 16-bit grey, CMYK, an animation, a large RGBA graphic."""
    rng = np.random.default_rng(8)
    noise = Image.fromarray(rng.integers(0, 256, (300, 300, 3), dtype=np.uint8))
    palette = noise.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    frames = [Image.new("RGB", (80, 60), colour) for colour in ((200, 0, 0), (0, 0, 200))]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    wide = Image.new("I;16", (256, 256))
    wide.frombytes((np.asarray(grey_of(photo(3)), dtype=np.uint16) * 250).tobytes())
    return {
        "1x1.png": encode(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"),
        "4000x3.jpg": encode(noise.resize((4000, 3))),
        "3x4000.png": encode(noise.resize((3, 4000)), "PNG"),
        "palette.png": encode(palette, "PNG"),
        "grey16.png": encode(wide, "PNG"),
        "cmyk.jpg": encode(photo(2).convert("CMYK")),
        "animated.gif": gif.getvalue(),
        "rgba-3000.png": encode(photo(5, size=300).convert("RGBA").resize((3000, 2000)), "PNG"),
    }


def test_odd_images_hash_alike_at_collection_and_in_the_stage() -> None:
    from pipelines.records import inspect_and_hash

    for name, data in odd_images().items():
        signature = image_signature(data)
        assert len(signature.phash) == 16 and len(signature.variant_hashes) == len(VARIANTS)
        assert len(signature.colour_hash) == 6 * 8 * 8 * 3 * 2, name
        assert inspect_and_hash(data, name)[3] == signature, name
