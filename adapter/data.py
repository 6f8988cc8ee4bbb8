"""The training data: (narrative prompt, keyword prompt, image) rows of one split.

``--data`` is what ``surd build export`` wrote (the folder, or its ``data/`` folder: files named
``{split}-*.parquet``), a single Parquet file (the train split), or a Hugging Face dataset id
with the same columns, loaded with ``datasets`` (this needs the hub). Columns are named by
:class:`Columns` (the export's names by default). Rows without one of the three are skipped
and counted, never silently dropped.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from surd_builder.errors import InputError


@dataclass(frozen=True)
class Columns:
    narrative: str = "narrative_prompt"
    keyword: str = "complex_prompt"
    image: str = "image"


@dataclass
class SplitRows:
    narrative_prompts: list[str]
    keyword_prompts: list[str]
    images: list[bytes]
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


def read_split_table(
    data: str, split: str, columns: Columns, only: list[str] | None = None
) -> pa.Table | None:
    """The three columns of ``split`` (or just ``only``); None when there is no such split."""
    wanted = only or [columns.narrative, columns.keyword, columns.image]
    if _looks_local(data):
        path = Path(data).expanduser()
        if not path.exists():
            raise InputError(f"--data {data}: no such file or folder")
        files = _local_files(path, split)
        if not files:
            return None
        tables = []
        for file in files:
            try:
                schema = pq.read_schema(file)
            except (OSError, pa.ArrowInvalid) as error:
                raise InputError(f"--data: {file} is not a Parquet file ({error})") from None
            _check_columns(schema.names, wanted, str(file))
            tables.append(pq.read_table(file, columns=wanted))
        return pa.concat_tables(tables)
    return _hub_split(data, split, wanted)


def _hub_split(data: str, split: str, wanted: list[str]) -> pa.Table | None:
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
    _check_columns(dataset.column_names, wanted, data)
    dataset = dataset.select_columns(wanted)
    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.Image):
            dataset = dataset.cast_column(name, datasets.Image(decode=False))
    return dataset.with_format("arrow")[:]


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
    table = read_split_table(data, split, Columns(narrative=column), only=[column])
    if table is None:
        return None
    texts = (text.strip() for text in table[column].to_pylist() if text and text.strip())
    return list(dict.fromkeys(texts))


def load_split(data: str, split: str, columns: Columns = Columns()) -> SplitRows | None:
    table = read_split_table(data, split, columns)
    if table is None:
        return None
    rows = SplitRows([], [], [])
    for narrative, keyword, image in zip(
        table[columns.narrative].to_pylist(),
        table[columns.keyword].to_pylist(),
        table[columns.image].to_pylist(),
        strict=True,
    ):
        data_bytes = _image_bytes(image)
        if not (narrative or "").strip():
            rows.skipped["no narrative prompt"] += 1
        elif not (keyword or "").strip():
            rows.skipped["no keyword prompt"] += 1
        elif data_bytes is None:
            rows.skipped["no image"] += 1
        else:
            rows.narrative_prompts.append(narrative.strip())
            rows.keyword_prompts.append(keyword.strip())
            rows.images.append(data_bytes)
    return rows
