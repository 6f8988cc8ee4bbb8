"""Reading the files users give to a collecting stage: record files (CSV, JSONL, Parquet) and
prompt sidecars, in whatever encoding their tools wrote. A bad row is kept with its error, so
the item alone fails; a file that is no such file at all is an :class:`InputError`.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipelines.records import ItemRejected
from surd_builder.errors import InputError

# Beyond this a prompt file is not a prompt (``pipelines.records.MAX_PROMPT_CHARS``): the item
# is skipped as "prompt-too-long".
MAX_PROMPT_FILE_BYTES = 2**20
_BOMS = (  # longest first: the UTF-32 LE mark starts with the UTF-16 LE one
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)


def decode_text(data: bytes) -> str:
    """Text of a prompt or metadata file as people's tools write it: the encoding a byte-order
    mark names (UTF-8, UTF-16, UTF-32; the mark dropped), else UTF-8, else Windows-1252 (the
    legacy 8-bit encoding of Windows and of most "latin-1" files, whose five undefined bytes
    are read as Latin-1). Never fails: a legacy file is read, not refused."""
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            return data[len(bom) :].decode(encoding, errors="replace")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="latin1-fallback")


def decode_lines(data: bytes) -> str:
    """:func:`decode_text` for a file of records: without a byte-order mark, each line is read
    as UTF-8 or else as Windows-1252 on its own, so one legacy row does not turn every other
    row's UTF-8 into mojibake."""
    if any(data.startswith(bom) for bom, _ in _BOMS):
        return decode_text(data)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "\n".join(decode_text(line) for line in data.split(b"\n"))


def decode_prompt_file(data: bytes, name: str) -> str:
    """A sidecar prompt file's text (:func:`decode_text`); UTF-16 written without a byte-order
    mark (NUL bytes between ASCII letters) is recognised; other NULs refuse the file."""
    text = decode_text(data)
    if "\x00" not in text:
        return text
    if len(data) % 2 == 0:
        even, odd = data[0::2].count(0), data[1::2].count(0)
        encoding = "utf-16-le" if odd > even else "utf-16-be"
        try:
            text = data.decode(encoding)
        except UnicodeDecodeError:
            pass
        else:
            if "\x00" not in text:
                return text
    raise ItemRejected("not-a-prompt", f"{name} holds NUL bytes: not a text file")


def _latin1_fallback(error: UnicodeDecodeError) -> tuple[str, int]:
    return error.object[error.start : error.end].decode("latin-1"), error.end


codecs.register_error("latin1-fallback", _latin1_fallback)


@dataclass(frozen=True)
class Record:
    """One row of a user's record file: its line number, and the row or why it is unusable."""

    line: int
    row: dict[str, Any] | None
    error: str | None = None


def iter_records(path: Path) -> list[Record]:
    """Every row of a user's CSV, JSONL or Parquet file, a bad row kept as a :class:`Record`
    with its error (invalid JSON, not an object, more fields than the header) so the caller
    can skip it alone. A file that is not such a file at all is an :class:`InputError`."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except (pa.ArrowInvalid, OSError) as error:
            raise InputError(f"{path} is not a readable Parquet file ({error})") from None
        return [Record(number, row) for number, row in enumerate(rows, start=1)]
    try:
        data = path.read_bytes()
    except OSError as error:
        raise InputError(f"{path}: {error.strerror or error}") from None
    text = decode_lines(data)
    if "\x00" in text:
        raise InputError(f"{path} is not a text file (it holds NUL bytes)")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    records = _csv_records(path, text) if suffix == ".csv" else _jsonl_records(text)
    if records and all(record.row is None for record in records):
        first = records[0]
        raise InputError(f"{path}:{first.line}: {first.error} (no usable row in the file)")
    return records


def _jsonl_records(text: str) -> list[Record]:
    records = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as error:
            records.append(Record(number, None, f"not valid JSON ({error})"))
            continue
        if not isinstance(row, dict):
            kind = type(row).__name__.replace("dict", "object").replace("list", "array")
            records.append(Record(number, None, f"a JSON {kind}, not an object"))
            continue
        records.append(Record(number, row))
    return records


def _csv_records(path: Path, text: str) -> list[Record]:
    reader = csv.reader(io.StringIO(text, newline=""))
    records = []
    try:
        header = next(reader, None) or []
        line = reader.line_num + 1  # where the next row starts (a quoted field may span lines)
        for values in reader:
            if values and len(values) > len(header):
                error = f"{len(values)} fields, the header names {len(header)}"
                records.append(Record(line, None, error))
            elif values:  # a short row leaves the rest empty, as spreadsheets write it
                records.append(Record(line, dict(zip(header, values, strict=False))))
            line = reader.line_num + 1
    except csv.Error as error:
        raise InputError(f"{path}: not valid CSV ({error})") from None
    return records
