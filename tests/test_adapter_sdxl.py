"""The adapter on Stable Diffusion XL and 2.x: tiny pipelines built from configs in code (two
text encoders, one with a projection, and a ``text_time`` UNet for SDXL; v-prediction and wider
text states for 2.x), trained, resumed, used and measured end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from adapter.frozen_inputs import (
    CropGeometry,
    TextEmbeddings,
    mirrored,
    prepare_image,
    split_text_record,
)
from adapter.model import SURAdapter
from adapter.pipeline import SURAdapterXLPipeline, load_pipeline
from adapter.stable_diffusion import (
    detect_family,
    load_stable_diffusion,
    stable_diffusion_pipeline_class,
    stable_diffusion_xl_pipeline_class,
)
from adapter.step import CachedSet, LossSettings, compute_losses
from adapter.train import TrainConfig, train
from surd_builder.cli import app
from surd_builder.errors import InputError
from tests.conftest import write_demo_dataset
from tests.tiny_models import (
    SDXL_POOLED_WIDTH,
    SDXL_TEXT_WIDTHS,
    save_tiny_causal_lm,
    save_tiny_clip,
    save_tiny_sd2,
    save_tiny_sdxl,
    save_tiny_stable_diffusion,
)

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

SMALL_ADAPTER = dict(adapter_heads=4, adapter_feedforward=64, adapter_mlp=64)
XL_WIDTH = sum(SDXL_TEXT_WIDTHS)


@dataclass
class Models:
    sdxl: Path
    sd2: Path
    sd: Path
    llm: Path
    clip: Path
    data: Path
    cache: Path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Models:
    root = tmp_path_factory.mktemp("families")
    return Models(
        sdxl=save_tiny_sdxl(root / "sdxl"),
        sd2=save_tiny_sd2(root / "sd2"),
        sd=save_tiny_stable_diffusion(root / "sd"),
        llm=save_tiny_causal_lm(root / "llm"),
        clip=save_tiny_clip(root / "clip"),
        data=write_demo_dataset(root / "demo", count=48, held_out=8),
        cache=root / "cache",
    )


def config(models: Models, base: Path, output: Path, **overrides) -> TrainConfig:
    values = dict(
        data=str(models.data), base_model=str(base), llm=str(models.llm), llm_layer=2,
        output=output, cache_dir=models.cache, batch_size=8, max_steps=4, learning_rate=1e-3,
        eta_prompt=1.0, device="cpu", validation_prompts=(), show_progress=False,
        **SMALL_ADAPTER,
    )  # fmt: skip
    return TrainConfig(**{**values, **overrides})


def history(output: Path, kind: str) -> list[dict]:
    rows = [json.loads(line) for line in (output / "history.jsonl").read_text().splitlines()]
    return [
        {k: v for k, v in row.items() if k != "samples_per_s"}
        for row in rows
        if row["kind"] == kind
    ]


def images(pipeline, prompts, seeds, **options) -> np.ndarray:
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    return pipeline(
        prompts, num_inference_steps=2, generator=generators, output_type="np", **options
    ).images


def trained_like(adapter: SURAdapter) -> SURAdapter:
    """The output layers moved off their zero start, as after training."""
    torch.manual_seed(3)
    with torch.no_grad():
        adapter.out.weight.normal_(0, 0.5)
        if adapter.pooled_mlp is not None:
            adapter.pooled_mlp[2].weight.normal_(0, 0.5)
    return adapter


def test_the_family_is_read_from_the_pipelines_components(models, tmp_path) -> None:
    assert detect_family(str(models.sdxl)) == "sdxl"
    assert detect_family(str(models.sd2)) == detect_family(str(models.sd)) == "sd"
    refiner = tmp_path / "refiner"
    refiner.mkdir()
    index = json.loads((models.sdxl / "model_index.json").read_text())
    (refiner / "model_index.json").write_text(json.dumps({**index, "text_encoder": [None, None]}))
    with pytest.raises(InputError, match="refiner"):
        detect_family(str(refiner))
    flux = tmp_path / "flux"
    flux.mkdir()
    (flux / "model_index.json").write_text(
        json.dumps({"_class_name": "FluxPipeline", "transformer": ["diffusers", "X"]})
    )
    with pytest.raises(InputError, match="FluxPipeline is not a UNet Stable Diffusion"):
        detect_family(str(flux))
    (flux / "model_index.json").write_bytes(b'{"_class_name": "Stable\xff')  # truncated
    with pytest.raises(InputError, match="unreadable model_index.json"):
        detect_family(str(flux))


def test_the_cached_sdxl_record_is_what_the_pipeline_conditions_on(models) -> None:
    """Training's cached text states and pooled embedding equal the SDXL pipeline's
    ``encode_prompt`` (penultimate states of both encoders, the second one's projection)."""
    parts = load_stable_diffusion(str(models.sdxl))
    assert parts.family == "sdxl" and parts.text_width == XL_WIDTH
    assert parts.pooled_width == SDXL_POOLED_WIDTH
    prompts = ["three red cats", "a dog on a beach at sunset"]
    record = TextEmbeddings(parts, "cpu", torch.float32)(prompts)
    assert record.shape == (2, 78, XL_WIDTH) and record.dtype == np.float16
    sequence, pooled = split_text_record(record, parts.pooled_width)
    pipeline = stable_diffusion_xl_pipeline_class().from_pretrained(models.sdxl)
    with torch.no_grad():
        expected, _, expected_pooled, _ = pipeline.encode_prompt(
            prompts, device="cpu", do_classifier_free_guidance=False
        )
    assert np.allclose(sequence, expected.numpy(), atol=2e-3)
    assert np.allclose(pooled, expected_pooled.numpy(), atol=2e-3)
    assert not record[:, -1, parts.pooled_width :].any()  # the padding of the pooled row


def test_time_ids_are_those_of_the_crop_actually_taken(tmp_path) -> None:
    """A 64x48 image at 32 px: resized to 43x32, cropped 5 px in from the left; its mirrored
    copy is the crop of the mirrored image 6 px in (43 - 32 - 5), as SDXL's script counts."""
    geometry = CropGeometry.of(64, 48, 32)
    assert (geometry.resized_width, geometry.resized_height) == (43, 32)
    assert geometry.time_ids().tolist() == [[48, 64, 0, 5, 32, 32], [48, 64, 0, 6, 32, 32]]
    tall = CropGeometry.of(30, 90, 32)
    assert tall.time_ids()[0].tolist() == [90, 30, 32, 0, 32, 32]  # 32x96, 32 down
    # a large photo's size is kept exactly (float32, not float16: 6001 is not a float16)
    huge = CropGeometry.of(6001, 4003, 1024).time_ids()
    assert huge[0, :2].tolist() == [4003, 6001] and huge.dtype == np.float32

    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    path = tmp_path / "p.png"
    picture.save(path)
    prepared = prepare_image(path.read_bytes(), 32)
    assert prepared.geometry == geometry
    resized = picture.resize((43, 32), Image.Resampling.BILINEAR)
    flipped = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    crop = np.asarray(flipped.crop((6, 0, 38, 32)), np.float32) / 127.5 - 1.0
    assert np.array_equal(mirrored(prepared.pixels), crop.transpose(2, 0, 1))

    # a batch takes the time ids of the crop it trains on: the mirrored one where flipped
    count = 3
    both = np.stack([geometry.time_ids(), tall.time_ids(), geometry.time_ids()])
    cached = CachedSet(
        np.zeros((count, 8, 4, 4), np.float16), np.ones((count, 8, 4, 4), np.float16),
        np.zeros((count, 77, 8), np.float16), np.zeros((count, 77, 8), np.float16),
        np.zeros((count, 4), np.float32), np.zeros((count, 5), np.float16),
        np.zeros((count, 5), np.float16), both,
    )  # fmt: skip
    batch = cached.batch(np.array([0, 1, 2]), torch.tensor([False, True, True]), "cpu")
    assert batch["time_ids"].tolist() == [both[0, 0].tolist(), both[1, 1].tolist(),
                                          both[2, 1].tolist()]  # fmt: skip
    assert batch["narrative_pooled"].shape == (3, 5)
    assert batch["latent_moments"][1:].eq(1).all() and batch["latent_moments"][0].eq(0).all()


@pytest.mark.parametrize("family", ["sdxl", "sd2"])
def test_a_fresh_adapter_at_weight_zero_reproduces_the_base_pipeline(
    models, tmp_path, family
) -> None:
    base = models.sdxl if family == "sdxl" else models.sd2
    parts = load_stable_diffusion(str(base), components=("text_encoder", "text_encoder_2"))
    sizes = dict(embed_dim=parts.text_width, num_heads=4, feedforward_dim=64, mlp_dim=64,
                 llm_dim=16, family=parts.family, pooled_dim=parts.pooled_width,
                 pooled_head=parts.pooled_width > 0)  # fmt: skip
    trained_like(SURAdapter(**sizes, adapter_weight=0.0)).save_pretrained(tmp_path / "off")
    trained_like(SURAdapter(**sizes, adapter_weight=0.3)).save_pretrained(tmp_path / "on")
    base_class = (
        stable_diffusion_xl_pipeline_class() if family == "sdxl"
        else stable_diffusion_pipeline_class()
    )  # fmt: skip
    options = {} if family == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    plain = base_class.from_pretrained(base, **options)
    plain.set_progress_bar_config(disable=True)
    prompts, seeds = ["three red cats", "a dog on a beach"], [0, 1]
    expected = images(plain, prompts, seeds, negative_prompt=["", ""])

    off = load_pipeline(str(base), tmp_path / "off", device="cpu", scheduler="default")
    assert np.array_equal(images(off, prompts, seeds, negative_prompt=["", ""]), expected)
    on = load_pipeline(str(base), tmp_path / "on", device="cpu", scheduler="default")
    with_adapter = images(on, prompts, seeds, negative_prompt=["", ""])
    assert np.abs(with_adapter - expected).max() > 1e-3
    without = images(on, prompts, seeds, negative_prompt=["", ""], use_adapter=False)
    assert np.array_equal(without, expected)

    # a batch-mate changes nothing: attention never runs across the samples of a batch
    alone = images(on, prompts[:1], seeds[:1], negative_prompt=[""])
    assert np.allclose(alone[0], with_adapter[0], atol=1e-4)
    if family != "sdxl":
        return
    assert isinstance(on, SURAdapterXLPipeline)
    # the adapter takes the token states and the pooled embedding; SDXL's zeroed unconditional
    # embedding (no negative prompt) stays zero, an encoded negative prompt is adapted
    on.use_adapter = False
    raw, raw_negative, raw_pooled, raw_negative_pooled = on.encode_prompt(
        prompts, device="cpu", negative_prompt=["", ""]
    )
    on.use_adapter = True
    adapted = on.encode_prompt(prompts, device="cpu", negative_prompt=["", ""])
    expected_out = on.adapter(raw, pooled_embeds=raw_pooled)
    assert torch.allclose(adapted[0], expected_out.prompt_embeds, atol=1e-5)
    assert torch.allclose(adapted[2], expected_out.pooled_embeds, atol=1e-5)
    assert not torch.allclose(adapted[2], raw_pooled, atol=1e-3)
    negative = on.adapter(raw_negative, pooled_embeds=raw_negative_pooled)
    assert torch.allclose(adapted[1], negative.prompt_embeds, atol=1e-5)
    zeroed = on.encode_prompt(prompts, device="cpu")
    assert not zeroed[1].any() and not zeroed[3].any()


def test_the_quality_loss_reaches_the_adapter_through_the_sdxl_unet(models) -> None:
    parts = load_stable_diffusion(str(models.sdxl))
    torch.manual_seed(0)
    count, width, pooled = 4, parts.text_width, parts.pooled_width
    time_ids = np.tile(CropGeometry.of(40, 32, 32).time_ids(), (count, 1, 1))
    cached = CachedSet(
        np.random.default_rng(0).standard_normal((count, 8, 8, 8)).astype(np.float16), None,
        torch.randn(count, 77, width).half(), torch.randn(count, 77, width).half(),
        torch.randn(count, 16), torch.randn(count, pooled).half(),
        torch.randn(count, pooled).half(), time_ids,
    )  # fmt: skip

    def grads(settings: LossSettings, time_ids_shift: float = 0.0):
        adapter = trained_like(SURAdapter(
            embed_dim=width, num_heads=4, feedforward_dim=64, mlp_dim=64, llm_dim=16,
            family="sdxl", pooled_dim=pooled, pooled_head=True,
        ))  # fmt: skip
        batch = cached.batch(np.arange(count), None, "cpu")
        batch["time_ids"] = batch["time_ids"] + time_ids_shift
        terms = compute_losses(adapter, parts.unet, parts.noise_scheduler, batch,
                               torch.Generator().manual_seed(1), settings, 0.13025)  # fmt: skip
        if terms.quality.requires_grad:
            terms.quality.backward()
        return terms, adapter

    quality_only = LossSettings(eta_llm=0.0, eta_prompt=0.0)
    terms, adapter = grads(quality_only)
    for name in ("out.weight", "encoder.layers.0.linear1.weight", "pooled_mlp.0.weight",
                 "pooled_mlp.2.weight"):  # fmt: skip
        gradient = adapter.get_parameter(name).grad
        assert gradient is not None and gradient.abs().sum() > 0, name
    # the time ids are part of the UNet's condition
    shifted, _ = grads(quality_only, time_ids_shift=100.0)
    assert float(shifted.quality.detach()) != pytest.approx(float(terms.quality.detach()), rel=1e-6)
    # the released objective: the quality loss is computed but trains nothing
    released, cut = grads(LossSettings(eta_llm=0.0, eta_prompt=0.0,
                                       quality_reaches_adapter=False))  # fmt: skip
    assert not released.quality.requires_grad
    assert all(p.grad is None for p in cut.parameters() if p.requires_grad)
    # the prompt alignment includes the pooled embeddings: their KL is part of the term
    without_pooled = compute_losses(
        adapter, parts.unet, parts.noise_scheduler,
        {k: v for k, v in cached.batch(np.arange(count), None, "cpu").items()
         if k != "keyword_pooled"},
        torch.Generator().manual_seed(1), quality_only, 0.13025,
    )  # fmt: skip
    assert float(terms.prompt_alignment.detach()) > float(without_pooled.prompt_alignment.detach())


def test_sdxl_trains_caches_once_resumes_exactly_and_is_used_from_the_command_line(
    models, tmp_path
) -> None:
    settings = dict(
        max_steps=6, checkpointing_steps=2, validation_steps=3, logging_steps=2,
        validation_prompts=("two red circles",), validation_inference_steps=2,
    )  # fmt: skip
    uninterrupted = tmp_path / "uninterrupted"
    first_config = config(models, models.sdxl, uninterrupted, **settings)
    report = train(first_config)
    # the base model's own defaults: its image side, gradient checkpointing for SDXL
    assert first_config.resolution == 32 and first_config.gradient_checkpointing is True
    assert report.computed["latents"] == 3 * 48  # plain, mirrored, time ids: one pass
    assert sorted(p.name for p in (uninterrupted / "validation").iterdir()) == [
        "step-000003.png", "step-000006.png",
    ]  # fmt: skip
    trained = SURAdapter.from_pretrained(uninterrupted)
    assert trained.config.family == "sdxl" and trained.config.embed_dim == XL_WIDTH
    assert trained.config.pooled_dim == SDXL_POOLED_WIDTH
    assert torch.count_nonzero(trained.pooled_mlp[2].weight) > 0  # the pooled head trained
    held = history(uninterrupted, "held_out")
    assert held[-1]["prompt_alignment"] < held[0]["prompt_alignment"], held

    # a second run with the same settings computes nothing
    again = train(config(models, models.sdxl, tmp_path / "again", max_steps=1))
    assert again.computed == {"text": 0, "latents": 0, "llm": 0}

    killed = tmp_path / "killed"
    args = [
        "train", "--data", str(models.data), "--base-model", str(models.sdxl),
        "--llm", str(models.llm), "--llm-layer", "2", "--output", str(killed),
        "--cache-dir", str(models.cache), "--batch-size", "8", "--max-steps", "6",
        "--learning-rate", "1e-3", "--eta-prompt", "1", "--checkpointing-steps", "2",
        "--validation-steps", "3", "--logging-steps", "2", "--validation-prompt",
        "two red circles", "--validation-inference-steps", "2", "--device", "cpu",
        "--no-progress", "--adapter-heads", "4", "--adapter-feedforward", "64",
        "--adapter-mlp", "64",
    ]  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-m", "surd_builder", *args],
        env={**os.environ, "SURD_TRAIN_KILL_AFTER_STEP": "3"},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    resumed_report = train(config(models, models.sdxl, killed, **settings))
    assert resumed_report.resumed_from == 2
    expected = SURAdapter.from_pretrained(uninterrupted).state_dict()
    resumed = SURAdapter.from_pretrained(killed).state_dict()
    for name, tensor in expected.items():
        assert torch.allclose(resumed[name], tensor, atol=1e-6), name
    assert history(killed, "train") == history(uninterrupted, "train")
    assert history(killed, "held_out") == history(uninterrupted, "held_out")

    # save / load round trip: the same outputs
    inputs = torch.randn(2, 77, XL_WIDTH), torch.randn(2, SDXL_POOLED_WIDTH)
    trained.eval()
    trained.save_pretrained(tmp_path / "copy")
    copy = SURAdapter.from_pretrained(tmp_path / "copy").eval()
    original, loaded = (
        trained(inputs[0], pooled_embeds=inputs[1]),
        copy(inputs[0], pooled_embeds=inputs[1]),
    )
    assert torch.equal(original.prompt_embeds, loaded.prompt_embeds)
    assert torch.equal(original.pooled_embeds, loaded.pooled_embeds)

    out = tmp_path / "generated"
    result = CliRunner().invoke(app, [
        "generate", "two red circles", "--base-model", str(models.sdxl), "--adapter",
        str(uninterrupted), "--output", str(out), "--seed", "1", "--compare", "--steps", "2",
        "--device", "cpu", "--no-progress",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "000-two-red-circles-compare.png", "000-two-red-circles-seed1.png",
    ]  # fmt: skip
    evaluated = tmp_path / "eval"
    result = CliRunner().invoke(app, [
        "eval", "--base-model", str(models.sdxl), "--adapter", str(uninterrupted),
        "--clip-model", str(models.clip), "--device", "cpu", "--steps", "2", "--no-progress",
        "--no-default-prompts", "--data", str(models.data), "--data-prompts", "2",
        "--output", str(evaluated),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics = json.loads((evaluated / "metrics.json").read_text())
    assert metrics["metrics"]["with"]["clip_score"] is not None
    assert {row["case"] for row in metrics["per_image"]} == {0, 1}


def test_sd2_v_prediction_trains_generates_and_evaluates(models, tmp_path) -> None:
    output = tmp_path / "run"
    sd2_config = config(models, models.sd2, output, max_steps=3)
    train(sd2_config)
    assert sd2_config.gradient_checkpointing is False
    trained = SURAdapter.from_pretrained(output)
    assert trained.config.family == "sd" and trained.config.embed_dim == 64
    assert trained.pooled_mlp is None
    parts = load_stable_diffusion(str(models.sd2), components=("scheduler",))
    assert parts.prediction_type == "v_prediction"
    out = tmp_path / "generated"
    result = CliRunner().invoke(app, [
        "generate", "two red circles", "--base-model", str(models.sd2), "--adapter", str(output),
        "--output", str(out), "--compare", "--steps", "2", "--device", "cpu", "--no-progress",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len(list(out.glob("*-compare.png"))) == 1
    result = CliRunner().invoke(app, [
        "eval", "--base-model", str(models.sd2), "--adapter", str(output), "--clip-model",
        str(models.clip), "--device", "cpu", "--steps", "2", "--no-progress",
        "--no-default-prompts", "--data", str(models.data), "--data-prompts", "1", "--output",
        str(tmp_path / "eval"),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output


def one_error_line(result) -> str:
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    return lines[0]


def test_the_vae_runs_upcast_where_it_asks_and_a_replacement_vae_is_its_own_cache(
    models,
) -> None:
    from adapter.frozen_inputs import vae_dtype

    parts = load_stable_diffusion(str(models.sdxl), components=("vae",))
    assert parts.vae.config.force_upcast  # as SDXL's own VAE
    assert vae_dtype(parts.vae, torch.float16) == torch.float32
    assert vae_dtype(parts.vae, torch.bfloat16) == torch.bfloat16
    parts.vae.register_to_config(force_upcast=False)  # a VAE fixed for float16
    assert vae_dtype(parts.vae, torch.float16) == torch.float16
    own = load_stable_diffusion(
        str(models.sdxl), components=("vae",), vae_model=str(models.sd / "vae")
    )
    assert own.vae.config.scaling_factor != parts.vae.config.scaling_factor  # the other VAE
    assert own.fingerprint(("vae",)) != parts.fingerprint(("vae",))


def test_a_mismatched_family_is_a_one_line_error(models, tmp_path) -> None:
    sd_adapter = SURAdapter(embed_dim=32, num_heads=4, feedforward_dim=64, mlp_dim=64, llm_dim=64)
    sd_adapter.save_pretrained(tmp_path / "sd-adapter")
    xl_adapter = SURAdapter(embed_dim=XL_WIDTH, num_heads=4, feedforward_dim=64, mlp_dim=64,
                            llm_dim=64, family="sdxl", pooled_dim=SDXL_POOLED_WIDTH,
                            pooled_head=True)  # fmt: skip
    xl_adapter.save_pretrained(tmp_path / "xl-adapter")
    cases = [
        (models.sdxl, "sd-adapter", "trained for Stable Diffusion 1.x/2.x, but"),
        (models.sd, "xl-adapter", "trained for Stable Diffusion XL, but"),
        (models.sd2, "sd-adapter", "is for text width 32, but"),
    ]
    for base, adapter, message in cases:
        result = CliRunner().invoke(app, [
            "generate", "x", "--base-model", str(base), "--adapter", str(tmp_path / adapter),
            "--output", str(tmp_path / "never"), "--device", "cpu", "--no-progress",
        ])  # fmt: skip
        assert result.exit_code == 2, result.output
        assert message in one_error_line(result)
    assert not (tmp_path / "never").exists() or not any((tmp_path / "never").iterdir())
    result = CliRunner().invoke(app, [
        "train", "--data", str(models.data), "--base-model", str(models.sdxl), "--llm",
        str(models.llm), "--llm-layer", "2", "--output", str(tmp_path / "out"), "--cache-dir",
        str(models.cache), "--max-steps", "1", "--no-progress", "--no-validation-images",
        "--device", "cpu", "--adapter-heads", "4", "--init-adapter", str(tmp_path / "sd-adapter"),
    ])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "trained for Stable Diffusion 1.x/2.x" in one_error_line(result)
