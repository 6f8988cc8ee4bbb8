"""``surd build takedown``: remove samples on request and keep them out of later scrapes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from surd_builder.cli.build import build_app
from surd_builder.cli.options import WorkspaceOption


@build_app.command()
def takedown(
    workspace: WorkspaceOption = Path("."),
    url: Annotated[
        list[str] | None, typer.Option(help="Image or page URL to remove (repeatable).")
    ] = None,
    source_item: Annotated[
        list[str] | None,
        typer.Option(help="SOURCE:ITEM_ID to remove, e.g. civitai:123456 (repeatable)."),
    ] = None,
    sample_id: Annotated[list[str] | None, typer.Option(help="Sample id (repeatable).")] = None,
    image: Annotated[
        list[Path] | None,
        typer.Option(
            help="An image file: samples that look the same (pHash) are removed, "
            "re-encodes and resizes included (repeatable)."
        ),
    ] = None,  # fmt: skip
    from_file: Annotated[
        Path | None,
        typer.Option(help="A file of lines 'KIND VALUE' (url, source-item, sample-id, image)."),
    ] = None,
    reason: Annotated[
        str, typer.Option(help="Why, as recorded with each removal (e.g. 'owner request').")
    ] = "takedown request",
    list_removed: Annotated[
        bool, typer.Option("--list", help="Show what was removed and why; change nothing.")
    ] = False,
) -> None:
    """Remove samples (export leaves them out) and keep them out of every later scrape."""
    from pipelines.takedown import (
        make_request,
        now_iso,
        read_removed,
        read_request_file,
        read_requests,
        take_down,
    )
    from surd_builder.errors import InputError
    from surd_builder.workspace import Workspace

    ws = Workspace.open(workspace)
    if list_removed:
        removed = read_removed(ws)
        for row in removed:
            typer.echo(
                f"{row['sample_id']}  {row['removed_at']}  {row['kind']} {row['label']}  "
                f"({row['reason']})"
            )
        typer.echo(f"{len(removed)} sample(s) removed by {len(read_requests(ws))} request(s)")
        return
    stamp = now_iso()
    given = [
        *(("url", value) for value in url or []),
        *(("source-item", value) for value in source_item or []),
        *(("sample-id", value) for value in sample_id or []),
        *(("image", str(value)) for value in image or []),
    ]
    requests = [make_request(kind, value, reason, stamp) for kind, value in given]
    if from_file is not None:
        requests += read_request_file(from_file, reason, stamp)
    if not requests:
        raise InputError("nothing to take down: give --url, --source-item, --sample-id, --image "
                         "or --from-file (or --list)")  # fmt: skip
    report = take_down(ws, requests)
    for sample, request in report.removed:
        typer.echo(f"removed {sample}  ({request.kind} {request.label})")
    typer.echo(
        f"{report.requests} request(s): {len(report.removed)} sample(s) removed, "
        f"{report.already_removed} already removed, {len(report.unmatched)} matched nothing yet "
        "(kept: a later scrape will not bring them in)"
    )
