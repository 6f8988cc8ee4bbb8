"""Benchmark: the SUR-adapter training step (run by hand, not a test).

    .venv/bin/python bench/train_step.py                          # CPU, small models
    .venv/bin/python bench/train_step.py --size sd15 --batch-size 32 --json train-step.json  # GPU
    .venv/bin/python bench/train_step.py --size sdxl --json train-step-sdxl.json             # GPU
    .venv/bin/python bench/train_step.py --size sdxl --device cpu --dtype bfloat16 \
        --batch-size 1 --resolution 256 --rounds 1 --steps 1 --warmup 1   # the code path on a CPU

Random-weight models built from configs (no download). ``--size sd15`` is Stable Diffusion 1.5's
UNet and VAE, a CLIP-L-sized text encoder and a 5120-wide LLM feature (LLaMA-13B) at 512 px
(64x64 latents); ``--size small`` is a scaled-down stack that runs on a CPU in seconds.
``--size sdxl`` is SDXL-base's UNet (2.6 B parameters: ``"text_time"`` added embedding, 2048-wide
cross-attention) at 1024 px (128x128 latents), conditioned on 77 x 2048 prompt embeddings, the
1280-wide pooled embedding and the six add_time_ids (original size, crop top-left, target size),
with the adapter ``surd train`` builds for SDXL (its pooled head on) and, as ``surd train``
defaults for SDXL, gradient checkpointing on (``--no-gradient-checkpointing`` turns it off).
The UNet is built on the device in the benchmark's dtype (on a CPU ``--dtype bfloat16`` keeps the
SDXL UNet at 5 GB; float32 is 10 GB). ``--resolution`` overrides the image side (a multiple of
8 x 2^(UNet levels - 1)).

Three measurements, in the same run, on the same device and dtype:

(a) ``surd``: :func:`adapter.step.compute_losses` from cached inputs (latent distributions, both
    prompts' CLIP embeddings, LLM vectors kept on the CPU and copied per batch, as the trainer
    does): adapter forward, frozen UNet forward and backward to the condition, the three losses,
    clipping and an AdamW step.
    For SDXL the pooled embedding (through the adapter's pooled head) and the time ids of the
    crop go into the UNet's ``added_cond_kwargs``.
(b) ``ceiling``: the frozen UNet's forward and backward to the condition alone, same batch: no
    step can be faster than this. For SDXL the condition is the prompt embeddings and the
    pooled embedding (both requiring grad), with the time ids, through ``added_cond_kwargs``.
(c) ``released``: what the released trainer does per sample: batch 1, accumulation 4, the VAE
    and the text encoder run on the fly for every sample (image, narrative and keyword prompt).
    Like the released code it cuts the graph before the UNet (its ``torch.tensor(...)``), so it
    does *less* work per sample than (a): no UNet backward. Not measured for ``sdxl``: the
    released trainer only ever ran SD 1.x (one CLIP text encoder, no pooled embedding or time
    ids), so there is no released SDXL step to compare with; the report says so
    (``skipped``), and ``a_over_c`` is null.

The measurements are interleaved over ``--rounds`` rounds (the order rotates each round) and each
is reported as the median samples/s with its range: run one after the other on a shared machine,
whatever else ran at the time skewed them apart ((a)/(b) = 1.42 once, which cannot be).
The ``sd15`` and ``sdxl`` adapters are built with ``surd train``'s defaults
(``adapter.train_config.TrainConfig``).

Reported: median samples/s (and min-max) and peak GPU memory of each, (a)/(b) and (a)/(c) of
the medians, the device and dtype, the process's peak resident memory (``peak_rss_gib``).
``--row FILE`` also writes the result as one ``OK<TAB>summary`` line (``bench/gpu_check.sh``'s
row format, used for its ``train_step_sdxl`` row).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import platform
import resource
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
        scaling=0.18215,
        batch=32,
    ),
    # SDXL-base's UNet config (unet/config.json of stabilityai/stable-diffusion-xl-base-1.0);
    # no VAE or text encoder: (c) is not measured for SDXL (see the module docstring)
    "sdxl": dict(
        resolution=1024,
        unet=dict(
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            use_linear_projection=True,
            cross_attention_dim=2048,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,  # 1280 pooled + 6 x 256
            sample_size=128,
            upcast_attention=False,
        ),
        vae=None,
        text=None,
        text_width=2048,  # CLIP-L's 768 + OpenCLIP-bigG's 1280 penultimate states
        pooled_dim=1280,
        adapter=dict(**trainer_adapter(), family="sdxl", pooled_dim=1280, pooled_head=True),
        llm_dim=5120,
        scaling=0.13025,
        scheduler=dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        gradient_checkpointing=True,  # surd train's default for SDXL
        batch=8,  # fits an 80 GB H100 with gradient checkpointing
        skip_released=(
            "the released trainer never supported SDXL (SD 1.x only: one CLIP text encoder, "
            "no pooled embedding or time ids)"
        ),
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
        scaling=0.18215,
    ),
}  # fmt: skip


@contextlib.contextmanager
def made_as(dtype: torch.dtype):
    """Parameters created in ``dtype`` (no float32 copy first: SDXL's UNet is 10 GB in it)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build(size: str, device: str, dtype: torch.dtype):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.utils import logging
    from transformers import CLIPTextConfig, CLIPTextModel

    logging.set_verbosity_error()  # "modules that should be kept in float32: []" on every .to()
    spec = SIZES[size]
    torch.manual_seed(0)
    with torch.device(device), made_as(dtype):  # built in place, random weights
        unet = UNet2DConditionModel(**spec["unet"])
    unet = unet.to(device, dtype).requires_grad_(False)
    vae = text = None
    if spec["vae"] is not None:  # for (c) only
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
    adapter = SURAdapter(embed_dim=text_width(spec), llm_dim=spec["llm_dim"], **spec["adapter"])
    adapter = adapter.to(device)
    scheduler = DDPMScheduler(steps_offset=1, clip_sample=False, **spec.get("scheduler", {}))
    return spec, unet, vae, text, adapter, scheduler


def text_width(spec: dict) -> int:
    """The width of the prompt embeddings (the UNet's cross-attention input)."""
    return spec.get("text_width") or spec["text"]["hidden_size"]


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


def peak_rss_gib() -> float:
    """This process's peak resident memory so far (Linux: ru_maxrss in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def summary(report: dict) -> str:
    """The report in one line (``bench/gpu_check.sh``'s result column)."""
    parts = []
    for key, value in report["results"].items():
        peak = "" if value["peak_gib"] is None else f", {value['peak_gib']:.1f} GiB"
        spread = f"{value['min']:.3g}-{value['max']:.3g}"
        parts.append(f"{key[2:]} {value['samples_per_s']:.3g}/s ({spread}{peak})")
    parts.extend(f"{key[2:]} skipped" for key in report["skipped"])
    ratios = f"a/b {report['a_over_b']:.2f}"
    if report["a_over_c"] is not None:
        ratios += f", a/c {report['a_over_c']:.1f}"
    return (
        f"{'; '.join(parts)}; {ratios}; {report['device']}, {report['dtype']}, "
        f"{report['size']} at {report['resolution']} px, batch {report['batch']}, "
        f"{report['rounds']} rounds, checkpointing {report['gradient_checkpointing']}, "
        f"compile {report['compile']}, peak RSS {report['peak_rss_gib']:.1f} GiB"
    )


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
        help="sd15 on a GPU, small on a CPU (the default follows the device); sdxl",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="sd15: 32; sdxl: 8 (with gradient checkpointing); small: 8",
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="image side, px (default: sd15 512, sdxl 1024, small 128)",
    )
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="auto: bfloat16 on a GPU, float32 on a CPU",
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (a, b, c)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    parser.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="default: on for sdxl (as surd train), else off",
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--row",
        type=Path,
        default=None,
        help="also write OK<TAB>summary here (bench/gpu_check.sh's row)",
    )
    args = parser.parse_args()  # fmt: skip
    device = args.device
    on_gpu = device.startswith("cuda")
    size = args.size or ("sd15" if on_gpu else "small")
    spec = SIZES[size]
    batch = args.batch_size or spec.get("batch", 8)
    if args.dtype == "auto":
        dtype = torch.bfloat16 if on_gpu else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    resolution = args.resolution or spec["resolution"]
    multiple = 8 * 2 ** (len(spec["unet"]["block_out_channels"]) - 1)
    if resolution % multiple:
        parser.error(f"--resolution {resolution}: not a multiple of {multiple} for {size}")
    checkpointing = args.gradient_checkpointing
    if checkpointing is None:
        checkpointing = spec.get("gradient_checkpointing", False)
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    began = time.perf_counter()
    spec, unet, vae, text, adapter, scheduler = build(size, device, dtype)
    built_s = time.perf_counter() - began
    unet_parameters = sum(parameter.numel() for parameter in unet.parameters())
    if checkpointing:
        unet.enable_gradient_checkpointing()
    step_unet = torch.compile(unet) if args.compile else unet
    width, side = text_width(spec), resolution // 8
    pooled_dim = spec.get("pooled_dim")  # SDXL: the pooled embedding and time ids
    autocast = torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32)
    results: dict[str, dict] = {}

    # (a) surd: from caches kept on the CPU, copied per batch like the trainer
    pool = 4 * batch
    sdxl_inputs = {}
    if pooled_dim:  # a crop of a random 1.0-1.5x larger image: (orig h, w, top, left, h, w)
        original = (resolution * (1 + torch.rand(pool, 2) / 2)).round()
        top_left = (torch.rand(pool, 2) * (original - resolution)).round()
        target = torch.full((pool, 2), float(resolution))
        mirrored = top_left.clone()
        mirrored[:, 1] = original[:, 1] - resolution - top_left[:, 1]
        sdxl_inputs = dict(
            narrative_pooled=torch.randn(pool, pooled_dim).half(),
            keyword_pooled=torch.randn(pool, pooled_dim).half(),
            time_ids=torch.stack(
                [torch.cat([original, top_left, target], 1),
                 torch.cat([original, mirrored, target], 1)], 1,
            ),
        )  # fmt: skip
    cached = CachedSet(
        latent_moments=torch.randn(pool, 8, side, side).half(),
        flipped_moments=None,
        narrative_embeds=torch.randn(pool, 77, width).half(),
        keyword_embeds=torch.randn(pool, 77, width).half(),
        llm_features=torch.randn(pool, spec["llm_dim"]),
        **sdxl_inputs,
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
                settings, spec["scaling"],
            )  # fmt: skip
        terms.total.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # (b) the ceiling: UNet forward + backward to the condition alone
    latents = torch.randn(batch, 4, side, side, device=device, dtype=dtype)
    condition = torch.randn(batch, 77, width, device=device, dtype=dtype, requires_grad=True)
    timesteps = torch.randint(0, 1000, (batch,), device=device)
    added = None
    if pooled_dim:
        pooled = torch.randn(batch, pooled_dim, device=device, dtype=dtype, requires_grad=True)
        time_ids = cached.batch(torch.arange(batch), None, device)["time_ids"].to(dtype)
        added = {"text_embeds": pooled, "time_ids": time_ids}

    def bare_step() -> None:
        with autocast:
            prediction = step_unet(latents, timesteps, condition, added_cond_kwargs=added).sample
            loss = noise_prediction_loss(prediction, latents)
        loss.backward()
        condition.grad = None
        if added is not None:
            added["text_embeds"].grad = None

    # (c) released-style: batch 1 x accumulation 4, VAE and CLIP on the fly, graph cut
    accumulation = 4
    image = torch.rand(1, 3, resolution, resolution, device=device) * 2 - 1
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
    skipped = {}
    if "skip_released" in spec:
        skipped["c_released"] = spec["skip_released"]
        del runs["c_released"]
    rates: dict[str, list[float]] = {name: [] for name in runs}
    peaks: dict[str, float | None] = {name: None for name in runs}
    names = list(runs)
    peak_memory(device)  # from here on: the steps' peaks, not the build's
    for round_number in range(args.rounds):
        turn = round_number % len(names)
        order = names[turn:] + names[:turn]
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

    a, b = results["a_surd"]["samples_per_s"], results["b_ceiling"]["samples_per_s"]
    c = results["c_released"]["samples_per_s"] if "c_released" in results else None
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
        "resolution": resolution,
        "batch": batch,
        "unet_parameters": unet_parameters,
        "torch": torch.__version__,
        "compile": args.compile,
        "gradient_checkpointing": checkpointing,
        "rounds": args.rounds,
        "results": results,
        "skipped": skipped,
        "a_over_b": a / b,
        "a_over_c": None if c is None else a / c,
        "build_s": round(built_s, 1),
        "peak_rss_gib": peak_rss_gib(),
    }
    print(
        f"device: {name}, {report['dtype']}, size {size} at {resolution} px, batch {batch}, "
        f"gradient checkpointing {checkpointing}, UNet {unet_parameters / 1e9:.2f} B parameters "
        f"built in {built_s:.1f} s"
    )
    print(f"{'step':<12}{'median/s':>10}{'min-max':>16}{'peak GiB':>10}   ({args.rounds} rounds)")
    for key, value in results.items():
        peak = "-" if value["peak_gib"] is None else f"{value['peak_gib']:.2f}"
        spread = f"{value['min']:.3g}-{value['max']:.3g}"
        print(f"{key:<12}{value['samples_per_s']:>10.3g}{spread:>16}{peak:>10}")
    for key, reason in skipped.items():
        print(f"{key:<12}{'skipped':>10}   ({reason})")
    ratio_c = "-" if c is None else f"{a / c:.1f}"
    print(f"(a)/(b) = {a / b:.2f}   (a)/(c) = {ratio_c}   (medians)")
    print(f"peak RSS {report['peak_rss_gib']:.2f} GiB")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    if args.row:
        args.row.write_text(f"OK\t{summary(report)}\n")


if __name__ == "__main__":
    main()
