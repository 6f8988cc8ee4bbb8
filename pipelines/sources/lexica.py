"""``lexica`` source: Lexica's search API, one page of results per query.

``GET /api/v1/search?q=QUERY`` answers ``{"images": [...]}`` (about 50 per query, no
pagination), each with ``id``, ``src``, ``prompt``, ``width``, ``height``, ``seed`` (a string),
``model``, ``guidance`` and ``nsfw``. The listing cursor is the index of the next query.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from pipelines.sources.base import PagedSource, items_table

DEFAULT_BASE_URL = "https://lexica.art"


class LexicaSearch(PagedSource):
    def __init__(
        self,
        queries: list[str],
        base_url: str = DEFAULT_BASE_URL,
        max_items: int | None = None,
        relist: bool = False,
        name: str = "lexica",
    ):
        super().__init__(max_items=max_items, relist=relist)
        self.queries, self.base_url, self.name = list(queries), base_url.rstrip("/"), name

    def params(self) -> dict[str, Any]:
        return {"source": self.name, "queries": self.queries}

    def page_request(self, cursor: Any) -> tuple[str, dict[str, Any] | None]:
        return f"{self.base_url}/api/v1/search", {"q": self.queries[int(cursor or 0)]}

    def parse_page(self, document: Any, cursor: Any) -> tuple[pa.Table, Any, bool]:
        if not isinstance(document, dict) or not isinstance(document.get("images"), list):
            raise ValueError("no 'images' list")
        items = []
        for image in document["images"]:
            if not isinstance(image, dict) or not image.get("id"):
                continue
            fields = {
                "complex_prompt": image.get("prompt"),
                "seed": image.get("seed"),
                "cfg_scale": image.get("guidance"),
                "model_name": image.get("model"),
                "nsfw": image.get("nsfw"),
                "page_url": image.get("gallery") or f"{self.base_url}/prompt/{image['id']}",
            }
            items.append((str(image["id"]), image.get("src"), fields))
        next_index = int(cursor or 0) + 1
        return items_table(self.name, items), next_index, next_index >= len(self.queries)
