"""The SUR-adapter model and its losses: the released code's defects must not come back."""

from __future__ import annotations

import pytest
import torch

from adapter.losses import (
    distillation_loss,
    kl_per_token,
    noise_prediction_loss,
    prompt_alignment_loss,
    total_loss,
)
from adapter.model import SURAdapter

DIM, LLM_DIM = 32, 48


def tiny_adapter(**overrides) -> SURAdapter:
    torch.manual_seed(0)
    config = dict(embed_dim=DIM, num_heads=4, feedforward_dim=64, mlp_dim=64, llm_dim=LLM_DIM)
    return SURAdapter(**{**config, **overrides}).eval()


def wake_output_layer(adapter: SURAdapter) -> None:
    """Give the zero-initialised output layer values, as after some training steps."""
    with torch.no_grad():
        adapter.out.weight.normal_(0, 0.1)
        adapter.out.bias.normal_(0, 0.1)


def test_a_fresh_adapter_returns_exactly_the_scaled_input() -> None:
    adapter = tiny_adapter(adapter_weight=0.1)
    x = torch.randn(3, 77, DIM)
    output = adapter(x)
    assert output.prompt_embeds.shape == output.encoded.shape == (3, 77, DIM)
    assert torch.equal(output.prompt_embeds, (1 - 0.1) * x)  # zero weight AND zero bias
    assert torch.count_nonzero(adapter.out.bias) == 0


def test_a_samples_output_does_not_depend_on_its_batch_mates() -> None:
    adapter = tiny_adapter()
    wake_output_layer(adapter)
    batch = torch.randn(4, 77, DIM)
    together = adapter(batch)
    for index in range(4):
        alone = adapter(batch[index : index + 1])
        assert torch.allclose(alone.prompt_embeds[0], together.prompt_embeds[index], atol=1e-5)
        assert torch.allclose(alone.encoded[0], together.encoded[index], atol=1e-5)
    # and it does depend on its own other tokens (attention runs over the 77 of them)
    changed = batch.clone()
    changed[0, 5] = torch.randn(DIM)
    assert not torch.allclose(adapter(changed).prompt_embeds[0, 0], together.prompt_embeds[0, 0])


def grads(adapter: SURAdapter, loss: torch.Tensor) -> dict[str, bool]:
    adapter.zero_grad(set_to_none=True)
    loss.backward()
    return {
        name: param.grad is not None and bool(torch.count_nonzero(param.grad))
        for name, param in adapter.named_parameters()
    }


def test_each_loss_reaches_exactly_its_parameters() -> None:
    adapter = tiny_adapter(train_llm_projection=True)
    x, keywords = torch.randn(2, 77, DIM), torch.randn(2, 77, DIM)
    llm = torch.randn(2, LLM_DIM)

    output = adapter(x)
    distill = grads(adapter, distillation_loss(output.encoded, adapter.project_llm(llm)))
    assert all(distill[n] for n in distill if n.startswith(("encoder.", "llm_projection.")))
    assert not any(distill[n] for n in distill if not n.startswith(("encoder.", "llm_projection.")))

    # a zero-initialised output layer gets gradients at once; the layers before it only once
    # it is non-zero (one optimiser step in training)
    prompt = grads(adapter, prompt_alignment_loss(adapter(x).prompt_embeds, keywords))
    assert prompt["out.weight"] and prompt["out.bias"]
    assert not any(prompt[n] for n in prompt if not n.startswith("out."))
    wake_output_layer(adapter)
    prompt = grads(adapter, prompt_alignment_loss(adapter(x).prompt_embeds, keywords))
    assert prompt["attention.query.weight"] and prompt["mlp.0.weight"]
    assert prompt["encoder.layers.0.self_attn.in_proj_weight"]
    assert not prompt["llm_projection.weight"]  # the prompt loss never touches the LLM side


def test_the_quality_loss_reaches_the_adapter_through_a_frozen_unet() -> None:
    """The released trainer rebuilt the condition with torch.tensor(...), cutting the graph:
    its quality loss never trained the adapter. Here it must."""
    from tests.tiny_models import tiny_unet

    unet = tiny_unet(DIM).requires_grad_(False)
    adapter = tiny_adapter()
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    condition = adapter(torch.randn(2, 77, DIM)).prompt_embeds
    prediction = unet(latents + noise, torch.tensor([10, 500]), condition).sample
    quality = grads(adapter, noise_prediction_loss(prediction, noise))
    assert quality["out.weight"] and quality["out.bias"]
    assert not any(param.grad is not None for param in unet.parameters())  # UNet stays frozen


def test_save_load_round_trip_and_a_seeded_frozen_projection(tmp_path) -> None:
    adapter = tiny_adapter()
    wake_output_layer(adapter)
    adapter.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = SURAdapter.from_pretrained(tmp_path / "adapter").eval()
    x = torch.randn(1, 77, DIM)
    assert torch.equal(loaded(x).prompt_embeds, adapter(x).prompt_embeds)
    other = tiny_adapter()
    assert torch.equal(other.llm_projection.weight, adapter.llm_projection.weight)  # seeded
    assert not adapter.llm_projection.weight.requires_grad  # frozen unless asked
    assert not any(n.startswith("value") for n, _ in adapter.named_parameters())  # nothing unused
    assert all(p.requires_grad for n, p in adapter.named_parameters() if "llm" not in n)


def test_losses() -> None:
    x = torch.randn(2, 77, DIM)
    assert kl_per_token(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert kl_per_token(x, torch.randn(2, 77, DIM)).item() > 0
    # the scale of the released code: torch's batchmean KL (summed over tokens) times T**2
    import torch.nn.functional as F

    other = torch.randn(2, 77, DIM)
    for temperature in (1.0, 2.0):
        batchmean = F.kl_div(
            F.log_softmax(other / temperature, -1),
            F.softmax(x / temperature, -1),
            reduction="batchmean",
        )
        expected = (batchmean * temperature**2).item()
        assert kl_per_token(x, other, temperature).item() == pytest.approx(expected, rel=1e-5)
    # the LLM vector is broadcast over tokens
    llm = torch.randn(2, DIM)
    broadcast = distillation_loss(x, llm)
    assert broadcast.item() == pytest.approx(
        kl_per_token(x, llm[:, None].expand(-1, 77, -1)).item()
    )
    prediction, target = torch.zeros(2, 4, 8, 8), torch.ones(2, 4, 8, 8)
    assert noise_prediction_loss(prediction, target).item() == pytest.approx(1.0)
    snr = torch.tensor([1.0, 20.0])
    weighted = noise_prediction_loss(prediction, target, snr=snr, min_snr_gamma=5.0)
    assert weighted.item() == pytest.approx((1.0 + 5.0 / 20.0) / 2)
    terms = total_loss(torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0), 0.5, 0.25)
    assert terms.total.item() == pytest.approx(1 + 1 + 0.75)
