"""The pieces of ``bench/gpu_check.sh`` (run by hand on a GPU machine, never in CI).

Each piece is one process: ``python bench/gpu_check.py PIECE --row FILE --work DIR ...``. On
success it writes one line ``STATUS<TAB>RESULT`` to ``--row``; the shell script turns a missing
row (a crash, a timeout) into FAILED with the log's last error line, and prints the table.

Pieces:

- ``env``: Python, torch, the GPU, and which of the packages surd imports for these pieces are
  missing (or where they come from: the image or the carried wheels).
- ``train-step``: ``bench/train_step.py`` (the arguments after ``--``), its JSON as one row:
  (a) surd's step, (b) the UNet ceiling, (c) the released trainer, samples/s medians, peak GiB.
- ``train``: ``surd train`` on tiny models (the CLI, as a child process): an uninterrupted run,
  a run SIGKILLed after step 5 (``SURD_TRAIN_KILL_AFTER_STEP``), its resume; the max abs
  difference of the final adapter weights and of the history's losses.
- ``screen`` / ``rewrite``: ``surd build screen --clip-model`` (tiny CLIP) and ``surd build
  rewrite --rewriter hf:`` (tiny Llama), the real CLI run in this process (so the CUDA memory it
  took is visible here): a warm-up call on a few items (imports, CUDA start-up), then a timed
  call on the rest; items/s over that call's wall time (model loading included).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for tests.tiny_models and the surd packages (not pip-installed)

# What these pieces import at run time, directly or through diffusers/transformers (measured with
# the CPU quick mode: the third-party top-level modules in sys.modules), by distribution name.
# The GPU image lacks only diffusers. importlib_metadata is one of diffusers' declared
# requirements but is not imported on Python >= 3.8: not listed.
RUNTIME_PACKAGES = [
    "torch",
    "diffusers",
    "transformers",
    "tokenizers",
    "safetensors",
    "huggingface_hub",
    "accelerate",
    "numpy",
    "pyarrow",
    "pillow",
    "typer",
    "click",
    "rich",
    "tensorboard",
    "matplotlib",
]
TRAIN_DIFF_LIMIT = 1e-6  # the CPU test's tolerance (tests/test_adapter_train.py)


class PieceError(RuntimeError):
    """A piece's own failure: printed as ``gpu_check: ...``, after which gpu_check.sh looks
    further up the log for the cause (a child's error line) to put in the table."""

    def __str__(self) -> str:
        return f"gpu_check: {super().__str__()}"


def write_row(path: Path, status: str, result: str) -> None:
    path.write_text(f"{status}\t{result}\n")


def cuda_note(device: str) -> str:
    """``on cuda (<GPU>, peak X GiB)`` when this process allocated CUDA memory, else ``on cpu``."""
    import torch

    if not device.startswith("cuda"):
        return "on cpu"
    peak = torch.cuda.max_memory_allocated() / 2**30
    if peak <= 0:
        raise PieceError("no CUDA memory was allocated: the stage did not run on the GPU")
    return f"on cuda ({torch.cuda.get_device_name()}, peak {peak:.2f} GiB)"


# ----------------------------------------------------------------------------- env
def piece_env(args) -> tuple[str, str]:
    found, missing = [], []
    for name in RUNTIME_PACKAGES:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
            continue
        carried = os.environ.get("SURD_GPU_CHECK_SITE", "")
        where = ""
        if carried:
            location = Path(str(importlib.metadata.distribution(name).locate_file("")))
            where = " (wheel)" if location.resolve() == Path(carried).resolve() else ""
        found.append(f"{name} {version}{where}")
    import torch

    on_gpu = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if on_gpu else "no CUDA GPU"
    python = ".".join(map(str, sys.version_info[:3]))
    result = f"Python {python}, torch {torch.__version__}, {device}; " + ", ".join(found)
    if missing:
        result += "; MISSING: " + ", ".join(missing)
    status = "OK"
    if missing or (args.device.startswith("cuda") and not on_gpu):
        status = "FAILED"
    return status, result


# ----------------------------------------------------------------------------- train-step
def piece_train_step(args) -> tuple[str, str]:
    """``bench/train_step.py --device DEVICE --json JSON ARGS`` (the arguments after ``--``)."""
    command = [sys.executable, str(REPO / "bench" / "train_step.py"), "--device", args.device]
    run = subprocess.run([*command, "--json", str(args.json), *args.rest], cwd=REPO)
    if run.returncode != 0:
        raise PieceError(f"bench/train_step.py exited with {run.returncode}")
    report = json.loads(args.json.read_text())
    parts = []
    for key, label in (("a_surd", "surd"), ("b_ceiling", "ceiling"), ("c_released", "released")):
        value = report["results"][key]
        peak = "" if value["peak_gib"] is None else f", {value['peak_gib']:.1f} GiB"
        spread = f"{value['min']:.3g}-{value['max']:.3g}"
        parts.append(f"{label} {value['samples_per_s']:.3g}/s ({spread}{peak})")
    result = (
        f"{'; '.join(parts)}; a/b {report['a_over_b']:.2f}, a/c {report['a_over_c']:.1f}; "
        f"{report['device']}, {report['dtype']}, {report['size']}, "
        f"batch {report['results']['a_surd']['batch']}, {report['rounds']} rounds, "
        f"compile {report['compile']}"
    )
    override = os.environ.get("TORCH_COMPILE_OVERRIDE_BACKENDS")
    if report["compile"] and override:
        result += f" (TORCH_COMPILE_OVERRIDE_BACKENDS={override})"
    return "OK", result


# ----------------------------------------------------------------------------- train
def history(output: Path) -> dict[str, list[dict]]:
    """history.jsonl's rows by kind, without the timings (samples_per_s)."""
    rows: dict[str, list[dict]] = {}
    for line in (output / "history.jsonl").read_text().splitlines():
        row = json.loads(line)
        row.pop("samples_per_s", None)
        rows.setdefault(row["kind"], []).append(row)
    return rows


def history_difference(first: dict[str, list[dict]], second: dict[str, list[dict]]) -> float:
    """Max abs difference of the numbers in two histories; inf when their rows differ."""
    if sorted(first) != sorted(second):
        return float("inf")
    worst = 0.0
    for kind, rows in first.items():
        if len(rows) != len(second[kind]):
            return float("inf")
        for left, right in zip(rows, second[kind], strict=True):
            if sorted(left) != sorted(right):
                return float("inf")
            for key, value in left.items():
                other = right[key]
                if isinstance(value, int | float) and isinstance(other, int | float):
                    worst = max(worst, abs(float(value) - float(other)))
                elif value != other:
                    return float("inf")
    return worst


def piece_train(args) -> tuple[str, str]:
    from surd_builder.demo import write_demo_dataset
    from tests.tiny_models import save_tiny_causal_lm, save_tiny_stable_diffusion

    work = args.work / "train"
    base_model = save_tiny_stable_diffusion(work / "sd")
    llm = save_tiny_causal_lm(work / "lm")
    data = write_demo_dataset(work / "demo")
    started = time.perf_counter()

    def surd_train(output: Path, kill_after: int | None = None) -> subprocess.CompletedProcess:
        command = [
            sys.executable, "-m", "surd_builder", "train", "--data", str(data),
            "--base-model", str(base_model), "--llm", str(llm), "--llm-layer", "2",
            "--output", str(output), "--cache-dir", str(work / "cache"), "--resolution", "32",
            "--batch-size", "8", "--gradient-accumulation-steps", "2", "--max-steps", "8",
            "--learning-rate", "1e-3", "--eta-prompt", "1", "--checkpointing-steps", "2",
            "--validation-steps", "2", "--lr-scheduler", "cosine", "--train-llm-projection",
            "--device", args.device, "--no-validation-images", "--no-progress",
            "--adapter-heads", "4", "--adapter-feedforward", "64", "--adapter-mlp", "64",
        ]  # fmt: skip
        env = dict(os.environ)
        env.pop("SURD_TRAIN_KILL_AFTER_STEP", None)
        if kill_after is not None:
            env["SURD_TRAIN_KILL_AFTER_STEP"] = str(kill_after)
        run = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)
        sys.stdout.write(run.stdout)
        sys.stderr.write(run.stderr)
        return run

    uninterrupted, killed = work / "uninterrupted", work / "killed"
    run = surd_train(uninterrupted)
    if run.returncode != 0:
        raise PieceError(f"the uninterrupted run exited with {run.returncode}")
    run = surd_train(killed, kill_after=5)
    if run.returncode != -signal.SIGKILL:
        raise PieceError(f"the run to kill after step 5 exited with {run.returncode}")
    checkpoints = sorted(p.name for p in (killed / "checkpoints").iterdir())
    run = surd_train(killed)  # --resume auto
    if run.returncode != 0:
        raise PieceError(f"the resumed run exited with {run.returncode}")
    seconds = time.perf_counter() - started

    from adapter.model import SURAdapter

    expected = SURAdapter.from_pretrained(uninterrupted).state_dict()
    resumed = SURAdapter.from_pretrained(killed).state_dict()
    if sorted(expected) != sorted(resumed):
        raise PieceError("the resumed adapter has other weights than the uninterrupted one")
    weights = max((resumed[k].float() - v.float()).abs().max().item() for k, v in expected.items())
    losses = history_difference(history(uninterrupted), history(killed))
    summary = json.loads((killed / "train-summary.json").read_text())
    status = "OK" if max(weights, losses) <= TRAIN_DIFF_LIMIT else "DIFFERS"
    result = (
        f"resumed from step {summary['resumed_from']} (checkpoints at kill: "
        f"{', '.join(checkpoints)}); max abs diff vs uninterrupted: weights {weights:.3g}, "
        f"history {losses:.3g} (limit {TRAIN_DIFF_LIMIT:g}); 3 runs x 8 steps in "
        f"{seconds:.0f} s on {args.device}"
    )
    return status, result


# ----------------------------------------------------------------------------- screen, rewrite
def ingested_workspace(root: Path, count: int, size: int):
    from pipelines.ingest import IngestStage
    from pipelines.runner import RunOptions, run_stage
    from surd_builder.demo import make_demo_folder
    from surd_builder.workspace import Workspace

    make_demo_folder(root / "demo", count=count, size=size)
    workspace = Workspace.create(root / "ws")
    options = RunOptions(show_progress=False, workers=min(8, os.cpu_count() or 1))
    report = run_stage(IngestStage(root / "demo", source="demo"), workspace, options)
    if report.written != count:
        raise PieceError(f"ingest wrote {report.written} of {count} demo samples")
    return workspace


def surd_cli(arguments: list[str]) -> float:
    """Run ``surd ARGUMENTS`` in this process; its wall time in seconds."""
    from surd_builder.cli import app

    started = time.perf_counter()
    code = app(arguments, prog_name="surd", standalone_mode=False)
    seconds = time.perf_counter() - started
    if code:  # a SurdError: its one line is on stderr already
        raise PieceError(f"surd {' '.join(arguments[:2])} exited with {code}")
    return seconds


def settled(workspace, table: str, stage: str) -> tuple[int, int]:
    """(samples in ``table``, samples whose last try failed and that are not in it)."""
    failed = workspace.read_failures(stage, outstanding_in=table).num_rows
    return workspace.read_table(table, ["sample_id"]).num_rows, failed


def timed_stage(args, workspace, arguments: list[str], table: str) -> tuple[int, int, float]:
    """A warm-up call on --warmup items, then the rest: (items, failed, seconds) of the second
    call (items: stored or failed; a failed warm-up item is tried again)."""
    options = ["-w", str(workspace.root), "--device", args.device, "--no-progress"]
    common = [*arguments[:2], *options, *arguments[2:]]
    surd_cli([*common, "--limit", str(args.warmup)])
    before, _ = settled(workspace, table, arguments[1])
    seconds = surd_cli(common)
    after, failed = settled(workspace, table, arguments[1])
    if after + failed != args.items:
        raise PieceError(f"{after} stored + {failed} failed of {args.items} samples")
    return args.items - before, failed, seconds


def piece_screen(args) -> tuple[str, str]:
    from tests.tiny_models import save_tiny_clip

    work = args.work / "screen"
    clip = save_tiny_clip(work / "clip")
    workspace = ingested_workspace(work, args.items, size=64)
    items, failed, seconds = timed_stage(
        args,
        workspace,
        ["build", "screen", "--clip-model", str(clip), "--model-batch-size", str(args.batch)],
        "screening",
    )
    result = (
        f"{items / seconds:,.0f} items/s ({items} items in {seconds:.2f} s, tiny CLIP, 64 px "
        f"images, model batch {args.batch}, {failed} failed) {cuda_note(args.device)}"
    )
    return "OK", result


TEMPLATE = 'system = "you write prompts"\nuser = "{keyword_prompt}"\n'


def piece_rewrite(args) -> tuple[str, str]:
    from tests.tiny_models import save_tiny_causal_lm

    work = args.work / "rewrite"
    # Bigger than the tests' (64 wide, 2 layers) so the GPU has some work; short template: the
    # default few-shot one is longer than its 256 positions.
    lm = save_tiny_causal_lm(work / "lm", hidden_size=256, num_layers=4)
    template = work / "template.toml"
    template.write_text(TEMPLATE)
    workspace = ingested_workspace(work, args.items, size=32)
    arguments = [
        "build", "rewrite", "--rewriter", f"hf:{lm}", "--template", str(template),
        "--include-source-narratives", "--max-new-tokens", str(args.new_tokens),
        "--generation-batch-size", str(args.batch), "--max-attempts", "1",
    ]  # fmt: skip
    items, failed, seconds = timed_stage(args, workspace, arguments, "narratives")
    result = (
        f"{items / seconds:,.0f} prompts/s ({items} prompts in {seconds:.2f} s, Llama 256x4, "
        f"{args.new_tokens} new tokens, generation batch {args.batch}, {failed} invalid) "
        f"{cuda_note(args.device)}"
    )
    return "OK", result


PIECES = {
    "env": piece_env,
    "train-step": piece_train_step,
    "train": piece_train,
    "screen": piece_screen,
    "rewrite": piece_rewrite,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("piece", choices=sorted(PIECES))
    parser.add_argument("--row", type=Path, required=True, help="write STATUS<TAB>RESULT here")
    parser.add_argument("--work", type=Path, default=Path("bench-out/work"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", type=Path, help="train-step: where train_step.py writes")
    parser.add_argument("--items", type=int, default=256, help="screen/rewrite: samples")
    parser.add_argument("--warmup", type=int, default=16, help="screen/rewrite: warm-up items")
    parser.add_argument("--batch", type=int, default=64, help="screen/rewrite: model batch")
    parser.add_argument("--new-tokens", type=int, default=16, help="rewrite: tokens per answer")
    argv, rest = sys.argv[1:], []
    if "--" in argv:  # train-step: what follows goes to bench/train_step.py
        cut = argv.index("--")
        argv, rest = argv[:cut], argv[cut + 1 :]
    args = parser.parse_args(argv)
    args.rest = rest
    args.work.mkdir(parents=True, exist_ok=True)
    status, result = PIECES[args.piece](args)
    write_row(args.row, status, result)
    print(f"{args.piece}: {status}: {result}")


if __name__ == "__main__":
    main()
