"""``surd generate`` and ``surd eval``: use and measure a trained SUR-adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

BaseModelOption = Annotated[
    str, typer.Option(help="Stable Diffusion 1.x/2.x in diffusers layout: a folder or a hub id.")
]
AdapterOption = Annotated[
    Path,
    typer.Option(help="The adapter: a `surd train` output, a checkpoint-N folder or any "
                 "save_pretrained folder."),
]  # fmt: skip
DeviceOption = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
DtypeOption = Annotated[
    str, typer.Option(help="auto (bf16/fp16 on GPU, fp32 on CPU), float32, float16, bfloat16.")
]
StepsOption = Annotated[int, typer.Option(min=1, help="Denoising steps.")]
GuidanceOption = Annotated[float, typer.Option(min=0.0, help="Classifier-free guidance scale.")]
SchedulerOption = Annotated[
    str, typer.Option(help="dpm, ddim, euler, euler-a, pndm, or default (the base model's).")
]
SizeOption = Annotated[
    int | None, typer.Option(min=8, help="Image side in pixels (default: the model's).")
]
ProgressOption = Annotated[bool, typer.Option(help="Show progress bars.")]


def generate(
    prompts: Annotated[list[str], typer.Argument(help="Narrative prompts, one image set each.")],
    base_model: BaseModelOption,
    adapter: AdapterOption,
    output: Annotated[Path, typer.Option(help="Folder for the PNGs.")] = Path("surd-images"),
    seed: Annotated[
        list[int] | None, typer.Option(help="Seed, repeatable: one image per seed (default 0).")
    ] = None,
    compare: Annotated[
        bool, typer.Option(help="Also write a grid: the same seeds without | with the adapter.")
    ] = False,
    negative_prompt: Annotated[str, typer.Option(help="Negative prompt.")] = "",
    batch_size: Annotated[int, typer.Option(min=1, help="Images per pipeline call.")] = 8,
    steps: StepsOption = 30,
    guidance_scale: GuidanceOption = 7.5,
    scheduler: SchedulerOption = "dpm",
    height: SizeOption = None,
    width: SizeOption = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    progress: ProgressOption = True,
) -> None:
    """Generate images for narrative prompts with the SUR-adapter."""
    from surd_builder.models import check_hub_model

    check_hub_model(base_model, "base model")  # an unreachable hub: one line before torch loads
    from adapter.generate import GenerateOptions
    from adapter.generate import generate as run_generate
    from adapter.pipeline import load_pipeline
    from surd_builder.progress import progress_bar

    pipeline = load_pipeline(base_model, adapter, device, dtype, scheduler)
    options = GenerateOptions(
        seeds=seed or [0], num_inference_steps=steps, guidance_scale=guidance_scale,
        negative_prompt=negative_prompt, height=height, width=width, compare=compare,
        batch_size=batch_size,
    )  # fmt: skip
    with progress_bar("generating", total=len(prompts), enabled=progress) as advance:
        written = run_generate(pipeline, prompts, output, options, advance)
    typer.echo(f"wrote {len(written)} image(s) to {output}")


def evaluate(
    base_model: BaseModelOption,
    adapter: AdapterOption,
    clip_model: Annotated[
        str, typer.Option(help="CLIP model that judges the images: a folder or a hub id.")
    ] = "openai/clip-vit-large-patch14",
    output: Annotated[Path, typer.Option(help="Folder for metrics, report and images.")] = Path(
        "surd-eval"
    ),
    prompts: Annotated[
        list[Path] | None,
        typer.Option(
            help="A TOML prompt suite in the shipped one's format, added to it (repeatable)."
        ),
    ] = None,  # fmt: skip
    default_prompts: Annotated[
        bool, typer.Option(help="Include the shipped suite (action, colour, counting).")
    ] = True,
    clip_dtype: Annotated[
        str, typer.Option(help="dtype of the judging CLIP; float32 keeps scores comparable.")
    ] = "float32",
    data: Annotated[
        str | None,
        typer.Option(help="Also evaluate narrative prompts of this dataset's --split."),
    ] = None,
    split: Annotated[str, typer.Option(help="Split of --data.")] = "test",
    data_prompts: Annotated[int, typer.Option(min=0, help="Prompts taken from --data.")] = 50,
    reference: Annotated[
        Path | None,
        typer.Option(help="Reference images for FID/KID: an image folder or Parquet (export)."),
    ] = None,
    reference_limit: Annotated[
        int, typer.Option(min=2, help="Reference images read at most.")
    ] = 5000,
    seed: Annotated[
        list[int] | None, typer.Option(help="Seeds per prompt, repeatable (default 0 and 1).")
    ] = None,
    steps: StepsOption = 25,
    guidance_scale: GuidanceOption = 7.5,
    scheduler: SchedulerOption = "dpm",
    height: SizeOption = None,
    width: SizeOption = None,
    batch_size: Annotated[
        int, typer.Option(min=1, help="Images per pipeline call (all seeds of a prompt together).")
    ] = 8,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    progress: ProgressOption = True,
) -> None:
    """Generate with and without the adapter under the same seeds and compare: CLIP score,
    semantic accuracy per category, CLIP-IQA, FID/KID against reference images."""
    from surd_builder.models import check_hub_model

    check_hub_model(clip_model, "CLIP model")  # an unreachable hub: one line before torch loads
    check_hub_model(base_model, "base model")
    from adapter.data import narrative_prompts
    from adapter.evaluate import EvalCase, load_suite, reference_features
    from adapter.evaluate import evaluate as run_evaluate
    from adapter.generate import GenerateOptions
    from adapter.pipeline import load_pipeline
    from surd_builder.clip import ClipScorer
    from surd_builder.errors import InputError
    from surd_builder.progress import progress_bar

    cases = load_suite() if default_prompts else []
    for path in prompts or []:
        cases += load_suite(path)
    if data is not None:
        narratives = narrative_prompts(data, split)
        if narratives is None:
            raise InputError(f"--data {data} has no {split!r} split")
        cases += [EvalCase(prompt, "test") for prompt in narratives[:data_prompts]]
    if not cases:
        raise InputError("nothing to evaluate: no prompts (--no-default-prompts without others)")
    scorer = ClipScorer(clip_model, device=device, dtype=clip_dtype)
    scorer.load()  # a wrong model fails before any generating
    references = reference_features(reference, reference_limit, scorer) if reference else None
    pipeline = load_pipeline(base_model, adapter, device, dtype, scheduler)
    options = GenerateOptions(
        seeds=seed or [0, 1], num_inference_steps=steps, guidance_scale=guidance_scale,
        height=height, width=width, batch_size=batch_size,
    )  # fmt: skip
    with progress_bar("evaluating", total=len(cases), enabled=progress) as advance:
        settings = {
            "base_model": base_model, "adapter": str(adapter), "clip_model": clip_model,
            "clip_dtype": clip_dtype, "scheduler": scheduler, "dtype": dtype,
            "reference": None if reference is None else str(reference),
        }  # fmt: skip
        result = run_evaluate(
            pipeline, scorer, cases, output, options, references, advance, settings
        )
    typer.echo(f"{result.cases} prompts x {len(options.seeds)} seeds, with and without the adapter")
    names = list(result.metrics["with"].keys())
    for name in names:
        without, with_adapter = result.metrics["without"][name], result.metrics["with"][name]
        if without is not None and with_adapter is not None:
            typer.echo(f"  {name:<18} {without:>9.4f} -> {with_adapter:>9.4f}")
    typer.echo(f"metrics: {result.metrics_file}\nreport: {result.report}")
