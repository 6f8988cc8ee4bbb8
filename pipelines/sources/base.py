"""The source interface of ``surd build scrape``.

A source lists work items; the scrape stage (``pipelines/scrape.py``) downloads them. ``plan``
returns one row per item with the columns in :data:`ITEM_COLUMNS`:

- ``sample_id``, ``source``, ``source_item_id``: identity (``make_sample_id(source, item id)``),
  stable across runs, so a re-run downloads only what is missing and never duplicates a sample;
- ``image_url``: what to download;
- ``metadata_json``: the sample fields the source knows (``complex_prompt`` and the
  ``pipelines.records.METADATA_FIELDS``), as a JSON object.

Sources that page through a remote API save their cursor in the workspace's stage state
(``Workspace.write_state``) so that listing resumes where it stopped.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import pyarrow as pa

if TYPE_CHECKING:
    from surd_builder.workspace import Workspace

ITEM_COLUMNS = ("sample_id", "source", "source_item_id", "image_url", "metadata_json")


class Source(ABC):
    #: source name, recorded in every sample's ``source`` and part of its ``sample_id``
    name: str

    @abstractmethod
    def plan(self, workspace: Workspace) -> pa.Table:
        """Every item of this source (see the module docstring)."""

    def params(self) -> dict[str, Any]:
        """What the manifest records about this source (never tokens)."""
        return {"source": self.name}
