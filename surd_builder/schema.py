"""The one sample schema, and the stage tables cut from it.

Every table in a workspace and every exported file uses the fields defined here and nowhere else.
A *stage table* (``samples``, ``narratives``, ``reviews``...) owns a subset of the sample fields,
always including ``sample_id``; "the current dataset" is the join of all stage tables on
``sample_id`` (see :meth:`surd_builder.workspace.Workspace.dataset`). To add a column, add a field
to :data:`SAMPLE_SCHEMA` and name it in the table of the stage that produces it.

Within a table, a newer row of a sample replaces the older one *whole*: a stage that writes a table
writes all of its columns. Two stages that compute different things get two tables (``hashes``
and ``duplicates``), never a shared one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import pyarrow as pa

TIMESTAMP = pa.timestamp("us", tz="UTC")

# Values of ``review_status``. "pending" means no human has decided yet.
REVIEW_STATUSES = ("pending", "accepted", "corrected", "rejected")
# Values of ``split`` in exports.
SPLITS = ("train", "validation", "test")


def _field(name: str, type_: pa.DataType, doc: str, nullable: bool = True) -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={"doc": doc})


SAMPLE_SCHEMA = pa.schema(
    [
        # identity and provenance
        _field("sample_id", pa.string(), "stable id: hash of source + source_item_id", False),
        _field(
            "source", pa.string(), "source name, e.g. 'civitai' or a local folder's name", False
        ),
        _field("source_item_id", pa.string(), "the source's own id of the item", False),
        _field("source_url", pa.string(), "URL the image was fetched from"),
        _field("page_url", pa.string(), "human-facing page of the item at its source"),
        _field("creator", pa.string(), "creator or username at the source"),
        _field("license", pa.string(), "licence of the image as the source states it"),
        _field(
            "robots_tags",
            pa.string(),
            "X-Robots-Tag headers seen on the image's response ('; '-joined); unless the scrape "
            "ran with --ignore-opt-out, none of them opted out of surd",
        ),
        # the image (bytes live once in the image store, addressed by image_sha256)
        _field("image_sha256", pa.string(), "sha256 of the stored image bytes"),
        _field("width", pa.int32(), "image width in pixels"),
        _field("height", pa.int32(), "image height in pixels"),
        _field("image_format", pa.string(), "PIL format name: JPEG, PNG, WEBP..."),
        # prompts
        _field("complex_prompt", pa.string(), "the long keyword prompt the image was made with"),
        _field("negative_prompt", pa.string(), "negative prompt used at generation"),
        _field("narrative_prompt", pa.string(), "short plain-sentence description of the image"),
        _field(
            "narrative_origin",
            pa.string(),
            "who wrote narrative_prompt: 'source', 'human', or '<rewriter>:<model>'",
        ),
        _field(
            "rewrite_key",
            pa.string(),
            "hash of (rewriter, model, template, input) that wrote narrative_prompt: the rewrite "
            "cache key",
        ),
        # generation metadata
        _field("model_name", pa.string(), "diffusion model / checkpoint that made the image"),
        _field("sampler", pa.string(), "sampler name"),
        _field("steps", pa.int32(), "sampling steps"),
        _field("cfg_scale", pa.float32(), "classifier-free guidance scale"),
        _field("seed", pa.int64(), "generation seed"),
        _field(
            "nsfw",
            pa.bool_(),
            "not safe for work: nsfw_level is not 'None' where a level is known, else what the "
            "source or screening says",
        ),
        _field(
            "nsfw_level",
            pa.string(),
            "the source's NSFW level on Civitai's scale: None, Soft, Mature or X (browsing "
            "levels 1, 2, 4, 8 and higher); null where the source gives none",
        ),
        # screening and dedupe
        _field("clip_score", pa.float32(), "image <-> narrative_prompt similarity (CLIP)"),
        _field("text_similarity", pa.float32(), "narrative <-> keyword prompt text similarity"),
        _field(
            "judge_score",
            pa.float32(),
            "a vision-language judge's probability (0..1) that the narrative matches the image",
        ),
        _field(
            "aesthetic_score",
            pa.float32(),
            "predicted aesthetic rating of the image (LAION-style MLP over CLIP image "
            "embeddings; about 1..10, higher is better)",
        ),
        _field(
            "screening_key",
            pa.string(),
            "hash of (models, image, narrative, keyword prompt) the scores were computed from",
        ),
        _field("phash", pa.string(), "perceptual hash of the image, hex (kind: hash_kind)"),
        _field("hash_kind", pa.string(), "how phash was computed, e.g. 'phash-8' (pHash, 64 bits)"),
        _field(
            "variant_hashes",
            pa.list_(pa.string()),
            "hashes (kind: hash_kind) of the mirrored image and of fixed crops, hex: how mirrored "
            "and cropped copies are found through the same index",
        ),
        _field(
            "colour_hash",
            pa.string(),
            "a coarse colour layout of the image, hex: the independent check that confirms a "
            "hash match (flat graphics share a pHash but not their colours)",
        ),
        _field(
            "hash_settings",
            pa.string(),
            "how the hashes were computed: signature version and JPEG decoding, e.g. 'v2 draft' "
            "(at a reduced DCT scale) or 'v2 full'; rows of other settings are hashed again",
        ),
        _field("duplicate_of", pa.string(), "sample_id kept in this sample's duplicate cluster"),
        _field(
            "cluster_id",
            pa.string(),
            "the duplicate cluster's id (its kept sample's sample_id); null outside any cluster",
        ),
        _field(
            "duplicate_match",
            pa.string(),
            "how this sample matched the kept one, e.g. 'phash-8', 'phash-8:mirror', "
            "'phash-8:crop', 'prompt', 'clip' (CLIP image embeddings, dedupe --by embedding: "
            "no hash matched)",
        ),
        _field(
            "duplicate_distance",
            pa.int16(),
            "bits between this sample's matching hash and the kept sample's (0: identical); "
            "null for a 'clip' or 'prompt' match and where the sample matched the kept one "
            "only through other members",
        ),
        # human review
        _field("review_status", pa.string(), "pending / accepted / corrected / rejected"),
        _field("review_tags", pa.list_(pa.string()), "problems an annotator tagged"),
        _field("reviewer", pa.string(), "annotator id of the deciding review"),
        _field("reviewed_at", TIMESTAMP, "time of the deciding review"),
        # bookkeeping
        _field("split", pa.string(), "train / validation / test (set at export)"),
        _field("collected_at", TIMESTAMP, "when surd collected the sample (last, with --force)"),
        _field("updated_at", TIMESTAMP, "when a stage last wrote this row"),
    ]
)


@dataclass(frozen=True)
class TableSpec:
    """A stage table: its name, the sample fields it owns, and a one-line purpose.

    ``order_by`` names a timestamp column that decides which of a sample's rows is current (the
    newest by that time, then the last written); without it the last written row is current. A
    review pulled late must not beat a newer one pulled earlier, so ``reviews`` orders by
    ``reviewed_at``.
    """

    name: str
    columns: tuple[str, ...]
    doc: str
    order_by: str | None = None

    @property
    def schema(self) -> pa.Schema:
        return pa.schema([SAMPLE_SCHEMA.field(c) for c in self.columns])


# Order matters: in the joined dataset a later table's non-null value wins over an earlier one's
# (a rewritten narrative over the source's, a human's over the rewriter's).
STAGE_TABLES: dict[str, TableSpec] = {
    spec.name: spec
    for spec in (
        TableSpec(
            "samples",
            (
                "sample_id",
                "source",
                "source_item_id",
                "source_url",
                "page_url",
                "creator",
                "license",
                "robots_tags",
                "image_sha256",
                "width",
                "height",
                "image_format",
                "complex_prompt",
                "negative_prompt",
                "narrative_prompt",
                "narrative_origin",
                "model_name",
                "sampler",
                "steps",
                "cfg_scale",
                "seed",
                "nsfw",
                "nsfw_level",
                "collected_at",
                "updated_at",
            ),
            "collected samples (ingest, scrape): provenance, image metadata, prompts",
        ),
        TableSpec(
            "narratives",
            ("sample_id", "narrative_prompt", "narrative_origin", "rewrite_key", "updated_at"),
            "narrative prompts written by a rewriter or captioner",
        ),
        TableSpec(
            "screening",
            (
                "sample_id",
                "clip_score",
                "text_similarity",
                "judge_score",
                "aesthetic_score",
                "screening_key",
                "nsfw",
                "review_status",
                "review_tags",
                "reviewer",
                "reviewed_at",
                "updated_at",
            ),
            "automatic screening scores; a sample below a threshold is auto-rejected here (a "
            "human review, a later table, still overrides it)",
        ),
        TableSpec(
            "hashes",
            (
                "sample_id",
                "phash",
                "hash_kind",
                "variant_hashes",
                "colour_hash",
                "hash_settings",
                "updated_at",
            ),
            "perceptual hashes",
        ),
        TableSpec(
            "duplicates",
            (
                "sample_id",
                "duplicate_of",
                "cluster_id",
                "duplicate_match",
                "duplicate_distance",
                "updated_at",
            ),
            "near-duplicate decisions: the sample kept in each cluster",
        ),
        TableSpec(
            "reviews",
            (
                "sample_id",
                "narrative_prompt",
                "narrative_origin",
                "review_status",
                "review_tags",
                "reviewer",
                "reviewed_at",
                "updated_at",
            ),
            "human review decisions from Label Studio",
            order_by="reviewed_at",
        ),
    )
}

# Per-item failures of any stage: one row per (stage, sample_id) attempt that produced no sample.
FAILURES_SCHEMA = pa.schema(
    [
        pa.field("stage", pa.string(), nullable=False),
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("source_item_id", pa.string()),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string()),
        pa.field("failed_at", TIMESTAMP),
    ]
)

# Items a scrape source has listed but not necessarily downloaded (``listings/<source>/``).
LISTING_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("source_item_id", pa.string(), nullable=False),
        pa.field("image_url", pa.string()),
        pa.field("metadata_json", pa.string()),  # the sample fields the source gave, as JSON
    ]
)

# The content-addressed image store: each image's bytes exactly once.
IMAGES_SCHEMA = pa.schema(
    [
        pa.field("image_sha256", pa.string(), nullable=False),
        pa.field("image_bytes", pa.binary(), nullable=False),
    ]
)


# Columns that only make sense together: in the join, the table that sets the first column of a
# group sets all of them (a rewritten narrative never keeps the source's origin).
COLUMN_GROUPS: tuple[tuple[str, ...], ...] = (
    ("narrative_prompt", "narrative_origin", "rewrite_key"),
    ("review_status", "review_tags", "reviewer", "reviewed_at"),
    ("duplicate_of", "cluster_id", "duplicate_match", "duplicate_distance"),
    ("phash", "hash_kind", "variant_hashes", "colour_hash", "hash_settings"),
)


def table_spec(name: str) -> TableSpec:
    try:
        return STAGE_TABLES[name]
    except KeyError:
        known = ", ".join(STAGE_TABLES)
        raise ValueError(f"unknown stage table {name!r} (known: {known})") from None


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Return ``table`` with exactly ``schema``'s columns, order and types.

    Missing nullable columns are added as nulls; extra columns, missing required columns, nulls in
    required columns and values that cannot be cast are errors, so a stage with a bug fails at the
    point of writing instead of writing a table that breaks every later reader.
    """
    extra = set(table.column_names) - set(schema.names)
    if extra:
        raise ValueError(f"columns not in the schema: {sorted(extra)}")
    columns = []
    for field in schema:
        if field.name in table.column_names:
            column = table.column(field.name)
            if column.type != field.type:
                column = column.cast(field.type)
            if not field.nullable and column.null_count:
                raise ValueError(f"column {field.name!r} must not contain nulls")
        elif field.nullable:
            column = pa.nulls(table.num_rows, field.type)
        else:
            raise ValueError(f"required column {field.name!r} is missing")
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=schema)


def records_to_table(records: Iterable[dict], schema: pa.Schema) -> pa.Table:
    """Build a conforming table from dicts (missing keys become nulls)."""
    rows = list(records)
    return conform(pa.Table.from_pylist(rows, schema=schema), schema)


def hf_features(schema: pa.Schema, image_column: str | None = "image"):
    """Hugging Face ``datasets.Features`` for an export schema.

    Derived from the Arrow schema so there is one source of truth; the image column (stored as
    ``struct<bytes: binary, path: string>``) becomes ``datasets.Image()`` so that
    ``load_dataset("parquet", ...)`` decodes it without glue code.
    """
    import datasets

    plain = pa.schema([f for f in schema if f.name != image_column])
    features = datasets.Features.from_arrow_schema(plain)
    ordered = {}
    for field in schema:
        ordered[field.name] = (
            datasets.Image() if field.name == image_column else features[field.name]
        )
    return datasets.Features(ordered)


# ----------------------------------------------------------------------------- export
# The image as Hugging Face ``datasets`` stores it: the encoded bytes plus a file name.
IMAGE_FIELD = pa.field("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())]))

# Columns of exported Parquet, in order; all but ``image`` are sample fields.
EXPORT_COLUMNS = (
    "sample_id",
    "narrative_prompt",
    "complex_prompt",
    "negative_prompt",
    "image",
    "width",
    "height",
    "image_format",
    "source",
    "source_item_id",
    "source_url",
    "page_url",
    "creator",
    "license",
    "robots_tags",
    "model_name",
    "sampler",
    "steps",
    "cfg_scale",
    "seed",
    "nsfw",
    "nsfw_level",
    "narrative_origin",
    "review_status",
    "review_tags",
    "clip_score",
    "text_similarity",
    "judge_score",
    "aesthetic_score",
    "phash",
    "hash_kind",
    "duplicate_of",
    "cluster_id",
    "duplicate_match",
    "duplicate_distance",
    "image_sha256",
    "split",
    "collected_at",
)


def export_schema() -> pa.Schema:
    """Arrow schema of exported shards, with the ``huggingface`` metadata that makes
    ``datasets.load_dataset("parquet", ...)`` decode ``image`` and type every column."""
    import json

    fields = [IMAGE_FIELD if c == "image" else SAMPLE_SCHEMA.field(c) for c in EXPORT_COLUMNS]
    schema = pa.schema(fields)
    features = hf_features(schema)
    return schema.with_metadata(
        {"huggingface": json.dumps({"info": {"features": features.to_dict()}})}
    )
