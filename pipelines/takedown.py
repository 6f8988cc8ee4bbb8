"""Takedown: remove samples on request, and keep them out for good.

A request names what to remove: an image or page URL (``url``), a source item (``source-item``,
``SOURCE:ITEM_ID``), a ``sample-id``, or an image (``image``, matched by perceptual hash within
``MAX_DISTANCE`` bits, so re-encodes, resizes and re-uploads are caught). ``surd build takedown``
stores every request in ``takedown/requests-*.parquet`` and every sample it matched in
``takedown/removed-*.parquet`` (reason, date, which request), atomically; nothing is ever
deleted from the list. Then:

- ``surd build export`` leaves removed samples out (counted as ``taken-down``);
- ``surd build scrape`` never downloads an item that a request names (by URL, source item or
  sample id), nor one that was removed, and does not store a downloaded image whose hash is
  within ``MAX_DISTANCE`` of a requested image (failure ``taken-down``), so a later scrape never
  brings them back, whatever id a re-upload has.

The image bytes of removed samples stay in the workspace's image store (shards are immutable);
they are unreachable from exports.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from surd_builder.atomic import part_name, write_parquet_atomic
from surd_builder.errors import InputError
from surd_builder.workspace import Workspace

KINDS = ("url", "source-item", "sample-id", "image")
LINE_FORM = f'expected "KIND VALUE" with KIND one of {", ".join(KINDS)}'
MAX_DISTANCE = 6  # pHash bits: no false positives among 499,500 distinct pairs (FACTS.md)
# a pHash with fewer set (or unset) bits than this comes from a nearly flat image: every flat
# image hashes alike, so such an image request would remove unrelated samples
MIN_STRUCTURE_BITS = 8
FOLDER = "takedown"
REQUEST_SCHEMA = pa.schema(
    [
        ("kind", pa.string()),
        ("value", pa.string()),  # for images: the pHash (hex)
        ("label", pa.string()),  # what the user gave (a URL, an id, an image file name)
        ("reason", pa.string()),
        ("requested_at", pa.string()),
    ]
)
REMOVED_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("kind", pa.string()),
        ("label", pa.string()),
        ("reason", pa.string()),
        ("removed_at", pa.string()),
    ]
)


@dataclass(frozen=True)
class TakedownRequest:
    kind: str
    value: str
    label: str
    reason: str
    requested_at: str


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def make_request(kind: str, given: str, reason: str, requested_at: str) -> TakedownRequest:
    """A request from what the user gave; an image file is hashed here."""
    given = given.strip()
    if kind not in KINDS:
        raise InputError(f"unknown takedown kind {kind!r} (use one of: {', '.join(KINDS)})")
    if not given:
        raise InputError(f"an empty {kind} in the takedown request")
    if kind == "source-item" and ":" not in given:
        raise InputError(f"--source-item {given!r}: give SOURCE:ITEM_ID, e.g. civitai:123456")
    if kind == "url":
        return TakedownRequest(kind, normalise_url(given), given, reason, requested_at)
    if kind == "image":
        from pipelines.perceptual import image_hash

        path = Path(given)
        try:
            data = path.read_bytes()
        except OSError as error:
            raise InputError(f"--image {given}: {error.strerror or error}") from None
        try:
            value = image_hash(data, draft=False)
        except Exception:  # noqa: BLE001 (PIL raises many kinds for a non-image)
            raise InputError(f"--image {given}: not an image surd can read") from None
        if not MIN_STRUCTURE_BITS <= bin(int(value, 16)).count("1") <= 64 - MIN_STRUCTURE_BITS:
            raise InputError(
                f"--image {given} has too little structure to match safely (flat colours match "
                "each other): give its --url or --sample-id instead"
            )
        return TakedownRequest(kind, value, path.name, reason, requested_at)
    return TakedownRequest(kind, given, given, reason, requested_at)


def read_request_file(path: Path, reason: str, requested_at: str) -> list[TakedownRequest]:
    """Lines ``KIND VALUE`` (``url https://...``, ``image ./copy.jpg``); ``#`` comments."""
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise InputError(f"--from-file {path}: {error.strerror}") from None
    requests = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        kind, _, value = line.replace("\t", " ", 1).partition(" ")  # a tab separates too
        if kind not in KINDS or not value.strip():  # e.g. "url|https://..." or a bare "url"
            raise InputError(f"{path}:{number}: {line[:60]!r}: {LINE_FORM}")
        requests.append(make_request(kind, value.strip(), reason, requested_at))
    return requests


def _folder(workspace: Workspace) -> Path:
    return workspace.root / FOLDER


def _read(workspace: Workspace, prefix: str, schema: pa.Schema) -> list[dict[str, Any]]:
    parts = sorted(_folder(workspace).glob(f"{prefix}-*.parquet"))
    return [row for part in parts for row in pq.read_table(part, schema=schema).to_pylist()]


def read_requests(workspace: Workspace) -> list[TakedownRequest]:
    return [TakedownRequest(**row) for row in _read(workspace, "requests", REQUEST_SCHEMA)]


def read_removed(workspace: Workspace) -> list[dict[str, Any]]:
    """Removed samples, first removal of each."""
    first: dict[str, dict[str, Any]] = {}
    for row in _read(workspace, "removed", REMOVED_SCHEMA):
        first.setdefault(row["sample_id"], row)
    return list(first.values())


def removed_ids(workspace: Workspace) -> set[str]:
    return {row["sample_id"] for row in read_removed(workspace)}


def hamming(a: str, b: str) -> int:
    return bin(int(a, 16) ^ int(b, 16)).count("1")


def image_matches(phash: str, requests: list[TakedownRequest]) -> TakedownRequest | None:
    for request in requests:
        if request.kind == "image" and hamming(phash, request.value) <= MAX_DISTANCE:
            return request
    return None


URL_FIELDS = ("source_url", "page_url", "image_url")
# the samples columns a request can match (sample_id comes with every table read)
MATCH_COLUMNS = ["source", "source_item_id", "source_url", "page_url", "image_sha256"]


def normalise_url(url: str) -> str:
    """Scheme and host in lower case, no default port, no fragment: the same resource written
    two ways matches."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url.strip())
        host = (parts.hostname or "").lower()
        port = parts.port
    except ValueError:
        return url.strip()
    default = {"http": 80, "https": 443}.get(parts.scheme.lower())
    netloc = host if port in (None, default) else f"{host}:{port}"
    if parts.username or parts.password:
        netloc = f"{parts.username or ''}{':' + parts.password if parts.password else ''}@{netloc}"
    return urlunsplit((parts.scheme.lower(), netloc, parts.path or "/", parts.query, ""))


def item_rows(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Listed items as rows :func:`match_rows` reads: the page URL comes from the metadata."""
    import json

    rows = []
    for item in items:
        try:
            metadata = json.loads(item.get("metadata_json") or "{}")
        except ValueError:
            metadata = {}
        rows.append({**item, "page_url": metadata.get("page_url")})
    return rows


def match_rows(
    rows: list[dict[str, Any]],
    requests: list[TakedownRequest],
    phashes: dict[str, str] | None = None,
) -> dict[str, TakedownRequest]:
    """sample_id -> the first request matching it. Pure. ``rows`` carry sample_id, source,
    source_item_id and URLs; ``phashes`` maps image sha256 to pHash for image requests."""
    by_kind: dict[str, dict[str, TakedownRequest]] = {}
    for request in requests:
        by_kind.setdefault(request.kind, {}).setdefault(request.value, request)
    matched: dict[str, TakedownRequest] = {}
    for row in rows:
        keys = {
            "sample-id": [row.get("sample_id")],
            "source-item": [f"{row.get('source')}:{row.get('source_item_id')}"],
            "url": [
                normalise_url(value)
                for value in (*(row.get(k) for k in URL_FIELDS), row.get("source_item_id"))
                if isinstance(value, str) and "://" in value
            ],
        }
        found = None
        for kind, values in keys.items():
            for value in values:
                found = found or by_kind.get(kind, {}).get(value)
        if found is None and phashes is not None and row.get("image_sha256") in phashes:
            found = image_matches(phashes[row["image_sha256"]], requests)
        if found is not None:
            matched[row["sample_id"]] = found
    return matched


@dataclass
class TakedownReport:
    requests: int
    removed: list[tuple[str, TakedownRequest]]  # newly removed samples
    already_removed: int
    unmatched: list[TakedownRequest]


def apply_takedowns(
    workspace: Workspace, requests: list[TakedownRequest] | None = None
) -> list[tuple[str, TakedownRequest]]:
    """Match every stored request against the samples not removed yet and record the new
    removals; returns them. Export runs it first, so samples that arrived after a request (an
    ingest, a forced scrape, a scrape running at the time) are removed too."""
    requests = read_requests(workspace) if requests is None else requests
    if not requests:
        return []
    before = removed_ids(workspace)
    rows = [
        row
        for row in workspace.read_table("samples", MATCH_COLUMNS).to_pylist()
        if row["sample_id"] not in before
    ]
    phashes = None
    if any(r.kind == "image" for r in requests):
        phashes = _stored_phashes(workspace, [row["image_sha256"] for row in rows])
    new = sorted(match_rows(rows, requests, phashes).items())
    if new:
        stamp = now_iso()
        table = pa.Table.from_pylist(
            [
                {"sample_id": sid, "kind": r.kind, "label": r.label, "reason": r.reason,
                 "removed_at": stamp}
                for sid, r in new
            ],
            schema=REMOVED_SCHEMA,
        )  # fmt: skip
        write_parquet_atomic(table, _folder(workspace) / part_name("removed"))
    return new


def take_down(workspace: Workspace, requests: list[TakedownRequest]) -> TakedownReport:
    """Store the requests, then remove every sample that a stored request matches."""
    if not requests:
        raise InputError("nothing to take down: give --url, --source-item, --sample-id, --image "
                         "or --from-file")  # fmt: skip
    folder = _folder(workspace)
    folder.mkdir(exist_ok=True)
    write_parquet_atomic(
        pa.Table.from_pylist([r.__dict__ for r in requests], schema=REQUEST_SCHEMA),
        folder / part_name("requests"),
    )
    already = {row["sample_id"]: row for row in read_removed(workspace)}
    new = apply_takedowns(workspace)
    # which of these requests match something (now or before), for the report
    given = {(r.kind, r.value) for r in requests}
    by_these = [(sid, r) for sid, r in new if (r.kind, r.value) in given]
    matched_before = {(row["kind"], row["label"]) for row in already.values()}
    used = {(r.kind, r.value) for _, r in by_these}
    unmatched = [
        r
        for r in requests
        if (r.kind, r.value) not in used and (r.kind, r.label) not in matched_before
    ]
    return TakedownReport(
        requests=len(requests),
        removed=by_these,
        already_removed=len(_matches_already_removed(workspace, requests, set(already))),
        unmatched=unmatched,
    )


def _matches_already_removed(
    workspace: Workspace, requests: list[TakedownRequest], removed: set[str]
) -> set[str]:
    """Samples removed before that these (non-image) requests name: a repeated request."""
    if not removed:
        return set()
    rows = [
        row
        for row in workspace.read_table("samples", MATCH_COLUMNS).to_pylist()
        if row["sample_id"] in removed
    ]
    return set(match_rows(rows, [r for r in requests if r.kind != "image"]))


def _stored_phashes(workspace: Workspace, shas: list[str]) -> dict[str, str]:
    from pipelines.perceptual import image_hash

    present = [sha for sha in dict.fromkeys(shas) if sha and sha in workspace.image_index()]
    out: dict[str, str] = {}
    for start in range(0, len(present), 512):
        chunk = present[start : start + 512]
        for sha, data in workspace.read_images(chunk).items():
            try:
                out[sha] = image_hash(data, draft=False)
            except Exception:  # noqa: BLE001, S112 (an unreadable stored image cannot match)
                continue
    return out


def collection_summary(workspace: Workspace) -> dict[str, Any]:
    """How the workspace's samples were collected, for the dataset card: the opt-out policy of
    its scrape runs and what opt-outs and takedowns kept out, with counts."""
    from collections import Counter

    runs = [run for run in workspace.runs() if str(run.get("stage", "")).startswith("scrape-")]
    policies = [run.get("params", {}).get("respect_opt_out") for run in runs]
    honoured = sum(1 for policy in policies if policy is True)
    unknown = sum(1 for policy in policies if policy is None)  # runs of a surd before opt-outs
    failures = workspace.read_failures(outstanding_in="samples")
    reasons = Counter(failures["reason"].to_pylist()) if failures.num_rows else Counter()
    return {
        "scrape_runs": len(runs),
        "scrape_runs_honouring_opt_outs": honoured,
        "scrape_runs_before_opt_out_support": unknown,
        "opted_out": reasons["opted-out"],
        "robots_unavailable": reasons["robots-unavailable"],
        "taken_down_at_scrape": reasons["taken-down"],
        "removed_by_takedown": len(removed_ids(workspace)),
        "takedown_requests": len(read_requests(workspace)),
    }
