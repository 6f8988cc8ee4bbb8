"""Benchmark: the SUR-adapter training step (run by hand, not a test).

    .venv/bin/python bench/train_step.py                          # CPU, small models
    .venv/bin/python bench/train_step.py --size sd15 --batch-size 32 --json train-step.json  # GPU

Random-weight models built from configs (no download). ``--size sd15`` is Stable Diffusion 1.5's
UNet and VAE, a CLIP-L-sized text encoder and a 5120-wide LLM feature (LLaMA-13B) at 512 px
(64x64 latents); ``--size small`` is a scaled-down stack that runs on a CPU in seconds.

Three measurements, in the same run, on the same device and dtype:

(a) ``surd``: :func:`adapter.step.compute_losses` from cached inputs (latent distributions, both
    prompts' CLIP embeddings, LLM vectors kept on the CPU and copied per batch, as the trainer
    does): adapter forward, frozen UNet forward and backward to the condition, the three losses,
    clipping and an AdamW step.
(b) ``ceiling``: the frozen UNet's forward and backward to the condition alone, same batch: no
    step can be faster than this.
(c) ``released``: what the released trainer does per sample: batch 1, accumulation 4, the VAE
    and the text encoder run on the fly for every sample (image, narrative and keyword prompt).
    Like the released code it cuts the graph before the UNet (its ``torch.tensor(...)``), so it
    does *less* work per sample than (a): no UNet backward.

The three are interleaved over ``--rounds`` rounds (the order rotates each round) and each is
reported as the median samples/s with its range: run one after the other on a shared machine,
whatever else ran at the time skewed them apart ((a)/(b) = 1.42 once, which cannot be).
The ``sd15`` adapter is built with ``surd train``'s defaults (``adapter.train_config.TrainConfig``).

Reported: median samples/s (and min-max) and peak GPU memory of each, (a)/(b) and (a)/(c) of
the medians, the device and dtype.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from adapter.losses import noise_prediction_loss  # noqa: E402
from adapter.model import SURAdapter  # noqa: E402
from adapter.step import CachedSet, LossSettings, compute_losses, step_generator  # noqa: E402
from adapter.train_config import TrainConfig  # noqa: E402


def trainer_adapter() -> dict:
    """The adapter ``surd train`` builds by default (its TrainConfig defaults)."""
    defaults = {
        field.name: field.default
        for field in dataclasses.fields(TrainConfig)
        if field.default is not dataclasses.MISSING
    }
    return dict(
        num_layers=defaults["adapter_layers"],
        num_heads=defaults["adapter_heads"],
        feedforward_dim=defaults["adapter_feedforward"],
        mlp_dim=defaults["adapter_mlp"],
        dropout=defaults["adapter_dropout"],
        adapter_weight=defaults["adapter_weight"],
        train_llm_projection=defaults["train_llm_projection"],
    )


SIZES = {
    "sd15": dict(
        resolution=512,
        unet=dict(
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            cross_attention_dim=768,
            attention_head_dim=8,
            sample_size=64,
        ),
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12),
        adapter=trainer_adapter(),
        llm_dim=5120,
    ),
    "small": dict(
        resolution=128,
        unet=dict(
            block_out_channels=(64, 128),
            layers_per_block=1,
            cross_attention_dim=128,
            attention_head_dim=8,
            sample_size=16,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        ),
        vae=dict(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8),
        text=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4),
        adapter=dict(num_heads=4, feedforward_dim=512, mlp_dim=512),
        llm_dim=1024,
    ),
}  # fmt: skip


def build(size: str, device: str, dtype: torch.dtype):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.utils import logging
    from transformers import CLIPTextConfig, CLIPTextModel

    logging.set_verbosity_error()  # "modules that should be kept in float32: []" on every .to()
    spec = SIZES[size]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**spec["unet"]).to(device, dtype).requires_grad_(False)
    blocks = len(spec["vae"]["block_out_channels"])
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        latent_channels=4,
        **spec["vae"],
    )
    vae = vae.to(device, dtype).requires_grad_(False)
    text = CLIPTextModel(
        CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **spec["text"])
    )
    text = text.to(device, dtype).requires_grad_(False)
    width = spec["text"]["hidden_size"]
    adapter = SURAdapter(embed_dim=width, llm_dim=spec["llm_dim"], **spec["adapter"]).to(device)
    scheduler = DDPMScheduler(steps_offset=1, clip_sample=False)
    return spec, unet, vae, text, adapter, scheduler


def timed(run, steps: int, warmup: int, device: str) -> float:
    """Seconds per call of ``run``, after ``warmup`` calls."""
    for _ in range(warmup):
        run()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        run()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / steps


def peak_memory(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    value = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return round(value, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--size",
        choices=sorted(SIZES),
        default=None,
        help="sd15 on a GPU, small on a CPU (the default follows the device)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="sd15: 32; small: 8")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (a, b, c)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()  # fmt: skip
    device = args.device
    on_gpu = device.startswith("cuda")
    size = args.size or ("sd15" if on_gpu else "small")
    batch = args.batch_size or (32 if size == "sd15" else 8)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    spec, unet, vae, text, adapter, scheduler = build(size, device, dtype)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    step_unet = torch.compile(unet) if args.compile else unet
    width, side = spec["text"]["hidden_size"], spec["resolution"] // 8
    autocast = torch.autocast(device.split(":")[0], dtype=dtype, enabled=on_gpu)
    results: dict[str, dict] = {}

    # (a) surd: from caches kept on the CPU, copied per batch like the trainer
    pool = 4 * batch
    cached = CachedSet(
        latent_moments=torch.randn(pool, 8, side, side).half(),
        flipped_moments=None,
        narrative_embeds=torch.randn(pool, 77, width).half(),
        keyword_embeds=torch.randn(pool, 77, width).half(),
        llm_features=torch.randn(pool, spec["llm_dim"]),
    )
    trainable = [p for p in adapter.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    settings = LossSettings()
    counter = iter(range(10**9))

    def surd_step() -> None:
        number = next(counter)
        indices = torch.arange(number * batch, (number + 1) * batch) % pool
        tensors = cached.batch(indices, None, device)
        with autocast:
            terms = compute_losses(
                adapter, step_unet, scheduler, tensors, step_generator(0, number, 0, device),
                settings, 0.18215,
            )  # fmt: skip
        terms.total.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # (b) the ceiling: UNet forward + backward to the condition alone
    latents = torch.randn(batch, 4, side, side, device=device, dtype=dtype)
    condition = torch.randn(batch, 77, width, device=device, dtype=dtype, requires_grad=True)
    timesteps = torch.randint(0, 1000, (batch,), device=device)

    def bare_step() -> None:
        with autocast:
            prediction = step_unet(latents, timesteps, condition).sample
            loss = noise_prediction_loss(prediction, latents)
        loss.backward()
        condition.grad = None

    # (c) released-style: batch 1 x accumulation 4, VAE and CLIP on the fly, graph cut
    accumulation = 4
    image = torch.rand(1, 3, spec["resolution"], spec["resolution"], device=device) * 2 - 1
    ids = torch.randint(0, 49408, (1, 77), device=device)
    llm = torch.randn(1, spec["llm_dim"], device=device)

    def released_step() -> None:
        from adapter.losses import distillation_loss, prompt_alignment_loss

        for _ in range(accumulation):
            with autocast:
                with torch.no_grad():
                    sample = vae.encode(image.to(dtype)).latent_dist.sample() * 0.18215
                    narrative = text(ids)[0]
                    keyword = text(ids)[0]
                output = adapter(narrative.float(), llm_features=llm)
                noise = torch.randn_like(sample)
                step = torch.randint(0, 1000, (1,), device=device)
                cut = output.prompt_embeds.detach().to(dtype)  # the released torch.tensor(...)
                prediction = unet(scheduler.add_noise(sample, noise, step), step, cut).sample
                loss = noise_prediction_loss(prediction, noise)
                loss = loss + 1e-5 * distillation_loss(output.encoded, output.llm_projected)
                loss = loss + 1e-5 * prompt_alignment_loss(output.prompt_embeds, keyword.float())
            (loss / accumulation).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # name -> (step, samples per call, calls per measurement, what describes it)
    runs = {
        "a_surd": (surd_step, batch, args.steps, {"batch": batch}),
        "b_ceiling": (bare_step, batch, args.steps, {"batch": batch}),
        "c_released": (
            released_step, accumulation, max(2, args.steps // 2),
            {"batch": 1, "accumulation": accumulation},
        ),
    }  # fmt: skip
    rates: dict[str, list[float]] = {name: [] for name in runs}
    peaks: dict[str, float | None] = {name: None for name in runs}
    names = list(runs)
    for round_number in range(args.rounds):
        order = names[round_number % 3 :] + names[: round_number % 3]
        for name in order:
            step, samples, calls, _ = runs[name]
            warmup = args.warmup if round_number == 0 else 1
            rates[name].append(samples / timed(step, calls, warmup, device))
            peak = peak_memory(device)
            if peak is not None:
                peaks[name] = max(peaks[name] or 0.0, peak)
    for name, (_, _, _, described) in runs.items():
        results[name] = {
            **described,
            "samples_per_s": statistics.median(rates[name]),
            "min": min(rates[name]),
            "max": max(rates[name]),
            "rounds": len(rates[name]),
            "peak_gib": peaks[name],
        }

    a, b, c = (results[k]["samples_per_s"] for k in ("a_surd", "b_ceiling", "c_released"))
    cores = torch.get_num_threads()
    name = (
        torch.cuda.get_device_name(device)
        if on_gpu
        else f"CPU {platform.machine()}, {cores} threads"
    )
    report = {
        "device": name,
        "dtype": str(dtype).removeprefix("torch."),
        "size": size,
        "torch": torch.__version__,
        "compile": args.compile,
        "gradient_checkpointing": args.gradient_checkpointing,
        "rounds": args.rounds,
        "results": results,
        "a_over_b": a / b,
        "a_over_c": a / c,
    }
    print(f"device: {name}, {report['dtype']}, size {size}, batch {batch}")
    print(f"{'step':<12}{'median/s':>10}{'min-max':>16}{'peak GiB':>10}   ({args.rounds} rounds)")
    for key, value in results.items():
        peak = "-" if value["peak_gib"] is None else f"{value['peak_gib']:.2f}"
        spread = f"{value['min']:.3g}-{value['max']:.3g}"
        print(f"{key:<12}{value['samples_per_s']:>10.3g}{spread:>16}{peak:>10}")
    print(f"(a)/(b) = {a / b:.2f}   (a)/(c) = {a / c:.1f}   (medians)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
