"""``surd build dedupe``: perceptual hashes and/or CLIP image embeddings, then near-duplicate
clusters marked as such."""

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
    given_on_command_line,
    option_groups,
)
from surd_builder.cli.reports import print_run_report
from surd_builder.config import MAX_BATCH_SIZE, MAX_WORKERS

# ``--by``: what finds pairs (``embedding`` alone runs no hashing)
PASSES = ("hash", "embedding")
# --clip-model, --min-cosine, --index and --device: only with --by embedding
EMBEDDING_OPTIONS = ("clip_model", "min_cosine", "index", "device")


def parse_by(value: str) -> tuple[str, ...]:
    """``--by``'s comma list, checked (one line, before any work)."""
    from surd_builder.errors import InputError

    passes = tuple(dict.fromkeys(p.strip() for p in value.split(",") if p.strip()))
    if not passes or any(p not in PASSES for p in passes):
        raise InputError(f"--by takes a comma list of: {', '.join(PASSES)} (got {value!r})")
    return passes


@build_app.command()
@option_groups
def dedupe(
    ctx: typer.Context,
    workspace: WorkspaceOption = Path("."),
    by: Annotated[
        str,
        typer.Option(
            help="What finds near-duplicates, a comma list: hash (perceptual hashes, the options "
            "below) and/or embedding (CLIP image embeddings at least --min-cosine alike, for "
            "re-posts a hash misses: new crops, overlays, recolouring). --by embedding alone "
            "hashes nothing; --by hash,embedding joins the pairs of both."
        ),
    ] = "hash",
    clip_model: Annotated[
        str,
        typer.Option(
            help="With --by embedding: the CLIP model (path or hub id), e.g. "
            "openai/clip-vit-large-patch14. Embeddings are cached in the workspace per model."
        ),
    ] = "",
    min_cosine: Annotated[
        float,
        typer.Option(
            help="With --by embedding: images at least this cosine alike are duplicates (0..1). "
            "Start at 0.97 (re-encoded, resized, slightly cropped or recoloured copies); "
            "0.93-0.95 also catches heavier crops and overlays but starts to join distinct "
            "images of one scene: check the clusters (--report) before going lower."
        ),
    ] = 0.97,
    index: Annotated[
        str,
        typer.Option(
            help="With --by embedding: exact (every pair, numpy: 57k images in tens of seconds) or "
            "usearch (approximate HNSW index for millions; pip install 'surd\\[ann]')."
        ),
    ] = "exact",
    device: Annotated[
        str,
        typer.Option(
            help="With --by embedding: where CLIP runs: auto (a CUDA GPU when present, else "
            "CPU), cpu, cuda, cuda:N or mps."
        ),
    ] = "auto",
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
    """Find near-duplicates by perceptual hash (and/or CLIP embedding), keep the best sample
    of each cluster.

    --by hash (default): each image has a perceptual hash, the hashes of its mirror image and
    of five fixed crops, and a colour layout, computed when it was collected (images without
    them are hashed here first). Pairs within --max-distance bits (a mirror or crop hash against
    another image's hash included) are candidates; with --verify (default) their colour layouts
    must also agree. With --engine ray the hashing runs on Ray; the pair search and clustering
    run here (1M hashes take seconds). The hash options (--hash, --max-distance, --verify,
    --variants, --draft...) apply to --by hash only.

    --by embedding (with --clip-model): pairs whose CLIP image embeddings are at least
    --min-cosine alike (start at 0.97; 0.93-0.95 for heavier edits, checked with --report);
    they are marked duplicate_match 'clip' where no hash matched. --by hash,embedding: both.
    Each run replaces the marks with its own clusters."""
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

    # options are checked before the hashing and embedding, not after them
    passes = parse_by(by)
    if prompts not in PROMPT_MODES:
        raise InputError(f"--prompts must be one of: {', '.join(PROMPT_MODES)}")
    criteria = check_keep(tuple(c.strip() for c in keep.split(",") if c.strip()))
    check_colour_distance(colour_distance)
    embedding = None
    if "embedding" in passes:
        embedding = embedding_pass(clip_model, min_cosine, index, device)
    else:
        explicit = given_on_command_line(ctx)
        given = ["--" + name.replace("_", "-") for name in EMBEDDING_OPTIONS if name in explicit]
        if given:
            raise InputError(f"{', '.join(given)}: only with --by embedding (or hash,embedding)")
    ws = Workspace.open(workspace)
    stage = HashStage(hash_kind, hash_size, draft)
    if "hash" in passes:
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
        stage.label if "hash" in passes else None,
        max_distance,
        prompts,
        workers,
        dry_run,
        criteria,
        prompt_distance,
        variants=variants,
        verify=verify,
        colour_distance=colour_distance,
        embedding=embedding,
        show_progress=progress,
    )
    verb = "would mark" if dry_run else "marked"
    hashed = f"{result.hashed:,} hashed, " if "hash" in passes else ""
    typer.echo(
        f"dedupe: {hashed}{len(result.clusters):,} clusters, "
        f"{result.duplicates:,} duplicates ({verb} {result.marked:,} new, "
        f"{'would clear' if dry_run else 'cleared'} {result.cleared:,}) in {result.seconds:.1f} s"
    )
    if "hash" in passes:
        checked = (
            f", {result.rejected_pairs:,} turned down by the colour check"
            if verify
            else " (unverified)"
        )
        found = f", {result.variant_pairs:,} only through a mirror or crop hash" if variants else ""
        typer.echo(f"  {result.candidate_pairs:,} candidate image pairs{checked}{found}")
    if embedding is not None:
        only = f", {result.embedding_only_pairs:,} found by no hash" if "hash" in passes else ""
        typer.echo(
            f"  {result.embedding_pairs:,} embedding pairs (cosine >= {embedding.min_cosine:g}, "
            f"{embedding.index}){only}"
        )
    for cluster in result.clusters[:show]:
        typer.echo(
            f"  keep {cluster[0]}  drop {', '.join(cluster[1:6])}"
            + (f" (+{len(cluster) - 6})" if len(cluster) > 6 else "")
        )
    if report is not None:
        label = stage.label if "hash" in passes else None
        written = cluster_grid(ws, result.clusters, report, hash_label=label)
        typer.echo(f"cluster grid: {written}" if written else "no clusters: no grid written")


def embedding_pass(clip_model: str, min_cosine: float, index: str, device: str):
    """The ``--by embedding`` pass, every option checked (one line each) before any work: the
    CLIP model is not loaded here, only looked up (a missing folder, an unreachable hub)."""
    from pipelines.embedding_dedupe import EmbeddingPass, check_index, check_min_cosine
    from surd_builder.clip import ClipScorer
    from surd_builder.errors import InputError
    from surd_builder.models import check_hub_model

    if not clip_model:
        raise InputError(
            "--by embedding needs --clip-model (a CLIP path or hub id, e.g. "
            "openai/clip-vit-large-patch14)"
        )
    check_min_cosine(min_cosine)
    check_index(index)
    check_hub_model(clip_model, "CLIP model")
    return EmbeddingPass(ClipScorer(clip_model, device=device), min_cosine, index)
