"""Options and option groups shared by several commands: each defined once, here.

An option group is a frozen dataclass whose fields are Typer options (``Annotated[...]`` with a
default). A command decorated with :func:`option_groups` takes the group as one parameter
(``engine: EngineOptions``); its ``--help``, defaults and parameter names are those of the options
written out one by one at that place.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

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

Command = TypeVar("Command", bound=Callable[..., Any])


@dataclasses.dataclass(frozen=True)
class Adjusted:
    """Metadata of a group parameter, ``Annotated[Group, Adjusted(...)]``: the command's own
    defaults for some of the group's options, and fields that are no option there but fixed."""

    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def option_groups(command: Command) -> Command:
    """``command`` with each parameter annotated with a dataclass (an option group) replaced, at
    its place (``--help`` lists options in signature order), by the group's fields; the values
    Typer passes for them are packed into the dataclass before ``command`` runs. The parameters
    keep the options' names, so ``ctx.params`` and ``ctx.get_parameter_source`` see each one."""
    hints = typing.get_type_hints(command, include_extras=True)
    parameters: list[inspect.Parameter] = []
    groups: dict[str, tuple[type, list[str], Mapping[str, Any]]] = {}
    for parameter in inspect.signature(command).parameters.values():
        annotation = hints.get(parameter.name, parameter.annotation)
        group, adjusted = _group_of(annotation)
        if group is None:
            parameters.append(parameter.replace(kind=parameter.KEYWORD_ONLY, annotation=annotation))
            continue
        options = _options_of(group)
        unknown = (adjusted.defaults.keys() | adjusted.fixed.keys()) - options.keys()
        if unknown:
            raise TypeError(f"{command.__name__}: {group.__name__} has no {sorted(unknown)}")
        names = [name for name in options if name not in adjusted.fixed]
        for name in names:
            option = options[name]
            parameters.append(option.replace(default=adjusted.defaults.get(name, option.default)))
        groups[parameter.name] = (group, names, adjusted.fixed)

    @functools.wraps(command)
    def with_groups(**values: Any) -> Any:
        for parameter, (group, names, fixed) in groups.items():
            values[parameter] = group(**{name: values.pop(name) for name in names}, **fixed)
        return command(**values)

    returns = hints.get("return", inspect.Signature.empty)
    with_groups.__signature__ = inspect.Signature(parameters, return_annotation=returns)  # type: ignore[attr-defined]
    with_groups.__annotations__ = {p.name: p.annotation for p in parameters} | {"return": returns}
    return typing.cast(Command, with_groups)


def _group_of(annotation: Any) -> tuple[type | None, Adjusted]:
    """The option group (a dataclass) that a parameter's annotation names, if any, and how the
    command adjusts it."""
    adjusted = Adjusted()
    if typing.get_origin(annotation) is Annotated:
        metadata = annotation.__metadata__
        adjusted = next((m for m in metadata if isinstance(m, Adjusted)), adjusted)
        annotation = annotation.__origin__
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        return annotation, adjusted
    return None, adjusted


@functools.cache
def _options_of(group: type) -> dict[str, inspect.Parameter]:
    """An option group's fields as keyword parameters with their Typer annotations."""
    hints = typing.get_type_hints(group, include_extras=True)
    empty = inspect.Parameter.empty
    return {
        field.name: inspect.Parameter(
            field.name,
            inspect.Parameter.KEYWORD_ONLY,
            default=empty if field.default is dataclasses.MISSING else field.default,
            annotation=hints[field.name],
        )
        for field in dataclasses.fields(group)
    }


ENGINE_PANEL = "Engine (where the batches run)"


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """Where a stage's batches run (``--engine``, ``--ray-address``, ``--ray-workers``)."""

    engine: Annotated[
        str,
        typer.Option(
            envvar="SURD_ENGINE",
            help="local: this machine's processes; ray: Ray Data on a Ray cluster (pip install "
            "'surd\\[ray]'), same tables either way. Default from surd.toml's \\[engine].",
            rich_help_panel=ENGINE_PANEL,
        ),
    ] = "local"
    ray_address: Annotated[
        str | None,
        typer.Option(
            envvar="RAY_ADDRESS",
            help="With --engine ray: the cluster to join (ray://head:10001, head:6379, auto); "
            "default: a new Ray on this machine. The workspace must be on storage every node "
            "sees.",
            rich_help_panel=ENGINE_PANEL,
            show_default=False,
        ),
    ] = None
    ray_workers: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="With --engine ray: workers (Ray actors); default: as many as the cluster's "
            "CPUs, or GPUs for models on a GPU, fit.",
            rich_help_panel=ENGINE_PANEL,
            show_default=False,
        ),
    ] = None

    def run_fields(self, ctx: typer.Context, workspace_root: Path) -> dict:
        """The ``RunOptions`` fields for these options, laid over the workspace's ``[engine]``
        settings."""
        from surd_builder.ray_engine import RayOptions, check_engine

        check_engine(self.engine)  # the command line's value: a usage error, not a bad surd.toml
        given = {
            "engine": self.engine,
            "ray_address": self.ray_address or "",
            "ray_workers": self.ray_workers or 0,
        }
        settings = configured(ctx, load_config(workspace_root).engine, given)
        for name in ("ray_address", "ray_workers"):
            if settings.engine != "ray" and ctx.get_parameter_source(name).name == "COMMANDLINE":
                option = "--" + name.replace("_", "-")
                raise InputError(f'{option} needs --engine ray (or engine = "ray" in surd.toml)')
        ray = RayOptions(settings.ray_address or None, settings.ray_workers or None)
        return {"engine": settings.engine, "ray": ray}


def configured(ctx: typer.Context, current: Any, values: Mapping[str, Any]) -> Any:
    """``current`` (a section of the workspace's ``surd.toml``) with the ``values`` of the options
    the user gave laid over it, those named like its fields."""
    known = {field.name for field in dataclasses.fields(current)}
    given = {name: value for name, value in values.items() if name in known}
    return resolve(current, given, given_on_command_line(ctx))


def given_on_command_line(ctx: typer.Context) -> set[str]:
    """Options the user set explicitly (flag or environment variable): these beat surd.toml."""
    given = set()
    for name in ctx.params:
        source = ctx.get_parameter_source(name)
        if source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT", "PROMPT"):
            given.add(name)
    return given
