"""Checkpoints: ``accelerator.save_state`` folders under ``OUTPUT/checkpoints/checkpoint-N``
with a state file (step and settings), written to a temporary folder and renamed so that a kill
never leaves a half one; which one a run resumes from, and whether its settings allow it.

Every checkpoint keeps the adapter as ``adapter/`` (``save_pretrained``), so it is also a
usable adapter.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from adapter.train_config import ADDED_RESUME_KEYS, TrainConfig
from surd_builder.errors import InputError

STATE_FILE = "surd-train-state.json"


def checkpoint_dir(output: Path) -> Path:
    return output / "checkpoints"


def list_checkpoints(output: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the complete checkpoints (those with a state file), oldest first."""
    found = []
    for path in checkpoint_dir(output).glob("checkpoint-*"):
        step = path.name.removeprefix("checkpoint-")
        if step.isdigit() and (path / STATE_FILE).is_file():
            found.append((int(step), path))
    return sorted(found)


def find_resume_checkpoint(config: TrainConfig) -> Path | None:
    """The checkpoint ``--resume`` names: none, the latest (auto), or a given folder."""
    if config.resume == "none":
        return None
    if config.resume == "auto":
        found = list_checkpoints(config.output)
        return found[-1][1] if found else None
    path = Path(config.resume)
    if not (path / STATE_FILE).is_file():
        raise InputError(f"--resume {path}: not a surd checkpoint ({STATE_FILE} is missing)")
    return path


def check_resume_settings(path: Path, config: TrainConfig, num_processes: int) -> int:
    """The checkpoint's step, after checking it was made with the settings of this run (a
    setting it predates counts as its old default)."""
    state = json.loads((path / STATE_FILE).read_text())
    saved, now = state["settings"], config.settings_for_resume(num_processes)
    saved = {**ADDED_RESUME_KEYS, **saved}
    changed = [key for key in now if saved.get(key) != now[key]]
    if changed:
        raise InputError(
            f"{path} was made with other settings ({', '.join(changed)}): train into a new "
            "--output, or pass --resume none to start over here"
        )
    return int(state["step"])


def set_aside_checkpoints(output: Path) -> Path | None:
    """``--resume none`` over an output that has checkpoints: move them to
    ``checkpoints-previous-N/`` so they neither vanish nor get resumed by a later run."""
    folder = checkpoint_dir(output)
    if not list_checkpoints(output):
        return None
    number = 1
    while (output / f"checkpoints-previous-{number}").exists():
        number += 1
    target = output / f"checkpoints-previous-{number}"
    folder.rename(target)
    return target


def save_checkpoint(accelerator: Any, config: TrainConfig, step: int) -> None:
    """``accelerator.save_state`` into a temporary folder, renamed into place; old ones pruned."""
    final = checkpoint_dir(config.output) / f"checkpoint-{step}"
    temp = final.with_name(final.name + ".partial")
    if accelerator.is_main_process:
        shutil.rmtree(temp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temp))
    accelerator.wait_for_everyone()  # every rank's RNG state is in before the rename
    if accelerator.is_main_process:
        state = {"step": step, "settings": config.settings_for_resume(accelerator.num_processes)}
        (temp / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        temp.rename(final)
        limit = config.checkpoints_total_limit
        if limit:
            for _step, old in list_checkpoints(config.output)[:-limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def register_adapter_hooks(accelerator: Any) -> None:
    """Checkpoints keep the adapter as ``adapter/`` via ``save_pretrained``, so any checkpoint
    is also a usable adapter."""
    from adapter.model import SURAdapter

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        if accelerator.is_main_process:
            for model in models:
                accelerator.unwrap_model(model).save_pretrained(Path(output_dir) / "adapter")
        weights.clear()

    def load_hook(models: list, input_dir: str) -> None:
        while models:
            model = accelerator.unwrap_model(models.pop())
            loaded = SURAdapter.from_pretrained(Path(input_dir) / "adapter")
            model.load_state_dict(loaded.state_dict())

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def resume_point(accelerator: Any, config: TrainConfig, show: bool) -> tuple[Path | None, int]:
    """(checkpoint to resume from or None, its step), checked against the settings; with
    ``--resume none`` earlier checkpoints are set aside. All processes wait for the main one
    to have moved them."""
    resume_path = None if config.caches_only else find_resume_checkpoint(config)
    world = accelerator.num_processes
    resume_step = check_resume_settings(resume_path, config, world) if resume_path else 0
    if config.resume == "none" and accelerator.is_main_process and not config.caches_only:
        moved = set_aside_checkpoints(config.output)
        if moved is not None and show:
            from surd_builder.progress import stderr_console

            stderr_console.print(f"earlier checkpoints moved to {moved} (--resume none)")
    accelerator.wait_for_everyone()
    return resume_path, resume_step


def check_steps_left(resume_path: Path | None, resume_step: int, steps: int) -> None:
    """A resumed run must have steps left to train."""
    if resume_step >= steps:
        raise InputError(
            f"{resume_path} is at step {resume_step}, the run has {steps} steps: nothing to do "
            "(raise --max-steps/--epochs, or --resume none to start over)"
        )
