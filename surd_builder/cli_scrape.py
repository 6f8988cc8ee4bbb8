"""``surd build scrape ...``: one command per source, sharing the download options."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from surd_builder.cli_build import ProgressOption, WorkspaceOption, print_run_report

scrape_app = typer.Typer(
    help="Download (image, prompt) pairs from a source into the workspace (resumable).",
    no_args_is_help=True,
)

ThreadsOption = Annotated[int, typer.Option(min=1, max=512, help="Concurrent downloads.")]
BatchOption = Annotated[
    int, typer.Option(min=1, max=100_000, help="Items per batch (one Parquet part each).")
]
RetriesOption = Annotated[
    int, typer.Option(min=0, max=20, help="Retries after a timeout, 429 or 5xx.")
]
TimeoutOption = Annotated[float, typer.Option(min=0.1, help="Read timeout per request, seconds.")]
MaxImageOption = Annotated[float, typer.Option(min=0.001, help="Largest image accepted, MiB.")]
RateOption = Annotated[
    float, typer.Option(min=0.0, help="Requests per second per host (0: no limit).")
]
PrivateOption = Annotated[
    bool,
    typer.Option(help="Allow URLs that resolve to private or loopback addresses (e.g. a mirror)."),
]
ForceOption = Annotated[bool, typer.Option(help="Download items already in the workspace again.")]
LimitOption = Annotated[
    int | None, typer.Option(min=1, help="Download at most this many new items.")
]


def _run(stage_factory, workspace: Path, batch_size: int, force: bool, limit, progress) -> None:
    from pipelines.runner import RunOptions, run_stage
    from surd_builder.workspace import Workspace

    ws = Workspace.open(workspace)
    options = RunOptions(batch_size=batch_size, force=force, limit=limit, show_progress=progress)
    print_run_report(run_stage(stage_factory(), ws, options))


def _fetch_options(retries: int, timeout: float, max_image_mb: float, rate: float, private: bool):
    from pipelines.download import FetchOptions

    return FetchOptions(
        read_timeout=timeout,
        retries=retries,
        max_bytes=int(max_image_mb * 2**20),
        per_host_rate=rate,
        allow_private=private,
    )


@scrape_app.command()
def urls(
    file: Annotated[Path, typer.Argument(help="CSV, JSONL or Parquet file with URLs and prompts.")],
    workspace: WorkspaceOption = Path("."),
    url_column: Annotated[str, typer.Option(help="Column with the image URL.")] = "url",
    prompt_column: Annotated[
        str | None,
        typer.Option(
            help="Column with the keyword prompt (default: first of complex_prompt, "
            "prompt, text, caption)."
        ),
    ] = None,
    id_column: Annotated[
        str | None, typer.Option(help="Column with a stable item id (default: the URL).")
    ] = None,
    source: Annotated[str, typer.Option(help="Source name recorded on the samples.")] = "urls",
    threads: ThreadsOption = 16,
    batch_size: BatchOption = 256,
    retries: RetriesOption = 3,
    timeout: TimeoutOption = 30.0,
    max_image_mb: MaxImageOption = 64.0,
    per_host_rate: RateOption = 0.0,
    allow_private: PrivateOption = False,
    force: ForceOption = False,
    limit: LimitOption = None,
    progress: ProgressOption = True,
) -> None:
    """Download images listed in a file of URLs and prompts (like img2dataset's input)."""
    from pipelines.scrape import ScrapeStage
    from pipelines.sources.urls import UrlListSource

    def stage():
        listing = UrlListSource(
            file,
            name=source,
            url_column=url_column,
            prompt_column=prompt_column,
            id_column=id_column,
        )
        fetch = _fetch_options(retries, timeout, max_image_mb, per_host_rate, allow_private)
        return ScrapeStage(listing, fetch, threads=threads)

    _run(stage, workspace, batch_size, force, limit, progress)
