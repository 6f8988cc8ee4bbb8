"""The tiny offline models load back through the normal from_pretrained route and run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import torch
import transformers
from PIL import Image

from tests.tiny_models import (
    SDXL_POOLED_WIDTH,
    SDXL_TEXT_WIDTHS,
    SDXL_TIME_EMBED_DIM,
    save_tiny_blip,
    save_tiny_causal_lm,
    save_tiny_clip,
    save_tiny_sd2,
    save_tiny_sdxl,
)

PROMPTS = ["a red fox", "two cute cats sitting in a snowy forest , 8k , artstation", "castle"]


def images() -> list[Image.Image]:
    """Two images of different sizes and colours (the processors resize to 32x32)."""
    return [Image.new("RGB", (40, 24), (200, 30, 30)), Image.new("RGB", (16, 50), (10, 100, 200))]


def test_causal_lm_reloads_with_left_padding_and_chat_template(tmp_path: Path) -> None:
    directory = save_tiny_causal_lm(tmp_path / "lm", chat_template=True)
    assert directory == tmp_path / "lm"

    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory)
    assert isinstance(model, transformers.LlamaForCausalLM)
    assert tokenizer.padding_side == "left"
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 2, 3)
    assert model.config.pad_token_id == model.generation_config.pad_token_id == 0

    ids = tokenizer(PROMPTS[1])["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == PROMPTS[1]

    messages = [
        {"role": "system", "content": "you write prompts"},
        {"role": "user", "content": "a fox"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<s> system : you write prompts </s> <s> user : a fox </s> <s> assistant :"


def test_causal_lm_batched_greedy_equals_single(tmp_path: Path) -> None:
    directory = save_tiny_causal_lm(tmp_path / "lm")
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory)
    assert tokenizer.chat_template is None

    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert (batch["attention_mask"][:, 0] == 0).any()  # left padding actually happened
    with torch.inference_mode():
        batched = model.generate(**batch, max_new_tokens=8, do_sample=False)
    new_tokens = batched[:, batch["input_ids"].shape[1] :]
    assert new_tokens.shape == (3, 8)
    for row, prompt in zip(new_tokens, PROMPTS, strict=True):
        single_batch = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            single = model.generate(**single_batch, max_new_tokens=8, do_sample=False)
        single = single[0, single_batch["input_ids"].shape[1] :]
        # A row that hit </s> early is padded afterwards in the batch; otherwise identical ids.
        assert row[: len(single)].tolist() == single.tolist()
        assert (row[len(single) :] == tokenizer.pad_token_id).all()
    decoded = tokenizer.batch_decode(batched, skip_special_tokens=True)
    assert all(text.startswith(prompt) for text, prompt in zip(decoded, PROMPTS, strict=True))


def test_causal_lm_is_deterministic(tmp_path: Path) -> None:
    first = save_tiny_causal_lm(tmp_path / "one") / "model.safetensors"
    second = save_tiny_causal_lm(tmp_path / "two") / "model.safetensors"
    assert first.read_bytes() == second.read_bytes()


def test_blip_reloads_and_captions(tmp_path: Path) -> None:
    directory = save_tiny_blip(tmp_path / "blip")
    processor = transformers.AutoProcessor.from_pretrained(directory)
    model = transformers.AutoModelForImageTextToText.from_pretrained(directory)
    assert isinstance(processor, transformers.BlipProcessor)
    assert isinstance(model, transformers.BlipForConditionalGeneration)

    inputs = processor(images=images(), return_tensors="pt")
    assert inputs["pixel_values"].shape == (2, 3, 32, 32)
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=6)
    assert output.shape[0] == 2 and output.shape[1] <= 7  # [DEC] + at most 6 new tokens
    captions = processor.batch_decode(output, skip_special_tokens=True)
    assert len(captions) == 2
    assert all(isinstance(caption, str) and caption for caption in captions)
    assert not any("[DEC]" in caption for caption in captions)


def test_clip_reloads_and_embeds(tmp_path: Path) -> None:
    directory = save_tiny_clip(tmp_path / "clip")
    processor = transformers.AutoProcessor.from_pretrained(directory)
    model = transformers.CLIPModel.from_pretrained(directory)
    assert isinstance(processor, transformers.CLIPProcessor)

    text = processor(
        text=["a red cat", "the dog and the fox , 8k"],
        padding=True,
        truncation=True,
        max_length=77,
        return_tensors="pt",
    )
    with torch.inference_mode():
        image_out = model.get_image_features(**processor(images=images(), return_tensors="pt"))
        text_out = model.get_text_features(**text)
    # transformers 5 returns an output object; the projected embeddings are pooler_output.
    for out in (image_out, text_out):
        assert isinstance(out, transformers.modeling_outputs.BaseModelOutputWithPooling)
        assert out.pooler_output.shape == (2, 16)
        assert torch.isfinite(out.pooler_output).all()
    assert image_out.last_hidden_state.shape == (2, 17, 32)  # CLS + 4x4 patches
    assert processor.tokenizer.decode(text["input_ids"][0], skip_special_tokens=True) == "a red cat"


def generate_32x32(pipeline: Any) -> np.ndarray:
    """Two denoising steps of a 32x32 image from "a red fox", seeded, as a numpy batch."""
    pipeline.set_progress_bar_config(disable=True)
    out = pipeline(
        "a red fox",
        num_inference_steps=2,
        height=32,
        width=32,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    return out.images


def test_sdxl_reloads_encodes_both_towers_and_generates(tmp_path: Path) -> None:
    directory = save_tiny_sdxl(tmp_path / "sdxl")
    assert directory == tmp_path / "sdxl"
    index = json.loads((directory / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["force_zeros_for_empty_prompt"] is True
    for part in ["tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "vae", "unet"]:
        assert (directory / part).is_dir(), part

    pipeline = diffusers.StableDiffusionXLPipeline.from_pretrained(directory)
    assert isinstance(pipeline.text_encoder, transformers.CLIPTextModel)
    assert isinstance(pipeline.text_encoder_2, transformers.CLIPTextModelWithProjection)
    assert pipeline.text_encoder.config.hidden_size == 32
    assert pipeline.text_encoder_2.config.hidden_size == 48
    assert pipeline.text_encoder_2.config.projection_dim == SDXL_POOLED_WIDTH == 24
    # SDXL reads hidden_states[-2]: with one layer that would be the bare embeddings.
    assert pipeline.text_encoder.config.num_hidden_layers >= 2
    assert pipeline.text_encoder_2.config.num_hidden_layers >= 2
    unet = pipeline.unet.config
    assert unet.addition_embed_type == "text_time"
    assert unet.cross_attention_dim == sum(SDXL_TEXT_WIDTHS) == 80
    assert unet.addition_time_embed_dim == SDXL_TIME_EMBED_DIM
    assert unet.projection_class_embeddings_input_dim == 24 + 6 * SDXL_TIME_EMBED_DIM
    assert pipeline.vae.config.force_upcast is True
    assert pipeline.vae.config.scaling_factor == 0.13025
    assert pipeline.scheduler.config.prediction_type == "epsilon"
    assert pipeline.scheduler.config.timestep_spacing == "leading"

    with torch.inference_mode():
        embeds, negative, pooled, negative_pooled = pipeline.encode_prompt(
            ["a red fox", "castle"], device="cpu", do_classifier_free_guidance=True
        )
    assert embeds.shape == negative.shape == (2, 77, 80)
    assert pooled.shape == negative_pooled.shape == (2, 24)
    assert torch.isfinite(embeds).all() and torch.isfinite(pooled).all()
    # force_zeros_for_empty_prompt: no negative prompt means all-zero negative embeddings.
    assert not negative.any() and not negative_pooled.any()

    image = generate_32x32(pipeline)
    assert image.shape == (1, 32, 32, 3)
    assert np.isfinite(image).all()


def test_sd2_reloads_with_v_prediction_and_generates(tmp_path: Path) -> None:
    directory = save_tiny_sd2(tmp_path / "sd2")
    assert directory == tmp_path / "sd2"
    pipeline = diffusers.StableDiffusionPipeline.from_pretrained(directory)
    assert type(pipeline) is diffusers.StableDiffusionPipeline
    assert pipeline.scheduler.config.prediction_type == "v_prediction"
    assert pipeline.text_encoder.config.hidden_size == 64
    assert pipeline.text_encoder.config.num_hidden_layers == 2
    assert pipeline.unet.config.cross_attention_dim == 64
    assert pipeline.unet.config.use_linear_projection is True
    assert tuple(pipeline.unet.config.attention_head_dim) == (4, 8)

    with torch.inference_mode():
        embeds, _ = pipeline.encode_prompt(
            "a red fox", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
        )
    assert embeds.shape == (1, 77, 64)

    image = generate_32x32(pipeline)
    assert image.shape == (1, 32, 32, 3)
    assert np.isfinite(image).all()
