"""``surd train``: parse options into a :class:`adapter.train.TrainConfig`, run, print counts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

DATA, MODEL, OPT, LOSS, ADAPTER, RUN, CACHE = (
    "Data", "Models", "Optimisation", "Losses", "Adapter", "Run, checkpoints, validation",
    "Cached inputs",
)  # fmt: skip


def train(
    data: Annotated[
        str,
        typer.Option(
            help="The export folder (or its data/ folder) of `surd build export`, one Parquet "
            "file, or a Hugging Face dataset id with the same columns.",
            rich_help_panel=DATA,
        ),
    ],
    base_model: Annotated[
        str,
        typer.Option(
            help="Stable Diffusion 1.x/2.x or XL in diffusers layout: a folder or a hub id "
            "(the family is read from its components).",
            rich_help_panel=MODEL,
        ),
    ],
    llm: Annotated[
        str,
        typer.Option(help="Causal LM to distil from: a folder or a hub id.", rich_help_panel=MODEL),
    ],
    llm_layer: Annotated[
        int,
        typer.Option(
            help="Transformer block whose output is distilled, from 1 (the paper: the last).",
            rich_help_panel=MODEL,
        ),
    ],
    output: Annotated[
        Path, typer.Option(help="Where the adapter, checkpoints and logs go.", rich_help_panel=RUN)
    ],
    llm_pooling: Annotated[
        str,
        typer.Option(
            help="mean: every token of the prompt, BOS/EOS included (the released adapter); "
            "mean-no-special: the prompt's own tokens only (a prompt of special tokens alone "
            "falls back to mean); last: the last token.",
            rich_help_panel=MODEL,
        ),
    ] = "mean",
    llm_dtype: Annotated[
        str, typer.Option(help="auto, float32, float16 or bfloat16.", rich_help_panel=MODEL)
    ] = "auto",
    variant: Annotated[
        str | None,
        typer.Option(help="Weights variant of the base model (e.g. fp16).", rich_help_panel=MODEL),
    ] = None,
    revision: Annotated[
        str | None, typer.Option(help="Hub revision of the base model.", rich_help_panel=MODEL)
    ] = None,
    vae: Annotated[
        str | None,
        typer.Option(
            help="A VAE (folder or hub id) instead of the base model's, e.g. an SDXL VAE fixed "
            "for float16 (without one SDXL's VAE is upcast to float32 under fp16).",
            rich_help_panel=MODEL,
            show_default=False,
        ),
    ] = None,
    pooled_head: Annotated[
        bool,
        typer.Option(
            help="SDXL: adapt the pooled text embedding with a small head trained by the same "
            "losses (--no-pooled-head: the narrative prompt's, unchanged).",
            rich_help_panel=MODEL,
        ),
    ] = True,
    split: Annotated[str, typer.Option(help="Split to train on.", rich_help_panel=DATA)] = "train",
    validation_split: Annotated[
        str,
        typer.Option(
            help="Held-out split for validation losses (none: skip).", rich_help_panel=DATA
        ),
    ] = "test",
    held_out_samples: Annotated[
        int, typer.Option(min=0, help="Held-out samples evaluated.", rich_help_panel=DATA)
    ] = 256,
    narrative_column: Annotated[
        str, typer.Option(help="Column of the narrative prompt.", rich_help_panel=DATA)
    ] = "narrative_prompt",
    keyword_column: Annotated[
        str, typer.Option(help="Column of the keyword prompt.", rich_help_panel=DATA)
    ] = "complex_prompt",
    image_column: Annotated[
        str,
        typer.Option(help="Column of the image (HF Image struct or bytes).", rich_help_panel=DATA),
    ] = "image",
    resolution: Annotated[
        int | None,
        typer.Option(
            min=8,
            help="Training image side (centre crop). Default: the base model's own (512 for SD "
            "1.x, 768 for SD 2.x-v, 1024 for SDXL).",
            rich_help_panel=DATA,
            show_default=False,
        ),
    ] = None,
    random_flip: Annotated[
        bool, typer.Option(help="Mirror half the images (both cached).", rich_help_panel=DATA)
    ] = True,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            help="Cache of frozen inputs, shared by runs (default: train-inputs/ in "
            "$SURD_CACHE_DIR, else in ~/.cache/surd).",
            rich_help_panel=CACHE,
        ),
    ] = None,
    batch_size: Annotated[
        int,
        typer.Option(
            min=1,
            help="Samples per process per micro-batch: the global batch is this x processes x "
            "--gradient-accumulation-steps (as in diffusers' scripts).",
            rich_help_panel=OPT,
        ),
    ] = 16,
    gradient_accumulation_steps: Annotated[
        int, typer.Option(min=1, help="Micro-batches per optimizer step.", rich_help_panel=OPT)
    ] = 1,
    epochs: Annotated[
        int, typer.Option(min=1, help="Passes over the train split.", rich_help_panel=OPT)
    ] = 10,
    max_steps: Annotated[
        int | None,
        typer.Option(min=1, help="Optimizer steps (overrides --epochs).", rich_help_panel=OPT),
    ] = None,
    learning_rate: Annotated[
        float | None,
        typer.Option(
            help="AdamW learning rate [default: the objective's: surd 3e-4, released 1e-5]",
            show_default=False,
            rich_help_panel=OPT,
        ),
    ] = None,
    lr_scheduler: Annotated[
        str,
        typer.Option(help="constant, constant_with_warmup, linear or cosine.", rich_help_panel=OPT),
    ] = "constant",
    lr_warmup_steps: Annotated[
        int, typer.Option(min=0, help="Warm-up steps of the lr schedule.", rich_help_panel=OPT)
    ] = 0,
    adam_weight_decay: Annotated[
        float, typer.Option(min=0.0, help="AdamW weight decay.", rich_help_panel=OPT)
    ] = 1e-2,
    max_grad_norm: Annotated[
        float, typer.Option(min=0.0, help="0 turns clipping off.", rich_help_panel=OPT)
    ] = 1.0,
    objective: Annotated[
        str,
        typer.Option(
            help="surd: the three losses through one graph, weights chosen from measured "
            "gradient norms (README: The objective); released: the released code (quality loss "
            "cut off the adapter, eta 1e-5, lr 1e-5), for comparison.",
            rich_help_panel=LOSS,
        ),
    ] = "surd",
    eta_llm: Annotated[
        float | None,
        typer.Option(
            help="Weight of the LLM distillation loss [default: the objective's: surd 1e-3, "
            "released 1e-5]",
            show_default=False,
            rich_help_panel=LOSS,
        ),
    ] = None,
    eta_prompt: Annotated[
        float | None,
        typer.Option(
            help="Weight of the prompt alignment loss [default: the objective's: surd 1e-2, "
            "released 1e-5]",
            show_default=False,
            rich_help_panel=LOSS,
        ),
    ] = None,
    temperature: Annotated[
        float, typer.Option(min=1e-6, help="Softmax temperature of both KLs.", rich_help_panel=LOSS)
    ] = 1.0,
    min_snr_gamma: Annotated[
        float | None,
        typer.Option(help="Min-SNR weighting of the quality loss (e.g. 5).", rich_help_panel=LOSS),
    ] = None,
    prediction_type: Annotated[
        str | None,
        typer.Option(
            help="epsilon or v_prediction (default: the base model scheduler's).",
            rich_help_panel=LOSS,
        ),
    ] = None,
    adapter_weight: Annotated[
        float, typer.Option(help="w in y = w*adapter + (1-w)*x.", rich_help_panel=ADAPTER)
    ] = 0.1,
    adapter_layers: Annotated[
        int, typer.Option(min=1, help="Transformer encoder layers.", rich_help_panel=ADAPTER)
    ] = 2,
    adapter_heads: Annotated[
        int,
        typer.Option(
            min=1, help="Attention heads (divide the text width).", rich_help_panel=ADAPTER
        ),
    ] = 8,
    adapter_feedforward: Annotated[
        int, typer.Option(min=1, help="Encoder feed-forward width.", rich_help_panel=ADAPTER)
    ] = 2048,
    adapter_mlp: Annotated[
        int,
        typer.Option(
            min=1, help="Hidden width of the MLP after cross-attention.", rich_help_panel=ADAPTER
        ),
    ] = 768,
    adapter_dropout: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="Dropout in the adapter's encoder (released: 0.1). 0 makes runs with different "
            "process counts agree up to float sums.",
            rich_help_panel=ADAPTER,
        ),
    ] = 0.1,
    train_llm_projection: Annotated[
        bool,
        typer.Option(
            help="Train the LLM-to-text projection (frozen if not).", rich_help_panel=ADAPTER
        ),
    ] = False,  # fmt: skip
    init_adapter: Annotated[
        str | None, typer.Option(help="Start from a saved adapter folder.", rich_help_panel=ADAPTER)
    ] = None,
    device: Annotated[
        str,
        typer.Option(
            help="auto, cpu or cuda (accelerate launch picks GPUs itself).", rich_help_panel=RUN
        ),
    ] = "auto",  # fmt: skip
    mixed_precision: Annotated[
        str, typer.Option(help="auto (bf16 on GPU), no, fp16 or bf16.", rich_help_panel=RUN)
    ] = "auto",
    seed: Annotated[
        int,
        typer.Option(
            min=0,
            help="Seeds init, sample order, noise: same seed, same run.",
            rich_help_panel=RUN,
        ),  # fmt: skip
    ] = 0,
    checkpointing_steps: Annotated[
        int,
        typer.Option(min=1, help="Save a resumable checkpoint every N steps.", rich_help_panel=RUN),
    ] = 500,
    checkpoints_total_limit: Annotated[
        int | None, typer.Option(min=1, help="Keep at most this many.", rich_help_panel=RUN)
    ] = 3,
    logging_steps: Annotated[
        int,
        typer.Option(
            min=1,
            help="Log losses, gradient norms and samples/s every N steps (and at checkpoints); "
            "only logged steps wait for the GPU.",
            rich_help_panel=RUN,
        ),
    ] = 10,
    resume: Annotated[
        str,
        typer.Option(
            help="auto (the latest checkpoint in --output), none, or a checkpoint folder.",
            rich_help_panel=RUN,
        ),
    ] = "auto",
    validation_steps: Annotated[
        int,
        typer.Option(min=1, help="Held-out losses and images every N steps.", rich_help_panel=RUN),
    ] = 500,
    validation_prompt: Annotated[
        list[str] | None,
        typer.Option(
            help="Prompt for validation images, repeatable (default: three built-in ones).",
            rich_help_panel=RUN,
        ),
    ] = None,
    no_validation_images: Annotated[
        bool,
        typer.Option("--no-validation-images", help="Skip validation images.", rich_help_panel=RUN),
    ] = False,
    validation_inference_steps: Annotated[
        int, typer.Option(min=1, help="Denoising steps of validation images.", rich_help_panel=RUN)
    ] = 25,
    gradient_checkpointing: Annotated[
        bool | None,
        typer.Option(
            help="Recompute UNet activations: less memory, slower. Default: on for SDXL, off "
            "for SD 1.x/2.x.",
            rich_help_panel=RUN,
            show_default=False,
        ),
    ] = None,
    compile: Annotated[
        bool, typer.Option(help="torch.compile the UNet.", rich_help_panel=RUN)
    ] = False,
    encode_batch_size: Annotated[
        int, typer.Option(min=1, help="Batch for caching VAE/CLIP inputs.", rich_help_panel=RUN)
    ] = 32,
    llm_batch_size: Annotated[
        int, typer.Option(min=1, help="Batch for caching LLM features.", rich_help_panel=RUN)
    ] = 16,
    cache_engine: Annotated[
        str,
        typer.Option(
            help="Where the caches are filled: local (this run's processes) or ray (workers "
            "on a Ray cluster's GPUs; --cache-dir on storage they all see).",
            rich_help_panel=CACHE,
        ),
    ] = "local",
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="With --cache-engine ray: the cluster to join (default: RAY_ADDRESS, else a "
            "new Ray on this machine).",
            rich_help_panel=CACHE,
            show_default=False,
        ),
    ] = None,
    ray_workers: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="With --cache-engine ray: workers (default: one per GPU, or per CPU).",
            rich_help_panel=CACHE,
            show_default=False,
        ),
    ] = None,
    caches_only: Annotated[
        bool,
        typer.Option(
            "--caches-only",
            help="Fill the caches and stop: a later run with the same settings computes nothing.",
            rich_help_panel=CACHE,
        ),
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.", rich_help_panel=RUN)] = True,
) -> None:
    """Train the SUR-adapter on a frozen Stable Diffusion model, distilling from an LLM."""
    from surd_builder.models import check_hub_model

    # every run loads the base model (the LLM may be unreachable while its vectors are cached):
    # an unreachable hub is one line before torch loads
    check_hub_model(base_model, "base model")
    from adapter.data import Columns
    from adapter.train import TrainConfig
    from adapter.train import train as run_training
    from adapter.validation import DEFAULT_VALIDATION_PROMPTS

    prompts: tuple[str, ...] = tuple(validation_prompt or DEFAULT_VALIDATION_PROMPTS)
    config = TrainConfig(
        data=data, base_model=base_model, llm=llm, llm_layer=llm_layer, output=output,
        llm_pooling=llm_pooling, llm_dtype=llm_dtype, variant=variant, revision=revision,
        vae=vae, pooled_head=pooled_head,
        columns=Columns(narrative_column, keyword_column, image_column), split=split,
        validation_split=validation_split, held_out_samples=held_out_samples,
        resolution=resolution, random_flip=random_flip, cache_dir=cache_dir,
        batch_size=batch_size, gradient_accumulation_steps=gradient_accumulation_steps,
        epochs=epochs, max_steps=max_steps, learning_rate=learning_rate,
        lr_scheduler=lr_scheduler, lr_warmup_steps=lr_warmup_steps,
        adam_weight_decay=adam_weight_decay, max_grad_norm=max_grad_norm, eta_llm=eta_llm,
        objective=objective, logging_steps=logging_steps,
        eta_prompt=eta_prompt, temperature=temperature, min_snr_gamma=min_snr_gamma,
        prediction_type=prediction_type, adapter_weight=adapter_weight,
        adapter_layers=adapter_layers, adapter_heads=adapter_heads,
        adapter_feedforward=adapter_feedforward, adapter_mlp=adapter_mlp,
        adapter_dropout=adapter_dropout,
        train_llm_projection=train_llm_projection, init_adapter=init_adapter, device=device,
        mixed_precision=mixed_precision, seed=seed, checkpointing_steps=checkpointing_steps,
        checkpoints_total_limit=checkpoints_total_limit, resume=resume,
        validation_steps=validation_steps,
        validation_prompts=() if no_validation_images else prompts,
        validation_inference_steps=validation_inference_steps,
        gradient_checkpointing=gradient_checkpointing, compile=compile,
        encode_batch_size=encode_batch_size, llm_batch_size=llm_batch_size,
        cache_engine=cache_engine, ray_address=ray_address, ray_workers=ray_workers,
        caches_only=caches_only, show_progress=progress,
    )  # fmt: skip
    report = run_training(config)
    if not report.main_process:
        return
    if caches_only:
        computed = ", ".join(f"{kind} {count}" for kind, count in report.computed.items())
        typer.echo(
            f"caches filled for {report.train_samples} train and {report.held_out_samples} "
            f"held-out samples: computed {computed or 'nothing'} (the rest were cached)"
        )
        dtypes = ", ".join(f"{part} in {dtype}" for part, dtype in report.cache_dtypes.items())
        typer.echo(
            f"cached for {dtypes}: a training run uses them when it resolves the same "
            "(--mixed-precision, --llm-dtype; auto is bf16 on a GPU, float32 on a CPU)"
        )
        return
    if report.resumed_from:
        typer.echo(f"resumed from step {report.resumed_from}")
    typer.echo(
        f"trained {report.steps} steps on {report.train_samples} samples ({report.device}, "
        f"{report.samples_per_second:,.1f} samples/s)"
    )
    skipped = ", ".join(f"{reason}: {count}" for reason, count in report.skipped.items())
    typer.echo(f"skipped: {skipped or 'none'}")
    computed = ", ".join(f"{kind} {count}" for kind, count in report.computed.items())
    typer.echo(f"cache: computed {computed or 'nothing'} (the rest were cached)")
    losses = ", ".join(f"{name} {value:.4g}" for name, value in report.final_losses.items())
    typer.echo(f"last step: {losses}")
    if report.first_held_out and report.last_held_out:
        first, last = report.first_held_out, report.last_held_out
        typer.echo(
            f"held-out ({report.held_out_samples}): prompt alignment "
            f"{first['prompt_alignment']:.4g} -> {last['prompt_alignment']:.4g}, quality "
            f"{first['quality']:.4g} -> {last['quality']:.4g}"
        )
    typer.echo(f"adapter saved to {report.output} (loss curve: {report.output / 'loss-curve.png'})")
