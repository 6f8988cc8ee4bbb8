"""``surd annotate ...``: human review of narrative prompts in Label Studio."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from annotation.tasks import DEFAULT_IMAGE_URL
from surd_builder.cli.options import ProgressOption, WorkspaceOption, option_groups

annotate_app = typer.Typer(
    help="Send samples to Label Studio for review and read the decisions back.",
    no_args_is_help=True,
)
console = Console()


@dataclass(frozen=True)
class ProjectOptions:
    """The workspace and the Label Studio project a command connects."""

    project: Annotated[str, typer.Option("--project", "-p", help="Label Studio project title.")]
    workspace: WorkspaceOption = Path(".")
    url: Annotated[
        str, typer.Option("--url", envvar="LABEL_STUDIO_URL", help="Label Studio base URL.")
    ] = "http://127.0.0.1:8080"
    api_key: Annotated[
        str,
        typer.Option(
            "--api-key",
            envvar="LABEL_STUDIO_API_KEY",
            help="API token (legacy token or personal access token); prefer the variable.",
            show_default=False,
        ),
    ] = ""

    def client(self):
        from annotation.client import LabelStudioClient

        return LabelStudioClient(self.url, self.api_key)


@dataclass(frozen=True)
class ReadOptions:
    """How annotations are read back from the project."""

    policy: Annotated[
        str,
        typer.Option(
            help="Several annotations on a task: 'latest' decision wins, or only 'unanimous' ones."
        ),
    ] = "latest"
    full: Annotated[
        bool,
        typer.Option(
            "--full",
            help="Read every task again instead of only what changed since the last read.",
        ),
    ] = False

    def __post_init__(self) -> None:
        from annotation.tasks import POLICIES
        from surd_builder.errors import InputError

        if self.policy not in POLICIES:
            raise InputError(f"--policy must be one of: {', '.join(POLICIES)}")


@annotate_app.command("push")
@option_groups
def push_command(
    studio: ProjectOptions,
    image_url_template: Annotated[
        str,
        typer.Option(
            help="Where annotators' browsers fetch images: {image_sha256}, {sample_id} and "
            "{image_file} (<sha256>.<ext>, as write-images names it) are filled in (S3, a CDN, "
            "`surd annotate serve-images`, or Label Studio's /data/local-files/?d=...)."
        ),
    ] = DEFAULT_IMAGE_URL,
    embed_images: Annotated[
        bool,
        typer.Option(help="Put images into the tasks as base64 instead (bloats Label Studio)."),
    ] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Tasks per import request.")] = 500,
    limit: Annotated[int | None, typer.Option(min=1, help="Push at most this many.")] = None,
    include_auto_rejected: Annotated[
        bool, typer.Option(help="Also push samples that screening rejected, for a second look.")
    ] = False,
    refresh: Annotated[
        bool,
        typer.Option(
            help="Give tasks not yet annotated whose narrative was rewritten since the push the "
            "new text (data and prediction)."
        ),
    ] = False,
    local_files: Annotated[
        str | None,
        typer.Option(
            help="Absolute folder on the Label Studio server holding write-images' files: the "
            "project gets a Local files storage for it, so Label Studio serves them."
        ),
    ] = None,
    progress: ProgressOption = True,
) -> None:
    """Create or find the project and import tasks for samples that need review (idempotent)."""
    from annotation.push import PushOptions, push
    from surd_builder.workspace import Workspace

    ws = Workspace.open(studio.workspace)
    options = PushOptions(
        image_url_template=image_url_template,
        embed_images=embed_images,
        batch_size=batch_size,
        limit=limit,
        include_auto_rejected=include_auto_rejected,
        refresh=refresh,
        local_files=local_files,
        show_progress=progress,
    )
    report = push(ws, studio.client(), studio.project, options)
    created = "created" if report.created_project else "existing"
    console.print(
        f"[bold]push[/bold]: {report.pushed:,} tasks -> {created} project {report.project.title!r}"
        f" (id {report.project.id}) in {report.seconds:.1f} s"
    )
    table = Table()
    table.add_column("count")
    table.add_column("value", justify="right")
    table.add_row("samples needing review", f"{report.candidates:,}")
    table.add_row("already in the project", f"{report.already_in_project:,}")
    table.add_row("pushed now", f"{report.pushed:,}")
    if report.stale:
        table.add_row("tasks showing an older narrative", f"{report.stale:,}")
        if refresh:
            table.add_row("  refreshed to the current one", f"{report.refreshed:,}")
            table.add_row("  left: already annotated", f"{report.stale_annotated:,}")
        else:
            table.add_row("  (push --refresh updates those not yet annotated)", "")
    for origin, number in sorted(report.by_origin.items()):
        table.add_row(f"  narrative from {origin}", f"{number:,}")
    console.print(table)


@annotate_app.command("pull")
@option_groups
def pull_command(studio: ProjectOptions, read: ReadOptions) -> None:
    """Apply finished annotations to the workspace (idempotent; never replaces newer reviews)."""
    from annotation.pull import pull
    from surd_builder.workspace import Workspace

    ws = Workspace.open(studio.workspace)
    report = pull(ws, studio.client(), studio.project, read.policy, read.full)
    written = sum(report.written.values())
    console.print(
        f"[bold]pull[/bold]: {written:,} decisions written; {report.read:,} of {report.tasks:,} "
        "tasks read (new or changed since the last read)"
    )
    table = Table()
    table.add_column("count")
    table.add_column("value", justify="right")
    for status, number in sorted(report.written.items()):
        table.add_row(f"written: {status}", f"{number:,}")
    table.add_row("already applied", f"{report.unchanged:,}")
    table.add_row("pending (skipped or not done)", f"{report.pending:,}")
    if read.policy == "unanimous":
        table.add_row("annotators disagree (left pending)", f"{report.conflicts:,}")
    table.add_row("tasks of unknown samples", f"{report.unknown_samples:,}")
    if report.agreement is not None:
        table.add_row(
            "agreement (tasks with 2+ annotators)",
            f"{report.agreement:.0%} of {report.several_annotators:,}",
        )
    console.print(table)


@annotate_app.command("status")
@option_groups
def status_command(studio: ProjectOptions, read: ReadOptions) -> None:
    """Counts in the project: pending / accepted / corrected / rejected, and per annotator."""
    from annotation.pull import project_status
    from surd_builder.workspace import Workspace

    ws = Workspace.open(studio.workspace)
    status = project_status(ws, studio.client(), studio.project, read.policy, read.full)
    statuses = ("pending", "accepted", "corrected", "rejected")
    table = Table(
        title=f"project {studio.project!r}: {status.tasks:,} tasks ({status.read:,} read now: "
        "new or changed since the last read)",
        title_justify="left",
    )
    table.add_column("annotator")
    for name in statuses:
        table.add_column(name, justify="right")
    table.add_row("all (decision per task)", *(f"{status.by_status.get(s, 0):,}" for s in statuses))
    for annotator, counts in status.by_annotator.items():
        table.add_row(annotator, "", *(f"{counts.get(s, 0):,}" for s in statuses[1:]))
    console.print(table)


@annotate_app.command("serve-images")
def serve_images_command(
    workspace: WorkspaceOption = Path("."),
    host: Annotated[
        str, typer.Option(help="Address to bind (0.0.0.0 exposes it to your network).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8081,
    cors_origin: Annotated[
        list[str],
        typer.Option(
            help="Origin whose pages may read the images in CORS mode, as Label Studio's editor "
            "loads them (scheme://host[:port] as annotators open it; repeatable), or '*'."
        ),
    ] = ["*"],  # noqa: B006 (Typer reads the default; it is never mutated)
) -> None:
    """Serve the workspace's images read-only at /images/<sha256> until Ctrl-C, with the CORS
    headers Label Studio's editor needs to draw them."""
    from annotation.images import ImageServer
    from surd_builder.errors import InputError
    from surd_builder.workspace import Workspace

    ws = Workspace.open(workspace)
    try:
        server = ImageServer(ws, host, port, allowed_origins=cors_origin)
    except OSError as error:
        raise InputError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    typer.echo(f"serving {len(ws.image_index()):,} images at {server.url}/images/<sha256>")
    origins = ", ".join(server.allowed_origins)
    typer.echo(f"CORS: images may be drawn by pages from {origins}")
    typer.echo(f"push with: --image-url-template '{server.url_template}'")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        typer.echo("stopped")
    finally:
        server.server_close()


@annotate_app.command("write-images")
def write_images_command(
    output: Annotated[Path, typer.Option(help="Folder for the files (<sha256>.<ext>).")],
    workspace: WorkspaceOption = Path("."),
    all_images: Annotated[
        bool,
        typer.Option("--all", help="Every sample's image, not only those that need review."),
    ] = False,
    include_auto_rejected: Annotated[
        bool, typer.Option(help="Also the images of samples that screening rejected.")
    ] = False,
    progress: ProgressOption = True,
) -> None:
    """Write images as plain files, for Label Studio's local storage (resumable)."""
    import pyarrow.compute as pc

    from annotation.image_files import write_image_files
    from annotation.push import samples_to_review
    from surd_builder.workspace import Workspace

    ws = Workspace.open(workspace)
    if all_images:
        data = ws.dataset()
        data = data.filter(pc.is_valid(data["image_sha256"]))
    else:
        data = samples_to_review(ws, include_auto_rejected)
    pairs = zip(data["image_sha256"].to_pylist(), data["image_format"].to_pylist(), strict=True)
    report = write_image_files(ws, output, pairs, show_progress=progress)
    console.print(
        f"[bold]write-images[/bold]: {report.written:,} written "
        f"({report.bytes_written / 2**20:,.1f} MiB), {report.present:,} already there, "
        f"{report.images:,} images in {output}"
    )
    console.print(
        "push with: --image-url-template '/data/local-files/?d=<folder under "
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT>/{image_file}' --local-files "
        f"{output.resolve()}"
    )
