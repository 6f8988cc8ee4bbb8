"""The dataset card (``README.md``) and report (``report.html``) written into every export.

The card's YAML front matter is what the Hugging Face Hub and ``datasets`` read: ``configs`` (the
data files of each split), ``dataset_info`` (features, split sizes, byte counts). Its body says
what the dataset is, how it was built and filtered, its statistics and near-duplicate clusters,
and every column with its type and meaning. ``report.html`` shows the
same numbers as tables and bar charts, with histograms of the screening scores and thumbnails per
source and review status (``pipelines/report_page.py``), in one file that opens in a browser
without a server.
"""

from __future__ import annotations

import html
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipelines.report_page import report_html
from surd_builder.atomic import atomic_path
from surd_builder.schema import export_schema, hf_features

HISTOGRAM_BINS = (0, 5, 10, 20, 40, 80, 160)  # prompt length in words: bin lower edges

# Where an exported column means something other than (or more than) the schema's ``doc`` says.
EXPORT_DOCS = {
    "image": "the image: its encoded bytes, embedded (`datasets` decodes it to a PIL image)",
    "duplicate_of": (
        "sample_id of the kept sample of this sample's near-duplicate cluster; null for the kept "
        "sample itself and for samples in no cluster"
    ),
    "cluster_id": (
        "the near-duplicate cluster's id (its kept sample's sample_id), on every member, the kept "
        "one included; null outside any cluster"
    ),
    "duplicate_match": (
        "how this sample matched the kept one: 'phash-8' (perceptual hash), 'phash-8:mirror' "
        "(mirrored copy), 'phash-8:crop' (cropped copy), 'prompt' (same keyword prompt), 'clip' "
        "(alike CLIP image embeddings)...; null for the kept sample and outside clusters"
    ),
}


def _words(text: str | None) -> int:
    return len((text or "").split())


def statistics(selected: pa.Table) -> dict[str, Any]:
    """Counts and prompt-length figures of the exported samples. Pure."""
    stats: dict[str, Any] = {}
    for column in ("source", "review_status", "narrative_origin", "license", "split"):
        values = [v or "unknown" for v in selected[column].to_pylist()]
        stats[column] = dict(Counter(values).most_common())
    for column in ("narrative_prompt", "complex_prompt"):
        lengths = sorted(_words(t) for t in selected[column].to_pylist() if t)
        histogram = Counter()
        for length in lengths:
            edge = max(e for e in HISTOGRAM_BINS if e <= length)
            histogram[edge] += 1
        stats[f"{column}_words"] = {
            "mean": round(sum(lengths) / len(lengths), 1) if lengths else 0,
            "median": lengths[len(lengths) // 2] if lengths else 0,
            "p95": lengths[int(len(lengths) * 0.95)] if lengths else 0,
            "histogram": {f"{edge}+": histogram.get(edge, 0) for edge in HISTOGRAM_BINS},
        }
    return stats


def card_yaml(report, marker: dict[str, Any]) -> str:
    import yaml

    features = hf_features(export_schema())
    split_bytes: Counter = Counter()
    for path in report.files:
        split_bytes[path.name.split("-", 1)[0]] += path.stat().st_size
    front = {
        "configs": [
            {
                "config_name": "default",
                "data_files": [
                    {"split": split, "path": f"data/{split}-*.parquet"} for split in report.by_split
                ],
            }
        ],
        "dataset_info": {
            "features": features._to_yaml_list(),
            "splits": [
                {"name": split, "num_bytes": split_bytes[split], "num_examples": count}
                for split, count in report.by_split.items()
            ],
            "download_size": sum(split_bytes.values()),
            "dataset_size": sum(split_bytes.values()),
        },
        "task_categories": ["text-to-image"],
        "tags": ["surd", "sur-adapter", "prompt-rewriting"],
        "pretty_name": "SURD-style narrative / keyword prompt pairs",
        "size_categories": [_size_category(report.exported)],
    }
    return yaml.safe_dump(front, sort_keys=False, allow_unicode=True)


def _size_category(count: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K")):
        if count < limit:
            return label
    return "100K<n<1M" if count < 1_000_000 else "n>1M"


def _cell(value: object, quote: bool = True) -> str:
    """A Markdown table cell: escaped, on one line, no column breaks (values come from sources);
    ``quote=False`` leaves quotes as they are (for this project's own texts)."""
    text = html.escape(" ".join(str(value).split()), quote=quote)
    return text.replace("|", "\\|")


def _table(title: str, counts: dict[str, int]) -> str:
    rows = "\n".join(f"| {_cell(k)} | {v:,} |" for k, v in counts.items())
    return f"| {title} | samples |\n|---|---|\n{rows}\n"


def card_markdown(report, marker: dict[str, Any], stats: dict[str, Any]) -> str:
    options = marker["options"]
    splits = ", ".join(f"'{s}': 'data/{s}-*.parquet'" for s in report.by_split)
    left_out = ", ".join(f"{k}: {v:,}" for k, v in report.skipped.items()) or "none"
    parts = [
        "# Narrative / keyword prompt pairs\n",
        "Triples of a short narrative prompt, the long keyword prompt an image was generated "
        "with, and the image, in the shape of SURD (the dataset of the SUR-adapter, Zhong et "
        f"al., ACM MM 2023). Built with surd {marker['surd_version']} on "
        f"{marker['created_at'][:10]}: {report.exported:,} samples.\n",
        "```python\nimport datasets\n\n"
        f'ds = datasets.load_dataset("parquet", data_files={{{splits}}})\n```\n',
        "## How it was built\n",
        "- Narratives come from the source, a rewriter (`narrative_origin` names it) or a person "
        "(`human`); `review_status` says whether a person accepted, corrected or has not yet "
        "seen it.\n"
        f"- Exported review statuses: {', '.join(options['statuses'])}; near-duplicates marked "
        f"by `surd build dedupe` {'left out' if options['drop_duplicates'] else 'kept'} "
        f"({report.skipped.get('duplicate', 0):,} left out, see Near-duplicates); minimum "
        "image side "
        f"{options['min_side'] or 'none'}; NSFW policy: {options['nsfw']}.\n"
        f"- Left out: {left_out}.\n"
        "- Splits come from a hash of `sample_id` (test fraction "
        f"{options['test_fraction']}, validation {options['validation_fraction']}), so a sample "
        "keeps its split as the dataset grows.\n",
        "## Statistics\n",
        _table("split", stats["split"]),
        _table("source", stats["source"]),
        _table("review status", stats["review_status"]),
        _table("narrative written by", stats["narrative_origin"]),
        _table("licence", stats["license"]),
        "| prompt | mean words | median | 95th percentile |\n|---|---|---|---|\n"
        + "".join(
            f"| {name} | {stats[f'{name}_words']['mean']} | {stats[f'{name}_words']['median']} "
            f"| {stats[f'{name}_words']['p95']} |\n"
            for name in ("narrative_prompt", "complex_prompt")
        ),
        "See `report.html` for charts. Provenance per sample: `source`, `source_item_id`, "
        "`source_url`, `page_url`, `creator`, `license`, `robots_tags` (the X-Robots-Tag "
        "headers seen), `collected_at`.\n",
        *_clusters_section(marker.get("clusters"), options["drop_duplicates"]),
        *_collection_section(marker.get("collection")),
        *_columns_section(),
    ]
    return "\n".join(parts)


def _clusters_section(clusters: dict[str, Any] | None, dropped: bool) -> list[str]:
    """Near-duplicate clusters (``pipelines.export.cluster_summary``) and what the export did
    with their duplicates."""
    if clusters is None:
        return []
    head = "## Near-duplicates\n"
    if not clusters.get("clusters"):
        return [
            head,
            "No near-duplicate clusters among the exported samples (`surd build dedupe` was not "
            "run, or found none): `cluster_id`, `duplicate_of`, `duplicate_match` and "
            "`duplicate_distance` are null in every row.\n",
        ]
    kept, left_out = clusters["duplicates_kept"], clusters["duplicates_dropped"]
    if dropped:
        policy = f"{left_out:,} left out (one sample per cluster is exported)" + (
            f"; {kept:,} kept, standing in for a kept sample that another filter left out"
            if kept
            else ""
        )
    else:
        policy = f"all {kept:,} kept (`--keep-duplicates`)"
    lines = [
        f"- {clusters['clusters']:,} cluster(s) of near-duplicates (`surd build dedupe`) among "
        f"the samples that passed every other filter, {clusters['samples_in_clusters']:,} "
        f"sample(s) in them; {clusters['duplicates']:,} are duplicates of their cluster's kept "
        f"sample: {policy}.\n",
        "- Every exported member of a cluster has `cluster_id` (the kept sample's `sample_id`); "
        "a duplicate also has `duplicate_of` (the same id), `duplicate_match` and "
        "`duplicate_distance` (bits between its hash and the kept sample's); `duplicate_of` is "
        "null for the kept sample."
        + (
            " Keep one row per cluster with `ds.filter(lambda r: r['duplicate_of'] is None)`"
            + (" (but for the clusters below)" if clusters.get("kept_sample_left_out") else "")
            + ".\n"
            if not dropped
            else "\n"
        ),
    ]
    if clusters.get("kept_sample_left_out"):
        lines.append(
            f"- {clusters['kept_sample_left_out']:,} cluster(s) lost their kept sample to "
            "another filter: their `cluster_id` and `duplicate_of` name a sample that is not "
            "in this export.\n"
        )
    rows = "\n".join(
        f"| {_cell(match)} | {counts['duplicates']:,} | {counts['dropped']:,} |"
        for match, counts in clusters.get("by_match", {}).items()
    )
    table = f"| match | duplicates | left out |\n|---|---|---|\n{rows}\n"
    return [head, "".join(lines), table]


def _columns_section() -> list[str]:
    """Every exported column with its type and meaning (the schema's docs, :data:`EXPORT_DOCS`
    where the export differs)."""
    rows = []
    for field in export_schema():
        doc = EXPORT_DOCS.get(field.name) or (field.metadata or {}).get(b"doc", b"").decode()
        rows.append(f"| `{field.name}` | {_type_name(field)} | {_cell(doc, quote=False)} |")
    return ["## Columns\n", "| column | type | meaning |\n|---|---|---|\n" + "\n".join(rows) + "\n"]


def _type_name(field: pa.Field) -> str:
    if field.name == "image":
        return "image"
    if pa.types.is_list(field.type):
        return f"list of {field.type.value_type}"
    if pa.types.is_timestamp(field.type):
        return f"timestamp ({field.type.tz or 'naive'})"
    return str(field.type)


def _collection_section(collection: dict[str, Any] | None) -> list[str]:
    """Opt-out policy and takedowns, with counts (absent for exports made without them)."""
    if not collection:
        return []
    runs, honoured = collection["scrape_runs"], collection["scrape_runs_honouring_opt_outs"]
    before = collection.get("scrape_runs_before_opt_out_support", 0)
    if runs == 0:
        policy = "No scrape runs: the samples were ingested from local files."
    elif before:
        policy = (
            f"{before} of {runs} scrape run(s) were made by a surd without opt-out support; "
            f"{honoured} honoured opt-outs."
        )
    elif honoured == runs:
        policy = (
            f"All {runs} scrape run(s) honoured opt-outs: X-Robots-Tag `noai`, `noimageai`, "
            "`noindex`, `noimageindex`, `none` on image responses, and robots.txt for URL lists "
            "(evaluated for the user agent `surd`)."
        )
    else:
        policy = (
            f"{runs - honoured} of {runs} scrape run(s) ignored opt-outs (`--ignore-opt-out`, "
            "used only with the owners' permission); the others honoured them."
        )
    return [
        "## Opt-out and takedown\n",
        f"- {policy}\n"
        f"- Kept out at collection: {collection['opted_out']:,} opted out, "
        f"{collection['robots_unavailable']:,} waiting for an unreachable robots.txt, "
        f"{collection['taken_down_at_scrape']:,} matching a taken-down image.\n"
        f"- Takedown: {collection['takedown_requests']:,} request(s), "
        f"{collection['removed_by_takedown']:,} sample(s) removed and left out of this export. "
        "To ask for removal, contact the dataset's maintainers with the image, its URL or its "
        "`sample_id`.\n",
    ]


def write_card(
    folder: Path,
    selected: pa.Table,
    report,
    marker: dict[str, Any],
    read_images: Callable[[Iterable[str]], dict[str, bytes]] | None = None,
) -> None:
    """``README.md`` (card with YAML front matter) and ``report.html`` into ``folder``; the
    page's thumbnails are read with ``read_images`` (none without it)."""
    stats = statistics(selected)
    with atomic_path(Path(folder) / "README.md") as temp:
        temp.write_text(
            f"---\n{card_yaml(report, marker)}---\n\n{card_markdown(report, marker, stats)}",
            encoding="utf-8",
        )
    with atomic_path(Path(folder) / "report.html") as temp:
        nsfw = marker.get("options", {}).get("nsfw", "include")
        temp.write_text(report_html(report, stats, selected, read_images, nsfw), encoding="utf-8")
