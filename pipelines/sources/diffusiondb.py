"""``diffusiondb`` source: the DiffusionDB layout (poloclub/diffusiondb), local or over HTTP.

A local ``metadata.parquet`` adds each image's creator and NSFW score (see ``_metadata_table``).

DiffusionDB ships images in parts of 1,000: ``images/part-000001.zip`` (2M subset, PNG) or
``diffusiondb-large-part-{1,2}/part-000001.zip`` (large subset, WebP; parts 1-10000 in ``-1``,
10001-14000 in ``-2``). Each part holds its images and ``part-000001.json``, a map from image file
name to ``{"p": prompt, "se": seed, "c": cfg, "st": steps, "sa": sampler}``.

``location`` is a local folder with that layout (zips, or parts already extracted to folders) or
an http(s) base URL; remote parts are downloaded once into the workspace's ``cache/`` (atomically,
so a killed download starts over and a finished one is reused). The item id is the image's file
name (a UUID), so re-running never duplicates a sample.
"""

from __future__ import annotations

import json
import threading
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from pipelines.download import Fetched
from pipelines.fetch_errors import FetchError
from pipelines.sources.base import Source, items_table
from surd_builder.errors import InputError
from surd_builder.schema import LISTING_SCHEMA

if TYPE_CHECKING:
    from pipelines.download import Fetcher
    from surd_builder.workspace import Workspace

DEFAULT_LOCATION = "https://huggingface.co/datasets/poloclub/diffusiondb/resolve/main"
PART_COUNT = {False: 2000, True: 14000}
MAX_PART_BYTES = 4 * 2**30
LICENSE = "CC0-1.0"  # DiffusionDB's images and prompts are released under CC0 1.0


def parse_parts(spec: str, large: bool = False) -> list[int]:
    """``"1-3,7"`` -> ``[1, 2, 3, 7]``, checked against the subset's part count."""
    parts: set[int] = set()
    highest = PART_COUNT[large]
    for chunk in spec.split(","):
        first, _, last = chunk.strip().partition("-")
        try:
            low, high = int(first), int(last or first)
        except ValueError:
            raise InputError(f"--parts {spec!r}: use numbers and ranges like 1-3,7") from None
        if not 1 <= low <= high <= highest:
            raise InputError(f"--parts {spec!r}: parts are numbered 1 to {highest}")
        parts.update(range(low, high + 1))
    return sorted(parts)


def part_path(part: int, large: bool) -> str:
    """Where part ``part`` sits, relative to the dataset root."""
    if large:
        return f"diffusiondb-large-part-{1 if part <= 10000 else 2}/part-{part:06d}.zip"
    return f"images/part-{part:06d}.zip"


class DiffusionDB(Source):
    def __init__(
        self,
        location: str = DEFAULT_LOCATION,
        parts: list[int] | None = None,
        large: bool = False,
        name: str = "diffusiondb",
    ):
        self.location = location.rstrip("/")
        self.remote = self.location.startswith(("http://", "https://"))
        self.parts, self.large, self.name = parts or [1], large, name
        self._local = threading.local()

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def params(self) -> dict[str, Any]:
        return {"source": self.name, "location": self.location, "parts": self.parts}

    # ----------------------------------------------------------------- listing (driver)
    def plan(self, workspace: Workspace, fetcher: Fetcher) -> pa.Table:
        if not self.remote and not Path(self.location).is_dir():
            raise InputError(f"DiffusionDB folder {self.location} does not exist")
        extra = self._metadata_table()
        tables, failed = [], []
        for part in self.parts:
            try:
                container = self._part_container(part, workspace, fetcher)
                prompts = self._read_part_json(part, container)
            except FetchError as error:
                failed.append(f"part {part}: {error.reason} ({error.detail})")
                continue
            except (OSError, ValueError, zipfile.BadZipFile, KeyError) as error:
                failed.append(f"part {part}: unreadable ({error})")
                continue
            tables.append(items_table(self.name, self._items(part, container, prompts, extra)))
        self.listing_error = "; ".join(failed) or None  # every part that failed, not the last
        if failed and not tables:
            from surd_builder.errors import ServiceError

            error = ServiceError if self.remote else InputError
            raise error(f"{self.name}: no part could be read: {self.listing_error}")
        return pa.concat_tables(tables) if tables else LISTING_SCHEMA.empty_table()

    def _part_container(self, part: int, workspace: Workspace, fetcher: Fetcher) -> Path:
        relative = part_path(part, self.large)
        if not self.remote:
            zip_path = Path(self.location) / relative
            folder = zip_path.with_suffix("")
            if folder.is_dir():
                return folder
            if zip_path.is_file():
                return zip_path
            raise FileNotFoundError(f"neither {zip_path} nor {folder} exists")
        cached = workspace.root / "cache" / self.name / relative
        if not cached.is_file():
            fetcher.download_to(f"{self.location}/{relative}", cached, MAX_PART_BYTES)
        return cached

    @staticmethod
    def _read_part_json(part: int, container: Path) -> dict[str, dict[str, Any]]:
        name = f"part-{part:06d}.json"
        if container.is_dir():
            text = (container / name).read_text(encoding="utf-8")
        else:
            with zipfile.ZipFile(container) as archive:
                text = archive.read(name).decode("utf-8")
        prompts = json.loads(text)
        if not isinstance(prompts, dict):
            raise ValueError(f"{name} is not a map of image names")
        return prompts

    def _metadata_table(self) -> dict[str, dict[str, Any]]:
        """Per-image extras from a local ``metadata.parquet`` (``metadata-large.parquet``), when
        present: creator (``user_name``) and NSFW (``image_nsfw`` >= 0.5; 2.0 marks images the
        SD safety filter blurred). The part JSONs alone carry the prompts and generation data."""
        path = Path(self.location) / (
            "metadata-large.parquet" if self.large else "metadata.parquet"
        )
        if self.remote or not path.is_file():
            return {}
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        columns = ["image_name", "part_id", "user_name", "image_nsfw"]
        try:
            table = pq.read_table(path, columns=columns)
        except (pa.ArrowInvalid, OSError, KeyError) as error:
            raise InputError(f"{path} is not a DiffusionDB metadata file ({error})") from None
        wanted = pa.array(self.parts, table["part_id"].type)
        table = table.filter(pc.is_in(table["part_id"], value_set=wanted))
        return {
            row["image_name"]: {
                "creator": row["user_name"],
                "nsfw": None if row["image_nsfw"] is None else row["image_nsfw"] >= 0.5,
            }
            for row in table.to_pylist()
        }

    def _items(self, part: int, container: Path, prompts: dict, extra: dict[str, dict[str, Any]]):
        for image_name, entry in sorted(prompts.items()):
            entry = entry if isinstance(entry, dict) else {}
            fields = {
                **extra.get(image_name, {}),
                "complex_prompt": entry.get("p"),
                "seed": entry.get("se"),
                "cfg_scale": entry.get("c"),
                "steps": entry.get("st"),
                "sampler": entry.get("sa"),
                "license": LICENSE,
                "_container": str(container),
                "_member": image_name,
            }
            remote = f"{self.location}/{part_path(part, self.large)}#{image_name}"
            yield image_name, remote if self.remote else f"part-{part:06d}/{image_name}", fields

    # ----------------------------------------------------------------- images (worker threads)
    def fetch_image(self, item: dict[str, Any], fetcher: Fetcher) -> Fetched:
        fields = json.loads(item["metadata_json"])
        container, member = Path(fields["_container"]), fields["_member"]
        try:
            if container.is_dir():
                data = (container / member).read_bytes()
            else:
                data = self._archive(container).read(member)
        except (OSError, KeyError, zipfile.BadZipFile) as error:
            raise FetchError("missing-file", f"{member}: {error}") from None
        return Fetched(data, item["image_url"] if self.remote else None, "")

    def _archive(self, path: Path) -> zipfile.ZipFile:
        """One open ZipFile per thread and archive: ZipFile objects are not thread-safe."""
        archives = self._local.__dict__.setdefault("archives", {})
        if path not in archives:
            archives[path] = zipfile.ZipFile(path)
        return archives[path]
