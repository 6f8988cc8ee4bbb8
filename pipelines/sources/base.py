"""The source interface of ``surd build scrape``.

A source lists work items; the scrape stage (``pipelines/scrape.py``) downloads them. ``plan``
returns one row per item with the columns of ``schema.LISTING_SCHEMA``:

- ``sample_id``, ``source``, ``source_item_id``: identity (``make_sample_id(source, item id)``),
  stable across runs, so a re-run downloads only what is missing and never duplicates a sample;
- ``image_url``: what to download;
- ``metadata_json``: the sample fields the source knows (``complex_prompt`` and the
  ``pipelines.records.METADATA_FIELDS``), as a JSON object.

Remote APIs are listed by :class:`PagedSource`: page by page, each page's items written to the
workspace's ``listings/<source>/`` and then the cursor saved, so a killed listing resumes at the
page it had not finished, and an item seen on two pages is one item.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from surd_builder.ids import make_sample_id
from surd_builder.schema import LISTING_SCHEMA

if TYPE_CHECKING:
    from pipelines.download import Fetched, Fetcher
    from surd_builder.workspace import Workspace


def items_table(source: str, items: Iterable[tuple[str, str | None, dict[str, Any]]]) -> pa.Table:
    """Listing rows from ``(item id, image URL, sample fields)`` triples."""
    rows = [
        {
            "sample_id": make_sample_id(source, item_id),
            "source": source,
            "source_item_id": item_id,
            "image_url": url,
            "metadata_json": json.dumps(fields, default=str),
        }
        for item_id, url, fields in items
    ]
    return pa.Table.from_pylist(rows, schema=LISTING_SCHEMA)


class Source(ABC):
    #: source name, recorded in every sample's ``source`` and part of its ``sample_id``
    name: str
    #: why listing stopped early (a page that failed after retries), for the user to see
    listing_error: str | None = None
    #: the only origin (scheme://host:port) that receives the source's API token, if it has one
    api_origin: str | None = None

    @abstractmethod
    def plan(self, workspace: Workspace, fetcher: Fetcher) -> pa.Table:
        """Every item of this source (see the module docstring)."""

    def params(self) -> dict[str, Any]:
        """What the manifest records about this source (never tokens)."""
        return {"source": self.name}

    def fetch_image(self, item: dict[str, Any], fetcher: Fetcher) -> Fetched:
        """The image of one listed item: bytes, the URL to record as ``source_url``, media type
        and the ``X-Robots-Tag`` values seen; raises ``FetchError``. Runs in the scrape stage's
        worker threads. Default: an HTTP GET that honours opt-outs."""
        return fetcher.get_image(item["image_url"])


class PagedSource(Source):
    """A source listed page by page from a remote API, resumable at the page level.

    Subclasses say how to request the page at a cursor and how to read a page. The cursor is any
    JSON value (a next-page URL, a page number, an index into a list of queries); ``None`` is the
    first page.
    """

    def __init__(self, max_items: int | None = None, relist: bool = False):
        self.max_items = max_items
        self.relist = relist

    @abstractmethod
    def page_request(self, cursor: Any) -> tuple[str, dict[str, Any] | None]:
        """(URL, query parameters) of the page at ``cursor``."""

    @abstractmethod
    def parse_page(self, document: Any, cursor: Any) -> tuple[pa.Table, Any, bool]:
        """(listing rows, next cursor, whether that was the last page). Raise ``ValueError``
        for a document that is not a page of this API."""

    def plan(self, workspace: Workspace, fetcher: Fetcher) -> pa.Table:
        from pipelines.fetch_errors import FetchError

        state_name = f"listing-{self.name}"
        asked = json.loads(json.dumps(self.params(), default=str))  # as it reads back from JSON
        state = workspace.read_state(state_name)
        if self.relist:
            workspace.clear_listing(self.name)
            state = {"params": asked}
            workspace.write_state(state_name, state)
        elif state and state.get("params") != asked:
            from surd_builder.errors import InputError

            raise InputError(
                f"the {self.name} listing in this workspace was made with other options "
                f"({state.get('params')}); pass --relist to list again with these, "
                "or --source NAME to keep both"
            )
        listed = int(state.get("listed", 0))
        pages = int(state.get("pages", 0))
        cursor, exhausted = state.get("cursor"), bool(state.get("exhausted", False))
        while not exhausted and (self.max_items is None or listed < self.max_items):
            url, params = self.page_request(cursor)
            try:
                document = fetcher.get_json(url, params)
                items, cursor, exhausted = self.parse_page(document, cursor)
            except FetchError as error:
                self.listing_error = f"page {pages + 1}: {error.reason} ({error.detail})"
                break
            except (ValueError, TypeError, KeyError, AttributeError) as error:
                self.listing_error = f"page {pages + 1} is not a {self.name} page: {error}"
                break
            workspace.write_listing(self.name, items)  # items first, then the cursor past them
            listed += items.num_rows
            pages += 1
            state = {
                "params": asked,
                "cursor": cursor,
                "exhausted": exhausted,
                "listed": listed,
                "pages": pages,
            }
            workspace.write_state(state_name, state)
        if self.listing_error and listed == 0:
            from surd_builder.errors import ServiceError

            raise ServiceError(
                f"{self.name}: the listing could not start: {self.listing_error}; nothing was "
                "listed or downloaded (check the network and --base-url)"
            )
        return workspace.read_listing(self.name)
