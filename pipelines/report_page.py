"""``report.html`` of an export: counts as bar tables, histograms of the screening scores and
galleries of thumbnails per source and per review status.

One file that opens offline: no script, no external CSS, font or image; histograms are inline
SVG, thumbnails are small JPEGs in ``data:`` URIs. Its size is bounded: at most
:data:`GALLERY_GROUPS` groups of :data:`THUMBNAILS_PER_GROUP` thumbnails of at most
:data:`THUMBNAIL_SIDE` pixels per gallery (a few KB each), whatever the size of the dataset.
"""

from __future__ import annotations

import base64
import html
import math
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import pyarrow as pa

from pipelines.records import nsfw_marked

SCORE_COLUMNS = {
    "clip_score": "CLIP score (image vs. narrative prompt)",
    "text_similarity": "Text similarity (narrative vs. keyword prompt)",
}
SCORE_BINS = 20
THUMBNAILS_PER_GROUP = 8
GALLERY_GROUPS = 12  # largest groups first; the rest are named, not shown
THUMBNAIL_SIDE = 128
THUMBNAIL_QUALITY = 70
CAPTION_CHARACTERS = 60

STYLE = (
    "body{font-family:sans-serif;margin:2em;color:#222}td{padding:2px 8px}.n{text-align:right}"
    ".bar{background:#4a7bd0;height:12px}svg{display:block}.hist rect{fill:#4a7bd0}"
    ".hist text{font-size:11px;fill:#444}.note{color:#666;font-size:90%}"
    ".gallery{display:flex;flex-wrap:wrap;gap:8px;margin-bottom:1em}"
    "figure{margin:0;width:136px;font-size:11px}figure img{width:128px;height:128px;"
    "object-fit:contain;background:#eee;border:1px solid #ccc;display:block}"
    "figcaption{overflow-wrap:anywhere;color:#444}"
)


def _escape(value: object) -> str:
    return html.escape(str(value), quote=True)


def bars(title: str, counts: dict[str, int]) -> str:
    top = max(counts.values(), default=1) or 1
    rows = "".join(
        f"<tr><td>{_escape(label)}</td><td class=n>{count:,}</td>"
        f"<td><div class=bar style='width:{300 * count / top:.0f}px'></div></td></tr>"
        for label, count in counts.items()
    )
    return f"<h2>{_escape(title)}</h2><table>{rows}</table>"


def score_summary(values: list[float], bins: int = SCORE_BINS) -> dict[str, Any]:
    """Count, mean, median, range and an equal-width histogram over the range of the finite
    ``values`` (NaN and infinities are left out, not counted); one bar, from the value to
    itself, when they are all equal. Pure."""
    values = sorted(value for value in values if math.isfinite(value))
    if not values:
        raise ValueError("no finite score to summarise")
    low, high = values[0], values[-1]
    width = (high - low) / bins if high > low else 0.0
    counts = [0] * (bins if high > low else 1)
    for value in values:
        counts[min(len(counts) - 1, int((value - low) / width)) if width else 0] += 1
    return {
        "count": len(values),
        "mean": sum(values) / len(values),
        "median": values[len(values) // 2],
        "min": low,
        "max": high,
        "edges": [low + width * i for i in range(len(counts) + 1)],
        "counts": counts,
    }


def _range(low: float, high: float) -> str:
    return f"{low:.3f}" if low == high else f"{low:.3f} to {high:.3f}"


def histogram_svg(summary: dict[str, Any], width: int = 480, height: int = 150) -> str:
    """Bars of ``summary["counts"]`` with the range and the tallest bar's count as labels."""
    counts, edges = summary["counts"], summary["edges"]
    top = max(counts) or 1
    left, bottom, plot_h = 36, 18, height - 30
    bar_w = (width - left - 4) / len(counts)
    single = edges[0] == edges[-1]  # all values equal: one bar, labelled with the value
    rects = "".join(
        f"<rect x='{left + i * bar_w + 1:.1f}' y='{height - bottom - plot_h * c / top:.1f}' "
        f"width='{max(bar_w - 2, 1):.1f}' height='{plot_h * c / top:.1f}'>"
        f"<title>{_range(edges[i], edges[i + 1])}: {c:,}</title></rect>"
        for i, c in enumerate(counts)
    )
    ends = (
        f"<text x='{(left + width - 4) / 2:.1f}' y='{height - 4}' text-anchor=middle>"
        f"{edges[0]:.3f}</text>"
        if single
        else f"<text x='{left}' y='{height - 4}'>{edges[0]:.3f}</text>"
        f"<text x='{width - 4}' y='{height - 4}' text-anchor=end>{edges[-1]:.3f}</text>"
    )
    labels = ends + (
        f"<text x='{left - 4}' y='{height - bottom - plot_h + 10}' text-anchor=end>{top:,}</text>"
        f"<text x='{left - 4}' y='{height - bottom}' text-anchor=end>0</text>"
    )
    return (
        f"<svg class=hist width={width} height={height} viewBox='0 0 {width} {height}' "
        f"role=img>{rects}{labels}</svg>"
    )


def score_sections(selected: pa.Table) -> list[str]:
    """A histogram per screening score the export has values of (none for unscreened data)."""
    sections = []
    for column, title in SCORE_COLUMNS.items():
        if column not in selected.column_names:
            continue
        values = [float(v) for v in selected[column].to_pylist() if v is not None]
        values = [v for v in values if math.isfinite(v)]  # NaN or infinite: without a score
        if not values:
            continue
        summary = score_summary(values)
        missing = selected.num_rows - summary["count"]
        spread = (
            f"all {summary['min']:.3f}"
            if summary["min"] == summary["max"]
            else f"range {summary['min']:.3f} to {summary['max']:.3f}"
        )
        note = (
            f"{summary['count']:,} samples, mean {summary['mean']:.3f}, median "
            f"{summary['median']:.3f}, {spread}"
            + (f"; {missing:,} without a score" if missing else "")
        )
        sections.append(
            f"<h2>{_escape(title)}</h2>{histogram_svg(summary)}<p class=note>{note}</p>"
        )
    return sections


def _thumbnail_uri(data: bytes) -> str | None:
    from surd_builder.pictures import thumbnail_jpeg

    try:
        jpeg = thumbnail_jpeg(data, THUMBNAIL_SIDE, THUMBNAIL_QUALITY)
    except Exception:  # noqa: BLE001 (PIL raises many kinds for a damaged image)
        return None
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def pick_gallery(
    rows: list[dict[str, Any]], column: str, order: str = "sample_id"
) -> dict[str, list[dict[str, Any]]]:
    """Up to :data:`THUMBNAILS_PER_GROUP` rows of each of the :data:`GALLERY_GROUPS` largest
    values of ``column``: those first by ``order``, a hash (sample id, image sha256), so a fixed
    choice spread over the data. Pure."""
    sizes = Counter(row[column] or "unknown" for row in rows)
    groups: dict[str, list[dict[str, Any]]] = {v: [] for v, _ in sizes.most_common(GALLERY_GROUPS)}
    for row in sorted(rows, key=lambda r: r[order] or ""):
        group = groups.get(row[column] or "unknown")
        if group is not None and len(group) < THUMBNAILS_PER_GROUP:
            group.append(row)
    return groups


def _figure(row: dict[str, Any], uri: str) -> str:
    prompt = " ".join((row.get("narrative_prompt") or "").split())
    short = prompt if len(prompt) <= CAPTION_CHARACTERS else prompt[: CAPTION_CHARACTERS - 1] + "…"
    score = row.get("clip_score")
    extra = f" (CLIP {score:.3f})" if score is not None else ""
    title = f"{row['sample_id']}: {prompt[:300]}"
    return (
        f'<figure><img src="{uri}" alt="{_escape(short)}" title="{_escape(title)}">'
        f"<figcaption>{_escape(short)}{_escape(extra)}</figcaption></figure>"
    )


def gallery_sections(
    selected: pa.Table,
    read_images: Callable[[Iterable[str]], dict[str, bytes]] | None,
    nsfw: str = "include",
) -> list[str]:
    """Thumbnails per source and per review status, embedded as small JPEGs. Samples marked
    NSFW are not shown (a note counts them) unless the export is ``--nsfw only``."""
    if read_images is None or selected.num_rows == 0:
        return []
    columns = ["sample_id", "image_sha256", "narrative_prompt", "clip_score"]
    columns += ["source", "review_status"]
    rows = selected.select([c for c in columns if c in selected.column_names]).to_pylist()
    marked = nsfw_marked(selected).to_pylist()
    shown = rows if nsfw == "only" else [row for row, m in zip(rows, marked, strict=True) if not m]
    galleries = {
        "source": ("Samples per source", pick_gallery(shown, "source")),
        # another order: where one source is one status, the two galleries show other samples
        "review_status": (
            "Samples per review status",
            pick_gallery(shown, "review_status", "image_sha256"),
        ),
    }
    wanted = {
        row["image_sha256"]
        for _, groups in galleries.values()
        for group in groups.values()
        for row in group
    }
    images = read_images(sorted(wanted))
    uris = {sha: _thumbnail_uri(data) for sha, data in images.items()}
    sections = []
    hidden = len(rows) - len(shown)
    if hidden:
        sections.append(f"<p class=note>{hidden:,} NSFW-marked samples not shown</p>")
    for column, (title, groups) in galleries.items():
        values = Counter(row[column] or "unknown" for row in rows)
        parts = [f"<h2>{_escape(title)}: thumbnails</h2>"]
        for value, group in groups.items():
            figures = [
                _figure(row, uris[row["image_sha256"]])
                for row in group
                if uris.get(row["image_sha256"])
            ]
            parts.append(
                f"<h3>{_escape(value)} <span class=note>({len(figures)} of "
                f"{values[value]:,})</span></h3><div class=gallery>{''.join(figures)}</div>"
            )
        if len(values) > len(groups):
            others = [v for v, _ in values.most_common() if v not in groups]
            rest = ", ".join(_escape(v) for v in others[:50]) + (", ..." * (len(others) > 50))
            parts.append(f"<p class=note>Not shown: {rest}</p>")
        sections.append("".join(parts))
    return sections


def report_html(
    report,
    stats: dict[str, Any],
    selected: pa.Table | None = None,
    read_images: Callable[[Iterable[str]], dict[str, bytes]] | None = None,
    nsfw: str = "include",
) -> str:
    """The page; score histograms from ``selected``, thumbnails read with ``read_images``
    (NSFW-marked samples not among them unless ``nsfw`` is the export's "only")."""
    sections = [
        bars("Samples per split", stats["split"]),
        bars("Samples per source", stats["source"]),
        bars("Samples per review status", stats["review_status"]),
        bars("Narrative written by", stats["narrative_origin"]),
        bars("Narrative prompt length (words)", stats["narrative_prompt_words"]["histogram"]),
        bars("Keyword prompt length (words)", stats["complex_prompt_words"]["histogram"]),
    ]
    if selected is not None:
        sections += score_sections(selected)
        sections += gallery_sections(selected, read_images, nsfw)
    return (
        "<!doctype html><html><head><meta charset=utf-8><title>surd export report</title>"
        f"<style>{STYLE}</style></head><body>"
        f"<h1>surd export: {report.exported:,} samples</h1>" + "".join(sections) + "</body></html>"
    )
