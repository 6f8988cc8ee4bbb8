"""What a run records as it trains: ``history.jsonl``, the loss terms summed on the device
between logged rows (one wait for the GPU per row, not per step), each loss term's gradient norm
on the adapter, and the progress bar."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from adapter.step import LossSettings


class History:
    """``history.jsonl``: every logged row; truncated to the resumed step on resume."""

    def __init__(self, path: Path, enabled: bool, resume_step: int):
        self.path, self.enabled = path, enabled
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            rows = []
            if path.is_file() and resume_step > 0:
                rows = [json.loads(line) for line in path.read_text().splitlines() if line]
                rows = [row for row in rows if row["step"] <= resume_step]
            path.write_text("".join(json.dumps(row) + "\n" for row in rows))

    def first(self, kind: str) -> dict[str, float]:
        """The first row of ``kind`` without its kind and step (empty if none or not main)."""
        if not self.enabled or not self.path.is_file():
            return {}
        for line in self.path.read_text().splitlines():
            row = json.loads(line)
            if row["kind"] == kind:
                return {k: v for k, v in row.items() if k not in ("kind", "step")}
        return {}

    def add(self, row: dict) -> None:
        if self.enabled:
            with self.path.open("a") as handle:
                handle.write(json.dumps(row) + "\n")


class LogWindow:
    """The loss terms summed on the device since the last logged row (no host sync per step),
    and the wall time they took."""

    NAMES = ("total", "quality", "distillation", "prompt_alignment")

    def __init__(self, device: Any):
        self.device = device
        self.sums: dict[str, Any] = {}
        self.steps = 0.0
        self.micro = 0
        self.restart_clock()

    def restart_clock(self) -> None:
        self.started, self.clock_steps = time.perf_counter(), 0.0

    def add(self, terms: Any, accumulation: int) -> None:
        for name in self.NAMES:
            value = getattr(terms, name).detach().float() / accumulation
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.micro += 1
        if self.micro == accumulation:
            self.micro, self.steps, self.clock_steps = 0, self.steps + 1, self.clock_steps + 1

    def take(self, accelerator: Any, samples_per_step: int) -> tuple[dict[str, float], Any]:
        """(mean of each term over the window, averaged over processes; samples/s over the
        window, None when the window had no training time of its own)."""
        import torch

        stacked = torch.stack([self.sums[name] for name in self.NAMES]) / max(self.steps, 1.0)
        means = accelerator.reduce(stacked, "mean").tolist()  # the one sync of the window
        elapsed = time.perf_counter() - self.started
        rate = samples_per_step * self.clock_steps / elapsed if self.clock_steps else None
        self.sums, self.steps = {}, 0.0
        self.restart_clock()
        return dict(zip(self.NAMES, means, strict=True)), rate


def term_gradient_norms(
    accelerator: Any, trainable: list, terms: Any, settings: LossSettings, accumulation: int
) -> dict[str, float]:
    """Backward of ``terms.total / accumulation`` (as every micro-batch does) that also returns
    each weighted term's gradient norm on the adapter's trainable parameters, for this
    micro-batch: what decides which term the adapter follows.

    The two KL terms do not pass through the UNet: their gradients are taken on their own
    (cheap, the graph kept); the quality term's is the rest of the total's, measured as the
    change of ``.grad`` across the backward. With several processes the KL gradients are
    averaged like the total's (the all-reduce), so the three add up to what the optimizer
    sees."""
    import torch

    weighted = {
        "distillation": terms.distillation * settings.eta_llm,
        "prompt_alignment": terms.prompt_alignment * settings.eta_prompt,
    }
    kl_grads: dict[str, list] = {}
    for name, term in weighted.items():
        if term.requires_grad:
            grads = torch.autograd.grad(term, trainable, retain_graph=True, allow_unused=True)
            kl_grads[name] = [
                torch.zeros_like(param) if grad is None else grad
                for grad, param in zip(grads, trainable, strict=True)
            ]
        else:
            kl_grads[name] = [torch.zeros_like(param) for param in trainable]
    before = [
        torch.zeros_like(param) if param.grad is None else param.grad.detach().clone()
        for param in trainable
    ]
    accelerator.backward(terms.total / accumulation)
    flat_total = torch.cat([
        ((param.grad if param.grad is not None else torch.zeros_like(param)) - old).flatten()
        for param, old in zip(trainable, before, strict=True)
    ]).float() * accumulation  # fmt: skip
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None:  # fp16: .grad holds the scaled gradients
        flat_total = flat_total / scaler.get_scale()
    flat_kl = {name: torch.cat([g.flatten() for g in grads]).float()
               for name, grads in kl_grads.items()}  # fmt: skip
    if accelerator.num_processes > 1:
        flat_kl = {name: accelerator.reduce(value, "mean") for name, value in flat_kl.items()}
    quality = flat_total - sum(flat_kl.values())
    norms = {"quality": quality, **flat_kl}
    return {f"grad_norm/{name}": float(torch.linalg.vector_norm(v)) for name, v in norms.items()}


class TrainProgress:
    """A rich bar over optimizer steps showing the loss and samples/s."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.enabled = enabled
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            from surd_builder.progress import stderr_console

            self.progress = Progress(
                TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}  {task.fields[rate]} samples/s"),
                TimeElapsedColumn(), TimeRemainingColumn(), console=stderr_console,
            )  # fmt: skip
            self.task = self.progress.add_task("train", total=total, completed=start, loss="-",
                                               rate="-")  # fmt: skip

    def __enter__(self) -> TrainProgress:
        if self.enabled:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.progress.__exit__(*exc)

    def advance(self) -> None:
        if self.enabled:
            self.progress.update(self.task, advance=1)

    def show(self, loss: float, rate: float | None) -> None:
        """The last logged loss and rate (the bar does not wait for the GPU to show more)."""
        if self.enabled:
            shown = "-" if rate is None else f"{rate:,.1f}"
            self.progress.update(self.task, loss=f"{loss:.4f}", rate=shown)
