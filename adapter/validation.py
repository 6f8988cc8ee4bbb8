"""What a training run shows about itself: held-out losses, validation images, a loss curve.

Held-out losses use fixed randomness (the same noise, timesteps and latent samples at every
evaluation), so a change between two evaluations is the adapter's doing, not the dice's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from adapter.step import (
    CachedSet,
    LossSettings,
    compute_losses,
    draw_step_noise,
    step_generator,
)
from surd_builder.pictures import labelled_grid

DEFAULT_VALIDATION_PROMPTS = (
    "three dogs playing in the snow",
    "a red car parked in front of a blue house",
    "an old man reading a book under a tree",
)
HELD_OUT_SEED = 1234
COMPARE_HEADERS = ("without adapter", "with adapter")


@torch.no_grad()
def held_out_losses(
    adapter: Any,
    unet: Any,
    noise_scheduler: Any,
    held_out: CachedSet,
    settings: LossSettings,
    scaling: float,
    shift: float | None,
    batch_size: int,
    device: Any,
    autocast: Any,
) -> dict[str, float]:
    """Mean of each loss term over the held-out set, sample-weighted."""
    sums = {"quality": 0.0, "distillation": 0.0, "prompt_alignment": 0.0, "total": 0.0}
    count = len(held_out)
    if not count:
        return {}
    # one draw for the whole set, then chunks of it: a sample's noise is the same whatever the
    # batch size, so runs with other --batch-size or process counts report comparable losses
    noise = draw_step_noise(
        step_generator(HELD_OUT_SEED, 0, 0, device), count, held_out.latent_shape,
        noise_scheduler.config.num_train_timesteps, False, device,
    )  # fmt: skip
    for start in range(0, count, batch_size):
        stop = min(start + batch_size, count)
        batch = held_out.batch(torch.arange(start, stop), None, device)
        with autocast():
            terms = compute_losses(
                adapter, unet, noise_scheduler, batch, None, settings, scaling, shift,
                noise.rows(start, stop),
            )  # fmt: skip
        for name in sums:
            sums[name] += float(getattr(terms, name)) * (stop - start)
    return {name: value / count for name, value in sums.items()} if count else {}


@torch.no_grad()
def validation_grid(
    pipeline: Any, prompts: list[str], seed: int, num_inference_steps: int, guidance_scale: float
) -> Any:
    """A PIL grid: one row per prompt (its text above it), without the adapter (left) and with
    it (right) under those column headers, with the same seed, so the difference is the
    adapter's alone. ``pipeline``: a SURAdapterPipeline."""

    def generate(use_adapter: bool) -> list[Any]:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        return pipeline(
            prompts,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generator,
            use_adapter=use_adapter,
        ).images

    without, with_adapter = generate(False), generate(True)
    return labelled_grid(
        list(zip(without, with_adapter, strict=True)), COMPARE_HEADERS, prompts
    ).image


def read_history(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curve(history: list[dict], out: Path) -> Path:
    """A PNG with one panel per loss term: training (per step) and held-out (points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    terms = ["total", "quality", "distillation", "prompt_alignment"]
    train = [row for row in history if row.get("kind") == "train"]
    held = [row for row in history if row.get("kind") == "held_out"]
    figure, axes = plt.subplots(1, len(terms), figsize=(4 * len(terms), 3.2), squeeze=False)
    for axis, term in zip(axes[0], terms, strict=True):
        if train:
            axis.plot([r["step"] for r in train], [r[term] for r in train], lw=1, label="train")
        if held:
            axis.plot(
                [r["step"] for r in held], [r[term] for r in held], "o-", ms=3, label="held-out"
            )
        axis.set_title(term.replace("_", " "))
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    axes[0][0].legend()
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = out.with_name(out.name + ".tmp.png")
    figure.savefig(temp, dpi=100)
    plt.close(figure)
    temp.replace(out)
    return out
