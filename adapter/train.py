"""``surd train``: the SUR-adapter on a frozen Stable Diffusion model, distilling from an LLM.

The order follows diffusers' training examples: options -> accelerator -> frozen parts in the
weight dtype -> cached inputs -> the trainable adapter in float32 -> loop -> save. What differs:

- frozen inputs (VAE latent distributions, CLIP embeddings of both prompts, LLM features) are
  computed once into caches (:mod:`adapter.cache`), so a step is one UNet forward and backward to
  the condition;
- the randomness of step ``s`` is a function of (seed, ``s``) (:mod:`adapter.step`), so a run
  resumed from ``checkpoint-s`` continues exactly as the uninterrupted run would have, and it
  does not depend on the number of processes: ``N`` processes with ``--batch-size B`` train the
  adapter one process with ``N * B`` does (up to float sums, with ``--adapter-dropout 0``);
- under ``accelerate launch`` caches are filled once, split over the processes that see the
  same cache folder (all of them on a shared filesystem, each node's own otherwise), and every
  process must see the same ``--output``;
- checkpoints are written to a temporary folder and renamed, so a kill never leaves a half one.

Output folder: the trained adapter (``config.json`` + safetensors, loadable with
``SURAdapter.from_pretrained(OUTPUT)``), ``checkpoints/checkpoint-N/``, ``logs/`` (TensorBoard),
``history.jsonl`` (every logged value), ``loss-curve.png``, ``validation/step-N.png`` and
``train-summary.json``.

This module holds :func:`train` and its loop. Each other job has its module:
:mod:`adapter.train_config` (options, objectives), :mod:`adapter.train_setup` (accelerator,
the processes' shares, adapter and optimizer), :mod:`adapter.train_caches` (the cached frozen
inputs), :mod:`adapter.checkpoints`, :mod:`adapter.train_logging` (history, gradient norms,
progress) and :mod:`adapter.train_outputs` (validation images, final save, summary).
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
from dataclasses import asdict
from typing import Any

from adapter.checkpoints import (
    check_steps_left,
    register_adapter_hooks,
    resume_point,
    save_checkpoint,
)
from adapter.step import (
    LossSettings,
    StepNoise,
    compute_losses,
    draw_step_noise,
    micro_batch_indices,
    step_generator,
)
from adapter.train_caches import TrainInputs, load_inputs
from adapter.train_config import TrainConfig, TrainReport, total_steps
from adapter.train_logging import History, LogWindow, TrainProgress, term_gradient_norms
from adapter.train_outputs import save_final_adapter, save_validation_images, write_summary
from adapter.train_setup import (
    loss_settings,
    make_accelerator,
    make_adapter,
    make_optimizer,
    make_output_folder,
    prepare_unet,
    resolve_model_defaults,
    seed_process,
)
from adapter.validation import held_out_losses
from surd_builder.errors import InputError

__all__ = ["TrainConfig", "TrainReport", "train"]


def train(config: TrainConfig) -> TrainReport:
    """Train the adapter as ``config`` says, resuming from a checkpoint where there is one."""
    import torch

    if config.cache_engine == "ray":
        from surd_builder.ray_engine import require_ray

        require_ray()  # before hours of loading, not after
    resolve_model_defaults(config)  # --resolution etc. from the base model, before resuming
    accelerator, weight_dtype = make_accelerator(config)
    show = config.show_progress and accelerator.is_main_process
    make_output_folder(accelerator, config)
    resume_path, resume_step = resume_point(accelerator, config, show)

    inputs = load_inputs(config, accelerator, weight_dtype, show)
    if config.caches_only:  # e.g. filled on a Ray cluster's GPUs before a long training run
        return _caches_only_report(config, accelerator, inputs, weight_dtype)
    if not len(inputs.train_set):
        raise InputError(f"--data {config.data}: none of the {config.split!r} images decode")

    parts, device = inputs.parts, accelerator.device
    unet = prepare_unet(config, parts, device)
    settings = loss_settings(config, parts)
    torch.manual_seed(config.seed)
    adapter = make_adapter(config, parts.text_width, inputs.train_set.llm_dim, parts)
    adapter.to(device).train()
    trainable = [param for param in adapter.parameters() if param.requires_grad]
    steps = total_steps(config, len(inputs.train_set), accelerator.num_processes)
    optimizer, lr_scheduler = make_optimizer(config, trainable, steps)
    adapter, optimizer = accelerator.prepare(adapter, optimizer)
    accelerator.register_for_checkpointing(lr_scheduler)
    register_adapter_hooks(accelerator)
    seed_process(config, accelerator.process_index)
    if resume_path is not None:
        accelerator.load_state(str(resume_path))  # restores each process's RNG state
    check_steps_left(resume_path, resume_step, steps)

    history = History(config.output / "history.jsonl", accelerator.is_main_process, resume_step)
    tracker_config = {k: v for k, v in asdict(config).items() if isinstance(v, int | float | str)}
    accelerator.init_trackers("surd-train", config=tracker_config)
    loop = _Loop(config, accelerator, inputs, unet, settings, adapter, trainable, optimizer,
                 lr_scheduler, history, steps)  # fmt: skip
    first_held = loop.evaluate(0) if resume_step == 0 else history.first("held_out")
    loop.window.restart_clock()  # evaluation time is not training time
    with TrainProgress(steps, resume_step, show) as progress:
        for step in range(resume_step, steps):
            loop.run_step(step, progress)
    return loop.finish(resume_step, first_held)


def logs_at(config: TrainConfig, done: int, steps: int) -> bool:
    """A history row every ``--logging-steps`` and at every checkpoint and evaluation, so a run
    resumed from a checkpoint logs the same windows as the uninterrupted run; only logged steps
    wait for the GPU."""
    logged = done % config.logging_steps == 0 or done % config.checkpointing_steps == 0
    return logged or done == steps or done % config.validation_steps == 0


class _Loop:
    """The training loop: what every step uses, and what the run reports at the end."""

    def __init__(
        self, config: TrainConfig, accelerator: Any, inputs: TrainInputs, unet: Any,
        settings: LossSettings, adapter: Any, trainable: list, optimizer: Any, lr_scheduler: Any,
        history: History, steps: int,
    ) -> None:  # fmt: skip
        self.config, self.accelerator, self.inputs = config, accelerator, inputs
        self.unet, self.settings, self.adapter, self.trainable = unet, settings, adapter, trainable
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.history, self.steps = history, steps
        self.noise_scheduler = inputs.parts.noise_scheduler
        vae_config = inputs.parts.vae.config
        self.scaling = vae_config.scaling_factor
        self.shift = getattr(vae_config, "shift_factor", None)
        self.main = accelerator.is_main_process
        self.accumulation = config.gradient_accumulation_steps
        self.samples_per_step = config.batch_size * self.accumulation * accelerator.num_processes
        self.window = LogWindow(accelerator.device)  # losses summed on the device between rows
        self.rates: list[float] = []
        self.last_terms: dict[str, float] = {}
        self.last_held: dict[str, float] = {}

    def evaluate(self, step: int) -> dict[str, float]:
        """Held-out losses (main process only), logged and returned."""
        held_set, accelerator = self.inputs.held_set, self.accelerator
        if held_set is None or not self.main:
            return {}
        model = accelerator.unwrap_model(self.adapter)
        model.eval()
        losses = held_out_losses(
            model, self.unet, self.noise_scheduler, held_set, self.settings, self.scaling,
            self.shift, self.config.batch_size, accelerator.device, accelerator.autocast,
        )  # fmt: skip
        model.train()
        accelerator.log({f"held_out/{k}": v for k, v in losses.items()}, step=step)
        self.history.add({"kind": "held_out", "step": step, **losses})
        return losses

    def run_step(self, step: int, progress: TrainProgress) -> None:
        """Optimizer step ``step`` (from 0), then what falls due after it."""
        done = step + 1
        logged = logs_at(self.config, done, self.steps)
        total_norm, grad_norms = self.optimisation_step(step, logged)
        if logged:
            self.log(done, total_norm, grad_norms, progress)
        progress.advance()
        self.after_step(done)

    def micro_batch(self, number: int) -> tuple[Any, StepNoise]:
        """(tensors, random inputs) of this process's part of global micro-batch ``number``:
        the random inputs are drawn for the whole global micro-batch, the same on every process,
        and this one's rows are those of its samples, so the process count changes nothing."""
        config, accelerator, train_set = self.config, self.accelerator, self.inputs.train_set
        device, batch = accelerator.device, config.batch_size
        rank, world = accelerator.process_index, accelerator.num_processes
        step_noise = draw_step_noise(
            step_generator(config.seed, number, 0, device), batch * world, train_set.latent_shape,
            self.noise_scheduler.config.num_train_timesteps, config.random_flip, device,
            flip_generator=step_generator(config.seed, number, 1),
        ).rows(rank * batch, (rank + 1) * batch)  # fmt: skip
        indices = micro_batch_indices(number, batch, world, rank, len(train_set), config.seed)
        return train_set.batch(indices, step_noise.flips, device), step_noise

    def optimisation_step(self, step: int, logged: bool) -> tuple[Any, dict[str, float]]:
        """Accumulate the micro-batches' gradients, clip, step: (the total gradient norm before
        clipping or None, and when ``logged`` each term's gradient norm on the last
        micro-batch)."""
        accelerator, accumulation = self.accelerator, self.accumulation
        grad_norms: dict[str, float] = {}
        for micro in range(accumulation):
            tensors, step_noise = self.micro_batch(step * accumulation + micro)
            sync = micro == accumulation - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(self.adapter):
                with accelerator.autocast():
                    terms = compute_losses(
                        self.adapter, self.unet, self.noise_scheduler, tensors, None,
                        self.settings, self.scaling, self.shift, step_noise,
                    )  # fmt: skip
                if logged and sync:  # the last micro-batch's per-term gradients
                    grad_norms = term_gradient_norms(
                        accelerator, self.trainable, terms, self.settings, accumulation
                    )
                else:
                    accelerator.backward(terms.total / accumulation)
            self.window.add(terms, accumulation)
        total_norm = None
        if self.config.max_grad_norm > 0:
            total_norm = accelerator.clip_grad_norm_(self.trainable, self.config.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total_norm, grad_norms

    def log(
        self, done: int, total_norm: Any, grad_norms: dict[str, float], progress: TrainProgress
    ) -> None:
        """A train row: the window's mean losses, learning rate, samples/s, gradient norms."""
        values, rate = self.window.take(self.accelerator, self.samples_per_step)
        if rate is not None:
            self.rates.append(rate)
        row = {**values, "lr": self.lr_scheduler.get_last_lr()[0]}
        if rate is not None:
            row["samples_per_s"] = rate
        if total_norm is not None:
            row["grad_norm/total"] = float(total_norm)
        row.update(grad_norms)
        self.accelerator.log({f"train/{k}": v for k, v in row.items()}, step=done)
        self.history.add({"kind": "train", "step": done, **row})
        self.last_terms = values
        progress.show(values["total"], rate)

    def after_step(self, done: int) -> None:
        """Evaluation and validation images, then the checkpoint, when they fall due."""
        config = self.config
        if done % config.validation_steps == 0 or done == self.steps:
            self.last_held = self.evaluate(done) or self.last_held
            if self.main and config.validation_prompts:
                save_validation_images(
                    self.accelerator, config, self.inputs.parts, self.unet, self.adapter, done
                )
            self.window.restart_clock()  # evaluation time is not training time
        if done % config.checkpointing_steps == 0 or done == self.steps:
            save_checkpoint(self.accelerator, config, done)
            self.window.restart_clock()
        if done == _crash_after_step():
            os.kill(os.getpid(), signal.SIGKILL)  # a real kill: no cleanup, no flushing

    def finish(self, resume_step: int, first_held: dict[str, float]) -> TrainReport:
        """Save the adapter, close the trackers, report (and write the summary)."""
        accelerator, config, inputs = self.accelerator, self.config, self.inputs
        accelerator.wait_for_everyone()
        if self.main:
            save_final_adapter(accelerator.unwrap_model(self.adapter), config.output)
        accelerator.end_training()
        # the first window includes warm-up (allocation, compilation): left out of the rate
        steady = self.rates[1:] or self.rates
        report = TrainReport(
            output=config.output,
            steps=self.steps,
            resumed_from=resume_step,
            train_samples=len(inputs.train_set),
            held_out_samples=len(inputs.held_set) if inputs.held_set is not None else 0,
            skipped=inputs.skipped,
            computed=inputs.computed,
            samples_per_second=statistics.median(steady) if steady else 0.0,
            final_losses=self.last_terms,
            first_held_out=first_held,
            last_held_out=self.last_held,
            device=str(accelerator.device),
            main_process=self.main,
        )
        if self.main:
            write_summary(report, config)
        return report


def _caches_only_report(
    config: TrainConfig, accelerator: Any, inputs: TrainInputs, weight_dtype: Any
) -> TrainReport:
    """``--caches-only``: what was cached, and the dtypes the cache identities name."""
    from surd_builder.models import dtype_name

    held_set = inputs.held_set
    return TrainReport(
        output=config.output, steps=0, resumed_from=0, train_samples=len(inputs.train_set),
        held_out_samples=len(held_set) if held_set is not None else 0, skipped=inputs.skipped,
        computed=inputs.computed, samples_per_second=0.0, final_losses={}, first_held_out={},
        last_held_out={}, device=str(accelerator.device), main_process=accelerator.is_main_process,
        cache_dtypes={"text encoder and VAE": dtype_name(weight_dtype),
                      "LLM": inputs.llm_dtype_name},
    )  # fmt: skip


def _crash_after_step() -> int | None:
    """``SURD_TRAIN_KILL_AFTER_STEP=N`` makes the process SIGKILL itself after step N (and its
    checkpoint, if one falls there): the kill-and-resume test's deterministic kill."""
    value = os.environ.get("SURD_TRAIN_KILL_AFTER_STEP", "")
    return int(value) if value.isdigit() else None
