"""``surd build scrape``: download the items a source lists into the workspace.

The stage is the standard contract (``pipelines/base.py``): ``plan`` asks the source for its items
and ``process`` downloads one batch with a thread pool (downloads wait on the network, so threads,
not processes), each item ending as a sample or a failure row with a reason. Resume comes from
the runner: items already in ``samples`` are skipped, failures are retried.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa

from pipelines.base import HostLimiter, Stage
from pipelines.download import Fetcher, FetchOptions
from pipelines.fetch_errors import FetchError
from pipelines.records import (
    COLLECT_OUTPUT_SCHEMA,
    REJECTED_ROW,
    ItemRejected,
    clean_prompt,
    collected_row,
    failed_row,
    sample_fields,
)
from pipelines.sources.base import Source
from surd_builder.workspace import Workspace

# Servers often label images generically; anything else (text/html...) is not an image.
IMAGE_MEDIA_TYPES = ("image/", "application/octet-stream", "binary/octet-stream")


class ScrapeStage(Stage):
    output_table = "samples"
    side_tables = ("hashes",)  # the image is hashed where it is decoded to check it

    def __init__(
        self,
        source: Source,
        options: FetchOptions | None = None,
        threads: int = 16,
        auth_headers: dict[str, str] | None = None,
        resize_max_side: int | None = None,
        decode_check: bool = True,
    ):
        self.source = source
        self.name = f"scrape-{source.name}"  # its own lock, state and manifest entries
        self.options = options or FetchOptions()
        self.threads = threads
        self.resize_max_side = resize_max_side
        self.decode_check = decode_check
        self._auth_headers = auth_headers or {}
        self._fetcher: Fetcher | None = None
        self._takedowns: list = []  # takedown requests, read by plan()
        self._removed: set[str] = set()
        self._host_limiter: HostLimiter | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fetcher"] = None  # sessions and locks stay in their process
        return state

    @property
    def fetcher(self) -> Fetcher:
        if self._fetcher is None:
            self._fetcher = Fetcher(
                self.options, self._auth_headers, self.source.api_origin, limiter=self._host_limiter
            )
        return self._fetcher

    def host_rate(self) -> float:
        return self.options.per_host_rate

    def use_host_limiter(self, limiter: HostLimiter | None) -> None:
        self._host_limiter, self._fetcher = limiter, None

    def params(self) -> dict[str, Any]:
        fetch = {k: v for k, v in self.options.__dict__.items() if k != "user_agent"}
        listing = {"listing_error": self.source.listing_error} if self.source.listing_error else {}
        return {
            **self.source.params(),
            **listing,
            "threads": self.threads,
            "resize_max_side": self.resize_max_side,
            "decode_check": self.decode_check,
            **fetch,
        }

    def plan(self, workspace: Workspace) -> pa.Table:
        from pipelines.takedown import read_requests, removed_ids

        self._takedowns, self._removed = read_requests(workspace), removed_ids(workspace)
        return self.source.plan(workspace, self.fetcher)

    def done_ids(self, workspace: Workspace, items: pa.Table) -> set[str]:
        """Stored samples, and items taken down: removed ones and those a takedown request
        names by URL, source item or sample id are never downloaded again."""
        return super().done_ids(workspace, items) | self._taken_down_ids(items.to_pylist())

    def _taken_down_ids(self, items: list[dict[str, Any]]) -> set[str]:
        from pipelines.takedown import item_rows, match_rows

        named = match_rows(item_rows(items), self._takedowns) if self._takedowns else {}
        return {item["sample_id"] for item in items if item["sample_id"] in self._removed} | set(
            named
        )

    def process(self, batch: pa.Table) -> pa.Table:
        items = batch.to_pylist()
        with ThreadPoolExecutor(max_workers=min(self.threads, max(1, len(items)))) as pool:
            rows = list(pool.map(self._download_one, items))
        return pa.Table.from_pylist(rows, schema=COLLECT_OUTPUT_SCHEMA)

    def _download_one(self, item: dict[str, Any]) -> dict[str, Any]:
        identity = {k: item[k] for k in ("sample_id", "source", "source_item_id")}
        try:
            metadata = json.loads(item["metadata_json"])
            if metadata.get(REJECTED_ROW):
                raise ItemRejected("bad-metadata-row", metadata[REJECTED_ROW])
            if (self._takedowns or self._removed) and self._taken_down_ids([item]):
                # also under --force, which does not skip done items
                raise ItemRejected("taken-down", "a takedown request names this item")
            prompt = clean_prompt(metadata.get("complex_prompt"))
            if prompt is None:  # checked first: no download for an item that cannot be a sample
                raise ItemRejected("no-prompt", "the source gives no prompt for this item")
            fields = sample_fields(metadata)
            url = item["image_url"]
            if not url:
                raise ItemRejected("no-url", "the source gives no image URL for this item")
            try:
                fetched = self.source.fetch_image(item, self.fetcher)
                data, final_url, media_type = fetched.data, fetched.url, fetched.content_type
            except FetchError as error:
                raise ItemRejected(error.reason, error.detail) from None
            if media_type and not media_type.startswith(IMAGE_MEDIA_TYPES):
                raise ItemRejected("not-an-image", f"{url}: served as {media_type}")
            self._check_taken_down(data, url)
            fields["source_url"] = final_url
            fields["robots_tags"] = "; ".join(fetched.robots_tags) or None
            return collected_row(
                identity, fields, prompt, data, url, self.resize_max_side, self.decode_check
            )
        except ItemRejected as rejected:
            return failed_row(identity, rejected)

    def _check_taken_down(self, data: bytes, url: str) -> None:
        """A downloaded image close to a taken-down one is not stored (a re-upload, a
        re-encode), whatever its id."""
        if not any(request.kind == "image" for request in self._takedowns):
            return
        from pipelines.perceptual import image_hash
        from pipelines.takedown import image_matches

        try:
            phash = image_hash(data, draft=False)
        except Exception:  # noqa: BLE001, S110 (not decodable: the decode check reports it)
            return
        request = image_matches(phash, self._takedowns)
        if request is not None:
            raise ItemRejected("taken-down", f"{url}: matches taken-down image {request.label}")
