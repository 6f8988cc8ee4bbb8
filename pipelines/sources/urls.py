"""``urls`` source: a CSV, JSONL or Parquet file of image URLs with prompts, as img2dataset reads.

The URL column and the prompt column are options; columns named like sample fields
(``negative_prompt``, ``narrative_prompt``, ``seed``...) are kept. The item id is an id column
when given, else the URL itself, so the same URL is the same sample on every run.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from pipelines.optout import shared_policy
from pipelines.record_files import Record, iter_records
from pipelines.records import PROMPT_COLUMN_CANDIDATES, REJECTED_ROW, default_prompt_column
from pipelines.sources.base import Source, items_table
from surd_builder.errors import InputError

if TYPE_CHECKING:
    from pipelines.download import Fetched, Fetcher
    from surd_builder.workspace import Workspace

FORMATS = (".csv", ".jsonl", ".json", ".parquet")


def read_rows(path: Path) -> list[Record]:
    """Records of the URL list (CSV / JSONL / Parquet), a bad row kept with its error; a file
    that is not such a list at all is an :class:`InputError`."""
    if not path.is_file():
        raise InputError(f"URL list {path} does not exist")
    if path.suffix.lower() not in FORMATS:
        raise InputError(f"{path}: use a .csv, .jsonl or .parquet file")
    return iter_records(path)


class UrlListSource(Source):
    def __init__(
        self,
        path: Path | str,
        name: str | None = None,
        url_column: str = "url",
        prompt_column: str | None = None,
        id_column: str | None = None,
        narrative_column: str = "narrative_prompt",
    ):
        self.path = Path(path)
        self.name = name or "urls"
        self.url_column, self.prompt_column, self.id_column = url_column, prompt_column, id_column
        self.narrative_column = narrative_column

    def fetch_image(self, item: dict[str, Any], fetcher: Fetcher) -> Fetched:
        """The open web: robots.txt is checked before every request, redirect hops included,
        on top of ``X-Robots-Tag``; see ``pipelines.optout``."""
        robots = shared_policy(fetcher).check if fetcher.options.respect_opt_out else None
        return fetcher.get_image(item["image_url"], before_each_hop=robots)

    def params(self) -> dict[str, Any]:
        return {"source": self.name, "file": str(self.path), "url_column": self.url_column}

    def plan(self, workspace: Workspace, fetcher: Fetcher | None = None) -> pa.Table:
        records = read_rows(self.path)
        rows = [record.row for record in records if record.row is not None]
        columns = set().union(*(row.keys() for row in rows)) if rows else set()
        for option, column in (("--url-column", self.url_column), ("--id-column", self.id_column)):
            if column is not None and rows and column not in columns:
                raise InputError(f"{self.path} has no column {column!r} ({option})")
        prompt_column = self.prompt_column
        if prompt_column is None:
            prompt_column = default_prompt_column(columns)
        if prompt_column is None or (rows and prompt_column not in columns):
            wanted = prompt_column or " / ".join(PROMPT_COLUMN_CANDIDATES)
            raise InputError(f"{self.path} has no prompt column {wanted!r} (--prompt-column)")

        items: dict[str, tuple[str, dict[str, Any]]] = {}
        for record in records:
            number, row = record.line, record.row
            if row is None:  # skipped alone, with its line: the rest of the list is fetched
                where = f"{self.path.name}:{number}"
                items[where] = ("", {REJECTED_ROW: f"{where}: {record.error}"})
                continue
            url = str(row.get(self.url_column) or "").strip()
            item_id = str(row.get(self.id_column) or "") if self.id_column else url
            item_id = item_id or f"row-{number}"  # no URL: recorded as a failure, not dropped
            metadata = {k: v for k, v in row.items() if k not in (self.url_column, prompt_column)}
            metadata["complex_prompt"] = row.get(prompt_column)
            if self.narrative_column != "narrative_prompt":
                metadata["narrative_prompt"] = row.get(self.narrative_column)
            items[item_id] = (url, metadata)
        return items_table(self.name, ((i, url, fields) for i, (url, fields) in items.items()))
