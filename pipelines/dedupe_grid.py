"""The picture of ``surd build dedupe --report``: the largest near-duplicate clusters under a
legend, one row each, with the kept sample first and each member's distance, name and id."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipelines.takedown import hamming

if TYPE_CHECKING:
    from surd_builder.workspace import Workspace

KEPT_COLOUR, DUPLICATE_COLOUR = (30, 160, 60), (200, 40, 40)


def _distance(a: str | None, b: str | None) -> int | None:
    """Bits between two hex hashes, None where one is missing."""
    return hamming(a, b) if a and b else None


def _decoded(thumbnail, data: bytes | None, side: int):
    """The thumbnail of ``data``, None where there is none or it does not decode."""
    if data is None:
        return None
    try:
        return thumbnail(data, side)
    except Exception:  # noqa: BLE001 (PIL raises many kinds for a damaged image)
        return None


def _display_name(source_item_id: str | None) -> str:
    """A file's name (a folder's relative path, a URL's last part) or the source's own id."""
    text = (source_item_id or "").rstrip("/")
    return text.rsplit("/", 1)[-1] or text


def cluster_grid(
    workspace: Workspace,
    clusters: list[list[str]],
    path,
    max_clusters: int = 8,
    per_row: int = 6,
    hash_label: str | None = None,
):
    """A PNG of the largest clusters under a legend, one row each, labelled with its number and
    size: the kept image first (green frame), the duplicates after it (red frames), each with
    its hash distance to the kept one in bits, its file name and its sample id. ``hash_label``:
    the hashes the distances are of (default: whatever hash each sample has)."""
    from PIL import Image, ImageDraw

    from surd_builder.atomic import atomic_path
    from surd_builder.pictures import (
        fit,
        font,
        font_size_for,
        labelled_grid,
        text_width,
        thumbnail,
    )

    shown = clusters[:max_clusters]
    if not shown:
        return None
    wanted = {s for cluster in shown for s in cluster[:per_row]}
    samples = workspace.read_table("samples", ["image_sha256", "source_item_id"]).to_pylist()
    samples = {r["sample_id"]: r for r in samples if r["sample_id"] in wanted}
    hashes = {
        r["sample_id"]: r["phash"]
        for r in workspace.read_table("hashes", ["phash", "hash_kind"]).to_pylist()
        if r["sample_id"] in wanted and (hash_label is None or r["hash_kind"] == hash_label)
    }
    shas = {s: r["image_sha256"] for s, r in samples.items() if r["image_sha256"]}
    images = workspace.read_images(shas[s] for s in wanted if s in shas)
    cell = 128
    face = font(font_size_for(cell))
    rows, captions, labels = [], [], []
    for number, cluster in enumerate(shown, 1):
        tiles, notes = [], []
        for column, sample_id in enumerate(cluster[:per_row]):
            tile = Image.new("RGB", (cell, cell), "white")
            draw = ImageDraw.Draw(tile)
            small = _decoded(thumbnail, images.get(shas.get(sample_id)), cell - 6)
            if small is not None:
                tile.paste(small, ((cell - small.width) // 2, (cell - small.height) // 2))
            else:
                gone = fit("no image", face, cell - 8)
                draw.text(((cell - text_width(face, gone)) // 2, cell // 2 - 6), gone, font=face,
                          fill=(90, 90, 90))  # fmt: skip
            colour = KEPT_COLOUR if column == 0 else DUPLICATE_COLOUR
            draw.rectangle([0, 0, cell - 1, cell - 1], outline=colour, width=3)
            tiles.append(tile)
            distance = _distance(hashes.get(sample_id), hashes.get(cluster[0]))
            first = "kept" if column == 0 else f"d = {'?' if distance is None else distance}"
            name = _display_name((samples.get(sample_id) or {}).get("source_item_id"))
            notes.append([first, name, sample_id])
        rows.append(tiles)
        captions.append(notes)
        more = f", first {per_row} shown" if len(cluster) > per_row else ""
        labels.append(f"cluster {number} of {len(clusters)}: {len(cluster)} samples{more}")
    hash_note = f" {hash_label}" if hash_label else ""
    legend = (
        f"Near-duplicate clusters, largest first ({len(shown)} of {len(clusters)} shown). "
        "Each row is one cluster. Its first image (green frame) is the sample kept; the others "
        "(red frames) are marked duplicates of it, left out of exports, not deleted. Under each "
        f"image: its{hash_note} hash distance to the kept image in bits (d), its file name or "
        "source id, and its sample id."
    )
    grid = labelled_grid(
        rows, row_labels=labels, title=legend, max_label_lines=1, captions=captions,
        max_title_lines=8, min_width=4 * (cell + 4) + 4,
    ).image  # fmt: skip
    with atomic_path(path) as temp:
        grid.save(temp, format="PNG")
    return path
