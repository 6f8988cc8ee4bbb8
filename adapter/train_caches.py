"""The inputs of a training run: the split's rows, the frozen models, and the caches of what
those models compute from the rows (:mod:`adapter.cache`), filled once and then mapped.

A step then reads cached VAE latent distributions, CLIP embeddings of both prompts and LLM
features instead of running the frozen models: one UNet forward and backward per step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adapter.cache import ArrayCache, cache_key, fill_cache, missing_keys
from adapter.cache_on_ray import fill_cache_on_ray
from adapter.data import SplitRows, load_split
from adapter.train_config import TrainConfig
from adapter.train_setup import cache_share, make_adapter, ranks_sharing
from surd_builder.errors import InputError
from surd_builder.ray_engine import RayOptions

CacheFiles = tuple[ArrayCache, list[str]]  # a cache and the keys of the rows, in row order


def default_cache_dir() -> Path:
    """``$SURD_CACHE_DIR/train-inputs``, else under ``~/.cache/surd``: shared by every run."""
    root = os.environ.get("SURD_CACHE_DIR") or Path.home() / ".cache" / "surd"
    return Path(root) / "train-inputs"


def load_rows(config: TrainConfig) -> tuple[SplitRows, SplitRows | None]:
    """(training rows, held-out rows or None): fails on a split with nothing to train on."""
    train_rows = load_split(config.data, config.split, config.columns)
    if train_rows is None:
        raise InputError(f"--data {config.data} has no {config.split!r} split")
    if not len(train_rows):
        raise InputError(
            f"--data {config.data}: no usable {config.split!r} rows ({dict(train_rows.skipped)})"
        )
    held_out = None
    if config.validation_split and config.validation_split != "none":
        limit = config.held_out_samples if config.held_out_samples >= 0 else None
        held_out = load_split(config.data, config.validation_split, config.columns, limit)
    return train_rows, held_out


@dataclass
class TrainInputs:
    """The frozen Stable Diffusion parts and the cached sets the run trains and evaluates on."""

    parts: Any
    train_set: Any  # a CachedSet
    held_set: Any | None
    skipped: dict[str, int]  # rows left out, by reason
    computed: dict[str, int]  # arrays computed into the caches, by kind
    llm_dtype_name: str


def load_inputs(
    config: TrainConfig, accelerator: Any, weight_dtype: Any, show_progress: bool
) -> TrainInputs:
    """Rows, frozen models, filled caches. The LLM is only needed to fill its cache: it is
    dropped (and the GPU's cache emptied) before training."""
    import torch

    from adapter.features import LLMFeatureExtractor
    from adapter.frozen_inputs import vae_dtype
    from adapter.stable_diffusion import load_stable_diffusion

    device = accelerator.device
    train_rows, held_rows = load_rows(config)
    parts = load_stable_diffusion(
        config.base_model, weight_dtype, config.variant, config.revision,
        vae_model=config.vae,
    )  # fmt: skip
    llm = LLMFeatureExtractor(
        config.llm, config.llm_layer, config.llm_pooling, config.llm_batch_size,
        device=str(device), dtype=config.llm_dtype,
    )  # fmt: skip
    llm.check_layer()
    llm_dtype_name = llm.resolved_dtype_name()
    if config.init_adapter is None and parts.text_width % config.adapter_heads:
        make_adapter(config, parts.text_width, 0, parts)  # fails fast, before any caching
    for encoder in parts.text_encoders:
        encoder.to(device)
    parts.vae.to(device)
    if vae_dtype(parts.vae, weight_dtype) != parts.vae.dtype:  # SDXL's VAE under fp16
        parts.vae.to(dtype=vae_dtype(parts.vae, weight_dtype))
    computed: dict[str, int] = {}
    row_sets = [train_rows] + ([held_rows] if held_rows is not None and len(held_rows) else [])
    sets = build_cached_sets(
        row_sets, parts, llm, config, device, weight_dtype, computed, show_progress, accelerator
    )
    (train_set, unreadable), held_set = sets[0], sets[1][0] if len(sets) > 1 else None
    skipped = {**train_rows.skipped}
    del llm, row_sets, train_rows, held_rows  # vectors are cached; image bytes not needed again
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if unreadable:
        skipped["unreadable image"] = unreadable
    return TrainInputs(parts, train_set, held_set, skipped, computed, llm_dtype_name)


def build_cached_sets(
    row_sets: list[SplitRows], parts: Any, llm: Any, config: TrainConfig, device: Any,
    dtype: Any, computed: dict[str, int], show_progress: bool, accelerator: Any,
) -> list[tuple[Any, int]]:  # fmt: skip
    """Fill the caches for all ``row_sets`` together (one progress bar per kind of input), then
    a (CachedSet, samples dropped because their image did not decode) for each: the sets map
    the cache files, they do not load them.

    With several processes each computes its share of what is missing (on its own GPU): the
    processes that see the same cache folder (all on a shared filesystem, a node's own with a
    node-local ``--cache-dir``) split its missing keys by key hash (images by image hash), so
    each folder is filled once. Then all wait for each other, one process per folder merges
    its small parts (:meth:`ArrayCache.compact`), all wait again, and each maps the complete
    cache read-only: the page cache holds one copy per node."""
    from adapter.frozen_inputs import LatentMoments, TextEmbeddings, TimeIds, vae_dtype

    root = Path(config.cache_dir or default_cache_dir())
    narratives = [text for rows in row_sets for text in rows.narrative_prompts]
    keywords = [text for rows in row_sets for text in rows.keyword_prompts]
    images = [ref for rows in row_sets for ref in rows.images]
    image_hashes = [digest for rows in row_sets for digest in rows.image_hashes]

    share, compacts = _process_share(accelerator, root, config.cache_engine == "ray")
    filler = _CacheFiller(root, config, accelerator, share, computed, show_progress)
    prompts = narratives + keywords
    text = filler.fill("text", TextEmbeddings(parts, device, dtype), prompts, prompts,
                       config.encode_batch_size)  # fmt: skip
    latent_dtype = vae_dtype(parts.vae, dtype)
    encoders: list[Any] = [LatentMoments(parts, config.resolution, False, device, latent_dtype)]
    if config.random_flip:
        encoders.append(LatentMoments(parts, config.resolution, True, device, latent_dtype))
    if parts.family == "sdxl":
        encoders.append(TimeIds(config.resolution))
    latents = filler.fill_latents(encoders, images, image_hashes)
    llm_vectors = filler.fill("llm", llm, narratives, narratives, config.llm_batch_size)
    accelerator.wait_for_everyone()  # every writer of every folder has finished
    if compacts:
        for cache, _keys in [text, *latents, llm_vectors]:
            cache.compact()
    accelerator.wait_for_everyone()
    time_ids = latents.pop() if parts.family == "sdxl" else None
    return _split_sets(
        row_sets, text, latents, llm_vectors, len(narratives), parts.pooled_width, time_ids
    )


def _process_share(accelerator: Any, root: Path, on_ray: bool) -> tuple[tuple[int, int], bool]:
    """(this process's share of the missing keys, whether it merges its folder's parts): one
    process per folder merges, a group's first, or the main one if the processes could not
    tell which of them share the folder."""
    share = (0, 1)
    if accelerator.num_processes > 1:
        groups = ranks_sharing(accelerator, root)
        if on_ray and any(len(group) < accelerator.num_processes for group in groups):
            raise InputError(
                f"--cache-engine ray fills one cache folder for every process: put --cache-dir "
                f"{root} on storage all nodes share"
            )
        share = cache_share(groups, accelerator.process_index)
    compacts = share[0] == 0 and (share[1] > 1 or accelerator.is_main_process)
    return share, compacts


class _CacheFiller:
    """Fills one kind of cache at a time under ``root`` (locally or on Ray), adding what it
    computed to ``computed``."""

    def __init__(
        self, root: Path, config: TrainConfig, accelerator: Any, share: tuple[int, int],
        computed: dict[str, int], show_progress: bool,
    ) -> None:  # fmt: skip
        self.root, self.config, self.accelerator = root, config, accelerator
        self.share, self.computed, self.show_progress = share, computed, show_progress
        self.on_ray = config.cache_engine == "ray"

    def folder(self, encoder: Any) -> tuple[ArrayCache, str]:
        """One folder per identity, under the encoder's ``cache_kind``: a run reads only the
        parts of its own models and settings."""
        identity = encoder.cache_identity()
        return ArrayCache(self.root / encoder.cache_kind / cache_key(identity, "")[:16]), identity

    def fill(
        self, kind: str, encoder: Any, contents: list[str], inputs: list, size: int
    ) -> CacheFiles:
        cache, identity = self.folder(encoder)
        keys = [cache_key(identity, content) for content in contents]
        if not self.on_ray:
            count = fill_cache(
                cache, keys, inputs, encoder, size, f"caching {kind}", self.show_progress,
                self.share,
            )  # fmt: skip
        elif self.accelerator.is_main_process:  # the other processes wait for the cluster's work
            ray = RayOptions(self.config.ray_address, self.config.ray_workers)
            count = fill_cache_on_ray(
                cache, keys, inputs, encoder.remote_factory(), size, f"caching {kind} on Ray",
                self.show_progress, ray,
            )  # fmt: skip
        else:
            count = 0
        self.computed[kind] = self.computed.get(kind, 0) + count
        return cache, keys

    def fill_latents(
        self, encoders: list[Any], images: list[Any], image_hashes: list[str]
    ) -> list[CacheFiles]:
        """The latent caches, one per encoder (plain and, with random flip, mirrored): on Ray
        one fill each, locally one pass over the images for both."""
        size = self.config.encode_batch_size
        if self.on_ray:
            return [
                self.fill("latents", encoder, image_hashes, images, size) for encoder in encoders
            ]
        latents = []
        for encoder in encoders:
            cache, identity = self.folder(encoder)
            latents.append((cache, [cache_key(identity, digest) for digest in image_hashes]))
        self.computed["latents"] = self.computed.get("latents", 0) + fill_latent_caches(
            latents, encoders, images, image_hashes, size, self.share, self.show_progress
        )
        return latents


def _split_sets(
    row_sets: list[SplitRows], text: CacheFiles, latents: list[CacheFiles],
    llm_vectors: CacheFiles, num_narratives: int, pooled_width: int = 0,
    time_ids: CacheFiles | None = None,
) -> list[tuple[Any, int]]:  # fmt: skip
    """The filled caches cut back into one CachedSet per row set (text rows: the narrative
    prompts, then the keyword prompts), without the rows whose image did not decode. SDXL
    (``pooled_width`` > 0): the text records split into token states and pooled embeddings,
    and the time ids of each image."""
    from adapter.step import CachedSet, RecordPart

    text_rows = text[0].rows(text[1])
    narrative_rows = text_rows.select(np.arange(num_narratives))
    keyword_rows = text_rows.select(np.arange(num_narratives, len(text[1])))
    narrative_pooled = keyword_pooled = None
    if pooled_width:
        tokens, width = text_rows.shape[0] - 1, text_rows.shape[1]
        narrative_pooled = RecordPart(narrative_rows, tokens, None, pooled_width)
        keyword_pooled = RecordPart(keyword_rows, tokens, None, pooled_width)
        narrative_rows = RecordPart(narrative_rows, 0, tokens, width)
        keyword_rows = RecordPart(keyword_rows, 0, tokens, width)
    time_rows = None if time_ids is None else time_ids[0].rows(time_ids[1])
    latent_rows = [cache.rows(keys) for cache, keys in latents]
    moments = latent_rows[0]
    flipped = latent_rows[1] if len(latent_rows) > 1 else None
    llm_rows = llm_vectors[0].rows(llm_vectors[1])
    readable = ~moments.rows_where_nan()

    out, start = [], 0
    for rows in row_sets:
        span = np.arange(start, start + len(rows))
        keep = span[readable[span]]
        start += len(rows)
        cached_set = CachedSet(
            moments.select(keep), None if flipped is None else flipped.select(keep),
            narrative_rows.select(keep), keyword_rows.select(keep), llm_rows.select(keep),
            *(None if part is None else part.select(keep)
              for part in (narrative_pooled, keyword_pooled, time_rows)),
        )  # fmt: skip
        out.append((cached_set, int(len(span) - len(keep))))
    return out


def fill_latent_caches(
    caches: list[CacheFiles], encoders: list[Any], images: list[Any],
    image_hashes: list[str], batch_size: int, share: tuple[int, int], show_progress: bool,
) -> int:  # fmt: skip
    """Fill the latent caches (plain and, with random flip, mirrored; for SDXL also the time
    ids) in one pass over the images they lack: each image is read and preprocessed once for
    all, a batch at a time (images are read from the data files then, never held together).
    ``share``: this process takes the images whose hash it owns. Returns how many arrays were
    computed."""
    from adapter.data import read_images
    from adapter.frozen_inputs import prepare_image
    from surd_builder.models import batched
    from surd_builder.progress import progress_bar

    rank, world = share
    missing = [missing_keys(cache, keys, range(len(keys))) for cache, keys in caches]
    wanted: dict[str, int] = {}  # image hash -> its first row, for the images some cache lacks
    for needs in missing:
        for row in needs.values():
            digest = image_hashes[row]
            if int(digest[:8], 16) % world == rank:
                wanted.setdefault(digest, row)
    rows = sorted(wanted.values())  # in file order: each row group is read once
    resolution = encoders[0].resolution
    count = 0
    with progress_bar(
        "caching latents", total=len(rows), enabled=show_progress and bool(rows)
    ) as advance:
        for chunk in batched(rows, batch_size):
            prepared = [
                None if data is None else prepare_image(data, resolution)
                for data in read_images([images[row] for row in chunk])
            ]
            for (cache, keys), encoder, needs in zip(caches, encoders, missing, strict=True):
                todo = [n for n, row in enumerate(chunk) if keys[row] in needs]
                if not todo:
                    continue
                batch = [prepared[n] for n in todo]
                cache.write([keys[chunk[n]] for n in todo], encoder.encode_prepared(batch))
                count += len(todo)
            advance(len(chunk))
    return count
