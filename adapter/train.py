"""``surd train``: the SUR-adapter on a frozen Stable Diffusion model, distilling from an LLM.

The order follows diffusers' training examples: options -> accelerator -> frozen parts in the
weight dtype -> cached inputs -> the trainable adapter in float32 -> loop -> save. What differs:

- frozen inputs (VAE latent distributions, CLIP embeddings of both prompts, LLM features) are
  computed once into caches (:mod:`adapter.cache`), so a step is one UNet forward and backward to
  the condition;
- the randomness of step ``s`` is a function of (seed, ``s``) (:mod:`adapter.step`), so a run
  resumed from ``checkpoint-s`` continues exactly as the uninterrupted run would have, and it
  does not depend on the number of processes: ``N`` processes with ``--batch-size B`` train the
  adapter one process with ``N * B`` does (up to float sums, with ``--adapter-dropout 0``);
- under ``accelerate launch`` caches are filled once, split over the processes that see the
  same cache folder (all of them on a shared filesystem, each node's own otherwise), and every
  process must see the same ``--output``;
- checkpoints are written to a temporary folder and renamed, so a kill never leaves a half one.

Output folder: the trained adapter (``config.json`` + safetensors, loadable with
``SURAdapter.from_pretrained(OUTPUT)``), ``checkpoints/checkpoint-N/``, ``logs/`` (TensorBoard),
``history.jsonl`` (every logged value), ``loss-curve.png``, ``validation/step-N.png`` and
``train-summary.json``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
import signal
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from adapter.cache import ArrayCache, cache_key, fill_cache, fill_cache_on_ray, missing_keys
from adapter.data import Columns, SplitRows, load_split
from adapter.features import POOLINGS
from adapter.step import LossSettings
from adapter.validation import DEFAULT_VALIDATION_PROMPTS
from surd_builder.errors import InputError, OutputError
from surd_builder.ray_engine import ENGINES, RayOptions

MIXED_PRECISIONS = ("auto", "no", "fp16", "bf16")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
STATE_FILE = "surd-train-state.json"
# settings a checkpoint must share with the run that resumes it
# (--max-steps / --epochs may grow: that is how a finished run is extended)
RESUME_KEYS = (
    "data", "split", "base_model", "variant", "revision", "llm", "llm_layer", "llm_pooling",
    "llm_dtype", "resolution", "random_flip", "batch_size", "gradient_accumulation_steps",
    "seed", "learning_rate", "lr_scheduler", "lr_warmup_steps", "adam_weight_decay",
    "max_grad_norm", "eta_llm", "eta_prompt", "temperature", "min_snr_gamma", "prediction_type",
    "adapter_weight", "adapter_layers", "adapter_heads", "adapter_feedforward", "adapter_mlp",
    "adapter_dropout", "train_llm_projection", "init_adapter", "mixed_precision", "objective",
)  # fmt: skip
# settings added to RESUME_KEYS later, with the value that checkpoints written before had
ADDED_RESUME_KEYS = {"adapter_dropout": 0.1, "objective": "surd"}


@dataclass(frozen=True)
class Objective:
    """What a preset of ``--objective`` sets when the options are not given."""

    eta_llm: float
    eta_prompt: float
    learning_rate: float
    quality_reaches_adapter: bool


OBJECTIVES = {
    # chosen from the measured gradient norms of each term on the adapter (README: "The
    # objective"): the KL terms weighted so that their gradients are not swamped by the quality
    # loss's, which reaches the adapter through the frozen UNet
    "surd": Objective(eta_llm=1e-3, eta_prompt=1e-2, learning_rate=3e-4,
                      quality_reaches_adapter=True),
    # the released code: its condition tensor rebuilt with torch.tensor(...) cut the graph, so
    # only the two KL terms (eta 1e-5) trained the adapter, with AdamW at 1e-5
    "released": Objective(eta_llm=1e-5, eta_prompt=1e-5, learning_rate=1e-5,
                          quality_reaches_adapter=False),
}  # fmt: skip


@dataclass
class TrainConfig:
    data: str
    base_model: str
    llm: str
    llm_layer: int
    output: Path
    llm_pooling: str = "mean"
    columns: Columns = field(default_factory=Columns)
    split: str = "train"
    validation_split: str = "test"
    cache_dir: Path | None = None
    variant: str | None = None
    revision: str | None = None
    resolution: int = 512
    random_flip: bool = True
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    epochs: int = 10
    max_steps: int | None = None
    learning_rate: float | None = None  # None: the objective's
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    adam_weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    objective: str = "surd"
    eta_llm: float | None = None  # None: the objective's
    eta_prompt: float | None = None  # None: the objective's
    temperature: float = 1.0
    min_snr_gamma: float | None = None
    prediction_type: str | None = None
    adapter_weight: float = 0.1
    adapter_layers: int = 2
    adapter_heads: int = 8
    adapter_feedforward: int = 2048
    adapter_mlp: int = 768
    adapter_dropout: float = 0.1  # PyTorch's default, which the released code used
    train_llm_projection: bool = False
    init_adapter: str | None = None
    mixed_precision: str = "auto"
    device: str = "auto"
    llm_dtype: str = "auto"
    seed: int = 0
    checkpointing_steps: int = 500
    logging_steps: int = 10  # a history row (one wait for the GPU) every N steps
    checkpoints_total_limit: int | None = 3
    resume: str = "auto"
    validation_steps: int = 500
    validation_prompts: tuple[str, ...] = DEFAULT_VALIDATION_PROMPTS
    validation_inference_steps: int = 25
    validation_guidance_scale: float = 7.5
    held_out_samples: int = 256
    gradient_checkpointing: bool = False
    compile: bool = False
    encode_batch_size: int = 32
    cache_engine: str = "local"  # or "ray": caches filled by Ray workers (GPUs of a cluster)
    ray_address: str | None = None  # with cache_engine "ray": the cluster (None: RAY_ADDRESS/local)
    ray_workers: int | None = None  # with cache_engine "ray": workers (None: one per GPU or CPU)
    caches_only: bool = False  # fill the caches, then stop (no training)
    llm_batch_size: int = 16
    show_progress: bool = True

    def __post_init__(self) -> None:
        self.output = Path(self.output)
        if self.objective not in OBJECTIVES:
            raise InputError(f"--objective must be one of {', '.join(OBJECTIVES)}")
        preset = OBJECTIVES[self.objective]
        for name in ("eta_llm", "eta_prompt", "learning_rate"):
            if getattr(self, name) is None:
                setattr(self, name, getattr(preset, name))
        checks = [
            (self.llm_pooling in POOLINGS, f"--llm-pooling must be one of {', '.join(POOLINGS)}"),
            (self.mixed_precision in MIXED_PRECISIONS,
             f"--mixed-precision must be one of {', '.join(MIXED_PRECISIONS)}"),
            (self.lr_scheduler in LR_SCHEDULERS,
             f"--lr-scheduler must be one of {', '.join(LR_SCHEDULERS)}"),
            (self.prediction_type in (None, "epsilon", "v_prediction"),
             "--prediction-type must be epsilon or v_prediction"),
            (self.resolution >= 8 and self.resolution % 8 == 0,
             "--resolution must be a positive multiple of 8"),
            (self.batch_size >= 1 and self.gradient_accumulation_steps >= 1,
             "--batch-size and --gradient-accumulation-steps must be >= 1"),
            (self.epochs >= 1 or (self.max_steps or 0) >= 1, "train for at least one step"),
            (self.learning_rate > 0, "--learning-rate must be > 0"),
            (self.adapter_layers >= 1 and self.adapter_heads >= 1,
             "--adapter-layers and --adapter-heads must be >= 1"),
            (min(self.checkpointing_steps, self.validation_steps, self.logging_steps) >= 1,
             "--checkpointing-steps, --validation-steps and --logging-steps must be >= 1"),
            (0.0 <= self.adapter_weight <= 1.0, "--adapter-weight must be in [0, 1]"),
            (0.0 <= self.adapter_dropout < 1.0, "--adapter-dropout must be in [0, 1)"),
            (self.cache_engine in ENGINES, f"--cache-engine must be one of: {', '.join(ENGINES)}"),
            (self.cache_engine == "ray" or (self.ray_address, self.ray_workers) == (None, None),
             "--ray-address and --ray-workers need --cache-engine ray"),
            (self.llm_layer >= 1, "--llm-layer counts blocks from 1"),
            (self.seed >= 0, "--seed must be >= 0"),
            (self.lr_warmup_steps == 0 or self.lr_scheduler != "constant",
             "--lr-warmup-steps needs --lr-scheduler constant_with_warmup, linear or cosine "
             "(constant has no warm-up)"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise InputError(message)

    def settings_for_resume(self, num_processes: int) -> dict[str, Any]:
        values = asdict(self)
        # the sample stream depends on the global batch, so the process count must match too
        return {**{key: values[key] for key in RESUME_KEYS}, "num_processes": num_processes}


@dataclass
class TrainReport:
    output: Path
    steps: int
    resumed_from: int
    train_samples: int
    held_out_samples: int
    skipped: dict[str, int]
    computed: dict[str, int]
    samples_per_second: float
    final_losses: dict[str, float]
    first_held_out: dict[str, float]
    last_held_out: dict[str, float]
    device: str
    main_process: bool = True  # under accelerate launch, only the main process reports
    # the dtypes the cache identities name: another run finds these caches when it resolves
    # the same (auto: bf16 on a GPU, float32 on a CPU)
    cache_dtypes: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------- accelerator and precision


def make_accelerator(config: TrainConfig) -> tuple[Any, Any]:
    """(accelerator, weight dtype of the frozen parts)."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    from surd_builder.models import resolve_device

    device = resolve_device(config.device) if config.device != "auto" else "auto"
    if device not in ("auto", "cpu", "cuda"):
        raise InputError(
            f"--device {config.device}: training runs on auto, cpu or cuda (pick GPUs with "
            "CUDA_VISIBLE_DEVICES or accelerate launch)"
        )
    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    precision = config.mixed_precision
    if precision == "auto":
        precision = "no" if on_cpu else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    if on_cpu and precision == "fp16":
        raise InputError("--mixed-precision fp16 needs a GPU (use bf16 or no on the CPU)")
    project = ProjectConfiguration(
        project_dir=str(config.output), logging_dir=str(config.output / "logs")
    )
    accelerator = Accelerator(
        cpu=on_cpu,
        mixed_precision=precision,
        log_with="tensorboard",
        project_config=project,
        # building caches can take hours before the first collective; NCCL's default is 10 min
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=12))],
    )
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    return accelerator, dtype


# ---------------------------------------------------------------- cached inputs


def default_cache_dir() -> Path:
    import os

    root = os.environ.get("SURD_CACHE_DIR") or Path.home() / ".cache" / "surd"
    return Path(root) / "train-inputs"


def ranks_sharing(accelerator: Any, folder: Path) -> list[tuple[int, ...]]:
    """For each process (by global rank), the ranks that see the same ``folder``: all of them
    on a shared filesystem, a node's own ones for a node-local path. Each process writes a
    marker named by a token from the main process and its rank, all wait, each looks up every
    rank's marker by name (a lookup, not a directory listing, so that network filesystems
    answer it fresh), and the answers are gathered, so every process decides alike. A collective
    call: every process must make it."""
    from accelerate.utils import broadcast_object_list, gather_object

    rank, world = accelerator.process_index, accelerator.num_processes
    token = broadcast_object_list([secrets.token_hex(8) if accelerator.is_main_process else ""])
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / f".surd-rank-{token[0]}-{rank}"
    marker.touch()
    accelerator.wait_for_everyone()
    seen = tuple(r for r in range(world) if (folder / f".surd-rank-{token[0]}-{r}").exists())
    groups = [tuple(group) for group in gather_object([seen])]
    marker.unlink()  # every process has looked: gather_object returned
    return groups


def cache_share(groups: list[tuple[int, ...]], rank: int) -> tuple[int, int]:
    """``rank``'s share (index, count) of the missing cache keys, given :func:`ranks_sharing`'s
    groups: split among the processes that see the same folder, so each folder is filled once
    and completely by its own processes. If what they see does not add up to separate groups
    (a filesystem showing files late), every process fills what its folder lacks: more work,
    never a missing key."""
    separate = all(r in group for r, group in enumerate(groups)) and all(
        groups[other] == group for group in groups for other in group
    )
    if separate:
        return groups[rank].index(rank), len(groups[rank])
    warnings.warn(
        "processes disagree on which of them share the cache folder; each fills its own",
        stacklevel=2,
    )
    return 0, 1


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
    from adapter.frozen_inputs import LatentMoments, TextEmbeddings
    from adapter.step import CachedSet

    root = Path(config.cache_dir or default_cache_dir())
    narratives = [text for rows in row_sets for text in rows.narrative_prompts]
    keywords = [text for rows in row_sets for text in rows.keyword_prompts]
    images = [ref for rows in row_sets for ref in rows.images]
    image_hashes = [digest for rows in row_sets for digest in rows.image_hashes]

    on_ray = config.cache_engine == "ray"
    share = (0, 1)
    if accelerator.num_processes > 1:
        groups = ranks_sharing(accelerator, root)
        if on_ray and any(len(group) < accelerator.num_processes for group in groups):
            raise InputError(
                f"--cache-engine ray fills one cache folder for every process: put --cache-dir "
                f"{root} on storage all nodes share"
            )
        share = cache_share(groups, accelerator.process_index)
    # one process per folder merges its parts: a group's first, or the main one if the
    # processes could not tell which of them share the folder
    compacts = share[0] == 0 and (share[1] > 1 or accelerator.is_main_process)

    def folder(kind: str, encoder: Any) -> tuple[ArrayCache, str]:
        identity = encoder.cache_identity()
        # one folder per identity: a run reads only the parts of its own models and settings
        return ArrayCache(root / kind / cache_key(identity, "")[:16]), identity

    def fill(
        kind: str, encoder: Any, contents: list[str], inputs: list, size: int
    ) -> tuple[ArrayCache, list[str]]:
        cache, identity = folder(kind, encoder)
        keys = [cache_key(identity, content) for content in contents]
        if not on_ray:
            count = fill_cache(
                cache, keys, inputs, encoder, size, f"caching {kind}", show_progress, share
            )
        elif accelerator.is_main_process:  # the other processes wait for the cluster's work
            ray = RayOptions(config.ray_address, config.ray_workers)
            count = fill_cache_on_ray(
                cache, keys, inputs, encoder.remote_factory(), size, f"caching {kind} on Ray",
                show_progress, ray,
            )  # fmt: skip
        else:
            count = 0
        computed[kind] = computed.get(kind, 0) + count
        return cache, keys

    prompts = narratives + keywords
    text = fill("text", TextEmbeddings(parts, device, dtype), prompts, prompts,
                config.encode_batch_size)  # fmt: skip
    encoders = [LatentMoments(parts, config.resolution, False, device, dtype)]
    if config.random_flip:
        encoders.append(LatentMoments(parts, config.resolution, True, device, dtype))
    if on_ray:
        latents = [
            fill("latents", encoder, image_hashes, images, config.encode_batch_size)
            for encoder in encoders
        ]
    else:
        latents = []
        for encoder in encoders:
            cache, identity = folder("latents", encoder)
            latents.append((cache, [cache_key(identity, digest) for digest in image_hashes]))
        computed["latents"] = computed.get("latents", 0) + fill_latent_caches(
            latents, encoders, images, image_hashes, config.encode_batch_size, share,
            show_progress,
        )  # fmt: skip
    llm_vectors = fill("llm", llm, narratives, narratives, config.llm_batch_size)
    accelerator.wait_for_everyone()  # every writer of every folder has finished
    if compacts:
        for cache, _keys in [text, *latents, llm_vectors]:
            cache.compact()
    accelerator.wait_for_everyone()

    text_rows = text[0].rows(text[1])
    narrative_rows = text_rows.select(np.arange(len(narratives)))
    keyword_rows = text_rows.select(np.arange(len(narratives), len(prompts)))
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
        )  # fmt: skip
        out.append((cached_set, int(len(span) - len(keep))))
    return out


def fill_latent_caches(
    caches: list[tuple[ArrayCache, list[str]]], encoders: list[Any], images: list[Any],
    image_hashes: list[str], batch_size: int, share: tuple[int, int], show_progress: bool,
) -> int:  # fmt: skip
    """Fill the latent caches (plain and, with random flip, mirrored) in one pass over the
    images they lack: each image is read and preprocessed once for both, a batch at a time
    (images are read from the data files then, never held together). ``share``: this process
    takes the images whose hash it owns. Returns how many arrays were computed."""
    from adapter.data import read_images
    from adapter.frozen_inputs import mirrored, preprocess_image
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
            pixels = [
                None if data is None else preprocess_image(data, resolution, False)
                for data in read_images([images[row] for row in chunk])
            ]
            for (cache, keys), encoder, needs in zip(caches, encoders, missing, strict=True):
                todo = [n for n, row in enumerate(chunk) if keys[row] in needs]
                if not todo:
                    continue
                batch = [pixels[n] for n in todo]
                if encoder.flip:
                    batch = [None if x is None else mirrored(x) for x in batch]
                cache.write([keys[chunk[n]] for n in todo], encoder.encode_pixels(batch))
                count += len(todo)
            advance(len(chunk))
    return count


# ---------------------------------------------------------------- the adapter


def make_adapter(config: TrainConfig, text_width: int, llm_dim: int, parts: Any) -> Any:
    from adapter.model import SURAdapter
    from adapter.stable_diffusion import check_adapter_width

    if config.init_adapter:
        path = Path(config.init_adapter)
        if (path / "adapter" / "config.json").is_file():  # a checkpoint-N folder
            path = path / "adapter"
        if not (path / "config.json").is_file():
            raise InputError(f"--init-adapter {path}: no adapter there (config.json is missing)")
        adapter = SURAdapter.from_pretrained(path, dropout=config.adapter_dropout)
        check_adapter_width(adapter.config.embed_dim, parts, f"--init-adapter {path}")
        if adapter.config.llm_dim != llm_dim:
            raise InputError(
                f"--init-adapter {path} projects LLM vectors of width {adapter.config.llm_dim}, "
                f"but {config.llm} gives {llm_dim}"
            )
        adapter.llm_projection.requires_grad_(config.train_llm_projection)
        return adapter
    if text_width % config.adapter_heads:
        raise InputError(
            f"--adapter-heads {config.adapter_heads} does not divide the text width {text_width}"
        )
    return SURAdapter(
        embed_dim=text_width,
        num_layers=config.adapter_layers,
        num_heads=config.adapter_heads,
        feedforward_dim=config.adapter_feedforward,
        mlp_dim=config.adapter_mlp,
        dropout=config.adapter_dropout,
        adapter_weight=config.adapter_weight,
        llm_dim=llm_dim,
        train_llm_projection=config.train_llm_projection,
        projection_seed=config.seed,
    )


# ---------------------------------------------------------------- checkpoints


def checkpoint_dir(output: Path) -> Path:
    return output / "checkpoints"


def list_checkpoints(output: Path) -> list[tuple[int, Path]]:
    found = []
    for path in checkpoint_dir(output).glob("checkpoint-*"):
        step = path.name.removeprefix("checkpoint-")
        if step.isdigit() and (path / STATE_FILE).is_file():
            found.append((int(step), path))
    return sorted(found)


def find_resume_checkpoint(config: TrainConfig) -> Path | None:
    if config.resume == "none":
        return None
    if config.resume == "auto":
        found = list_checkpoints(config.output)
        return found[-1][1] if found else None
    path = Path(config.resume)
    if not (path / STATE_FILE).is_file():
        raise InputError(f"--resume {path}: not a surd checkpoint ({STATE_FILE} is missing)")
    return path


def check_resume_settings(path: Path, config: TrainConfig, num_processes: int) -> int:
    state = json.loads((path / STATE_FILE).read_text())
    saved, now = state["settings"], config.settings_for_resume(num_processes)
    saved = {**ADDED_RESUME_KEYS, **saved}
    changed = [key for key in now if saved.get(key) != now[key]]
    if changed:
        raise InputError(
            f"{path} was made with other settings ({', '.join(changed)}): train into a new "
            "--output, or pass --resume none to start over here"
        )
    return int(state["step"])


def set_aside_checkpoints(output: Path) -> Path | None:
    """``--resume none`` over an output that has checkpoints: move them to
    ``checkpoints-previous-N/`` so they neither vanish nor get resumed by a later run."""
    folder = checkpoint_dir(output)
    if not list_checkpoints(output):
        return None
    number = 1
    while (output / f"checkpoints-previous-{number}").exists():
        number += 1
    target = output / f"checkpoints-previous-{number}"
    folder.rename(target)
    return target


def save_checkpoint(accelerator: Any, config: TrainConfig, step: int) -> None:
    """``accelerator.save_state`` into a temporary folder, renamed into place; old ones pruned."""
    final = checkpoint_dir(config.output) / f"checkpoint-{step}"
    temp = final.with_name(final.name + ".partial")
    if accelerator.is_main_process:
        shutil.rmtree(temp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temp))
    accelerator.wait_for_everyone()  # every rank's RNG state is in before the rename
    if accelerator.is_main_process:
        state = {"step": step, "settings": config.settings_for_resume(accelerator.num_processes)}
        (temp / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        temp.rename(final)
        limit = config.checkpoints_total_limit
        if limit:
            for _step, old in list_checkpoints(config.output)[:-limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def register_adapter_hooks(accelerator: Any) -> None:
    """Checkpoints keep the adapter as ``adapter/`` via ``save_pretrained``, so any checkpoint
    is also a usable adapter."""
    from adapter.model import SURAdapter

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        if accelerator.is_main_process:
            for model in models:
                accelerator.unwrap_model(model).save_pretrained(Path(output_dir) / "adapter")
        weights.clear()

    def load_hook(models: list, input_dir: str) -> None:
        while models:
            model = accelerator.unwrap_model(models.pop())
            loaded = SURAdapter.from_pretrained(Path(input_dir) / "adapter")
            model.load_state_dict(loaded.state_dict())

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# ---------------------------------------------------------------- history


class History:
    """``history.jsonl``: every logged row; truncated to the resumed step on resume."""

    def __init__(self, path: Path, enabled: bool, resume_step: int):
        self.path, self.enabled = path, enabled
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            rows = []
            if path.is_file() and resume_step > 0:
                rows = [json.loads(line) for line in path.read_text().splitlines() if line]
                rows = [row for row in rows if row["step"] <= resume_step]
            path.write_text("".join(json.dumps(row) + "\n" for row in rows))

    def first(self, kind: str) -> dict[str, float]:
        """The first row of ``kind`` without its kind and step (empty if none or not main)."""
        if not self.enabled or not self.path.is_file():
            return {}
        for line in self.path.read_text().splitlines():
            row = json.loads(line)
            if row["kind"] == kind:
                return {k: v for k, v in row.items() if k not in ("kind", "step")}
        return {}

    def add(self, row: dict) -> None:
        if self.enabled:
            with self.path.open("a") as handle:
                handle.write(json.dumps(row) + "\n")


# ---------------------------------------------------------------- the run


def _load_rows(config: TrainConfig) -> tuple[SplitRows, SplitRows | None]:
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


def total_steps(config: TrainConfig, num_samples: int, world_size: int) -> int:
    if config.max_steps:
        return config.max_steps
    per_step = config.batch_size * config.gradient_accumulation_steps * world_size
    return max(1, math.ceil(config.epochs * num_samples / per_step))


def train(config: TrainConfig) -> TrainReport:
    import torch
    from diffusers.optimization import get_scheduler

    from adapter.features import LLMFeatureExtractor
    from adapter.stable_diffusion import load_stable_diffusion
    from adapter.step import (
        compute_losses,
        draw_step_noise,
        micro_batch_indices,
        step_generator,
    )
    from adapter.validation import held_out_losses
    from surd_builder.models import dtype_name

    if config.cache_engine == "ray":
        from surd_builder.ray_engine import require_ray

        require_ray()  # before hours of loading, not after
    accelerator, weight_dtype = make_accelerator(config)
    device = accelerator.device
    main = accelerator.is_main_process
    show = config.show_progress and main
    try:
        config.output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"cannot create --output {config.output}: {error.strerror}") from None
    world = accelerator.num_processes
    if world > 1 and any(len(group) < world for group in ranks_sharing(accelerator, config.output)):
        # checkpoints hold every process's RNG state and all must resume from the same one
        raise InputError(
            f"--output {config.output} is not one folder for all {world} processes: with "
            "several nodes put it on a filesystem they share"
        )
    resume_path = None if config.caches_only else find_resume_checkpoint(config)
    resume_step = check_resume_settings(resume_path, config, world) if resume_path else 0
    if config.resume == "none" and main and not config.caches_only:
        moved = set_aside_checkpoints(config.output)
        if moved is not None and show:
            from surd_builder.progress import stderr_console

            stderr_console.print(f"earlier checkpoints moved to {moved} (--resume none)")
    accelerator.wait_for_everyone()

    train_rows, held_rows = _load_rows(config)
    parts = load_stable_diffusion(config.base_model, weight_dtype, config.variant, config.revision)
    llm = LLMFeatureExtractor(
        config.llm, config.llm_layer, config.llm_pooling, config.llm_batch_size,
        device=str(device), dtype=config.llm_dtype,
    )  # fmt: skip
    llm.check_layer()
    llm_dtype_name = llm.resolved_dtype_name()
    if config.init_adapter is None and parts.text_width % config.adapter_heads:
        make_adapter(config, parts.text_width, 0, parts)  # fails fast, before any caching
    parts.text_encoder.to(device)
    parts.vae.to(device)
    computed: dict[str, int] = {}
    row_sets = [train_rows] + ([held_rows] if held_rows is not None and len(held_rows) else [])
    sets = build_cached_sets(
        row_sets, parts, llm, config, device, weight_dtype, computed, show, accelerator
    )
    (train_set, unreadable), held_set = sets[0], sets[1][0] if len(sets) > 1 else None
    skipped = {**train_rows.skipped}
    del llm, row_sets, train_rows, held_rows  # vectors are cached; image bytes not needed again
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if unreadable:
        skipped["unreadable image"] = unreadable
    if config.caches_only:  # e.g. filled on a Ray cluster's GPUs before a long training run
        return TrainReport(
            output=config.output, steps=0, resumed_from=0, train_samples=len(train_set),
            held_out_samples=len(held_set) if held_set is not None else 0, skipped=skipped,
            computed=computed, samples_per_second=0.0, final_losses={}, first_held_out={},
            last_held_out={}, device=str(device), main_process=main,
            cache_dtypes={"text encoder and VAE": dtype_name(weight_dtype),
                          "LLM": llm_dtype_name},
        )  # fmt: skip
    if not len(train_set):
        raise InputError(f"--data {config.data}: none of the {config.split!r} images decode")

    unet, noise_scheduler = parts.unet, parts.noise_scheduler
    unet.to(device)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if config.compile:
        unet = torch.compile(unet)
    settings = LossSettings(
        config.eta_llm, config.eta_prompt, config.temperature, config.min_snr_gamma,
        config.prediction_type or parts.prediction_type,
        OBJECTIVES[config.objective].quality_reaches_adapter,
    )  # fmt: skip
    vae_config = parts.vae.config
    scaling, shift = vae_config.scaling_factor, getattr(vae_config, "shift_factor", None)

    torch.manual_seed(config.seed)
    adapter = make_adapter(config, parts.text_width, train_set.llm_dim, parts)
    adapter.to(device).train()
    trainable = [param for param in adapter.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=config.learning_rate, weight_decay=config.adam_weight_decay
    )
    steps = total_steps(config, len(train_set), world)
    lr_scheduler = get_scheduler(
        config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=steps,
    )  # fmt: skip
    adapter, optimizer = accelerator.prepare(adapter, optimizer)
    accelerator.register_for_checkpointing(lr_scheduler)
    register_adapter_hooks(accelerator)
    if accelerator.process_index > 0:
        # dropout draws from the global RNG, the same on every process after the seeded init:
        # other processes get their own masks (the main one keeps a single process's)
        torch.manual_seed((config.seed * 1_000_003 + accelerator.process_index) % (2**63 - 1))
    if resume_path is not None:
        accelerator.load_state(str(resume_path))  # restores each process's RNG state
    if resume_step >= steps:
        raise InputError(
            f"{resume_path} is at step {resume_step}, the run has {steps} steps: nothing to do "
            "(raise --max-steps/--epochs, or --resume none to start over)"
        )

    history = History(config.output / "history.jsonl", main, resume_step)
    tracker_config = {k: v for k, v in asdict(config).items() if isinstance(v, int | float | str)}
    accelerator.init_trackers("surd-train", config=tracker_config)

    def evaluate(step: int) -> dict[str, float]:
        if held_set is None or not main:
            return {}
        model = accelerator.unwrap_model(adapter)
        model.eval()
        losses = held_out_losses(
            model, unet, noise_scheduler, held_set, settings, scaling, shift,
            config.batch_size, device, accelerator.autocast,
        )  # fmt: skip
        model.train()
        accelerator.log({f"held_out/{k}": v for k, v in losses.items()}, step=step)
        history.add({"kind": "held_out", "step": step, **losses})
        return losses

    first_held = evaluate(0) if resume_step == 0 else history.first("held_out")
    last_held: dict[str, float] = {}
    rank, batch = accelerator.process_index, config.batch_size
    accumulation = config.gradient_accumulation_steps
    latent_shape = train_set.latent_shape
    num_train_timesteps = noise_scheduler.config.num_train_timesteps
    samples_per_step = batch * accumulation * world
    last_terms: dict[str, float] = {}
    window = _LogWindow(device)  # losses summed on the device between logged rows
    rates: list[float] = []
    progress = _TrainProgress(steps, resume_step, show)
    with progress:
        for step in range(resume_step, steps):
            done = step + 1
            # a row every --logging-steps and at every checkpoint, so a run resumed from one
            # logs the same windows as the uninterrupted run; only logged steps wait for the GPU
            logged = done % config.logging_steps == 0 or done % config.checkpointing_steps == 0
            logged = logged or done == steps or done % config.validation_steps == 0
            grad_norms: dict[str, float] = {}
            for micro in range(accumulation):
                number = step * accumulation + micro
                # the random inputs of the global micro-batch, the same on every process; this
                # one's rows are those of its samples, so the process count changes nothing
                step_noise = draw_step_noise(
                    step_generator(config.seed, number, 0, device), batch * world, latent_shape,
                    num_train_timesteps, config.random_flip, device,
                    flip_generator=step_generator(config.seed, number, 1),
                ).rows(rank * batch, (rank + 1) * batch)  # fmt: skip
                indices = micro_batch_indices(
                    number, batch, world, rank, len(train_set), config.seed
                )
                tensors = train_set.batch(indices, step_noise.flips, device)
                sync = micro == accumulation - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(adapter):
                    with accelerator.autocast():
                        terms = compute_losses(
                            adapter, unet, noise_scheduler, tensors, None, settings,
                            scaling, shift, step_noise,
                        )  # fmt: skip
                    if logged and sync:  # the last micro-batch's per-term gradients
                        grad_norms = term_gradient_norms(
                            accelerator, trainable, terms, settings, accumulation
                        )
                    else:
                        accelerator.backward(terms.total / accumulation)
                window.add(terms, accumulation)
            total_norm = None
            if config.max_grad_norm > 0:
                total_norm = accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if logged:
                values, rate = window.take(accelerator, samples_per_step)
                if rate is not None:
                    rates.append(rate)
                row = {**values, "lr": lr_scheduler.get_last_lr()[0]}
                if rate is not None:
                    row["samples_per_s"] = rate
                if total_norm is not None:
                    row["grad_norm/total"] = float(total_norm)
                row.update(grad_norms)
                accelerator.log({f"train/{k}": v for k, v in row.items()}, step=done)
                history.add({"kind": "train", "step": done, **row})
                last_terms = values
                progress.show(values["total"], rate)
            progress.advance()
            if done % config.validation_steps == 0 or done == steps:
                last_held = evaluate(done) or last_held
                if main and config.validation_prompts:
                    _validation_images(accelerator, config, parts, unet, adapter, done)
                window.restart_clock()  # evaluation time is not training time
            if done % config.checkpointing_steps == 0 or done == steps:
                save_checkpoint(accelerator, config, done)
                window.restart_clock()
            if done == _crash_after_step():
                os.kill(os.getpid(), signal.SIGKILL)  # a real kill: no cleanup, no flushing

    accelerator.wait_for_everyone()
    if main:
        _save_final(accelerator.unwrap_model(adapter), config.output)
    accelerator.end_training()
    # the first window includes warm-up (allocation, compilation): left out of the rate
    steady = rates[1:] or rates
    rate = statistics.median(steady) if steady else 0.0
    report = TrainReport(
        output=config.output,
        steps=steps,
        resumed_from=resume_step,
        train_samples=len(train_set),
        held_out_samples=len(held_set) if held_set is not None else 0,
        skipped=skipped,
        computed=computed,
        samples_per_second=rate,
        final_losses=last_terms,
        first_held_out=first_held,
        last_held_out=last_held,
        device=str(device),
        main_process=main,
    )
    if main:
        _write_summary(report, config)
    return report


class _LogWindow:
    """The loss terms summed on the device since the last logged row (no host sync per step),
    and the wall time they took."""

    NAMES = ("total", "quality", "distillation", "prompt_alignment")

    def __init__(self, device: Any):
        self.device = device
        self.sums: dict[str, Any] = {}
        self.steps = 0.0
        self.micro = 0
        self.restart_clock()

    def restart_clock(self) -> None:
        self.started, self.clock_steps = time.perf_counter(), 0.0

    def add(self, terms: Any, accumulation: int) -> None:
        for name in self.NAMES:
            value = getattr(terms, name).detach().float() / accumulation
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.micro += 1
        if self.micro == accumulation:
            self.micro, self.steps, self.clock_steps = 0, self.steps + 1, self.clock_steps + 1

    def take(self, accelerator: Any, samples_per_step: int) -> tuple[dict[str, float], Any]:
        """(mean of each term over the window, averaged over processes; samples/s over the
        window, None when the window had no training time of its own)."""
        import torch

        stacked = torch.stack([self.sums[name] for name in self.NAMES]) / max(self.steps, 1.0)
        means = accelerator.reduce(stacked, "mean").tolist()  # the one sync of the window
        elapsed = time.perf_counter() - self.started
        rate = samples_per_step * self.clock_steps / elapsed if self.clock_steps else None
        self.sums, self.steps = {}, 0.0
        self.restart_clock()
        return dict(zip(self.NAMES, means, strict=True)), rate


def term_gradient_norms(
    accelerator: Any, trainable: list, terms: Any, settings: LossSettings, accumulation: int
) -> dict[str, float]:
    """Backward of ``terms.total / accumulation`` (as every micro-batch does) that also returns
    each weighted term's gradient norm on the adapter's trainable parameters, for this
    micro-batch: what decides which term the adapter follows.

    The two KL terms do not pass through the UNet: their gradients are taken on their own
    (cheap, the graph kept); the quality term's is the rest of the total's, measured as the
    change of ``.grad`` across the backward. With several processes the KL gradients are
    averaged like the total's (the all-reduce), so the three add up to what the optimizer
    sees."""
    import torch

    weighted = {
        "distillation": terms.distillation * settings.eta_llm,
        "prompt_alignment": terms.prompt_alignment * settings.eta_prompt,
    }
    kl_grads: dict[str, list] = {}
    for name, term in weighted.items():
        if term.requires_grad:
            grads = torch.autograd.grad(term, trainable, retain_graph=True, allow_unused=True)
            kl_grads[name] = [
                torch.zeros_like(param) if grad is None else grad
                for grad, param in zip(grads, trainable, strict=True)
            ]
        else:
            kl_grads[name] = [torch.zeros_like(param) for param in trainable]
    before = [
        torch.zeros_like(param) if param.grad is None else param.grad.detach().clone()
        for param in trainable
    ]
    accelerator.backward(terms.total / accumulation)
    flat_total = torch.cat([
        ((param.grad if param.grad is not None else torch.zeros_like(param)) - old).flatten()
        for param, old in zip(trainable, before, strict=True)
    ]).float() * accumulation  # fmt: skip
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None:  # fp16: .grad holds the scaled gradients
        flat_total = flat_total / scaler.get_scale()
    flat_kl = {name: torch.cat([g.flatten() for g in grads]).float()
               for name, grads in kl_grads.items()}  # fmt: skip
    if accelerator.num_processes > 1:
        flat_kl = {name: accelerator.reduce(value, "mean") for name, value in flat_kl.items()}
    quality = flat_total - sum(flat_kl.values())
    norms = {"quality": quality, **flat_kl}
    return {f"grad_norm/{name}": float(torch.linalg.vector_norm(v)) for name, v in norms.items()}


class _TrainProgress:
    """A rich bar over optimizer steps showing the loss and samples/s."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.enabled = enabled
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            from surd_builder.progress import stderr_console

            self.progress = Progress(
                TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}  {task.fields[rate]} samples/s"),
                TimeElapsedColumn(), TimeRemainingColumn(), console=stderr_console,
            )  # fmt: skip
            self.task = self.progress.add_task("train", total=total, completed=start, loss="-",
                                               rate="-")  # fmt: skip

    def __enter__(self) -> _TrainProgress:
        if self.enabled:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.progress.__exit__(*exc)

    def advance(self) -> None:
        if self.enabled:
            self.progress.update(self.task, advance=1)

    def show(self, loss: float, rate: float | None) -> None:
        """The last logged loss and rate (the bar does not wait for the GPU to show more)."""
        if self.enabled:
            shown = "-" if rate is None else f"{rate:,.1f}"
            self.progress.update(self.task, loss=f"{loss:.4f}", rate=shown)


def _validation_images(
    accelerator: Any, config: TrainConfig, parts: Any, unet: Any, adapter: Any, step: int
) -> None:
    from adapter.pipeline import SURAdapterPipeline
    from adapter.validation import validation_grid

    model = accelerator.unwrap_model(adapter)
    pipeline = SURAdapterPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
        unet=accelerator.unwrap_model(unet), scheduler=parts.inference_scheduler(), adapter=model,
    )  # fmt: skip
    pipeline.set_progress_bar_config(disable=True)
    model.eval()
    with accelerator.autocast():
        grid = validation_grid(
            pipeline, list(config.validation_prompts), config.seed,
            config.validation_inference_steps, config.validation_guidance_scale,
        )  # fmt: skip
    model.train()
    out = config.output / "validation" / f"step-{step:06d}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = out.with_name(out.name + ".tmp.png")
    grid.save(temp)
    temp.replace(out)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")


def _crash_after_step() -> int | None:
    """``SURD_TRAIN_KILL_AFTER_STEP=N`` makes the process SIGKILL itself after step N (and its
    checkpoint, if one falls there): the kill-and-resume test's deterministic kill."""
    value = os.environ.get("SURD_TRAIN_KILL_AFTER_STEP", "")
    return int(value) if value.isdigit() else None


def _save_final(adapter: Any, output: Path) -> None:
    """``save_pretrained`` into a temporary folder, then each file moved into ``output``."""
    temp = output / ".adapter.partial"
    shutil.rmtree(temp, ignore_errors=True)
    adapter.save_pretrained(temp)
    for file in temp.iterdir():
        file.replace(output / file.name)
    temp.rmdir()


def _write_summary(report: TrainReport, config: TrainConfig) -> None:
    from adapter.validation import plot_loss_curve, read_history
    from surd_builder.atomic import write_json_atomic

    plot_loss_curve(read_history(config.output / "history.jsonl"), config.output / "loss-curve.png")
    summary = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(report).items()}
    write_json_atomic(summary, config.output / "train-summary.json")
