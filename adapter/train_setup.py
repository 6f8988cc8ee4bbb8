"""Setting a run up: the accelerator (devices, precision, trackers); which processes see the
same folder (they split the filling of a cache folder, and must all checkpoint into one
``--output``); and what is trained with what (the UNet it backpropagates through, the loss
settings, the adapter, the optimizer and its learning-rate schedule)."""

from __future__ import annotations

import secrets
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

from adapter.step import LossSettings
from adapter.train_config import OBJECTIVES, TrainConfig
from surd_builder.errors import InputError, OutputError


def resolve_precision(config: TrainConfig) -> tuple[bool, str]:
    """(on the CPU, mixed precision) from ``--device`` and ``--mixed-precision``: auto is bf16
    where the GPU has it, fp16 on older GPUs, none on the CPU."""
    import torch

    from surd_builder.models import resolve_device

    device = resolve_device(config.device) if config.device != "auto" else "auto"
    if device not in ("auto", "cpu", "cuda"):
        raise InputError(
            f"--device {config.device}: training runs on auto, cpu or cuda (pick GPUs with "
            "CUDA_VISIBLE_DEVICES or accelerate launch)"
        )
    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    precision = config.mixed_precision
    if precision == "auto":
        precision = "no" if on_cpu else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    if on_cpu and precision == "fp16":
        raise InputError("--mixed-precision fp16 needs a GPU (use bf16 or no on the CPU)")
    return on_cpu, precision


def make_accelerator(config: TrainConfig) -> tuple[Any, Any]:
    """(accelerator, weight dtype of the frozen parts)."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    on_cpu, precision = resolve_precision(config)
    project = ProjectConfiguration(
        project_dir=str(config.output), logging_dir=str(config.output / "logs")
    )
    accelerator = Accelerator(
        cpu=on_cpu,
        mixed_precision=precision,
        log_with="tensorboard",
        project_config=project,
        # building caches can take hours before the first collective; NCCL's default is 10 min
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=12))],
    )
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    return accelerator, dtype


def ranks_sharing(accelerator: Any, folder: Path) -> list[tuple[int, ...]]:
    """For each process (by global rank), the ranks that see the same ``folder``: all of them
    on a shared filesystem, a node's own ones for a node-local path. Each process writes a
    marker named by a token from the main process and its rank, all wait, each looks up every
    rank's marker by name (a lookup, not a directory listing, so that network filesystems
    answer it fresh), and the answers are gathered, so every process decides alike. A collective
    call: every process must make it."""
    from accelerate.utils import broadcast_object_list, gather_object

    rank, world = accelerator.process_index, accelerator.num_processes
    token = broadcast_object_list([secrets.token_hex(8) if accelerator.is_main_process else ""])
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / f".surd-rank-{token[0]}-{rank}"
    marker.touch()
    accelerator.wait_for_everyone()
    seen = tuple(r for r in range(world) if (folder / f".surd-rank-{token[0]}-{r}").exists())
    groups = [tuple(group) for group in gather_object([seen])]
    marker.unlink()  # every process has looked: gather_object returned
    return groups


def cache_share(groups: list[tuple[int, ...]], rank: int) -> tuple[int, int]:
    """``rank``'s share (index, count) of the missing cache keys, given :func:`ranks_sharing`'s
    groups: split among the processes that see the same folder, so each folder is filled once
    and completely by its own processes. If what they see does not add up to separate groups
    (a filesystem showing files late), every process fills what its folder lacks: more work,
    never a missing key."""
    separate = all(r in group for r, group in enumerate(groups)) and all(
        groups[other] == group for group in groups for other in group
    )
    if separate:
        return groups[rank].index(rank), len(groups[rank])
    warnings.warn(
        "processes disagree on which of them share the cache folder; each fills its own",
        stacklevel=2,
    )
    return 0, 1


def make_output_folder(accelerator: Any, config: TrainConfig) -> None:
    """Create ``--output`` and check that every process sees the same one: checkpoints hold
    every process's RNG state and all must resume from the same one. A collective call with
    several processes."""
    try:
        config.output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"cannot create --output {config.output}: {error.strerror}") from None
    world = accelerator.num_processes
    if world > 1 and any(len(group) < world for group in ranks_sharing(accelerator, config.output)):
        raise InputError(
            f"--output {config.output} is not one folder for all {world} processes: with "
            "several nodes put it on a filesystem they share"
        )


def resolve_model_defaults(config: TrainConfig) -> str:
    """Fill in what defaults to the base model's own, from its configs alone (before any
    checkpoint is compared with the run's settings): ``--resolution`` (the UNet's native image
    side) and ``--gradient-checkpointing`` (on for SDXL, whose UNet at 1024 px needs it at any
    useful batch). Returns the family."""
    from adapter.stable_diffusion import detect_family, native_resolution

    family = detect_family(config.base_model, config.revision)
    if config.resolution is None:
        config.resolution = native_resolution(config.base_model, config.revision)
    if config.gradient_checkpointing is None:
        config.gradient_checkpointing = family == "sdxl"
    return family


def make_adapter(config: TrainConfig, text_width: int, llm_dim: int, parts: Any) -> Any:
    """The adapter to train: from ``--init-adapter`` (checked against the models), else a new
    one for the base model's family and widths. Fails with an input error, not a shape error,
    on widths that do not fit."""
    from adapter.model import SURAdapter
    from adapter.stable_diffusion import check_adapter_fits

    if config.init_adapter:
        path = Path(config.init_adapter)
        if (path / "adapter" / "config.json").is_file():  # a checkpoint-N folder
            path = path / "adapter"
        if not (path / "config.json").is_file():
            raise InputError(f"--init-adapter {path}: no adapter there (config.json is missing)")
        adapter = SURAdapter.from_pretrained(path, dropout=config.adapter_dropout)
        check_adapter_fits(adapter.config, parts, f"--init-adapter {path}")
        if adapter.config.llm_dim != llm_dim:
            raise InputError(
                f"--init-adapter {path} projects LLM vectors of width {adapter.config.llm_dim}, "
                f"but {config.llm} gives {llm_dim}"
            )
        adapter.llm_projection.requires_grad_(config.train_llm_projection)
        return adapter
    if text_width % config.adapter_heads:
        raise InputError(
            f"--adapter-heads {config.adapter_heads} does not divide the text width {text_width}"
        )
    return SURAdapter(
        embed_dim=text_width,
        num_layers=config.adapter_layers,
        num_heads=config.adapter_heads,
        feedforward_dim=config.adapter_feedforward,
        mlp_dim=config.adapter_mlp,
        dropout=config.adapter_dropout,
        adapter_weight=config.adapter_weight,
        llm_dim=llm_dim,
        train_llm_projection=config.train_llm_projection,
        projection_seed=config.seed,
        family=parts.family,
        pooled_dim=parts.pooled_width,
        pooled_head=config.pooled_head and parts.pooled_width > 0,
    )


def prepare_unet(config: TrainConfig, parts: Any, device: Any) -> Any:
    """The frozen UNet on the device, with gradient checkpointing and compilation if asked."""
    import torch

    unet = parts.unet
    unet.to(device)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if config.compile:
        unet = torch.compile(unet)
    return unet


def loss_settings(config: TrainConfig, parts: Any) -> LossSettings:
    """The objective's weights and options; the prediction type defaults to the model's."""
    return LossSettings(
        config.eta_llm, config.eta_prompt, config.temperature, config.min_snr_gamma,
        config.prediction_type or parts.prediction_type,
        OBJECTIVES[config.objective].quality_reaches_adapter,
    )  # fmt: skip


def make_optimizer(config: TrainConfig, trainable: list, steps: int) -> tuple[Any, Any]:
    """(AdamW over the trainable parameters, its learning-rate schedule over ``steps``)."""
    import torch
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.AdamW(
        trainable, lr=config.learning_rate, weight_decay=config.adam_weight_decay
    )
    lr_scheduler = get_scheduler(
        config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=steps,
    )  # fmt: skip
    return optimizer, lr_scheduler


def seed_process(config: TrainConfig, process_index: int) -> None:
    """Dropout draws from the global RNG, the same on every process after the seeded init:
    other processes get their own masks (the main one keeps a single process's)."""
    import torch

    if process_index > 0:
        torch.manual_seed((config.seed * 1_000_003 + process_index) % (2**63 - 1))
