"""``surd build run``: the whole build as the ``[run]`` steps of a checked-in ``surd.toml``.

Each step is a surd command line, exactly as a user would type it after ``surd``, so every
option of every stage is available and documented by that command's ``--help``::

    [run]
    steps = [
      "build ingest images/",
      "build rewrite --rewriter openai:http://gpu-box:8000/v1 --model qwen",
      "build screen --clip-model openai/clip-vit-large-patch14 --min-clip-score 0.18",
      "annotate push -p 'surd review'",
      "annotate pull -p 'surd review'",
      "build dedupe",
      "build export out/ --overwrite",
    ]

Steps run in order in this process, on the workspace of the run (``-w`` is added to each), with
relative paths read from the folder of the config file. A run stops at the first failing step.
Running it again starts from the first step, and every stage skips the work it has already
done, so only what is missing is redone (give export steps ``--overwrite`` so they can run
again). ``annotate`` steps are skipped, with a note, when no Label Studio is configured
(``LABEL_STUDIO_URL`` unset). Stage settings (``[export]``, ``[screen]``...) always come from the
workspace's own ``surd.toml``; ``--config`` only supplies the steps.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from surd_builder.errors import ConfigError

# the commands a step may run (first two words)
ALLOWED = {
    ("build", "ingest"),
    ("build", "scrape"),
    ("build", "rewrite"),
    ("build", "screen"),
    ("build", "dedupe"),
    ("build", "export"),
    ("annotate", "push"),
    ("annotate", "pull"),
}


@dataclass
class StepResult:
    step: str
    status: str  # completed | skipped | failed
    seconds: float = 0.0
    detail: str = ""


@dataclass
class RunSummary:
    steps: list[StepResult] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return any(s.status == "failed" for s in self.steps)


def load_steps(config: Path) -> list[str]:
    """The ``[run] steps`` of a config file, checked: each a known command line."""
    try:
        data = tomllib.loads(Path(config).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{config} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{config}: not valid TOML ({error})") from None
    steps = (data.get("run") or {}).get("steps")
    if not isinstance(steps, list) or not steps or not all(isinstance(s, str) for s in steps):
        raise ConfigError(f'{config}: [run] needs steps = ["build ingest DIR", ...]')
    for step in steps:
        words = shlex.split(step)
        if tuple(words[:2]) not in ALLOWED:
            known = ", ".join(" ".join(a) for a in sorted(ALLOWED))
            raise ConfigError(f"{config}: step {step!r} is not one of: {known}")
        if any(w.startswith(("-w", "--workspace")) for w in words):
            raise ConfigError(f"{config}: step {step!r} names a workspace; the run sets it")
    return steps


@contextlib.contextmanager
def _working_directory(path: Path) -> Iterator[None]:
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def run_steps(
    steps: list[str],
    workspace: Path,
    base_dir: Path,
    invoke: Callable[[list[str]], int],
    announce: Callable[[str], None] = print,
) -> RunSummary:
    """Run each step with ``invoke(args) -> exit code``; stop at the first failure."""
    summary = RunSummary()
    workspace = Path(workspace).resolve()
    with _working_directory(base_dir):
        for number, step in enumerate(steps, 1):
            words = shlex.split(step)
            if words[0] == "annotate" and not os.environ.get("LABEL_STUDIO_URL"):
                summary.steps.append(StepResult(step, "skipped", detail="LABEL_STUDIO_URL unset"))
                announce(f"[{number}/{len(steps)}] {step}: skipped (no Label Studio configured)")
                continue
            announce(f"[{number}/{len(steps)}] surd {step}")
            started = time.perf_counter()
            # -w right after the command's name: safe even when the step uses "--"
            path = 3 if words[:2] == ["build", "scrape"] else 2
            code = invoke([*words[:path], "-w", str(workspace), *words[path:]])
            seconds = time.perf_counter() - started
            if code:
                summary.steps.append(StepResult(step, "failed", seconds, f"exit code {code}"))
                break
            summary.steps.append(StepResult(step, "completed", seconds))
    return summary
