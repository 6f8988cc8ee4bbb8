"""An on-disk cache of fixed-shape arrays, keyed by content: what every frozen input is kept in.

Training the SUR-adapter needs, per sample, the VAE latents of the image, the CLIP embeddings of
both prompts and the LLM feature of the narrative prompt. All come from frozen models, so each is
computed once and kept here under ``sha256(identity, content)``: the identity names the model and
every setting that changes the values (layer, pooling, resolution, flip, dtype), the content is
the text or the image's hash. Changing a setting misses; going back hits again.

Storage is Parquet parts of ``(key, value)`` rows, ``value`` the raw bytes of one array; the
dtype and shape are in the part's schema metadata. Parts are written atomically, one per computed
batch, so a killed build keeps every finished batch and the next run computes only the rest.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from surd_builder.atomic import write_parquet_atomic
from surd_builder.errors import OutputError
from surd_builder.models import batched
from surd_builder.progress import progress_bar
from surd_builder.ray_engine import RayOptions
from surd_builder.workspace import part_name

T = TypeVar("T")


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


class ArrayCache:
    """Arrays of one dtype and shape per part, stored by key in ``folder``."""

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)

    def _parts(self) -> list[Path]:
        return sorted(self.folder.glob("part-*.parquet"))

    def keys(self) -> set[str]:
        found: set[str] = set()
        for part in self._parts():
            found.update(pq.read_table(part, columns=["key"])["key"].to_pylist())
        return found

    def load(self, keys: Sequence[str]) -> np.ndarray:
        """The arrays of ``keys`` stacked in that order (a key may repeat); KeyError names the
        first key that is not cached. One pass over the parts, filling one array."""
        rows: dict[str, list[int]] = {}
        for row, key in enumerate(keys):
            rows.setdefault(key, []).append(row)
        out: np.ndarray | None = None
        filled: set[str] = set()
        for part in self._parts():
            table = pq.read_table(part)
            meta = json.loads(table.schema.metadata[b"surd_array"])
            dtype, shape = np.dtype(meta["dtype"]), tuple(meta["shape"])
            for key, value in zip(
                table["key"].to_pylist(), table["value"].to_pylist(), strict=True
            ):
                if key not in rows or key in filled:
                    continue
                array = np.frombuffer(value, dtype=dtype).reshape(shape)
                if out is None:
                    out = np.empty((len(keys), *shape), dtype=dtype)
                elif out.shape[1:] != shape or out.dtype != dtype:
                    raise ValueError(
                        f"cache {self.folder} mixes array shapes {out.shape[1:]}, {shape}"
                    )
                out[rows[key]] = array
                filled.add(key)
        missing = [key for key in rows if key not in filled]
        if missing:
            raise KeyError(
                f"{len(missing)} key(s) not in the cache {self.folder}, e.g. {missing[0]}"
            )
        return out if out is not None else np.zeros((0,), np.float32)

    def write(self, keys: Sequence[str], arrays: np.ndarray) -> None:
        if not len(keys):
            return
        arrays = np.ascontiguousarray(arrays)
        meta = {"dtype": arrays.dtype.str, "shape": list(arrays.shape[1:])}
        values = [array.tobytes() for array in arrays]
        table = pa.table({"key": pa.array(list(keys)), "value": pa.array(values, pa.binary())})
        table = table.replace_schema_metadata({"surd_array": json.dumps(meta)})
        write_parquet_atomic(table, self.folder / part_name("part"))


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

    ``share=(rank, world)``: this process computes only the keys it owns (by the key's hash,
    so ownership does not depend on what other processes have written meanwhile), and
    processes sharing the folder split the work (parts never clash: their names carry the
    pid)."""
    present = cache.keys()
    input_of = dict(zip(keys, inputs, strict=True))
    rank, world = share
    missing = [key for key in input_of if key not in present and int(key[:8], 16) % world == rank]
    with progress_bar(
        description, total=len(missing), enabled=show_progress and bool(missing)
    ) as advance:
        for chunk in batched(missing, batch_size):
            cache.write(chunk, compute([input_of[key] for key in chunk]))
            advance(len(chunk))
    return len(missing)


class _RayCacheWorker:
    """A Ray actor's work for :func:`fill_cache_on_ray`: one encoder per actor, each batch
    computed and written into the (shared) cache folder as a part of its own."""

    def __init__(self, folder: str, make_encoder: Callable[[], Callable[[list], np.ndarray]]):
        from surd_builder.ray_engine import check_visible

        check_visible(
            Path(folder), "the cache folder", OutputError,
            "put --cache-dir on storage every node mounts at that path",
        )  # fmt: skip
        self.cache, self.encoder = ArrayCache(folder), make_encoder()

    def __call__(self, batch: pa.Table) -> int:
        keys = batch["key"].to_pylist()
        self.cache.write(keys, self.encoder(batch["input"].to_pylist()))
        return len(keys)


def fill_cache_on_ray(
    cache: ArrayCache,
    keys: Sequence[str],
    inputs: Sequence[Any],
    make_encoder: Callable[[], Callable[[list], np.ndarray]],
    batch_size: int,
    description: str,
    show_progress: bool = True,
    ray: RayOptions | None = None,
) -> int:
    """:func:`fill_cache` with the missing batches computed on a Ray cluster: each worker (a
    GPU each when the cluster has GPUs) builds its encoder from ``make_encoder`` (a picklable
    recipe, e.g. ``TextEmbeddings.remote_factory()``) and writes its parts into ``cache``
    itself, so the folder must be on storage every node sees. Returns how many were computed."""
    from surd_builder import ray_engine

    ray = ray or RayOptions()
    present = cache.keys()
    input_of = dict(zip(keys, inputs, strict=True))
    missing = [key for key in input_of if key not in present]
    if not missing:
        return 0
    cache.folder.mkdir(parents=True, exist_ok=True)
    ray_engine.connect(ray.address)
    kind = pa.binary() if isinstance(input_of[missing[0]], bytes) else pa.string()
    batches = [
        pa.table({"key": chunk, "input": pa.array([input_of[key] for key in chunk], kind)})
        for chunk in batched(missing, batch_size)
    ]
    worker = functools.partial(_RayCacheWorker, str(cache.folder.resolve()), make_encoder)
    with progress_bar(description, total=len(missing), enabled=show_progress) as advance:
        for done in ray_engine.map_batches(batches, worker, device="auto", workers=ray.workers):
            advance(done)
    return len(missing)
