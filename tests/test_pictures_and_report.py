"""Review fixes: the grids' font and wrapping (``surd_builder.pictures``), the report page's
scores and galleries (``pipelines.report_page``), the dedupe grid's damaged images."""

from __future__ import annotations

import io
import math
import re

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageDraw, ImageFont

import surd_builder.pictures as pictures
from pipelines.export import ExportOptions, export_dataset
from pipelines.ingest import IngestStage
from pipelines.report_page import gallery_sections, histogram_svg, score_summary
from pipelines.runner import RunOptions, run_stage
from surd_builder.demo import make_demo_folder
from surd_builder.ids import sha256_hex
from surd_builder.schema import IMAGES_SCHEMA, STAGE_TABLES, records_to_table, table_spec

QUIET = ExportOptions(show_progress=False)


def rendered(face, text: str) -> tuple[tuple[int, int], bytes]:
    mask = face.getmask(text)
    return mask.size, bytes(np.asarray(mask).tobytes())


def png(colour: tuple[int, int, int], size: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


# 1. the font has accented, Greek and Cyrillic letters; a bitmap font does not raise


@pytest.mark.parametrize("letter", ["é", "ü", "ñ", "ß", "\u2014", "Ж", "λ"])
def test_the_font_draws_accents_dashes_greek_and_cyrillic(letter) -> None:
    face = pictures.font(20)
    missing = rendered(face, "\uffff")  # an unmapped code point: the missing-glyph box
    assert rendered(face, letter) != missing
    assert rendered(face, "café naïve") != rendered(face, "caf\uffff na\uffffve")
    assert pictures.font(20) is face  # cached per size


def test_a_bitmap_font_draws_the_ellipsis_and_any_text_without_raising(monkeypatch) -> None:
    bitmap = ImageFont.load_default_imagefont()
    text = "café naïve — Привет, Ελλάδα 字 " * 10
    assert pictures.text_width(bitmap, text) > 0
    cut = pictures.fit(text, bitmap, 120)
    assert cut.endswith("...") and pictures.text_width(bitmap, cut) <= 120
    lines = pictures.wrap(text, bitmap, 120, 3)
    assert len(lines) == 3 and lines[-1].endswith("...")
    assert pictures.wrap("字" * 500, bitmap, 60, 2)[-1].endswith("...")
    image = Image.new("RGB", (200, 100), "white")
    pictures.draw_lines(ImageDraw.Draw(image), (0, 0), ["a\u2026", "Привет"], bitmap)
    # a whole grid drawn with it
    monkeypatch.setattr(pictures, "font", lambda size: bitmap)
    grid = pictures.labelled_grid(
        [[Image.new("RGB", (64, 64))] * 2], ("без адаптера", "with — adapter"), ["λ…"], title=text
    )
    assert grid.image.width >= 128


# 2. wrapping a long text without spaces measures a bounded amount


def test_wrapping_a_long_text_without_spaces_stops_at_max_lines(monkeypatch) -> None:
    face = pictures.font(14)
    calls = 0
    real = pictures.text_width

    def counting(face, text):
        nonlocal calls
        calls += 1
        return real(face, text)

    monkeypatch.setattr(pictures, "text_width", counting)
    lines = pictures.wrap("字" * 50_000, face, 200, max_lines=3)
    assert len(lines) == 3 and lines[-1].endswith(pictures.ELLIPSIS)
    assert all(real(face, line) <= 200 for line in lines)
    assert calls < 5000


# 3. NaN and infinite scores; all scores equal


def test_non_finite_scores_are_left_out_of_the_summary() -> None:
    summary = score_summary([0.1, math.nan, math.inf, 0.3])
    assert summary["count"] == 2 and summary["min"] == 0.1 and summary["max"] == 0.3
    assert summary["mean"] == pytest.approx(0.2) and sum(summary["counts"]) == 2
    assert all(math.isfinite(edge) for edge in summary["edges"])
    svg = histogram_svg(summary)
    assert "nan" not in svg.lower() and "inf" not in svg.lower()


def test_equal_scores_make_one_bar_of_that_value() -> None:
    summary = score_summary([0.5, 0.5])
    assert summary["counts"] == [2] and summary["edges"] == [0.5, 0.5]
    svg = histogram_svg(summary)
    assert "1.500" not in svg and "0.500" in svg


@pytest.fixture
def demo_workspace(tmp_path, workspace):
    make_demo_folder(tmp_path / "demo", count=12, seed=3, size=32)
    run_stage(
        IngestStage(tmp_path / "demo", source="demo"), workspace, RunOptions(show_progress=False)
    )
    return workspace


def write_screening(workspace, rows: list[dict]) -> None:
    workspace.write_table_part(
        "screening", records_to_table(rows, STAGE_TABLES["screening"].schema)
    )


def test_an_export_with_nan_and_infinite_scores_writes_its_report(tmp_path, demo_workspace):
    ids = sorted(demo_workspace.sample_ids("samples"))
    scores = [0.1, math.nan, math.inf, -math.inf, 0.3] + [0.2] * (len(ids) - 5)
    write_screening(
        demo_workspace,
        [{"sample_id": s, "clip_score": v} for s, v in zip(ids, scores, strict=True)],
    )
    export_dataset(demo_workspace, tmp_path / "export", QUIET)
    page = (tmp_path / "export" / "report.html").read_text()
    assert f"{len(ids) - 3} samples, mean" in page and "3 without a score" in page


def test_equal_scores_are_reported_as_one_value(tmp_path, demo_workspace):
    ids = sorted(demo_workspace.sample_ids("samples"))
    write_screening(demo_workspace, [{"sample_id": s, "text_similarity": 0.5} for s in ids])
    export_dataset(demo_workspace, tmp_path / "export", QUIET)
    page = (tmp_path / "export" / "report.html").read_text()
    assert "all 0.500" in page and "1.500" not in page


# 5. NSFW-marked samples are not shown; 7. the header counts the thumbnails shown


def gallery_table() -> tuple[pa.Table, dict[str, bytes]]:
    images = {f"s{n}": png((n * 40, 0, 0)) for n in range(5)}
    images["s5"] = b"not an image"
    rows = {
        "sample_id": list(images),
        "image_sha256": [sha256_hex(data) for data in images.values()],
        "narrative_prompt": [f"prompt of {s}" for s in images],
        "clip_score": [None] * 6,
        "source": ["demo"] * 6,
        "review_status": ["pending"] * 6,
        "nsfw": [False, True, None, False, False, False],
        "nsfw_level": [None, None, "High", "None", None, None],
    }
    stored = {sha256_hex(data): data for data in images.values()}
    return pa.table(rows), stored


def test_galleries_leave_out_nsfw_marked_samples_unless_the_export_is_nsfw_only() -> None:
    table, stored = gallery_table()
    asked = []

    def read_images(shas):
        shas = list(shas)
        asked.extend(shas)
        return {sha: stored[sha] for sha in shas}

    page = "".join(gallery_sections(table, read_images))
    assert "2 NSFW-marked samples not shown" in page
    for marked in ("s1", "s2"):
        assert f"{marked}:" not in page and f"prompt of {marked}" not in page
    assert set(asked) == {sha256_hex(png((n * 40, 0, 0))) for n in (0, 3, 4)} | {
        sha256_hex(b"not an image")
    }
    assert page.count("<img") == 2 * 3 and "(3 of 6)" in page  # s5 does not decode
    only = "".join(gallery_sections(table, read_images, "only"))
    assert "NSFW-marked" not in only and "prompt of s1" in only and "prompt of s2" in only
    assert only.count("<img") == 2 * 5 and "(5 of 6)" in only


def test_the_exported_report_hides_nsfw_samples_by_default(tmp_path, demo_workspace):
    ids = sorted(demo_workspace.sample_ids("samples"))
    write_screening(demo_workspace, [{"sample_id": s, "nsfw": True} for s in ids[:2]])
    export_dataset(demo_workspace, tmp_path / "a", QUIET)
    page = (tmp_path / "a" / "report.html").read_text()
    assert "2 NSFW-marked samples not shown" in page
    assert not any(re.search(rf'title="{s}:', page) for s in ids[:2])
    only = ExportOptions(nsfw="only", show_progress=False)
    export_dataset(demo_workspace, tmp_path / "b", only)
    page = (tmp_path / "b" / "report.html").read_text()
    assert "NSFW-marked" not in page and page.count("<img") == 2 * 2


# 4. the dedupe grid draws a damaged image as "no image"


def test_the_cluster_grid_draws_an_image_that_does_not_decode_as_no_image(
    workspace, tmp_path, monkeypatch
) -> None:
    from pipelines.dedupe_grid import cluster_grid

    images = {"good": png((0, 0, 200), 64), "bad": b"\x89PNG\r\n\x1a\n broken"}
    rows = [
        {
            "sample_id": sample_id,
            "source": "test",
            "source_item_id": f"{sample_id}.png",
            "image_sha256": sha256_hex(data),
            "width": 64,
            "height": 64,
            "complex_prompt": "p",
        }
        for sample_id, data in images.items()
    ]
    stored = [{"image_sha256": sha256_hex(d), "image_bytes": d} for d in images.values()]
    workspace.write_images(records_to_table(stored, IMAGES_SCHEMA))
    workspace.write_table_part("samples", records_to_table(rows, table_spec("samples").schema))
    drawn = {}
    real = pictures.labelled_grid

    def recording(*args, **kwargs):
        drawn["rows"] = args[0]
        return real(*args, **kwargs)

    monkeypatch.setattr(pictures, "labelled_grid", recording)
    path = cluster_grid(workspace, [["good", "bad"]], tmp_path / "grid.png")
    assert path.exists()
    good, bad = (np.asarray(tile).astype(int) for tile in drawn["rows"][0])
    assert (good[64, 64] == (0, 0, 200)).all()
    inside = bad[4:-4, 4:-4]
    assert (inside == 255).all(axis=2).mean() > 0.9  # white, with the "no image" text
    assert (inside < 200).all(axis=2).any()


# 6. the compare grids' column headers are defined once


def test_the_compare_headers_are_defined_once() -> None:
    from pathlib import Path

    import adapter.generate as generate
    import adapter.validation as validation

    assert generate.COMPARE_HEADERS is validation.COMPARE_HEADERS
    sources = [p.read_text() for p in Path(validation.__file__).parent.glob("*.py")]
    assert sum(text.count("COMPARE_HEADERS = ") for text in sources) == 1


def test_the_gallery_header_counts_the_thumbnails_that_decoded() -> None:
    table, stored = gallery_table()
    table = table.drop_columns(["nsfw", "nsfw_level"])
    page = "".join(gallery_sections(table, lambda shas: {sha: stored[sha] for sha in shas}))
    assert page.count("<img") == 2 * 5 and "(5 of 6)" in page and "(6 of 6)" not in page
