"""``surd build ...``: the dataset build stages."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from surd_builder.cli.options import (
    EngineOptions,
    ProgressOption,
    WorkspaceOption,
    configured,
    option_groups,
)
from surd_builder.cli.reports import console, print_export_report, print_run_report
from surd_builder.config import (
    MAX_BATCH_SIZE,
    MAX_WORKERS,
    ExportSettings,
    IngestSettings,
    load_config,
)

build_app = typer.Typer(
    help="Collect, rewrite, screen, dedupe and export samples in a workspace.",
    no_args_is_help=True,
)


@build_app.command()
@option_groups
def ingest(
    ctx: typer.Context,
    folder: Annotated[
        Path,
        typer.Argument(
            help="Folder of images with sidecar .txt prompts and/or metadata.jsonl/csv."
        ),
    ],
    workspace: WorkspaceOption = Path("."),
    source: Annotated[
        str | None,
        typer.Option(help="Source name for these samples (default: the folder's name)."),
    ] = None,
    prompt_column: Annotated[
        str | None,
        typer.Option(
            help="Metadata column with the keyword prompt "
            "(default: the first of complex_prompt, prompt, text, caption)."
        ),
    ] = None,
    narrative_column: Annotated[
        str, typer.Option(help="Metadata column with a narrative prompt, if any.")
    ] = "narrative_prompt",
    batch_size: Annotated[
        int,
        typer.Option(min=1, max=MAX_BATCH_SIZE, help="Items per batch (one Parquet part each)."),
    ] = IngestSettings.batch_size,
    workers: Annotated[
        int, typer.Option(min=1, max=MAX_WORKERS, help="Worker processes decoding images.")
    ] = IngestSettings.workers,
    max_image_mb: Annotated[
        float, typer.Option(min=0.001, help="Skip image files larger than this, MiB.")
    ] = IngestSettings.max_image_mb,
    force: Annotated[bool, typer.Option(help="Redo items already ingested.")] = False,
    limit: Annotated[
        int | None, typer.Option(min=1, help="Process at most this many new items.")
    ] = None,
    progress: ProgressOption = True,
    *,
    engine: EngineOptions,
) -> None:
    """Ingest a local folder of images with prompts into the workspace (resumable). With
    --engine ray the folder must be on storage every Ray node sees, at the same path."""
    from pipelines.ingest import IngestStage
    from pipelines.runner import RunOptions, run_stage
    from surd_builder.workspace import Workspace

    ws = Workspace.open(workspace)
    settings = configured(
        ctx,
        load_config(ws.root).ingest,
        {"batch_size": batch_size, "workers": workers, "max_image_mb": max_image_mb},
    )
    stage = IngestStage(
        folder,
        source=source,
        prompt_column=prompt_column,
        narrative_column=narrative_column,
        max_image_bytes=int(settings.max_image_mb * 2**20),
    )
    options = RunOptions(
        batch_size=settings.batch_size,
        workers=settings.workers,
        force=force,
        limit=limit,
        show_progress=progress,
        **engine.run_fields(ctx, ws.root),
    )
    print_run_report(run_stage(stage, ws, options))


@build_app.command()
def export(
    ctx: typer.Context,
    out: Annotated[
        Path, typer.Argument(help="Folder to write the Parquet dataset to (must not exist).")
    ],
    workspace: WorkspaceOption = Path("."),
    status: Annotated[
        list[str], typer.Option(help="Review statuses to include (repeat the option).")
    ] = list(ExportSettings.status),  # noqa: B006, B008 (typer copies it, never mutates it)
    keep_duplicates: Annotated[
        bool, typer.Option(help="Keep samples marked as near-duplicates.")
    ] = ExportSettings.keep_duplicates,
    test_fraction: Annotated[
        float, typer.Option(min=0.0, max=0.99, help="Share of samples in the test split.")
    ] = ExportSettings.test_fraction,
    validation_fraction: Annotated[
        float, typer.Option(min=0.0, max=0.99, help="Share in the validation split.")
    ] = ExportSettings.validation_fraction,
    max_shard_mb: Annotated[
        int, typer.Option(min=1, help="Upper bound of image data per Parquet file, MiB.")
    ] = ExportSettings.max_shard_mb,
    min_side: Annotated[
        int, typer.Option(min=0, help="Leave out images whose shorter side is smaller (px).")
    ] = ExportSettings.min_side,
    nsfw: Annotated[
        str, typer.Option(help="Samples marked NSFW: include, exclude, or only them.")
    ] = ExportSettings.nsfw,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
    progress: ProgressOption = True,
) -> None:
    """Export the dataset as Parquet that `datasets.load_dataset("parquet", ...)` loads as-is."""
    from pipelines.export import ExportOptions, export_dataset
    from surd_builder.workspace import Workspace

    ws = Workspace.open(workspace)
    given = {
        "status": tuple(status),
        "keep_duplicates": keep_duplicates,
        "test_fraction": test_fraction,
        "validation_fraction": validation_fraction,
        "max_shard_mb": max_shard_mb,
        "min_side": min_side,
        "nsfw": nsfw,
    }
    settings = configured(ctx, load_config(ws.root).export, given)
    options = ExportOptions(
        statuses=settings.status,
        drop_duplicates=not settings.keep_duplicates,
        test_fraction=settings.test_fraction,
        validation_fraction=settings.validation_fraction,
        max_shard_bytes=settings.max_shard_mb * 2**20,
        min_side=settings.min_side,
        nsfw=settings.nsfw,
        overwrite=overwrite,
        show_progress=progress,
    )
    print_export_report(export_dataset(ws, out, options))


@build_app.command("status")
def status_command(workspace: WorkspaceOption = Path(".")) -> None:
    """Counts per stage table, stored images, outstanding failures, last run of each stage."""
    from surd_builder.status import workspace_status
    from surd_builder.workspace import Workspace

    report = workspace_status(Workspace.open(workspace))
    tables = Table(title=f"workspace {workspace}", title_justify="left")
    tables.add_column("table")
    tables.add_column("samples", justify="right")
    for name, rows in report.tables.items():
        tables.add_row(name, f"{rows:,}")
    tables.add_row("images stored", f"{report.images:,} ({report.image_bytes / 2**20:,.1f} MiB)")
    for source, number in report.sources.items():
        tables.add_row(f"source: {source}", f"{number:,}")
    for review, number in report.review_status.items():
        tables.add_row(f"review: {review}", f"{number:,}")
    console.print(tables)

    if report.failures:
        failures = Table(
            title="outstanding failures (retried by the next run)", title_justify="left"
        )
        failures.add_column("stage")
        failures.add_column("reason")
        failures.add_column("items", justify="right")
        for (stage, reason), number in report.failures.items():
            failures.add_row(stage, reason, f"{number:,}")
        console.print(failures)

    if report.last_runs:
        runs = Table(title="last run of each stage", title_justify="left")
        for column in ("stage", "status", "started", "written", "failed"):
            runs.add_column(column)
        for stage, run in report.last_runs.items():
            counts = run.get("counts", {})
            runs.add_row(
                stage,
                run["status"],
                run["started_at"][:19].replace("T", " "),
                f"{counts.get('written', '')}",
                f"{counts.get('failed', '')}",
            )
        console.print(runs)


def run_surd_command(ctx: typer.Context, args: list[str]) -> int:
    """Run ``surd ARGS`` in this process, as a user's shell would; return its exit code (its
    errors are printed as the CLI prints them). It runs on the root ``surd`` command of ``ctx``
    (the running one), so this module needs no import of the app that includes it."""
    root_command = ctx.find_root().command
    try:
        # without standalone mode, click returns a command's exit code instead of exiting
        result = root_command.main(args=args, prog_name="surd", standalone_mode=False)
    except Exception as error:  # typer vendors click: match its exceptions by shape
        if hasattr(error, "show") and hasattr(error, "exit_code"):  # usage errors
            error.show()
            return error.exit_code or 2
        if type(error).__name__ in ("Exit", "Abort"):
            return getattr(error, "exit_code", 1)
        raise
    return result if isinstance(result, int) else 0


def run_configured(ctx: typer.Context, ws, config_path: Path) -> None:
    """Run the [run] steps of ``config_path`` on ``ws`` in this process; print one summary."""
    from surd_builder.errors import SurdError
    from surd_builder.run import load_steps, run_steps

    steps = load_steps(config_path)

    def invoke(args: list[str]) -> int:
        return run_surd_command(ctx, args)

    summary = run_steps(steps, ws.root, Path(config_path).resolve().parent, invoke, typer.echo)
    table = Table(title="surd build run", title_justify="left")
    for column in ("step", "status", "seconds"):
        table.add_column(column)
    for step in summary.steps:
        status = step.status + (f" ({step.detail})" if step.detail else "")
        table.add_row(step.step, status, f"{step.seconds:.1f}")
    console.print(table)
    if summary.failed:
        failed = summary.steps[-1]
        raise SurdError(
            f"step {failed.step!r} failed; fix it and run again (finished work is kept)"
        )


@build_app.command("run")
def run_command(
    ctx: typer.Context,
    workspace: WorkspaceOption = Path("."),
    config: Annotated[
        Path | None,
        typer.Option(help="TOML file with a run table of steps (default: the workspace's)."),
    ] = None,
) -> None:
    """Run the steps of the config's run table in order: the whole build in one command."""
    from surd_builder.workspace import Workspace

    ws = Workspace.open(workspace)
    run_configured(ctx, ws, config or ws.root / "surd.toml")
