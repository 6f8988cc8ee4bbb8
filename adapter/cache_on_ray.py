"""Filling an :class:`adapter.cache.ArrayCache` on a Ray cluster (``--engine ray``).

Each worker builds its own encoder and writes its parts into the shared cache folder itself;
only keys and small text inputs (prompts, image locators) travel through the driver. Kept apart
from :mod:`adapter.cache` so the cache itself needs nothing of Ray's.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from adapter.cache import ArrayCache, missing_keys
from surd_builder.errors import OutputError
from surd_builder.models import batched
from surd_builder.progress import progress_bar
from surd_builder.ray_engine import RayOptions


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
        inputs = [_from_wire(value) for value in batch["input"].to_pylist()]
        self.cache.write(keys, self.encoder(inputs))
        return len(keys)


def _to_wire(value: Any) -> str:
    """An input as a string for an Arrow column: text as is, anything else (an image
    locator) as JSON of its fields, marked."""
    if isinstance(value, str):
        return value
    from adapter.data import ImageRef

    if isinstance(value, ImageRef):
        return "\x00ref" + json.dumps(value.to_json())
    raise TypeError(f"cannot send a {type(value).__name__} to a Ray worker")


def _from_wire(value: str) -> Any:
    if value.startswith("\x00ref"):
        from adapter.data import ImageRef

        return ImageRef.from_json(json.loads(value[4:]))
    return value


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
    itself, so the folder must be on storage every node sees. Inputs travel as text: prompts,
    or image locators (the file and row each worker reads itself, so the data must be on that
    storage too; images never pass through this process). Returns how many were computed."""
    from surd_builder import ray_engine

    ray = ray or RayOptions()
    missing = missing_keys(cache, keys, inputs)
    if not missing:
        return 0
    cache.folder.mkdir(parents=True, exist_ok=True)
    ray_engine.connect(ray.address)
    batches = [
        pa.table({"key": chunk, "input": pa.array([_to_wire(missing[k]) for k in chunk])})
        for chunk in batched(list(missing), batch_size)
    ]
    worker = functools.partial(_RayCacheWorker, str(cache.folder.resolve()), make_encoder)
    with progress_bar(description, total=len(missing), enabled=show_progress) as advance:
        for done in ray_engine.map_batches(batches, worker, device="auto", workers=ray.workers):
            advance(done)
    return len(missing)
