"""The pieces under a training step: the array cache, the sample order, the frozen encoders."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adapter.cache import ArrayCache, cache_key, fill_cache
from adapter.frozen_inputs import LatentMoments, preprocess_image
from adapter.stable_diffusion import load_stable_diffusion
from adapter.step import (
    CachedSet,
    LossSettings,
    compute_losses,
    micro_batch_indices,
    sample_latents,
    step_generator,
)
from tests.conftest import image_bytes
from tests.tiny_models import save_tiny_stable_diffusion


def test_array_cache_round_trip_repeats_and_misses(tmp_path) -> None:
    cache = ArrayCache(tmp_path / "c")
    arrays = np.arange(24, dtype=np.float16).reshape(3, 2, 4)
    cache.write(["a", "b", "c"], arrays)
    cache.write(["d"], arrays[:1] + 100)
    loaded = cache.load(["c", "a", "d", "a"])
    assert loaded.dtype == np.float16 and loaded.shape == (4, 2, 4)
    assert np.array_equal(loaded[0], arrays[2]) and np.array_equal(loaded[1], loaded[3])
    assert np.array_equal(loaded[2], arrays[0] + 100)
    assert cache.keys() == {"a", "b", "c", "d"}
    with pytest.raises(KeyError, match="1 key"):
        cache.load(["a", "zz"])


def test_fill_cache_keeps_finished_batches_when_a_run_dies(tmp_path) -> None:
    cache = ArrayCache(tmp_path / "c")
    keys = [cache_key("model-x", f"text {n}") for n in range(5)]
    inputs = list(range(5))
    calls: list[list[int]] = []

    def dies_on_second_batch(batch: list[int]) -> np.ndarray:
        calls.append(batch)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return np.array([[value, value] for value in batch], dtype=np.float32)

    with pytest.raises(RuntimeError):
        fill_cache(cache, keys, inputs, dies_on_second_batch, 2, "x", show_progress=False)
    computed: list[list[int]] = []

    def square(batch: list[int]) -> np.ndarray:
        computed.append(batch)
        return np.array([[value, value * value] for value in batch], dtype=np.float32)

    assert fill_cache(cache, keys, inputs, square, 2, "x", show_progress=False) == 3
    assert computed == [[2, 3], [4]]  # the first batch survived the failure
    assert fill_cache(cache, keys + keys, inputs + inputs, square, 2, "x", False) == 0
    assert cache_key("model-x", "a") != cache_key("model-y", "a")


def test_the_sample_stream_covers_every_epoch_and_splits_between_ranks() -> None:
    num_samples, batch, world = 10, 3, 2
    seen = np.concatenate(
        [
            micro_batch_indices(micro, batch, world, rank, num_samples, seed=5)
            for micro in range(10)  # 10 micro-batches x 6 = 60 positions = 6 epochs
            for rank in range(world)
        ]
    )
    for epoch in range(6):
        assert sorted(seen[epoch * 10 : (epoch + 1) * 10]) == list(range(10))
    assert not np.array_equal(seen[:10], seen[10:20])  # each epoch its own order
    again = micro_batch_indices(3, batch, world, 1, num_samples, seed=5)
    assert np.array_equal(again, micro_batch_indices(3, batch, world, 1, num_samples, seed=5))

    def draw(micro: int, rank: int) -> torch.Tensor:
        return torch.rand(4, generator=step_generator(0, micro, rank, "cpu"))

    assert torch.equal(draw(7, 0), draw(7, 0)) and not torch.equal(draw(7, 0), draw(8, 0))
    assert not torch.equal(draw(7, 0), draw(7, 1))


def test_preprocess_crops_the_centre_and_mirrors() -> None:
    from PIL import Image

    image = Image.new("RGB", (64, 32), (0, 0, 0))
    image.paste((255, 255, 255), (16, 0, 32, 32))  # white in the left half of the centre square
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    pixels = preprocess_image(buffer.getvalue(), 16, flip=False)
    assert pixels.shape == (3, 16, 16) and pixels.min() >= -1.0 and pixels.max() <= 1.0
    assert pixels[0, 8, 2] == pytest.approx(1.0) and pixels[0, 8, 13] == pytest.approx(-1.0)
    mirrored = preprocess_image(buffer.getvalue(), 16, flip=True)
    assert np.array_equal(mirrored, pixels[:, :, ::-1])
    assert preprocess_image(b"not an image", 16, flip=False) is None


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return load_stable_diffusion(str(save_tiny_stable_diffusion(tmp_path_factory.mktemp("sd"))))


def test_unreadable_images_become_nan_rows_and_latents_are_sampled(parts) -> None:
    encoder = LatentMoments(parts, 32, False, "cpu", torch.float32)
    moments = encoder([image_bytes(size=(40, 32)), b"broken", image_bytes((0, 90, 0))])
    assert moments.shape == (3, 8, 8, 8) and moments.dtype == np.float16
    assert np.isnan(moments[1]).all() and np.isfinite(moments[[0, 2]]).all()
    assert "flip=False" in encoder.cache_identity()
    stacked = torch.from_numpy(moments[[0, 2]])
    first = sample_latents(stacked, step_generator(0, 0, 0, "cpu"), 0.18215, None)
    second = sample_latents(stacked, step_generator(0, 1, 0, "cpu"), 0.18215, None)
    assert first.shape == (2, 4, 8, 8) and not torch.equal(first, second)  # a fresh draw


def test_the_quality_loss_alone_trains_the_adapter_through_compute_losses(parts) -> None:
    from adapter.model import SURAdapter

    torch.manual_seed(0)
    adapter = SURAdapter(
        embed_dim=32, num_heads=4, feedforward_dim=64, mlp_dim=64, llm_dim=16, dropout=0.0
    )
    cached = CachedSet(
        latent_moments=torch.randn(4, 8, 8, 8).half(),
        flipped_moments=None,
        narrative_embeds=torch.randn(4, 77, 32).half(),
        keyword_embeds=torch.randn(4, 77, 32).half(),
        llm_features=torch.randn(4, 16),
    )
    batch = cached.batch(torch.tensor([0, 2]), None, "cpu")
    only_quality = LossSettings(eta_llm=0.0, eta_prompt=0.0)
    terms = compute_losses(
        adapter, parts.unet, parts.noise_scheduler, batch, step_generator(0, 0, 0, "cpu"),
        only_quality, scaling=0.18215,
    )  # fmt: skip
    terms.total.backward()
    assert torch.count_nonzero(adapter.out.weight.grad) > 0
    assert all(p.grad is None for p in parts.unet.parameters())
    v_terms = compute_losses(
        adapter, parts.unet, parts.noise_scheduler, batch, step_generator(0, 0, 0, "cpu"),
        LossSettings(prediction_type="v_prediction"), scaling=0.18215,
    )  # fmt: skip
    assert v_terms.quality.item() != pytest.approx(terms.quality.item())  # another target
    assert v_terms.distillation.item() == pytest.approx(terms.distillation.item())


def test_cached_inputs_equal_what_diffusers_computes(parts) -> None:
    from adapter.frozen_inputs import TextEmbeddings
    from adapter.stable_diffusion import stable_diffusion_pipeline_class

    pipeline = stable_diffusion_pipeline_class()(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
        unet=parts.unet, scheduler=parts.inference_scheduler(), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    prompts = ["three red cats", "a dog on the beach at sunset"]
    expected, _ = pipeline.encode_prompt(prompts, "cpu", 1, False)
    embeds = TextEmbeddings(parts, "cpu", torch.float32)(prompts)
    assert embeds.shape == (2, 77, 32)
    assert np.allclose(embeds, expected.numpy(), atol=2e-3)  # float16 storage

    data = image_bytes((10, 200, 40), size=(32, 32))
    moments = LatentMoments(parts, 32, False, "cpu", torch.float32)([data])
    pixels = torch.from_numpy(preprocess_image(data, 32, flip=False))[None]
    with torch.no_grad():
        dist = parts.vae.encode(pixels).latent_dist
    assert np.allclose(moments[0, :4], dist.mean[0].numpy(), atol=2e-3)
    assert np.allclose(moments[0, 4:], dist.logvar[0].numpy(), atol=2e-2)
    # with (almost) no variance a sample is the mean, scaled as the UNet expects
    certain = torch.cat([dist.mean, torch.full_like(dist.mean, -30.0)], dim=1)
    sample = sample_latents(certain, step_generator(0, 0, 0, "cpu"), 0.18215, None)
    assert torch.allclose(sample, dist.mean * 0.18215, atol=1e-5)
    shifted = sample_latents(certain, step_generator(0, 0, 0, "cpu"), 2.0, 0.5)
    assert torch.allclose(shifted, (dist.mean - 0.5) * 2.0, atol=1e-5)


def test_a_batch_takes_mirrored_latents_exactly_where_flipped() -> None:
    plain, mirrored = torch.zeros(3, 8, 2, 2), torch.ones(3, 8, 2, 2)
    cached = CachedSet(
        plain, mirrored, torch.zeros(3, 77, 4), torch.zeros(3, 77, 4), torch.zeros(3, 5)
    )
    batch = cached.batch(torch.tensor([2, 0, 1]), torch.tensor([True, False, True]), "cpu")
    assert batch["latent_moments"][:, 0, 0, 0].tolist() == [1.0, 0.0, 1.0]
    assert cached.batch(torch.tensor([0]), None, "cpu")["latent_moments"].sum() == 0


def test_mirroring_preprocessed_pixels_equals_preprocessing_mirrored(parts) -> None:
    """The latent cache preprocesses an image once for both caches; the mirrored copy must be
    what the flipping encoder computes from the bytes, bit for bit (layout included: the VAE's
    convolutions round differently for another memory layout)."""
    import io

    from PIL import Image

    from adapter.frozen_inputs import mirrored

    def gradient(size: tuple[int, int]) -> bytes:  # left and right differ: a flip shows
        buffer = io.BytesIO()
        Image.linear_gradient("L").rotate(90).resize(size).convert("RGB").save(buffer, "PNG")
        return buffer.getvalue()

    images = [gradient((37, 32)), gradient((32, 48)), image_bytes((10, 200, 40), size=(32, 32))]
    plain = [preprocess_image(data, 32, flip=False) for data in images]
    flipped = [preprocess_image(data, 32, flip=True) for data in images]
    for mine, expected in zip((mirrored(p) for p in plain), flipped, strict=True):
        assert np.array_equal(mine, expected) and mine.strides == expected.strides
    assert not np.array_equal(plain[0], flipped[0])
    # and both are the image mirrored before it was preprocessed (32 px: no resize, no crop)
    square = Image.open(io.BytesIO(gradient((32, 32))))
    buffer = io.BytesIO()
    square.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(buffer, "PNG")
    reference = preprocess_image(buffer.getvalue(), 32, flip=False)
    mine = preprocess_image(gradient((32, 32)), 32, flip=True)
    assert np.array_equal(mine, reference) and mine.strides == reference.strides
    encoder = LatentMoments(parts, 32, True, "cpu", torch.float32)
    assert np.array_equal(encoder.encode_pixels([mirrored(p) for p in plain]), encoder(images))


def test_the_released_graph_cut_keeps_the_quality_loss_off_the_adapter(parts) -> None:
    from adapter.model import SURAdapter

    torch.manual_seed(0)
    adapter = SURAdapter(
        embed_dim=32, num_heads=4, feedforward_dim=64, mlp_dim=64, llm_dim=16, dropout=0.0
    )
    cached = CachedSet(
        torch.randn(4, 8, 8, 8).half(), None, torch.randn(4, 77, 32).half(),
        torch.randn(4, 77, 32).half(), torch.randn(4, 16),
    )  # fmt: skip
    batch = cached.batch(torch.tensor([0, 2]), None, "cpu")
    cut = LossSettings(eta_llm=0.0, eta_prompt=0.0, quality_reaches_adapter=False)
    terms = compute_losses(
        adapter, parts.unet, parts.noise_scheduler, batch, step_generator(0, 0, 0, "cpu"), cut,
        scaling=0.18215,
    )  # fmt: skip
    assert terms.quality.item() > 0 and not terms.quality.requires_grad  # computed, trains nothing
    kept = LossSettings(eta_llm=0.0, eta_prompt=1.0, quality_reaches_adapter=False)
    terms = compute_losses(
        adapter, parts.unet, parts.noise_scheduler, batch, step_generator(0, 0, 0, "cpu"), kept,
        scaling=0.18215,
    )  # fmt: skip
    terms.total.backward(retain_graph=True)
    total_grads = {
        name: p.grad.clone() for name, p in adapter.named_parameters() if p.grad is not None
    }
    adapter.zero_grad()
    terms.prompt_alignment.backward()
    alignment_grads = {n: p.grad for n, p in adapter.named_parameters() if p.grad is not None}
    assert total_grads.keys() == alignment_grads.keys() and total_grads
    for name, grad in total_grads.items():  # the total's gradient is the alignment term's alone
        assert torch.allclose(grad, alignment_grads[name], atol=1e-7), name
