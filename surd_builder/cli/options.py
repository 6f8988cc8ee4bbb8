"""Options and option sets shared by several commands: each defined once, here."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from surd_builder.config import load_config, resolve
from surd_builder.errors import InputError

WorkspaceOption = Annotated[
    Path,
    typer.Option(
        "--workspace", "-w", envvar="SURD_WORKSPACE", help="Workspace folder (see `surd init`)."
    ),
]
ProgressOption = Annotated[bool, typer.Option(help="Show a progress bar.")]

ENGINE_PANEL = "Engine (where the batches run)"
EngineOption = Annotated[
    str,
    typer.Option(
        envvar="SURD_ENGINE",
        help="local: this machine's processes; ray: Ray Data on a Ray cluster (pip install "
        "'surd\\[ray]'), same tables either way. Default from surd.toml's \\[engine].",
        rich_help_panel=ENGINE_PANEL,
    ),
]
RayAddressOption = Annotated[
    str | None,
    typer.Option(
        envvar="RAY_ADDRESS",
        help="With --engine ray: the cluster to join (ray://head:10001, head:6379, auto); "
        "default: a new Ray on this machine. The workspace must be on storage every node sees.",
        rich_help_panel=ENGINE_PANEL,
        show_default=False,
    ),
]
RayWorkersOption = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="With --engine ray: workers (Ray actors); default: as many as the cluster's CPUs, "
        "or GPUs for models on a GPU, fit.",
        rich_help_panel=ENGINE_PANEL,
        show_default=False,
    ),
]


def engine_options(
    ctx: typer.Context,
    workspace_root: Path,
    engine: str,
    ray_address: str | None,
    ray_workers: int | None,
) -> dict:
    """The ``RunOptions`` fields for a command's engine options, laid over the workspace's
    ``[engine]`` settings."""
    from surd_builder.ray_engine import RayOptions, check_engine

    check_engine(engine)  # the command line's value: a usage error, not a bad surd.toml
    given = {"engine": engine, "ray_address": ray_address or "", "ray_workers": ray_workers or 0}
    from_command_line = given_on_command_line(ctx)
    settings = resolve(load_config(workspace_root).engine, given, from_command_line)
    for name in ("ray_address", "ray_workers"):
        if settings.engine != "ray" and ctx.get_parameter_source(name).name == "COMMANDLINE":
            option = "--" + name.replace("_", "-")
            raise InputError(f'{option} needs --engine ray (or engine = "ray" in surd.toml)')
    ray = RayOptions(settings.ray_address or None, settings.ray_workers or None)
    return {"engine": settings.engine, "ray": ray}


def given_on_command_line(ctx: typer.Context) -> set[str]:
    """Options the user set explicitly (flag or environment variable): these beat surd.toml."""
    given = set()
    for name in ctx.params:
        source = ctx.get_parameter_source(name)
        if source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT", "PROMPT"):
            given.add(name)
    return given
