"""`surd quickstart`: the whole mission (build, train, generate, eval) on the demo models, and
`--no-train`, which stops after the export; `surd demo-models` writes the same models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from adapter.generate import compare_grid
from adapter.model import SURAdapter
from surd_builder.cli import app
from surd_builder.cli.quickstart import SAMPLE_PROMPTS

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

# the same code path as the default run, shorter: fewer images, steps and denoising steps
SMALL = ["--count", "24", "--train-steps", "4", "--sample-steps", "2", "--no-progress"]


def quickstart(directory: Path, *args: str) -> str:
    result = CliRunner().invoke(app, ["quickstart", str(directory), *SMALL, *args])
    assert result.exit_code == 0, result.output
    return result.output


def listed_files(output: str) -> dict[str, list[Path]]:
    """The summary's "open:" block: name -> paths."""
    block = output[output.index("\nopen:\n") + len("\nopen:\n") :].splitlines()
    files: dict[str, list[Path]] = {}
    for line in block:
        if not line.startswith("  ") or line.startswith("  ("):
            break
        name, path = line.strip().rsplit(" ", 1)
        files.setdefault(name.strip(), []).append(Path(path))
    return files


def test_the_quickstart_runs_the_whole_mission_and_no_train_stops_after_the_export(tmp_path):
    directory = tmp_path / "qs"
    build_only = quickstart(directory, "--no-train")
    assert (directory / "export" / "README.md").is_file()
    assert "Load it with:" in build_only and "surd train" not in build_only
    assert build_only.rstrip().endswith(f"datasets.load_dataset('{directory / 'export'}')")
    assert not any((directory / name).exists() for name in ("models", "train", "generate", "eval"))

    output = quickstart(directory)  # resumes the build, then the rest of the mission
    assert "reusing 24 images" in output and "already done" in output
    for command in ("surd train", "surd generate", "surd eval"):
        assert f"\n$ {command} " in output, command
    files = listed_files(output)
    assert set(files) == {
        "dataset card", "build report", "adapter", "loss curve", "comparison grid",
        "eval report", "eval metrics",
    }  # fmt: skip
    assert all(path.exists() for paths in files.values() for path in paths), files

    card = files["dataset card"][0].read_text()
    assert card.startswith("---\n") and "report.html" in card
    assert "<html" in files["build report"][0].read_text().lower()

    adapter = SURAdapter.from_pretrained(files["adapter"][0])
    assert adapter.config.embed_dim == 32  # the demo Stable Diffusion's text width
    summary = json.loads((directory / "train" / "train-summary.json").read_text())
    assert summary["steps"] == 4 and summary["last_held_out"]["prompt_alignment"] > 0
    curve = Image.open(files["loss curve"][0])
    assert curve.format == "PNG" and curve.size[0] > curve.size[1] > 100

    grids = files["comparison grid"]
    assert len(grids) == 2  # one per prompt
    for grid, prompt in zip(grids, SAMPLE_PROMPTS, strict=True):
        image = Image.open(grid)
        # 2 columns (without | with the adapter) x 2 seeds of the demo model's 32 px images
        tile = Image.new("RGB", (32, 32))
        expected = compare_grid(prompt, [0, 1], [tile, tile], [tile, tile]).image.size
        assert image.format == "PNG" and image.size == expected

    metrics = json.loads(files["eval metrics"][0].read_text())
    categories = [case["category"] for case in metrics["cases"]]
    # the quickstart's suite, then up to 3 narrative prompts of the export's test split
    assert categories[:4] == ["counting", "counting", "colour", "colour"]
    assert 1 <= len(categories[4:]) <= 3 and set(categories[4:]) == {"test"}
    for variant in ("with", "without"):
        values = metrics["metrics"][variant]
        for name in ("clip_score", "clip_iqa", "semantic_accuracy", "fid_clip"):
            assert isinstance(values[name], float), (variant, name, values)
    assert "semantic_accuracy" in output.split("\nopen:\n")[1]  # the summary's numbers

    again = quickstart(directory)  # a finished training run is kept; generate and eval rerun
    assert "train: already done" in again and "\n$ surd train " not in again
    assert listed_files(again) == files


def test_demo_models_writes_the_quickstart_models_the_same_every_time(tmp_path):
    from surd_builder.demo_models import demo_words, write_demo_models

    first = write_demo_models(tmp_path / "first")
    result = CliRunner().invoke(app, ["demo-models", str(tmp_path / "second")])
    assert result.exit_code == 0, result.output
    assert "surd train" in result.output and f"--base-model {tmp_path / 'second' / 'sd'}" in (
        result.output
    )
    names = sorted(p.relative_to(first.root) for p in first.root.rglob("*") if p.is_file())
    assert names == sorted(
        p.relative_to(tmp_path / "second") for p in (tmp_path / "second").rglob("*") if p.is_file()
    )
    for name in names:  # seeded: the same bytes
        assert (first.root / name).read_bytes() == (tmp_path / "second" / name).read_bytes(), name

    again = CliRunner().invoke(app, ["demo-models", str(tmp_path / "second")])
    assert again.exit_code == 5 and "not empty" in again.output

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(first.llm)
    ids = tokenizer(" ".join(demo_words()))["input_ids"]
    assert tokenizer.unk_token_id not in ids  # the demo's prompts are in the LLM's vocabulary


def test_eval_takes_test_prompts_only_where_the_export_has_a_test_split(tmp_path):
    """A few demo images may all fall in train: eval then runs without the export's test
    prompts instead of failing at the end of the mission (`--count 3` did)."""
    from surd_builder.cli.quickstart import Mission

    export = tmp_path / "export"
    (export / "data").mkdir(parents=True)
    (export / "data" / "train-00000-of-00001.parquet").touch()
    mission = Mission(tmp_path, export, progress=False, train_steps=2, sample_steps=1)

    def eval_args() -> list[str]:
        return dict(mission.commands())["eval"]

    assert "--data" not in eval_args() and "--reference" in eval_args()
    (export / "data" / "test-00000-of-00001.parquet").touch()
    assert eval_args()[eval_args().index("--data") + 1] == str(export)
