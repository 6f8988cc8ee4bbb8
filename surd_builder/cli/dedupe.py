"""``surd build dedupe``: perceptual hashes, then near-duplicate clusters marked as such."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from surd_builder.cli.build import build_app
from surd_builder.cli.options import (
    EngineOptions,
    ProgressOption,
    WorkspaceOption,
    option_groups,
)
from surd_builder.cli.reports import print_run_report
from surd_builder.config import MAX_BATCH_SIZE, MAX_WORKERS


@build_app.command()
@option_groups
def dedupe(
    ctx: typer.Context,
    workspace: WorkspaceOption = Path("."),
    hash_kind: Annotated[
        str, typer.Option("--hash", help="Perceptual hash: phash, dhash, ahash or whash.")
    ] = "phash",
    hash_size: Annotated[
        int, typer.Option(min=2, max=8, help="Hash side; bits = size squared (8: 64 bits).")
    ] = 8,
    max_distance: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=32,
            help="Near-duplicates differ in at most this many bits (default: 6 for 64-bit "
            "hashes, scaled to the hash's bit count; see README).",
        ),
    ] = None,
    prompts: Annotated[
        str,
        typer.Option(
            help="Also merge samples by keyword prompt: off, exact (equal after normalising "
            "case, spacing and weights) or near (SimHash within --prompt-distance bits)."
        ),
    ] = "off",
    prompt_distance: Annotated[
        int, typer.Option(min=0, max=32, help="With --prompts near: SimHash bits apart, at most.")
    ] = 6,
    keep: Annotated[
        str,
        typer.Option(
            help="Which sample of a cluster is kept, criteria in order (comma list of "
            "reviewed, resolution, clip_score, earliest)."
        ),
    ] = "reviewed,resolution,clip_score,earliest",
    variants: Annotated[
        bool,
        typer.Option(
            help="Also find mirrored and cropped re-posts: the hashes of the mirrored image and "
            "of five fixed crops (centre and corners, 90% of each side) against others' hashes."
        ),
    ] = True,
    verify: Annotated[
        bool,
        typer.Option(
            help="Confirm every hash match with the two images' colour layouts (8x8 mean "
            "colours): flat graphics that share a pHash, e.g. a red square on white and a red "
            "circle on purple, are not merged. --no-verify: the hash alone decides."
        ),
    ] = True,
    colour_distance: Annotated[
        float,
        typer.Option(
            help="With --verify: the largest colour difference a match may have (CIELAB delta E "
            "of the most different of 8x8 cells, once a brightness change is taken out; 0..100; "
            "4 keeps 10,000 distinct flat images apart, see bench/dedupe_quality.py).",
        ),
    ] = 4.0,
    draft: Annotated[
        bool, typer.Option(help="Decode JPEGs at reduced size before hashing (much faster).")
    ] = True,
    workers: Annotated[
        int, typer.Option(min=1, max=MAX_WORKERS, help="Processes hashing and searching.")
    ] = min(4, os.cpu_count() or 1),
    batch_size: Annotated[
        int, typer.Option(min=1, max=MAX_BATCH_SIZE, help="Images per hashing batch.")
    ] = 512,
    dry_run: Annotated[
        bool, typer.Option(help="List the clusters; mark nothing (hashes are still stored).")
    ] = False,
    report: Annotated[
        Path | None, typer.Option(help="Write a PNG grid of the largest clusters here.")
    ] = None,
    show: Annotated[int, typer.Option(min=0, help="Clusters to list.")] = 10,
    progress: ProgressOption = True,
    *,
    engine: EngineOptions,
) -> None:
    """Hash every image, find near-duplicates, keep the best sample of each cluster.

    Each image gets a perceptual hash, the hashes of its mirror image and of five fixed crops,
    and a colour layout. Pairs within --max-distance bits (a mirror or crop hash against another
    image's hash included) are candidates; with --verify (default) their colour layouts must
    also agree. With --engine ray the hashing runs on Ray; the pair search and clustering run
    here (1M hashes take seconds)."""
    from pipelines.dedupe import (
        DEFAULT_MAX_DISTANCE,
        PROMPT_MODES,
        HashStage,
        check_colour_distance,
        check_keep,
    )
    from pipelines.dedupe import dedupe as run_dedupe
    from pipelines.dedupe_grid import cluster_grid
    from pipelines.runner import RunOptions, run_stage
    from surd_builder.errors import InputError
    from surd_builder.workspace import Workspace

    if prompts not in PROMPT_MODES:  # options are checked before the hashing, not after it
        raise InputError(f"--prompts must be one of: {', '.join(PROMPT_MODES)}")
    criteria = check_keep(tuple(c.strip() for c in keep.split(",") if c.strip()))
    check_colour_distance(colour_distance)
    ws = Workspace.open(workspace)
    stage = HashStage(hash_kind, hash_size, draft)
    options = RunOptions(
        batch_size=batch_size,
        workers=workers,
        show_progress=progress,
        **engine.run_fields(ctx, ws.root),
    )
    print_run_report(run_stage(stage, ws, options))
    if max_distance is None:
        max_distance = round(DEFAULT_MAX_DISTANCE * hash_size**2 / 64)
    result = run_dedupe(
        ws,
        stage.label,
        max_distance,
        prompts,
        workers,
        dry_run,
        criteria,
        prompt_distance,
        variants=variants,
        verify=verify,
        colour_distance=colour_distance,
    )
    verb = "would mark" if dry_run else "marked"
    typer.echo(
        f"dedupe: {result.hashed:,} hashed, {len(result.clusters):,} clusters, "
        f"{result.duplicates:,} duplicates ({verb} {result.marked:,} new, "
        f"{'would clear' if dry_run else 'cleared'} {result.cleared:,}) in {result.seconds:.1f} s"
    )
    checked = (
        f", {result.rejected_pairs:,} turned down by the colour check"
        if verify
        else " (unverified)"
    )
    found = f", {result.variant_pairs:,} only through a mirror or crop hash" if variants else ""
    typer.echo(f"  {result.candidate_pairs:,} candidate image pairs{checked}{found}")
    for cluster in result.clusters[:show]:
        typer.echo(
            f"  keep {cluster[0]}  drop {', '.join(cluster[1:6])}"
            + (f" (+{len(cluster) - 6})" if len(cluster) > 6 else "")
        )
    if report is not None:
        written = cluster_grid(ws, result.clusters, report, hash_label=stage.label)
        typer.echo(f"cluster grid: {written}" if written else "no clusters: no grid written")
