"""``surd train``'s options (:class:`TrainConfig`), its report, and the objective presets.

Kept apart from the loop so that the CLI, the checkpoint code and the benchmarks can build and
check a configuration without the training machinery (accelerate, diffusers).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from adapter.data import Columns
from adapter.features import POOLINGS
from adapter.validation import DEFAULT_VALIDATION_PROMPTS
from surd_builder.errors import InputError
from surd_builder.ray_engine import ENGINES

MIXED_PRECISIONS = ("auto", "no", "fp16", "bf16")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
# settings a checkpoint must share with the run that resumes it
# (--max-steps / --epochs may grow: that is how a finished run is extended)
RESUME_KEYS = (
    "data", "split", "base_model", "variant", "revision", "llm", "llm_layer", "llm_pooling",
    "llm_dtype", "resolution", "random_flip", "batch_size", "gradient_accumulation_steps",
    "seed", "learning_rate", "lr_scheduler", "lr_warmup_steps", "adam_weight_decay",
    "max_grad_norm", "eta_llm", "eta_prompt", "temperature", "min_snr_gamma", "prediction_type",
    "adapter_weight", "adapter_layers", "adapter_heads", "adapter_feedforward", "adapter_mlp",
    "adapter_dropout", "train_llm_projection", "init_adapter", "mixed_precision", "objective",
    "vae", "pooled_head",
)  # fmt: skip
# settings added to RESUME_KEYS later, with the value that checkpoints written before had
ADDED_RESUME_KEYS = {"adapter_dropout": 0.1, "objective": "surd", "vae": None,
                     "pooled_head": True}  # fmt: skip


@dataclass(frozen=True)
class Objective:
    """What a preset of ``--objective`` sets when the options are not given."""

    eta_llm: float
    eta_prompt: float
    learning_rate: float
    quality_reaches_adapter: bool


OBJECTIVES = {
    # chosen from the measured gradient norms of each term on the adapter (README: "The
    # objective"): the KL terms weighted so that their gradients are not swamped by the quality
    # loss's, which reaches the adapter through the frozen UNet
    "surd": Objective(eta_llm=1e-3, eta_prompt=1e-2, learning_rate=3e-4,
                      quality_reaches_adapter=True),
    # the released code: its condition tensor rebuilt with torch.tensor(...) cut the graph, so
    # only the two KL terms (eta 1e-5) trained the adapter, with AdamW at 1e-5
    "released": Objective(eta_llm=1e-5, eta_prompt=1e-5, learning_rate=1e-5,
                          quality_reaches_adapter=False),
}  # fmt: skip


@dataclass
class TrainConfig:
    """Every ``surd train`` option; checked (and the objective's defaults filled in) on creation,
    so a bad value fails before any model is loaded."""

    data: str
    base_model: str
    llm: str
    llm_layer: int
    output: Path
    llm_pooling: str = "mean"
    columns: Columns = field(default_factory=Columns)
    split: str = "train"
    validation_split: str = "test"
    cache_dir: Path | None = None
    variant: str | None = None
    revision: str | None = None
    resolution: int | None = None  # None: the base model's own (see resolve_model_defaults)
    vae: str | None = None  # a VAE folder or hub id instead of the base model's (SDXL fp16 fix)
    pooled_head: bool = True  # SDXL: adapt the pooled text embedding too (else passed through)
    random_flip: bool = True
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    epochs: int = 10
    max_steps: int | None = None
    learning_rate: float | None = None  # None: the objective's
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    adam_weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    objective: str = "surd"
    eta_llm: float | None = None  # None: the objective's
    eta_prompt: float | None = None  # None: the objective's
    temperature: float = 1.0
    min_snr_gamma: float | None = None
    prediction_type: str | None = None
    adapter_weight: float = 0.1
    adapter_layers: int = 2
    adapter_heads: int = 8
    adapter_feedforward: int = 2048
    adapter_mlp: int = 768
    adapter_dropout: float = 0.1  # PyTorch's default, which the released code used
    train_llm_projection: bool = False
    init_adapter: str | None = None
    mixed_precision: str = "auto"
    device: str = "auto"
    llm_dtype: str = "auto"
    seed: int = 0
    checkpointing_steps: int = 500
    logging_steps: int = 10  # a history row (one wait for the GPU) every N steps
    checkpoints_total_limit: int | None = 3
    resume: str = "auto"
    validation_steps: int = 500
    validation_prompts: tuple[str, ...] = DEFAULT_VALIDATION_PROMPTS
    validation_inference_steps: int = 25
    validation_guidance_scale: float = 7.5
    held_out_samples: int = 256
    gradient_checkpointing: bool | None = None  # None: on for SDXL, off for SD 1.x/2.x
    compile: bool = False
    encode_batch_size: int = 32
    cache_engine: str = "local"  # or "ray": caches filled by Ray workers (GPUs of a cluster)
    ray_address: str | None = None  # with cache_engine "ray": the cluster (None: RAY_ADDRESS/local)
    ray_workers: int | None = None  # with cache_engine "ray": workers (None: one per GPU or CPU)
    caches_only: bool = False  # fill the caches, then stop (no training)
    llm_batch_size: int = 16
    show_progress: bool = True

    def __post_init__(self) -> None:
        self.output = Path(self.output)
        if self.objective not in OBJECTIVES:
            raise InputError(f"--objective must be one of {', '.join(OBJECTIVES)}")
        preset = OBJECTIVES[self.objective]
        for name in ("eta_llm", "eta_prompt", "learning_rate"):
            if getattr(self, name) is None:
                setattr(self, name, getattr(preset, name))
        checks = [
            (self.llm_pooling in POOLINGS, f"--llm-pooling must be one of {', '.join(POOLINGS)}"),
            (self.mixed_precision in MIXED_PRECISIONS,
             f"--mixed-precision must be one of {', '.join(MIXED_PRECISIONS)}"),
            (self.lr_scheduler in LR_SCHEDULERS,
             f"--lr-scheduler must be one of {', '.join(LR_SCHEDULERS)}"),
            (self.prediction_type in (None, "epsilon", "v_prediction"),
             "--prediction-type must be epsilon or v_prediction"),
            (self.resolution is None or (self.resolution >= 8 and self.resolution % 8 == 0),
             "--resolution must be a positive multiple of 8"),
            (self.batch_size >= 1 and self.gradient_accumulation_steps >= 1,
             "--batch-size and --gradient-accumulation-steps must be >= 1"),
            (self.epochs >= 1 or (self.max_steps or 0) >= 1, "train for at least one step"),
            (self.learning_rate > 0, "--learning-rate must be > 0"),
            (self.adapter_layers >= 1 and self.adapter_heads >= 1,
             "--adapter-layers and --adapter-heads must be >= 1"),
            (min(self.checkpointing_steps, self.validation_steps, self.logging_steps) >= 1,
             "--checkpointing-steps, --validation-steps and --logging-steps must be >= 1"),
            (0.0 <= self.adapter_weight <= 1.0, "--adapter-weight must be in [0, 1]"),
            (0.0 <= self.adapter_dropout < 1.0, "--adapter-dropout must be in [0, 1)"),
            (self.cache_engine in ENGINES, f"--cache-engine must be one of: {', '.join(ENGINES)}"),
            (self.cache_engine == "ray" or (self.ray_address, self.ray_workers) == (None, None),
             "--ray-address and --ray-workers need --cache-engine ray"),
            (self.llm_layer >= 1, "--llm-layer counts blocks from 1"),
            (self.seed >= 0, "--seed must be >= 0"),
            (self.lr_warmup_steps == 0 or self.lr_scheduler != "constant",
             "--lr-warmup-steps needs --lr-scheduler constant_with_warmup, linear or cosine "
             "(constant has no warm-up)"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise InputError(message)

    def settings_for_resume(self, num_processes: int) -> dict[str, Any]:
        """The settings a checkpoint records and a resuming run must match."""
        values = asdict(self)
        # the sample stream depends on the global batch, so the process count must match too
        return {**{key: values[key] for key in RESUME_KEYS}, "num_processes": num_processes}


@dataclass
class TrainReport:
    """What a run did, for the CLI's summary and ``train-summary.json``."""

    output: Path
    steps: int
    resumed_from: int
    train_samples: int
    held_out_samples: int
    skipped: dict[str, int]
    computed: dict[str, int]
    samples_per_second: float
    final_losses: dict[str, float]
    first_held_out: dict[str, float]
    last_held_out: dict[str, float]
    device: str
    main_process: bool = True  # under accelerate launch, only the main process reports
    # the dtypes the cache identities name: another run finds these caches when it resolves
    # the same (auto: bf16 on a GPU, float32 on a CPU)
    cache_dtypes: dict[str, str] = field(default_factory=dict)


def total_steps(config: TrainConfig, num_samples: int, world_size: int) -> int:
    """Optimizer steps of the run: ``--max-steps``, else enough for ``--epochs`` of the data."""
    if config.max_steps:
        return config.max_steps
    per_step = config.batch_size * config.gradient_accumulation_steps * world_size
    return max(1, math.ceil(config.epochs * num_samples / per_step))
