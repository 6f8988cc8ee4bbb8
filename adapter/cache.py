"""An on-disk cache of fixed-shape arrays, keyed by content: what every frozen input is kept in.

Training the SUR-adapter needs, per sample, the VAE latents of the image, the CLIP embeddings of
both prompts and the LLM feature of the narrative prompt. All come from frozen models, so each is
computed once and kept here under ``sha256(identity, content)``: the identity names the model and
every setting that changes the values (layer, pooling, resolution, flip, dtype), the content is
the text or the image's hash. Changing a setting misses; going back hits again.

Storage: fixed-size records in NumPy ``.npy`` files, each with a ``.keys.npy`` beside it (one
64-byte hex key per record). Why ``.npy``: a record is one array of a known dtype and shape, so a
file is a header plus a contiguous block that ``np.load(mmap_mode="r")`` maps without reading;
rows are gathered by index with one fancy-index per file; every process opens the same files
read-only, so the page cache holds one copy per node however many ranks train; and it needs no
library beyond NumPy (Arrow IPC would do the same with more ceremony; safetensors cannot append).

- A part is written once, atomically, one per computed batch (its keys file last: a part counts
  only once its keys are there), so a killed build keeps every finished batch and the next run
  computes only the rest. Processes sharing a folder never clash: names carry the pid.
- :meth:`ArrayCache.compact` merges the small parts into one file, so a folder holds a few
  large files however it was filled (each mapped file holds a file descriptor while open).
- :meth:`ArrayCache.rows` maps the records of a list of keys without loading them:
  :class:`CacheRows` gathers a batch by index from the mapped files.

Caches written by earlier versions (Parquet parts of ``(key, value)`` rows) are converted on
first use.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import pyarrow as pa

from surd_builder.atomic import atomic_path, part_name
from surd_builder.models import batched
from surd_builder.progress import progress_bar

T = TypeVar("T")
KEY_DTYPE = np.dtype("S64")  # a hex sha256
KEYS_SUFFIX = ".keys.npy"
# parts with fewer records than this are merged by compact(); larger ones stay as they are
SMALL_PART_ROWS = 8192
# compact() does nothing while a folder has fewer small parts than this
COMPACT_MIN_PARTS = 16
COPY_ROWS = 512  # records copied at a time when merging (bounded memory)


def model_fingerprint(
    model: str,
    subfolders: Sequence[str] = (),
    revision: str | None = None,
    variant: str | None = None,
) -> str:
    """What identifies a model's weights in a cache key. A local folder: its absolute path plus
    the names, sizes and modification times of its files (in ``subfolders`` if given), so two
    different ``./sd`` folders, or one retrained in place, never share cached values. A hub id:
    the id at ``revision``."""
    path = Path(model).expanduser()
    if not path.is_dir():
        return f"{model}@{revision or 'main'}:{variant or ''}"
    digest = hashlib.sha256()
    roots = [path / sub for sub in subfolders] if subfolders else [path]
    for root in roots:
        for file in sorted(root.rglob("*")):
            if file.is_file():
                stat = file.stat()
                digest.update(
                    f"{file.relative_to(path)}\x1f{stat.st_size}\x1f{stat.st_mtime_ns}\n".encode()
                )
    return f"{path.resolve()}:{variant or ''}:{digest.hexdigest()[:16]}"


def cache_key(identity: str, content: str) -> str:
    return hashlib.sha256(f"{identity}\x1f{content}".encode()).hexdigest()


def _keys_path(part: Path) -> Path:
    return part.with_name(part.name.removesuffix(".npy") + KEYS_SUFFIX)


def _save_npy_atomic(array: np.ndarray, final: Path) -> None:
    with atomic_path(final) as temp, temp.open("wb") as handle:
        np.save(handle, array, allow_pickle=False)


class CacheRows:
    """The records of a list of keys, row ``i`` being key ``i``'s, left in their memory-mapped
    files: :meth:`gather` copies the rows of a batch out, nothing else is read. Row-aligned
    with whatever the keys came from (a split's samples)."""

    def __init__(self, files: list[np.ndarray], file_of: np.ndarray, row_of: np.ndarray):
        self.files, self.file_of, self.row_of = files, file_of, row_of
        first = files[0] if files else np.zeros((0, 0), np.float32)
        self.shape: tuple[int, ...] = tuple(first.shape[1:])
        self.dtype = first.dtype

    def __len__(self) -> int:
        return len(self.row_of)

    def gather(self, indices: np.ndarray | Sequence[int], out: np.ndarray | None = None):
        """The records of rows ``indices`` as one array (into ``out`` if given, e.g. pinned
        memory): per file, one fancy-index of sorted rows (pages read in order)."""
        indices = np.asarray(indices, dtype=np.int64)
        if out is None:
            out = np.empty((len(indices), *self.shape), self.dtype)
        files, rows = self.file_of[indices], self.row_of[indices]
        for number in np.unique(files):
            chosen = np.flatnonzero(files == number)
            order = np.argsort(rows[chosen], kind="stable")
            out[chosen[order]] = self.files[number][rows[chosen[order]]]
        return out

    def select(self, indices: np.ndarray) -> CacheRows:
        """These rows only (e.g. the samples whose image decoded), still mapped."""
        return CacheRows(self.files, self.file_of[indices], self.row_of[indices])

    def rows_where_nan(self) -> np.ndarray:
        """Which rows an encoder stored as NaN (an input it could not read: the whole record
        is NaN), from each record's first value, read with ``pread`` rather than through the
        mapping, so checking a large set leaves nothing mapped in this process."""
        found = np.zeros(len(self), dtype=bool)
        if not len(self):
            return found
        record = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        for number in np.unique(self.file_of):
            mapped = self.files[number]
            chosen = np.flatnonzero(self.file_of == number)
            with open(mapped.filename, "rb") as handle:
                descriptor = handle.fileno()
                for index in chosen:
                    raw = os.pread(
                        descriptor, self.dtype.itemsize,
                        mapped.offset + int(self.row_of[index]) * record,
                    )  # fmt: skip
                    found[index] = np.isnan(np.frombuffer(raw, self.dtype)[0])
        return found


class ArrayCache:
    """Arrays of one dtype and shape, stored by key in ``folder`` (see the module docstring)."""

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)

    def _parts(self) -> list[Path]:
        self._convert_parquet_parts()
        return sorted(
            part
            for part in self.folder.glob("part-*.npy")
            if not part.name.endswith(KEYS_SUFFIX) and _keys_path(part).is_file()
        )

    def _part_keys(self, part: Path) -> np.ndarray:
        return np.load(_keys_path(part), allow_pickle=False)

    def keys(self) -> set[str]:
        found: set[str] = set()
        for part in self._parts():
            found.update(key.decode() for key in self._part_keys(part).tolist())
        return found

    def rows(self, keys: Sequence[str]) -> CacheRows:
        """The records of ``keys`` (a key may repeat), mapped, not loaded; KeyError names the
        first key that is not cached. A part merged away between listing and opening (another
        process compacting) is looked up again."""
        wanted = np.asarray(keys, dtype=KEY_DTYPE) if len(keys) else np.zeros(0, KEY_DTYPE)
        for attempt in range(3):
            try:
                return self._rows(wanted)
            except FileNotFoundError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _rows(self, wanted: np.ndarray) -> CacheRows:
        files: list[np.ndarray] = []
        key_blocks, file_blocks, row_blocks = [], [], []
        for part in self._parts():
            part_keys = self._part_keys(part)
            # open only the files that hold a wanted key (fewer descriptors, fewer maps)
            hit = np.isin(part_keys, wanted)
            if not hit.any():
                continue
            mapped = np.load(part, mmap_mode="r", allow_pickle=False)
            if files and (mapped.shape[1:] != files[0].shape[1:] or mapped.dtype != files[0].dtype):
                raise ValueError(
                    f"cache {self.folder} mixes array shapes {files[0].shape[1:]}, "
                    f"{mapped.shape[1:]}"
                )
            rows = np.flatnonzero(hit)
            key_blocks.append(part_keys[rows])
            file_blocks.append(np.full(len(rows), len(files), np.int32))
            row_blocks.append(rows)
            files.append(mapped)
        if not files:
            if len(wanted):
                raise KeyError(
                    f"{len(set(wanted.tolist()))} key(s) not in the cache {self.folder}, "
                    f"e.g. {wanted[0].decode()}"
                )
            return CacheRows([], np.zeros(0, np.int32), np.zeros(0, np.int64))
        all_keys = np.concatenate(key_blocks)
        all_files, all_rows = np.concatenate(file_blocks), np.concatenate(row_blocks)
        order = np.argsort(all_keys, kind="stable")  # a key in two parts: the first part wins
        sorted_keys = all_keys[order]
        where = np.searchsorted(sorted_keys, wanted)
        where = np.minimum(where, len(sorted_keys) - 1)
        missing = sorted_keys[where] != wanted
        if missing.any():
            lacking = wanted[missing]
            raise KeyError(
                f"{len(set(lacking.tolist()))} key(s) not in the cache {self.folder}, "
                f"e.g. {lacking[0].decode()}"
            )
        chosen = order[where]
        return CacheRows(files, all_files[chosen], all_rows[chosen].astype(np.int64))

    def load(self, keys: Sequence[str]) -> np.ndarray:
        """The arrays of ``keys`` stacked in that order, in memory (small sets; training maps
        them with :meth:`rows`)."""
        rows = self.rows(keys)
        if not len(rows):
            return np.zeros((0,), np.float32)
        return rows.gather(np.arange(len(rows)))

    def write(self, keys: Sequence[str], arrays: np.ndarray) -> None:
        if not len(keys):
            return
        arrays = np.ascontiguousarray(arrays)
        if len(keys) != len(arrays):
            raise ValueError(f"{len(keys)} keys for {len(arrays)} arrays")
        part = self.folder / part_name("part").removesuffix(".parquet")
        part = part.with_name(part.name + ".npy")
        _save_npy_atomic(arrays, part)
        _save_npy_atomic(np.asarray(list(keys), dtype=KEY_DTYPE), _keys_path(part))

    def compact(self, min_parts: int = COMPACT_MIN_PARTS) -> int:
        """Merge the small parts (fewer than ``SMALL_PART_ROWS`` records) into one, dropping
        records whose key is already held, if there are at least ``min_parts`` of them.
        Returns how many parts were merged. Only one process should compact a folder at a time
        (training has its main process do it while the others wait); readers of other runs
        are safe: the merged part is complete before any old one is removed."""
        small = [part for part in self._parts() if len(self._part_keys(part)) < SMALL_PART_ROWS]
        if len(small) < max(2, min_parts):
            return 0
        keep: list[tuple[Path, np.ndarray]] = []
        seen: set[bytes] = set()
        for part in small:
            part_keys = self._part_keys(part)
            rows = [n for n, key in enumerate(part_keys.tolist()) if key not in seen]
            seen.update(part_keys[rows].tolist())
            keep.append((part, np.asarray(rows, dtype=np.int64)))
        first = np.load(small[0], mmap_mode="r", allow_pickle=False)
        total = sum(len(rows) for _part, rows in keep)
        merged = self.folder / (part_name("part").removesuffix(".parquet") + ".npy")
        header = {
            "descr": np.lib.format.dtype_to_descr(first.dtype),
            "fortran_order": False,
            "shape": (total, *first.shape[1:]),
        }
        keys_out: list[np.ndarray] = []
        with atomic_path(merged) as temp, temp.open("wb") as handle:
            np.lib.format.write_array_header_2_0(handle, header)
            for part, rows in keep:
                mapped = np.load(part, mmap_mode="r", allow_pickle=False)
                if mapped.shape[1:] != first.shape[1:] or mapped.dtype != first.dtype:
                    raise ValueError(f"cache {self.folder} mixes array shapes")
                for start in range(0, len(rows), COPY_ROWS):
                    handle.write(np.ascontiguousarray(mapped[rows[start : start + COPY_ROWS]]))
                keys_out.append(self._part_keys(part)[rows])
                del mapped
        _save_npy_atomic(np.concatenate(keys_out), _keys_path(merged))
        for part in small:
            _keys_path(part).unlink(missing_ok=True)  # uncounted first, then gone
            part.unlink(missing_ok=True)
        return len(small)

    def _convert_parquet_parts(self) -> None:
        """Parts of the earlier Parquet format, rewritten as ``.npy`` parts once."""
        import pyarrow.parquet as pq

        for old in sorted(self.folder.glob("part-*.parquet")):
            try:
                table = pq.read_table(old)
            except (OSError, pa.ArrowInvalid):
                continue  # another process converted and removed it meanwhile
            meta = json.loads(table.schema.metadata[b"surd_array"])
            dtype, shape = np.dtype(meta["dtype"]), tuple(meta["shape"])
            values = table["value"].to_pylist()
            arrays = np.stack([np.frombuffer(v, dtype=dtype).reshape(shape) for v in values])
            self.write(table["key"].to_pylist(), arrays)
            old.unlink(missing_ok=True)


def fill_cache(
    cache: ArrayCache,
    keys: Sequence[str],
    inputs: Sequence[T],
    compute: Callable[[list[T]], np.ndarray],
    batch_size: int,
    description: str,
    show_progress: bool = True,
    share: tuple[int, int] = (0, 1),
) -> int:
    """Compute the arrays of the keys the cache lacks (each distinct key once), batch by batch,
    writing each batch before the next starts. Returns how many were computed.

    ``inputs`` are handed to ``compute`` as they are: they may be the values themselves or
    cheap locators that ``compute`` reads (images: :class:`adapter.data.ImageRef`, read a batch
    at a time, so a split's images never sit in memory together).

    ``share=(rank, world)``: this process computes only the keys it owns (by the key's hash,
    so ownership does not depend on what other processes have written meanwhile), and
    processes sharing the folder split the work (parts never clash: their names carry the
    pid)."""
    missing = missing_keys(cache, keys, inputs, share)
    with progress_bar(
        description, total=len(missing), enabled=show_progress and bool(missing)
    ) as advance:
        for chunk in batched(list(missing), batch_size):
            cache.write(chunk, compute([missing[key] for key in chunk]))
            advance(len(chunk))
    return len(missing)


def missing_keys(
    cache: ArrayCache, keys: Sequence[str], inputs: Iterable[T], share: tuple[int, int] = (0, 1)
) -> dict[str, T]:
    """The keys ``cache`` lacks that process ``share[0]`` of ``share[1]`` owns, each once (its
    first input), in the order given."""
    present = cache.keys()
    rank, world = share
    missing: dict[str, T] = {}
    for key, value in zip(keys, inputs, strict=True):
        if key not in present and key not in missing and int(key[:8], 16) % world == rank:
            missing[key] = value
    return missing
