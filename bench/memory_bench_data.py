"""The inputs of bench/train_memory.py: a tiny random Stable Diffusion with latents at real size
(512 px images, 4x64x64 latents) and the tiny test LLM, and an export-shaped Parquet dataset of
512 px JPEGs that differ per sample. Built once under the benchmark's ``--work`` folder and
reused; kept apart from the measuring so the runs read as what they measure."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

RESOLUTION = 512
ROW_GROUP_ROWS = 100  # as surd build export writes them
LLM_LAYER = 2
# the tiny base model: latents at real size, as little compute as diffusers allows around them
VAE = dict(
    in_channels=3, out_channels=3, block_out_channels=(1, 1, 1, 1), layers_per_block=0,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4, norm_num_groups=1, sample_size=RESOLUTION, mid_block_add_attention=False,
)  # fmt: skip
UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=(8, 16, 16),
    layers_per_block=1, norm_num_groups=4, attention_head_dim=8,
    down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
)  # fmt: skip


# ---------------------------------------------------------------- models


def save_models(root: Path) -> tuple[Path, Path]:
    """(base model, LLM) folders, built once and reused."""
    spec = hashlib.sha256(json.dumps([VAE, UNET]).encode()).hexdigest()[:8]
    sd, lm = root / f"sd-512-{spec}", root / "lm"  # another architecture: another folder
    if not (sd / "model_index.json").is_file():
        save_stable_diffusion_512(sd)
    if not (lm / "config.json").is_file():
        from tests.tiny_models import save_tiny_causal_lm

        save_tiny_causal_lm(lm)
    return sd, lm


def save_stable_diffusion_512(directory: Path) -> None:
    """tests.tiny_models.save_tiny_stable_diffusion with latents at real size: a VAE of 4 down
    blocks (512 px -> 4x64x64) of 1 channel and no resnet each, no mid-block attention (4096
    tokens), so a CPU encodes an image in ~30 ms; a UNet of sample_size 64 whose attention
    starts at 16x16 (~0.4 s a step of 8 on a CPU). Written to a temporary folder, renamed."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from tests.tiny_models import _clip_bpe, _clip_text_config

    text_width = 32
    vocab, merges = _clip_bpe()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET, cross_attention_dim=text_width)
    text_encoder = CLIPTextModel(CLIPTextConfig(**_clip_text_config(vocab, text_width)))
    vae = AutoencoderKL(**VAE)
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDPMScheduler(steps_offset=1, clip_sample=False), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    temp = directory.with_name(directory.name + ".partial")
    shutil.rmtree(temp, ignore_errors=True)
    pipeline.save_pretrained(temp)
    temp.rename(directory)


# ---------------------------------------------------------------- data


def make_image(index: int) -> bytes:
    """A 512x512 JPEG (quality 90) of its own per index: a random 8x8 RGB image upscaled
    bilinearly, 3-6 filled shapes, a little noise (so it compresses like a photo: ~45 KB)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng([19, index])
    small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    image = small.resize((RESOLUTION, RESOLUTION), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 7))):
        x, y = (int(v) for v in rng.integers(0, RESOLUTION - 64, 2))
        width, height = (int(v) for v in rng.integers(32, 256, 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x, y, x + width, y + height], fill=colour)
    noisy = np.asarray(image, dtype=np.int16) + rng.integers(-7, 8, (RESOLUTION, RESOLUTION, 3))
    image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def make_prompts(index: int) -> tuple[str, str]:
    """(narrative, keyword) prompts of their own per index, from the tiny tokenizers' words."""
    from tests.tiny_models import PROMPT_WORDS

    rng = np.random.default_rng([20, index])
    narrative = " ".join(rng.choice(PROMPT_WORDS, int(rng.integers(12, 30))))
    keyword = " , ".join(rng.choice(PROMPT_WORDS, int(rng.integers(8, 20))))
    return f"{narrative} {index}", keyword


def export_schema() -> Any:
    """The four columns surd train reads, typed as the export types them, with the
    ``huggingface`` metadata ``surd build export`` writes (surd_builder.schema.export_schema's
    recipe on these columns)."""
    import pyarrow as pa

    from surd_builder.schema import IMAGE_FIELD, SAMPLE_SCHEMA, hf_features

    fields = [SAMPLE_SCHEMA.field("narrative_prompt"), SAMPLE_SCHEMA.field("complex_prompt"),
              IMAGE_FIELD, SAMPLE_SCHEMA.field("image_sha256")]  # fmt: skip
    schema = pa.schema(fields)
    features = hf_features(schema)
    return schema.with_metadata(
        {"huggingface": json.dumps({"info": {"features": features.to_dict()}})}
    )


def make_dataset(folder: Path, samples: int, shard_rows: int) -> Path:
    """``folder`` as an export (``data/train-*.parquet``), written once: a ``.complete`` marker
    names the sample count, a folder without it is written again."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    marker = folder / ".complete"
    if marker.is_file() and marker.read_text().strip() == str(samples):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    data = folder / "data"
    data.mkdir(parents=True)
    schema = export_schema()
    shards = max(1, -(-samples // shard_rows))
    started, done = time.monotonic(), 0
    print(f"writing {samples:,} samples of {RESOLUTION} px into {folder} ...", flush=True)
    for shard in range(shards):
        rows = range(shard * shard_rows, min(samples, (shard + 1) * shard_rows))
        path = data / f"train-{shard:05d}-of-{shards:05d}.parquet"
        with pq.ParquetWriter(path, schema) as writer:
            for start in range(rows.start, rows.stop, ROW_GROUP_ROWS):
                chunk = range(start, min(rows.stop, start + ROW_GROUP_ROWS))
                images = [make_image(index) for index in chunk]
                prompts = [make_prompts(index) for index in chunk]
                table = pa.table(
                    {
                        "narrative_prompt": [narrative for narrative, _ in prompts],
                        "complex_prompt": [keyword for _, keyword in prompts],
                        "image": [
                            {"bytes": image, "path": f"{index:08d}.jpg"}
                            for index, image in zip(chunk, images, strict=True)
                        ],
                        "image_sha256": [hashlib.sha256(image).hexdigest() for image in images],
                    },  # fmt: skip
                    schema=schema,
                )
                writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
                done += len(chunk)
                if done % 1000 == 0 or done == samples:
                    elapsed = time.monotonic() - started
                    print(f"  {done:,}/{samples:,} samples ({elapsed:.0f} s)", flush=True)
    marker.write_text(f"{samples}\n")
    return folder
