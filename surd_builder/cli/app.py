"""The root ``surd`` command: parses options, calls one library function, prints its report.

Heavy libraries are imported inside command bodies so ``surd --help`` stays fast. Errors a user can
cause are ``SurdError`` subclasses; :class:`SurdGroup` is the one place that turns them into a
one-line message and an exit code (``--debug`` shows the traceback instead).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

from surd_builder import __version__
from surd_builder.errors import SurdError


class SurdGroup(TyperGroup):
    """Maps user-facing errors to one line on stderr and an exit code, and renders the ``--help``
    of every command under it to read well at 80 columns (see ``help_layout``)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        from surd_builder.cli.help_layout import use_readable_help

        use_readable_help(self)  # Typer builds the subcommands first: they are all here

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except SurdError as error:
            if ctx.meta.get("surd_debug"):
                raise
            typer.echo(f"error: {error}", err=True)
            ctx.exit(error.exit_code)
        except BrokenPipeError:  # output piped into `head` and closed: not an error to report
            ctx.exit(141)
        except OSError as error:  # disk full, permission denied...: the user's machine, not a bug
            if ctx.meta.get("surd_debug"):
                raise
            where = f": {error.filename}" if error.filename else ""
            typer.echo(f"error: {error.strerror or error}{where}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            ctx.exit(130)


app = typer.Typer(
    cls=SurdGroup,
    name="surd",
    help="Build (narrative prompt, keyword prompt, image) datasets and train the SUR-adapter.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals may hold API tokens
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"surd {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show full tracebacks instead of one-line errors.")
    ] = False,
) -> None:
    """surd: build SUR-adapter datasets (build, annotate) and train the adapter on them."""
    ctx.meta["surd_debug"] = debug


@app.command()
def init(
    directory: Annotated[
        Path, typer.Argument(help="Folder to make a workspace of (missing or empty).")
    ],
) -> None:
    """Create a workspace: the folder every build stage reads and writes."""
    from surd_builder.workspace import MARKER_FILE, Workspace

    existed = (directory / MARKER_FILE).is_file()
    Workspace.create(directory)
    typer.echo(f"{'already a workspace' if existed else 'created workspace'}: {directory}")


@app.command()
def demo(
    out: Annotated[
        Path, typer.Argument(help="Folder to write the demo images and metadata.jsonl to.")
    ],
    count: Annotated[int, typer.Option(min=1, help="Number of images.")] = 200,
    seed: Annotated[int, typer.Option(help="Random seed: the same seed gives the same files.")] = 0,
    size: Annotated[int, typer.Option(min=16, help="Image side in pixels.")] = 128,
    overwrite: Annotated[bool, typer.Option(help="Write into a non-empty folder.")] = False,
) -> None:
    """Generate the synthetic demo folder: coloured shapes with narrative and keyword prompts."""
    from surd_builder.demo import make_demo_folder

    scenes = make_demo_folder(out, count=count, seed=seed, size=size, overwrite=overwrite)
    typer.echo(f"wrote {len(scenes)} images and metadata.jsonl to {out}")


def _register_groups() -> None:
    from surd_builder.cli import (  # noqa: F401 (they register build commands)
        dedupe,
        narratives,
        takedown,
    )
    from surd_builder.cli.adapter import evaluate, generate
    from surd_builder.cli.annotate import annotate_app
    from surd_builder.cli.build import build_app
    from surd_builder.cli.quickstart import demo_models, quickstart
    from surd_builder.cli.scrape import scrape_app
    from surd_builder.cli.train import train

    build_app.add_typer(scrape_app, name="scrape")
    app.add_typer(build_app, name="build")
    app.add_typer(annotate_app, name="annotate")
    app.command("quickstart")(quickstart)
    app.command("demo-models")(demo_models)
    app.command("train")(train)
    app.command("generate")(generate)
    app.command("eval")(evaluate)


_register_groups()


def main() -> None:
    app(prog_name="surd")
