"""The workspace's image store: image bytes stored once, content-addressed by sha256.

``images/shard-*.parquet`` files (``IMAGES_SCHEMA``), each sorted by sha256 and written
atomically, never rewritten: a reader needs no lock, and a killed writer leaves no half shard.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from surd_builder.atomic import part_name, write_parquet_atomic
from surd_builder.errors import WorkspaceError
from surd_builder.schema import IMAGES_SCHEMA, conform

# Rows per Parquet row group in the image store: small groups let a reader fetch a few images
# without decompressing a whole shard (shards are sorted by sha256, so row-group statistics prune).
IMAGE_ROW_GROUP = 64


def read_shard_images(shard: Path, shas: list[str]) -> dict[str, bytes]:
    """The bytes of ``shas`` from one image shard (shards are immutable: safe without locks)."""
    table = pq.read_table(shard, filters=pc.is_in(pc.field("image_sha256"), pa.array(shas)))
    return dict(
        zip(table["image_sha256"].to_pylist(), table["image_bytes"].to_pylist(), strict=True)
    )


class ImageStore:
    """The shards of one ``images/`` folder, with a sha256 -> shard index read once and then
    kept up to date by this process's writes (:meth:`reload` sees other processes')."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._index: dict[str, Path] | None = None

    def shards(self) -> list[Path]:
        return sorted(self.folder.glob("shard-*.parquet"))

    def index(self) -> dict[str, Path]:
        """sha256 -> shard holding those bytes."""
        if self._index is None:
            index: dict[str, Path] = {}
            for shard in self.shards():
                for sha in pq.read_table(shard, columns=["image_sha256"])[
                    "image_sha256"
                ].to_pylist():
                    index[sha] = shard
            self._index = index
        return self._index

    def write(self, images: pa.Table) -> int:
        """Store image bytes not stored yet; returns how many new images were written."""
        if images.num_rows == 0:
            return 0
        index = self.index()
        images = conform(images, IMAGES_SCHEMA)
        # the last row of each image not stored yet, sorted by sha256: worked out on the sha256
        # column and taken once (each filter or sort of the table copies every image's bytes);
        # the batch is looked up in the index (O(batch)), not the index in the batch (O(store))
        last = {sha: row for row, sha in enumerate(images["image_sha256"].to_pylist())}
        new = sorted((sha, row) for sha, row in last.items() if sha not in index)
        if not new:
            return 0
        images = images.take(pa.array([row for _, row in new], pa.int64()))
        shard = write_parquet_atomic(
            images,
            self.folder / part_name("shard"),
            row_group_size=IMAGE_ROW_GROUP,
            # encoded images do not compress: zstd over them costs CPU and saves nothing; nor do
            # a dictionary or min/max statistics of image bytes help (readers select by sha256)
            compression={"image_sha256": "zstd", "image_bytes": "none"},
            use_dictionary=["image_sha256"],
            write_statistics=["image_sha256"],
        )
        for sha in images["image_sha256"].to_pylist():
            index[sha] = shard
        return images.num_rows

    def read(self, shas: Iterable[str]) -> dict[str, bytes]:
        """Bytes of the given images, reading each shard once."""
        index = self.index()
        by_shard: dict[Path, list[str]] = {}
        for sha in set(shas):
            if sha not in index:
                raise WorkspaceError(f"image {sha} is not in the workspace's image store")
            by_shard.setdefault(index[sha], []).append(sha)
        found: dict[str, bytes] = {}
        for shard, wanted in by_shard.items():
            found.update(read_shard_images(shard, wanted))
        return found

    def reload(self) -> None:
        """Forget the cached index: other processes may have stored images since."""
        self._index = None

    def stats(self) -> tuple[int, int]:
        """(number of distinct stored images, bytes of their shards on disk). Concurrent writers
        may each store an image they both fetched; it is counted once."""
        self.reload()
        return len(self.index()), sum(s.stat().st_size for s in self.shards())
