"""The training data: (narrative prompt, keyword prompt, image) rows of one split, streamed.

``--data`` is what ``surd build export`` wrote (the folder, or its ``data/`` folder: files named
``{split}-*.parquet``), a single Parquet file (the train split), or a Hugging Face dataset id
with the same columns, loaded with ``datasets`` (this needs the hub). Columns are named by
:class:`Columns` (the export's names by default). Rows without one of the three are skipped
and counted, never silently dropped.

A split is never held in memory. :func:`load_split` reads it in row batches and keeps, per
usable row, the two prompts, the image's sha256 (the export's ``image_sha256`` column when
there is one, else hashed from the bytes batch by batch) and an :class:`ImageRef`: the file and
row the image lives in. :func:`read_images` reads a batch of those back (a row group at a time)
when the latent cache lacks them, so filling the cache holds one row group of images at most.
"""

from __future__ import annotations

import functools
import hashlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from surd_builder.errors import InputError

HASH_COLUMN = "image_sha256"  # written by surd build export: sha256 of the image bytes
BATCH_ROWS = 100  # rows read at a time (the export's row groups hold 100)


@dataclass(frozen=True)
class Columns:
    narrative: str = "narrative_prompt"
    keyword: str = "complex_prompt"
    image: str = "image"


@dataclass(frozen=True)
class ImageRef:
    """Where one sample's image is: row ``row`` of the Parquet file ``source`` (an absolute
    path), or of split ``split`` of the hub dataset ``source`` (``hub`` true)."""

    source: str
    row: int
    column: str
    hub: bool = False
    split: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "row": self.row, "column": self.column,
                "hub": self.hub, "split": self.split}  # fmt: skip

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> ImageRef:
        return cls(**value)


@dataclass
class SplitRows:
    narrative_prompts: list[str]
    keyword_prompts: list[str]
    images: list[ImageRef]
    image_hashes: list[str]
    skipped: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.narrative_prompts)


def _local_files(data: Path, split: str) -> list[Path]:
    if data.is_file():
        return [data] if split == "train" else []
    folder = data / "data" if (data / "data").is_dir() else data
    return sorted(folder.glob(f"{split}-*.parquet")) or sorted(folder.glob(f"{split}.parquet"))


def _looks_local(data: str) -> bool:
    return data.startswith(("/", ".", "~")) or Path(data).exists() or data.count("/") != 1


@dataclass
class _Batch:
    """Rows of a split read together: their columns, and where row 0 sits."""

    table: pa.Table
    source: str
    first_row: int
    hub: bool


def _open_parquet(file: Path) -> pq.ParquetFile:
    try:
        # no pre-buffering: it would read whole column chunks ahead, images included
        return pq.ParquetFile(file, pre_buffer=False)
    except (OSError, pa.ArrowInvalid) as error:
        raise InputError(f"--data: {file} is not a Parquet file ({error})") from None


def _columns_to_read(
    names: list[str], wanted: list[str], optional: list[str], unless: dict[str, str]
) -> list[str]:
    """``wanted`` (less any column whose stand-in from ``unless`` is present) and the
    ``optional`` columns present."""
    needed = [name for name in wanted if unless.get(name) not in names]
    return needed + [name for name in optional if name in names]


def _split_batches(
    data: str, split: str, wanted: list[str], optional: list[str],
    unless: dict[str, str] | None = None,
) -> Any:  # fmt: skip
    """An iterator over the split's rows in batches (columns ``wanted``, and ``optional`` ones
    where present), or None when there is no such split. Checks the columns before any row.
    ``unless`` maps a wanted column to one that stands in for it: where that one is present,
    the wanted column is checked but not read (the images, where the export has their
    hashes). One file is open at a time."""
    unless = unless or {}
    if _looks_local(data):
        path = Path(data).expanduser()
        if not path.exists():
            raise InputError(f"--data {data}: no such file or folder")
        files = _local_files(path, split)
        if not files:
            return None
        for file in files:
            _check_columns(_open_parquet(file).schema_arrow.names, wanted, str(file))

        def local() -> Iterator[_Batch]:
            for file in files:
                parquet = _open_parquet(file)
                columns = _columns_to_read(parquet.schema_arrow.names, wanted, optional, unless)
                start = 0
                for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns):
                    table = pa.Table.from_batches([batch])
                    yield _Batch(table, str(file.resolve()), start, False)
                    start += table.num_rows
                parquet.close()

        return local()
    dataset = _hub_dataset(data, split)
    if dataset is None:
        return None
    _check_columns(dataset.column_names, wanted, data)
    columns = _columns_to_read(dataset.column_names, wanted, optional, unless)

    def hub() -> Iterator[_Batch]:
        start = 0
        for table in dataset.select_columns(columns).with_format("arrow").iter(BATCH_ROWS):
            yield _Batch(table, data, start, True)
            start += table.num_rows

    return hub()


@functools.lru_cache(maxsize=4)
def _hub_dataset(data: str, split: str) -> Any:
    """The hub dataset's split, images left undecoded (memory-mapped by ``datasets``)."""
    import datasets

    try:
        dataset = datasets.load_dataset(data, split=split)
    except ValueError as error:  # an unknown split
        if "split" in str(error).lower():
            return None
        raise InputError(f"--data {data}: {str(error).splitlines()[0]}") from None
    except (OSError, FileNotFoundError, ConnectionError) as error:
        raise InputError(
            f"cannot load dataset {data!r}: {str(error).splitlines()[0]} (give the export folder, "
            "or a hub id on a machine that can reach the hub)"
        ) from None
    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.Image):
            dataset = dataset.cast_column(name, datasets.Image(decode=False))
    return dataset


def _check_columns(present: list[str], wanted: list[str], where: str) -> None:
    missing = [name for name in wanted if name not in present]
    if missing:
        raise InputError(
            f"{where} lacks the column(s) {', '.join(missing)} (it has: {', '.join(present)}); "
            "name them with --narrative-column / --keyword-column / --image-column"
        )


def _image_bytes(value: object) -> bytes | None:
    """An image cell as bytes: a struct {bytes, path} (HF Image), raw bytes, or a path."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        value = value.get("path")
    if isinstance(value, bytes | bytearray):
        return bytes(value) or None
    if isinstance(value, str) and value and Path(value).is_file():
        return Path(value).read_bytes()
    return None


def narrative_prompts(data: str, split: str, column: str = "narrative_prompt") -> list[str] | None:
    """The distinct non-empty narrative prompts of ``split`` (no image is read)."""
    batches = _split_batches(data, split, [column], [])
    if batches is None:
        return None
    texts: dict[str, None] = {}
    for batch in batches:
        for text in batch.table[column].to_pylist():
            if text and text.strip():
                texts.setdefault(text.strip())
    return list(texts)


def load_split(
    data: str, split: str, columns: Columns = Columns(), limit: int | None = None
) -> SplitRows | None:
    """The usable rows of ``split`` (the first ``limit`` of them if given), without their image
    bytes: see the module docstring. None when there is no such split."""
    wanted = [columns.narrative, columns.keyword, columns.image]
    batches = _split_batches(data, split, wanted, [HASH_COLUMN], {columns.image: HASH_COLUMN})
    if batches is None:
        return None
    rows = SplitRows([], [], [], [])
    for batch in batches:
        table = batch.table
        hashes = table[HASH_COLUMN].to_pylist() if HASH_COLUMN in table.column_names else None
        # with the export's hashes the image column is not read here at all
        images = None if hashes is not None else table[columns.image].to_pylist()
        for offset, (narrative, keyword) in enumerate(
            zip(table[columns.narrative].to_pylist(), table[columns.keyword].to_pylist(),
                strict=True)
        ):  # fmt: skip
            if limit is not None and len(rows) >= limit:
                return rows
            if not (narrative or "").strip():
                rows.skipped["no narrative prompt"] += 1
                continue
            if not (keyword or "").strip():
                rows.skipped["no keyword prompt"] += 1
                continue
            if hashes is not None:
                digest = hashes[offset]
            else:
                data_bytes = _image_bytes(images[offset])
                digest = hashlib.sha256(data_bytes).hexdigest() if data_bytes else None
            if not digest:
                rows.skipped["no image"] += 1
                continue
            rows.narrative_prompts.append(narrative.strip())
            rows.keyword_prompts.append(keyword.strip())
            rows.image_hashes.append(digest)
            rows.images.append(
                ImageRef(batch.source, batch.first_row + offset, columns.image, batch.hub, split)
            )
    return rows


def read_images(refs: list[ImageRef | bytes]) -> list[bytes | None]:
    """The bytes of each image (None where the cell holds none). Local rows are read a row
    group at a time, the last one kept (refs in row order read each group once)."""
    out: list[bytes | None] = []
    for ref in refs:
        if isinstance(ref, bytes | bytearray):
            out.append(bytes(ref))
        elif ref.hub:
            out.append(_image_bytes(_hub_dataset(ref.source, ref.split)[ref.row][ref.column]))
        else:
            group, first = _row_group_of(ref.source, ref.row)
            cells = _read_row_group(ref.source, group, ref.column)
            out.append(_image_bytes(cells[ref.row - first]))
    return out


@functools.lru_cache(maxsize=64)
def _row_group_starts(source: str, mtime_ns: int) -> tuple[int, ...]:
    metadata = pq.ParquetFile(source).metadata
    starts, total = [], 0
    for group in range(metadata.num_row_groups):
        starts.append(total)
        total += metadata.row_group(group).num_rows
    return (*starts, total)


def _row_group_of(source: str, row: int) -> tuple[int, int]:
    import bisect

    starts = _row_group_starts(source, Path(source).stat().st_mtime_ns)
    group = bisect.bisect_right(starts, row) - 1
    if not 0 <= group < len(starts) - 1:
        raise InputError(f"--data {source} changed while training read it (no row {row})")
    return group, starts[group]


@functools.lru_cache(maxsize=1)  # one row group of images in memory at most
def _read_row_group(source: str, group: int, column: str) -> list[Any]:
    return pq.ParquetFile(source).read_row_group(group, columns=[column])[column].to_pylist()
