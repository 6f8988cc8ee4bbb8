"""``civitai`` source: images with their generation data from Civitai's public REST API (v1).

Two ways in, as SURD-style data is reached:

- ``/api/v1/images`` (:class:`CivitaiImages`): cursor pagination, ``meta`` with prompt,
  negativePrompt, sampler, seed, cfgScale, steps, Model (requested with ``withMeta=true``);
- ``/api/v1/models`` (:class:`CivitaiModels`): the images sit in
  ``items[].modelVersions[].images[]``; the generation data is read from their ``meta`` where the
  API gives it (older API versions and mirrors do; images without a prompt end as ``no-prompt``).

Both follow ``metadata.nextPage`` (a full URL that carries the query and the next cursor), which is
the saved listing cursor. An API token, if any, is sent as ``Authorization: Bearer`` from the
``CIVITAI_API_TOKEN`` environment variable and never stored.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa

from pipelines.sources.base import PagedSource, items_table

DEFAULT_BASE_URL = "https://civitai.com"
TOKEN_ENV = "CIVITAI_API_TOKEN"
NSFW_LEVELS = ("None", "Soft", "Mature", "X")
SORTS_IMAGES = ("Most Reactions", "Most Comments", "Most Collected", "Newest", "Oldest")
PERIODS = ("AllTime", "Year", "Month", "Week", "Day")


def token_headers(environ: dict[str, str]) -> dict[str, str]:
    token = environ.get(TOKEN_ENV, "").strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _meta(raw: Any) -> dict[str, Any]:
    meta = raw if isinstance(raw, dict) else {}
    if isinstance(meta.get("meta"), dict):  # the legacy path wraps it as {id, meta}
        meta = meta["meta"]
    return meta


def _nsfw_level(image: dict[str, Any]) -> Any:
    """The image's level as the API gives it: ``nsfwLevel`` (a name in older responses of the
    images endpoint, a browsing-level number in newer ones) or, on the models endpoint,
    ``nsfw`` as a name. ``pipelines.records.nsfw_level`` reads any of them."""
    level = image.get("nsfwLevel")
    if level is None and not isinstance(image.get("nsfw"), bool):
        level = image.get("nsfw")
    return level


def image_fields(image: dict[str, Any], site: str, model_name: str | None = None) -> dict:
    """Sample fields of one Civitai image object (from either endpoint)."""
    meta = _meta(image.get("meta"))
    return {
        "complex_prompt": meta.get("prompt"),
        "negative_prompt": meta.get("negativePrompt"),
        "sampler": meta.get("sampler"),
        "steps": meta.get("steps"),
        "cfg_scale": meta.get("cfgScale"),
        "seed": meta.get("seed"),
        "model_name": meta.get("Model") or model_name or image.get("baseModel"),
        "nsfw": image["nsfw"] if isinstance(image.get("nsfw"), bool) else None,
        "nsfw_level": _nsfw_level(image),
        "creator": image.get("username"),
        "page_url": f"{site}/images/{image['id']}" if image.get("id") is not None else None,
    }


class _CivitaiSource(PagedSource):
    endpoint: str

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        query: dict[str, Any] | None = None,
        page_size: int = 100,
        max_items: int | None = None,
        relist: bool = False,
        name: str = "civitai",
    ):
        super().__init__(max_items=max_items, relist=relist)
        self.base_url = base_url.rstrip("/")
        parts = urlsplit(self.base_url)
        self.api_origin = f"{parts.scheme}://{parts.netloc}"
        self.query = {k: v for k, v in (query or {}).items() if v not in (None, "", [])}
        self.page_size = page_size
        self.name = name

    def params(self) -> dict[str, Any]:
        return {"source": self.name, "endpoint": self.endpoint, "query": self.query}

    def page_request(self, cursor: Any) -> tuple[str, dict[str, Any] | None]:
        if cursor:
            return str(cursor), None  # nextPage already holds the query and the cursor
        return f"{self.base_url}{self.endpoint}", {**self.query, "limit": self.page_size}

    @staticmethod
    def _next(document: dict[str, Any]) -> tuple[str | None, bool]:
        next_page = (document.get("metadata") or {}).get("nextPage")
        return next_page, not next_page

    def parse_page(self, document: Any, cursor: Any) -> tuple[pa.Table, Any, bool]:
        if not isinstance(document, dict) or not isinstance(document.get("items"), list):
            raise ValueError("no 'items' list")
        items = list(self._items(document["items"]))
        next_page, last = self._next(document)
        return items_table(self.name, items), next_page, last


class CivitaiImages(_CivitaiSource):
    endpoint = "/api/v1/images"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.query.setdefault("withMeta", "true")
        self.page_size = min(self.page_size, 200)

    def _items(self, images: list[Any]):
        for image in images:
            if isinstance(image, dict) and image.get("id") is not None:
                yield str(image["id"]), image.get("url"), image_fields(image, self.base_url)


class CivitaiModels(_CivitaiSource):
    endpoint = "/api/v1/models"

    def _items(self, models: list[Any]):
        for model in models:
            if not isinstance(model, dict):
                continue
            for version in model.get("modelVersions") or []:
                name = " / ".join(str(x) for x in (model.get("name"), version.get("name")) if x)
                for image in version.get("images") or []:
                    if not isinstance(image, dict) or not image.get("url"):
                        continue
                    item_id = str(image["id"]) if image.get("id") is not None else image["url"]
                    fields = image_fields(image, self.base_url, model_name=name or None)
                    yield item_id, image["url"], fields
