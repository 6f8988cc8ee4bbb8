"""``surd build scrape ...``: one command per source, sharing the download options."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from surd_builder.cli.options import (
    Adjusted,
    EngineOptions,
    ProgressOption,
    WorkspaceOption,
    option_groups,
)
from surd_builder.cli.reports import print_run_report

scrape_app = typer.Typer(
    help="Download (image, prompt) pairs from a source into the workspace (resumable).",
    no_args_is_help=True,
)

DEFAULT_WORKERS = min(2, os.cpu_count() or 1)
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class DownloadOptions:
    """How a scrape command downloads, whatever the source: the options they all share."""

    threads: Annotated[
        int, typer.Option(min=1, max=512, help="Concurrent downloads per worker process.")
    ] = 16
    workers: Annotated[
        int, typer.Option(min=1, max=64, help="Worker processes (each with --threads downloads).")
    ] = DEFAULT_WORKERS
    batch_size: Annotated[
        int, typer.Option(min=1, max=100_000, help="Items per batch (one Parquet part each).")
    ] = 256
    retries: Annotated[
        int, typer.Option(min=0, max=20, help="Retries after a timeout, 429 or 5xx.")
    ] = 3
    timeout: Annotated[float, typer.Option(min=0.1, help="Read timeout per request, seconds.")] = (
        30.0
    )
    max_image_mb: Annotated[float, typer.Option(min=0.001, help="Largest image accepted, MiB.")] = (
        64.0
    )
    per_host_rate: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="Requests per second per host (0: no limit), for the whole run: locally it uses "
            "one worker process; on Ray every worker books from one shared limiter.",
        ),
    ] = 0.0
    allow_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-host",
            metavar="HOST[:PORT]",
            help="A host that may resolve to a private or loopback address, e.g. a local mirror "
            "(repeat for more; without a port every port). Link-local and cloud-metadata "
            "addresses are refused whatever is allowed.",
        ),
    ] = None
    allow_private: Annotated[
        bool,
        typer.Option(
            "--allow-private",
            hidden=True,
            help="Deprecated: --allow-host localhost --allow-host 127.0.0.1 --allow-host ::1.",
        ),
    ] = False
    deadline: Annotated[
        float,
        typer.Option(
            min=1.0,
            help="Seconds one request (each redirect hop) may take in all (a server trickling "
            "bytes is cut there, as 'timeout'); --timeout bounds each wait for the next bytes.",
        ),
    ] = 120.0
    resize_max_side: Annotated[
        int | None,
        typer.Option(
            min=16, help="Store images shrunk to this longer side (default: the original)."
        ),
    ] = None
    decode_check: Annotated[
        bool,
        typer.Option(
            help="Decode every image to reject corrupt data, and hash it from that decode for "
            "dedupe (off: header check only, faster; build dedupe hashes the images then)."
        ),
    ] = True
    force: Annotated[bool, typer.Option(help="Download items already in the workspace again.")] = (
        False
    )
    limit: Annotated[
        int | None, typer.Option(min=1, help="Download at most this many new items.")
    ] = None
    progress: ProgressOption = True
    ignore_opt_out: Annotated[
        bool,
        typer.Option(
            "--ignore-opt-out",
            help="Store images whose X-Robots-Tag opts out of AI use or indexing, and ignore "
            "robots.txt. Off by default; use only with the owners' permission.",
        ),
    ] = False
    contact: Annotated[
        str | None,
        typer.Option(
            help="A URL or e-mail for site owners, sent in the user agent: surd/<version> "
            "(+CONTACT) (default: the project's page)."
        ),
    ] = None


def allowed_host_list(allow_host: list[str] | None, allow_private: bool) -> tuple[str, ...]:
    """The checked ``--allow-host`` entries (and the loopback names the deprecated
    ``--allow-private`` stands for)."""
    from pipelines.url_policy import parse_allowed_host
    from surd_builder.errors import InputError

    hosts = list(allow_host or [])
    for entry in hosts:
        try:
            parse_allowed_host(entry)
        except ValueError as error:
            raise InputError(f"--allow-host {error}") from None
    if allow_private:
        typer.echo(
            "warning: --allow-private is deprecated and now allows loopback only; "
            "use --allow-host HOST[:PORT]",
            err=True,
        )
        hosts += LOOPBACK_HOSTS
    return tuple(dict.fromkeys(hosts))


def _scrape(
    ctx: typer.Context,
    source,
    workspace: Path,
    download: DownloadOptions,
    engine: EngineOptions,
    auth_headers: dict[str, str] | None = None,
) -> None:
    """What every scrape command does once it has its source: download, report, warn."""
    from pipelines.download import FetchOptions, user_agent_for
    from surd_builder.errors import InputError

    contact = download.contact
    if contact is not None and not (
        contact.isascii() and contact.isprintable() and contact.strip()
    ):
        raise InputError("--contact must be a printable ASCII URL or e-mail address")
    from pipelines.runner import RunOptions, run_stage
    from pipelines.scrape import ScrapeStage
    from surd_builder.workspace import Workspace

    allowed_hosts = allowed_host_list(download.allow_host, download.allow_private)
    fetch = FetchOptions(
        read_timeout=download.timeout,
        deadline_seconds=download.deadline,
        retries=download.retries,
        max_bytes=int(download.max_image_mb * 2**20),
        per_host_rate=download.per_host_rate,
        allowed_hosts=allowed_hosts,
        respect_opt_out=not download.ignore_opt_out,
        user_agent=user_agent_for(contact),
    )
    stage = ScrapeStage(
        source,
        fetch,
        threads=download.threads,
        auth_headers=auth_headers,
        resize_max_side=download.resize_max_side,
        decode_check=download.decode_check,
    )
    ws = Workspace.open(workspace)
    engine_fields = engine.run_fields(ctx, ws.root)
    workers = download.workers
    if download.per_host_rate > 0 and engine_fields["engine"] == "local":
        workers = 1  # the local rate limit is kept per process: one process keeps it exact
    options = RunOptions(
        batch_size=download.batch_size,
        workers=workers,
        force=download.force,
        limit=download.limit,
        show_progress=download.progress,
        **engine_fields,
    )
    report = run_stage(stage, ws, options)
    print_run_report(report)
    if source.listing_error:
        typer.echo(
            f"warning: listing stopped early at {source.listing_error}; what was listed "
            "was downloaded, and the next run resumes listing there",
            err=True,
        )
    if report.failures_by_reason.get("private-address") and not allowed_hosts:
        typer.echo(
            f"hint: {report.failures_by_reason['private-address']} item(s) are on private or "
            "loopback addresses; for a local mirror allow its host with --allow-host HOST[:PORT]",
            err=True,
        )


@scrape_app.command()
@option_groups
def urls(
    ctx: typer.Context,
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
    *,
    download: DownloadOptions,
    engine: EngineOptions,
) -> None:
    """Download images listed in a file of URLs and prompts (like img2dataset's input)."""
    from pipelines.sources.urls import UrlListSource

    listing = UrlListSource(
        file, name=source, url_column=url_column, prompt_column=prompt_column, id_column=id_column
    )
    _scrape(ctx, listing, workspace, download, engine)


MaxItemsOption = Annotated[
    int | None,
    typer.Option(min=1, help="Stop listing once this many items are listed (all runs together)."),
]
RelistOption = Annotated[
    bool, typer.Option(help="Forget the saved listing cursor and list from the first page.")
]


@scrape_app.command()
@option_groups
def civitai(
    ctx: typer.Context,
    workspace: WorkspaceOption = Path("."),
    endpoint: Annotated[
        str, typer.Option(help="API route: 'images' (/api/v1/images) or 'models' (/api/v1/models).")
    ] = "images",
    model_id: Annotated[int | None, typer.Option(help="Only images of this model.")] = None,
    model_version_id: Annotated[
        int | None, typer.Option(help="Only images of this model version.")
    ] = None,
    username: Annotated[str | None, typer.Option(help="Only images by this user.")] = None,
    base_model: Annotated[
        list[str] | None, typer.Option(help="Only these base models (repeat), e.g. 'SD 1.5'.")
    ] = None,
    query: Annotated[str | None, typer.Option(help="Search text (models endpoint).")] = None,
    types: Annotated[
        list[str] | None, typer.Option(help="Model types (models endpoint), e.g. Checkpoint.")
    ] = None,
    nsfw: Annotated[
        str | None,
        typer.Option(help="NSFW level: None, Soft, Mature or X (images); true/false (models)."),
    ] = None,
    sort: Annotated[
        str | None, typer.Option(help="API sort, e.g. 'Newest', 'Most Reactions'.")
    ] = None,
    period: Annotated[str | None, typer.Option(help="AllTime, Year, Month, Week or Day.")] = None,
    page_size: Annotated[
        int, typer.Option(min=1, max=200, help="Items per API page (images: 200 max, models: 100).")
    ] = 100,
    max_items: MaxItemsOption = None,
    relist: RelistOption = False,
    base_url: Annotated[str, typer.Option(help="API base URL (a mirror, or a test server).")] = (
        "https://civitai.com"
    ),
    source: Annotated[str, typer.Option(help="Source name recorded on the samples.")] = "civitai",
    *,
    download: DownloadOptions,
    engine: EngineOptions,
) -> None:
    """Images with their prompts from Civitai's REST API; token from CIVITAI_API_TOKEN."""
    from pipelines.sources.civitai import CivitaiImages, CivitaiModels, token_headers
    from surd_builder.errors import InputError

    if endpoint not in ("images", "models"):
        raise InputError(f"--endpoint must be 'images' or 'models', not {endpoint!r}")
    if period is not None and period not in ("AllTime", "Year", "Month", "Week", "Day"):
        raise InputError(f"--period must be AllTime, Year, Month, Week or Day, not {period!r}")
    common = {"sort": sort, "period": period, "nsfw": nsfw, "baseModels": base_model}
    if endpoint == "images":
        if nsfw is not None and nsfw not in ("None", "Soft", "Mature", "X"):
            raise InputError(f"--nsfw must be None, Soft, Mature or X for images, not {nsfw!r}")
        filters = {"modelId": model_id, "modelVersionId": model_version_id, "username": username}
        source_class = CivitaiImages
    else:
        filters = {"query": query, "types": types, "username": username}
        source_class = CivitaiModels

    listing = source_class(
        base_url=base_url,
        query={**common, **filters},
        page_size=page_size,
        max_items=max_items,
        relist=relist,
        name=source,
    )
    _scrape(ctx, listing, workspace, download, engine, token_headers(os.environ))


@scrape_app.command()
@option_groups
def lexica(
    ctx: typer.Context,
    query: Annotated[list[str], typer.Argument(help="Search queries; each gives one page.")],
    workspace: WorkspaceOption = Path("."),
    max_items: MaxItemsOption = None,
    relist: RelistOption = False,
    base_url: Annotated[str, typer.Option(help="API base URL.")] = "https://lexica.art",
    source: Annotated[str, typer.Option(help="Source name recorded on the samples.")] = "lexica",
    *,
    download: DownloadOptions,
    engine: EngineOptions,
) -> None:
    """Images with their prompts from Lexica's search API (about 50 per query)."""
    from pipelines.sources.lexica import LexicaSearch

    listing = LexicaSearch(
        query, base_url=base_url, max_items=max_items, relist=relist, name=source
    )
    _scrape(ctx, listing, workspace, download, engine)


@scrape_app.command()
@option_groups
def diffusiondb(
    ctx: typer.Context,
    location: Annotated[
        str, typer.Argument(help="Local DiffusionDB folder, or base URL of a copy (a mirror).")
    ] = "https://huggingface.co/datasets/poloclub/diffusiondb/resolve/main",
    workspace: WorkspaceOption = Path("."),
    parts: Annotated[str, typer.Option(help="Parts to take, e.g. '1-3,7' (1,000 images each).")] = (
        "1"
    ),
    large: Annotated[
        bool, typer.Option(help="The DiffusionDB Large layout (14,000 parts).")
    ] = False,
    source: Annotated[str, typer.Option(help="Source name recorded on the samples.")] = (
        "diffusiondb"
    ),
    *,
    download: Annotated[  # diffusiondb has no --per-host-rate
        DownloadOptions,
        Adjusted(defaults={"threads": 8, "timeout": 60.0}, fixed={"per_host_rate": 0.0}),
    ],
    engine: EngineOptions,
) -> None:
    """Images with prompts from the DiffusionDB layout (part zips + their JSON)."""
    from pipelines.sources.diffusiondb import DiffusionDB, parse_parts

    part_numbers = parse_parts(parts, large)

    listing = DiffusionDB(location, parts=part_numbers, large=large, name=source)
    _scrape(ctx, listing, workspace, download, engine)
