"""Typed settings from a workspace's ``surd.toml``, with unknown keys rejected.

Settings that must stay the same from run to run (split fractions above all: a sample must keep
its split across exports) belong in the workspace, not in each command line. Precedence, highest
first: an option given on the command line (or by its environment variable), the workspace's
``surd.toml``, the defaults below, which are also the defaults the CLI shows.

Secrets never go here: tokens are read from environment variables named by the stage that needs
them, so a workspace can be shared or archived without leaking them.
"""

from __future__ import annotations

import os
import tomllib
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

    def __post_init__(self) -> None:
        try:
            check_split_fractions(self.test_fraction, self.validation_fraction)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        _require(self.max_shard_mb >= 1, "max_shard_mb must be at least 1")


@dataclass(frozen=True)
class SurdConfig:
    ingest: IngestSettings = field(default_factory=IngestSettings)
    export: ExportSettings = field(default_factory=ExportSettings)


TEMPLATE = """\
# surd workspace settings. Uncomment to change; a command-line option still wins over this file.

[ingest]
# batch_size = 256   # items per batch (one Parquet part each)
# workers = 4        # worker processes decoding images
# max_image_mb = 64  # image files larger than this are skipped as too-large

[export]
# status = ["pending", "accepted", "corrected"]   # review statuses exported
# keep_duplicates = false
# test_fraction = 0.05        # keep these fixed: a sample keeps its split only if they do
# validation_fraction = 0.0
# max_shard_mb = 256
"""


def _check_type(value: Any, expected: Any, where: str) -> Any:
    if expected is bool:
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
