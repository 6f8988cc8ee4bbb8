"""What a run leaves in ``--output`` besides checkpoints and history: validation image grids,
the trained adapter, ``loss-curve.png`` and ``train-summary.json``. Each file is written under
a temporary name and moved into place, so a kill never leaves a half one."""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from adapter.train_config import TrainConfig, TrainReport


def save_validation_images(
    accelerator: Any, config: TrainConfig, parts: Any, unet: Any, adapter: Any, step: int
) -> None:
    """``validation/step-N.png`` (and TensorBoard's copy): the validation prompts drawn with the
    adapter as it is at ``step``, from the same seed every time so the grids compare."""
    from adapter.pipeline import pipeline_from_parts
    from adapter.validation import validation_grid

    model = accelerator.unwrap_model(adapter)
    pipeline = pipeline_from_parts(parts, accelerator.unwrap_model(unet), model)
    model.eval()
    with accelerator.autocast():
        grid = validation_grid(
            pipeline, list(config.validation_prompts), config.seed,
            config.validation_inference_steps, config.validation_guidance_scale,
        )  # fmt: skip
    model.train()
    out = config.output / "validation" / f"step-{step:06d}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = out.with_name(out.name + ".tmp.png")
    grid.save(temp)
    temp.replace(out)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")


def save_final_adapter(adapter: Any, output: Path) -> None:
    """``save_pretrained`` into a temporary folder, then each file moved into ``output``."""
    temp = output / ".adapter.partial"
    shutil.rmtree(temp, ignore_errors=True)
    adapter.save_pretrained(temp)
    for file in temp.iterdir():
        file.replace(output / file.name)
    temp.rmdir()


def write_summary(report: TrainReport, config: TrainConfig) -> None:
    """``loss-curve.png`` from the history, and the report as ``train-summary.json``."""
    from adapter.validation import plot_loss_curve, read_history
    from surd_builder.atomic import write_json_atomic

    plot_loss_curve(read_history(config.output / "history.jsonl"), config.output / "loss-curve.png")
    summary = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(report).items()}
    write_json_atomic(summary, config.output / "train-summary.json")
