"""``surd generate``: images for prompts with the adapter, optionally beside the same seeds
without it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adapter.validation import COMPARE_HEADERS
from surd_builder.atomic import atomic_path


@dataclass
class GenerateOptions:
    seeds: list[int] = field(default_factory=lambda: [0])
    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    negative_prompt: str = ""
    height: int | None = None
    width: int | None = None
    compare: bool = False
    batch_size: int = 8  # images per pipeline call


def slug(text: str, length: int = 40) -> str:
    words = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return words[:length].rstrip("-") or "prompt"


def generate_images(
    pipeline: Any, prompts: list[str], options: GenerateOptions, use_adapter: bool
) -> list[Any]:
    """One image per (prompt, seed), prompt-major, ``batch_size`` images per pipeline call.
    Each image has its own generator, so it is the same whatever else is in its batch."""
    pairs = [(prompt, seed) for prompt in prompts for seed in options.seeds]
    images = []
    for start in range(0, len(pairs), options.batch_size):
        chunk = pairs[start : start + options.batch_size]
        images += pipeline(
            [prompt for prompt, _ in chunk],
            negative_prompt=[options.negative_prompt] * len(chunk),
            num_inference_steps=options.num_inference_steps,
            guidance_scale=options.guidance_scale,
            height=options.height,
            width=options.width,
            generator=[torch.Generator(device="cpu").manual_seed(seed) for _, seed in chunk],
            use_adapter=use_adapter,
        ).images
    return images


def generate_for_prompt(
    pipeline: Any, prompt: str, options: GenerateOptions, use_adapter: bool
) -> list[Any]:
    """One image per seed of ``prompt``."""
    return generate_images(pipeline, [prompt], options, use_adapter)


def save_png(image: Any, path: Path) -> Path:
    with atomic_path(path) as temp:
        image.save(temp, format="PNG")
    return path


def compare_grid(prompt: str, seeds: list[int], without: list[Any], with_adapter: list[Any]):
    """The prompt on top, "without adapter" / "with adapter" column headers, a row per seed
    (labelled with it); a :class:`surd_builder.pictures.Grid`."""
    from surd_builder.pictures import labelled_grid

    rows = list(zip(without, with_adapter, strict=True))
    return labelled_grid(
        rows, COMPARE_HEADERS, [f"seed {seed}" for seed in seeds], title=prompt, max_label_lines=1
    )


def generate(
    pipeline: Any, prompts: list[str], out: Path, options: GenerateOptions, progress: Any = None
) -> list[Path]:
    """Write ``NNN-<prompt>-seed<S>.png`` per prompt and seed; with ``compare``, also
    ``NNN-<prompt>-compare.png``: a row per seed, without the adapter left, with it right."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for number, prompt in enumerate(prompts):
        stem = f"{number:03d}-{slug(prompt)}"
        images = generate_for_prompt(pipeline, prompt, options, use_adapter=True)
        for seed, image in zip(options.seeds, images, strict=True):
            written.append(save_png(image, out / f"{stem}-seed{seed}.png"))
        if options.compare:
            without = generate_for_prompt(pipeline, prompt, options, use_adapter=False)
            grid = compare_grid(prompt, options.seeds, without, images).image
            written.append(save_png(grid, out / f"{stem}-compare.png"))
        if progress is not None:
            progress(1)
    return written
