"""`surd train` end to end on a tiny Stable Diffusion, a tiny LLM and the demo shapes data."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from adapter.data import load_split, read_images
from adapter.model import SURAdapter
from adapter.train import TrainConfig, train
from surd_builder.cli import app
from surd_builder.errors import InputError
from tests.conftest import write_demo_dataset
from tests.tiny_models import save_tiny_causal_lm, save_tiny_stable_diffusion

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

SMALL_ADAPTER = dict(adapter_heads=4, adapter_feedforward=64, adapter_mlp=64)


@dataclass
class Stack:
    base_model: Path
    llm: Path
    data: Path
    cache: Path


def make_stack(root: Path) -> Stack:
    return Stack(
        base_model=save_tiny_stable_diffusion(root / "sd"),
        llm=save_tiny_causal_lm(root / "lm"),
        data=write_demo_dataset(root / "demo"),
        cache=root / "cache",
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Stack:
    return make_stack(tmp_path_factory.mktemp("train"))


def config(stack: Stack, output: Path, **overrides) -> TrainConfig:
    values = dict(
        data=str(stack.data),
        base_model=str(stack.base_model),
        llm=str(stack.llm),
        llm_layer=2,
        output=output,
        cache_dir=stack.cache,
        resolution=32,
        batch_size=16,
        max_steps=4,
        learning_rate=1e-3,
        eta_prompt=1.0,
        device="cpu",
        validation_prompts=(),
        show_progress=False,
        **SMALL_ADAPTER,
    )
    return TrainConfig(**{**values, **overrides})


def history(output: Path, kind: str) -> list[dict]:
    rows = [json.loads(line) for line in (output / "history.jsonl").read_text().splitlines()]
    return [row for row in rows if row["kind"] == kind]


def test_a_short_run_learns_prompt_alignment_and_writes_its_outputs(stack, tmp_path) -> None:
    """At surd train's defaults (objective, weights, learning rate, adapter sizes): only the run
    length and the tiny models' sizes are the test's."""
    output = tmp_path / "run"
    defaults = dict(learning_rate=None, eta_prompt=None, adapter_heads=8, adapter_feedforward=2048,
                    adapter_mlp=768)  # fmt: skip
    report = train(
        config(
            stack,
            output,
            max_steps=60,
            validation_steps=30,
            checkpointing_steps=20,
            checkpoints_total_limit=2,
            validation_prompts=("three red circles on a blue background",),
            validation_inference_steps=2,
            **defaults,
        )
    )
    held_out = history(output, "held_out")
    assert [row["step"] for row in held_out] == [0, 30, 60]
    first, last = held_out[0]["prompt_alignment"], held_out[-1]["prompt_alignment"]
    # held-out prompts the adapter never saw move clearly towards their keyword prompts ...
    assert last < 0.8 * first, (first, last)
    # ... and the images do not get worse for it (same noise at every evaluation)
    assert held_out[-1]["quality"] <= held_out[0]["quality"] * 1.001, held_out
    assert report.first_held_out["prompt_alignment"] == pytest.approx(first)
    assert report.train_samples == 128 and report.held_out_samples == 32
    rows = history(output, "train")
    # a row every --logging-steps (10) and at checkpoints (every 20)
    assert [row["step"] for row in rows] == [10, 20, 30, 40, 50, 60]
    for row in rows:  # each term's gradient on the adapter, and the clipped total's
        norms = {name: row[f"grad_norm/{name}"] for name in
                 ("quality", "distillation", "prompt_alignment", "total")}  # fmt: skip
        assert all(value > 0 for value in norms.values()), row
    # the default weights keep the alignment term from being swamped by the quality term
    assert rows[0]["grad_norm/prompt_alignment"] > rows[0]["grad_norm/quality"], rows[0]
    events = list((output / "logs").rglob("events.out.tfevents.*"))
    assert any(b"train/grad_norm/prompt_alignment" in event.read_bytes() for event in events)

    trained = SURAdapter.from_pretrained(output)
    assert torch.count_nonzero(trained.out.weight) > 0  # it moved off its zero start
    assert trained.config.embed_dim == 32 and trained.config.llm_dim == 64
    assert (output / "loss-curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (output / "validation").iterdir()) == [
        "step-000030.png",
        "step-000060.png",
    ]
    assert list((output / "logs").rglob("events.out.tfevents.*"))
    checkpoints = sorted(p.name for p in (output / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-40", "checkpoint-60"]  # the limit pruned checkpoint-20
    # every checkpoint is itself a loadable adapter
    assert SURAdapter.from_pretrained(output / "checkpoints" / "checkpoint-60" / "adapter")
    summary = json.loads((output / "train-summary.json").read_text())
    assert summary["steps"] == 60 and summary["final_losses"]["total"] > 0


def test_caches_are_built_once_and_keyed_by_settings(stack, tmp_path) -> None:
    cache = tmp_path / "own-cache"
    first = train(config(stack, tmp_path / "a", cache_dir=cache, max_steps=1))
    # 160 narrative + 160 keyword prompts (a few repeat), 160 images twice (flip), 160 LLM rows
    assert 0 < first.computed["text"] <= 320 and first.computed["latents"] == 320
    assert 0 < first.computed["llm"] <= 160
    again = train(config(stack, tmp_path / "b", cache_dir=cache, max_steps=1))
    assert again.computed == {"text": 0, "latents": 0, "llm": 0}
    other_layer = train(config(stack, tmp_path / "c", cache_dir=cache, max_steps=1, llm_layer=1))
    assert other_layer.computed["llm"] == first.computed["llm"]
    assert other_layer.computed["text"] == other_layer.computed["latents"] == 0


def test_kill_and_resume_reproduce_an_uninterrupted_run(stack, tmp_path) -> None:
    settings = dict(
        max_steps=8,
        batch_size=8,
        gradient_accumulation_steps=2,
        checkpointing_steps=2,
        validation_steps=2,
        lr_scheduler="cosine",
        train_llm_projection=True,
        logging_steps=3,
    )
    uninterrupted = tmp_path / "uninterrupted"
    train(config(stack, uninterrupted, **settings))

    killed = tmp_path / "killed"
    args = [
        "train", "--data", str(stack.data), "--base-model", str(stack.base_model),
        "--llm", str(stack.llm), "--llm-layer", "2", "--output", str(killed),
        "--cache-dir", str(stack.cache), "--resolution", "32", "--batch-size", "8",
        "--gradient-accumulation-steps", "2", "--max-steps", "8", "--learning-rate", "1e-3",
        "--eta-prompt", "1", "--checkpointing-steps", "2", "--validation-steps", "2",
        "--lr-scheduler", "cosine", "--logging-steps", "3",
        "--train-llm-projection", "--device", "cpu", "--no-validation-images", "--no-progress",
        "--adapter-heads", "4", "--adapter-feedforward", "64", "--adapter-mlp", "64",
    ]  # fmt: skip
    env = {**os.environ, "SURD_TRAIN_KILL_AFTER_STEP": "5"}
    run = subprocess.run(
        [sys.executable, "-m", "surd_builder", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == [
        "checkpoint-2",
        "checkpoint-4",
    ]
    assert not (killed / "config.json").exists()  # no final adapter from a killed run

    report = train(config(stack, killed, **settings))  # --resume auto
    assert report.resumed_from == 4
    expected = SURAdapter.from_pretrained(uninterrupted).state_dict()
    resumed = SURAdapter.from_pretrained(killed).state_dict()
    for name, tensor in expected.items():
        assert torch.allclose(resumed[name], tensor, atol=1e-6), name
    assert not torch.equal(expected["llm_projection.weight"], SURAdapter(
        embed_dim=32, llm_dim=64, num_heads=4, feedforward_dim=64, mlp_dim=64
    ).state_dict()["llm_projection.weight"])  # fmt: skip

    # the resumed history is the uninterrupted one (timings aside), held-out points included
    def losses(output: Path, kind: str) -> list[dict]:
        return [
            {k: v for k, v in row.items() if k != "samples_per_s"} for row in history(output, kind)
        ]

    assert losses(killed, "train") == losses(uninterrupted, "train")
    # rows every 3 steps and at every checkpoint (2): the resumed run's windows are the same
    assert [row["step"] for row in history(killed, "train")] == [2, 3, 4, 6, 8]
    assert [row["step"] for row in history(killed, "held_out")] == [0, 2, 4, 6, 8]
    assert losses(killed, "held_out") == losses(uninterrupted, "held_out")
    assert report.first_held_out == {
        k: v for k, v in history(uninterrupted, "held_out")[0].items() if k not in ("kind", "step")
    }


def cli(*args: str):
    return CliRunner().invoke(app, ["train", *args])


def base_args(stack: Stack, output: Path) -> list[str]:
    return [
        "--data", str(stack.data), "--base-model", str(stack.base_model), "--llm",
        str(stack.llm), "--llm-layer", "2", "--output", str(output), "--cache-dir",
        str(stack.cache), "--resolution", "32", "--max-steps", "1", "--no-progress",
        "--no-validation-images", "--device", "cpu", "--adapter-heads", "4",
    ]  # fmt: skip


def replace_option(args: list[str], option: str, value: str) -> list[str]:
    args = list(args)
    args[args.index(option) + 1] = value
    return args


def one_error_line(result) -> str:
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    return lines[0]


def test_user_mistakes_are_one_line_errors(stack, tmp_path) -> None:
    args = base_args(stack, tmp_path / "out")

    no_keywords = tmp_path / "no-keywords.parquet"
    pq.write_table(
        pa.table({"narrative_prompt": ["a cat"], "image": [{"bytes": b"x", "path": None}]}),
        no_keywords,
    )
    result = cli(*replace_option(args, "--data", str(no_keywords)))
    assert result.exit_code == 2 and "lacks the column(s) complex_prompt" in one_error_line(result)

    result = cli(*replace_option(args, "--llm-layer", "3"))
    assert result.exit_code == 2 and "blocks 1..2" in one_error_line(result)

    result = cli(*replace_option(args, "--device", "cuda"))
    assert result.exit_code == 2 and "no CUDA GPU" in one_error_line(result)

    wide = SURAdapter(embed_dim=48, num_heads=4, feedforward_dim=64, mlp_dim=64, llm_dim=64)
    wide.save_pretrained(tmp_path / "wide")
    result = cli(*args, "--init-adapter", str(tmp_path / "wide"))
    assert result.exit_code == 2 and "text width 48" in one_error_line(result)

    result = cli(*replace_option(args, "--data", str(tmp_path / "nowhere")))
    assert result.exit_code == 2 and "no such file" in one_error_line(result)

    result = cli(*args, "--lr-warmup-steps", "10")
    assert result.exit_code == 2 and "constant has no warm-up" in one_error_line(result)

    result = cli(*args, "--adapter-dropout", "1")
    assert result.exit_code == 2 and "--adapter-dropout must be in [0, 1)" in one_error_line(result)


def test_resuming_with_other_settings_is_refused_and_resume_none_sets_old_runs_aside(
    stack, tmp_path
) -> None:
    output = tmp_path / "out"
    train(config(stack, output, max_steps=2, checkpointing_steps=1))
    args = replace_option(base_args(stack, output), "--max-steps", "4")
    result = cli(*args, "--seed", "7", "--learning-rate", "0.5")
    assert result.exit_code == 2 and "other settings (" in one_error_line(result)
    assert "seed" in result.output and "learning_rate" in result.output

    # a fresh start in the same folder keeps the old checkpoints, out of the way
    report = train(config(stack, output, max_steps=1, seed=7, resume="none"))
    assert report.resumed_from == 0
    assert sorted(p.name for p in (output / "checkpoints-previous-1").iterdir()) == [
        "checkpoint-1",
        "checkpoint-2",
    ]
    assert [p.name for p in (output / "checkpoints").iterdir()] == ["checkpoint-1"]
    assert [row["step"] for row in history(output, "train")] == [1]


def test_checkpoints_from_before_a_setting_existed_resume_with_its_old_value(
    stack, tmp_path
) -> None:
    from adapter.checkpoints import STATE_FILE, check_resume_settings

    checkpoint = tmp_path / "checkpoint-3"
    checkpoint.mkdir()
    settings = config(stack, tmp_path / "out").settings_for_resume(1)
    del settings["adapter_dropout"]  # written before --adapter-dropout (always 0.1 then)
    (checkpoint / STATE_FILE).write_text(json.dumps({"step": 3, "settings": settings}))
    assert check_resume_settings(checkpoint, config(stack, tmp_path / "out"), 1) == 3
    with pytest.raises(InputError, match=r"other settings \(adapter_dropout\)"):
        check_resume_settings(checkpoint, config(stack, tmp_path / "out", adapter_dropout=0.0), 1)


def test_the_bf16_path_trains_with_frozen_parts_in_bf16(stack, tmp_path) -> None:
    """What a GPU run does by default (bf16 autocast, frozen parts stored in bf16, the adapter
    in float32), exercised on the CPU."""
    output = tmp_path / "bf16"
    report = train(
        config(stack, output, max_steps=2, mixed_precision="bf16", gradient_checkpointing=True)
    )
    assert report.computed["text"] > 0  # bf16 embeddings are cached apart from float32 ones
    adapter = SURAdapter.from_pretrained(output)
    assert adapter.out.weight.dtype == torch.float32
    assert all(torch.isfinite(t).all() for t in adapter.state_dict().values())
    assert torch.isfinite(torch.tensor(report.final_losses["total"]))


def test_rows_missing_a_part_are_skipped_and_counted(tmp_path) -> None:
    from tests.conftest import image_bytes

    image = {"bytes": image_bytes(), "path": None}
    table = pa.table(
        {
            "narrative_prompt": ["a cat", "", "a dog", "a fox"],
            "complex_prompt": ["cat, 8k", "x, 8k", None, "fox, 8k"],
            "image": [image, image, image, {"bytes": None, "path": None}],
        }
    )
    pq.write_table(table, tmp_path / "one.parquet")
    rows = load_split(str(tmp_path / "one.parquet"), "train")
    assert rows.narrative_prompts == ["a cat"] and read_images(rows.images) == [image["bytes"]]
    assert rows.image_hashes == [hashlib.sha256(image["bytes"]).hexdigest()]
    assert dict(rows.skipped) == {"no narrative prompt": 1, "no keyword prompt": 1, "no image": 1}
    assert load_split(str(tmp_path / "one.parquet"), "test") is None  # a single file is train


def test_the_released_objective_keeps_the_quality_loss_off_the_adapter(stack, tmp_path) -> None:
    presets = dict(learning_rate=None, eta_prompt=None)
    released = config(stack, tmp_path / "released", objective="released", max_steps=2,
                      logging_steps=1, **presets)  # fmt: skip
    assert (released.eta_llm, released.eta_prompt, released.learning_rate) == (1e-5, 1e-5, 1e-5)
    surd = config(stack, tmp_path / "surd", **presets)
    assert (surd.eta_llm, surd.eta_prompt, surd.learning_rate) == (1e-3, 1e-2, 3e-4)
    assert config(stack, tmp_path / "x", objective="released", eta_prompt=0.5).eta_prompt == 0.5
    with pytest.raises(InputError, match="--objective"):
        config(stack, tmp_path / "x", objective="paper")

    train(released)
    rows = history(tmp_path / "released", "train")
    assert [row["step"] for row in rows] == [1, 2]
    for row in rows:  # the quality loss is computed and logged, but trains nothing
        assert row["quality"] > 0 and row["grad_norm/distillation"] > 0
        assert row["grad_norm/quality"] <= 1e-6 * row["grad_norm/distillation"], row
    # a checkpoint of one objective does not resume under the other
    result = cli(*base_args(stack, tmp_path / "released"), "--objective", "surd",
                 "--max-steps", "3")  # fmt: skip
    assert result.exit_code != 0 and "objective" in result.output


def test_reading_a_split_with_image_hashes_does_not_read_its_images(tmp_path) -> None:
    """The export's image_sha256 stands in for the images when the split is indexed: arrow's
    peak allocation while a fresh process reads a 3-file split with 24 MB of images per file
    stays far below one file's images (it held all of them before: the column was read and
    pre-buffered, and every file kept open)."""
    folder = tmp_path / "split"
    (folder / "data").mkdir(parents=True)
    for number in range(3):
        images = [os.urandom(200_000) for _ in range(120)]
        table = pa.table(
            {
                "narrative_prompt": [f"a cat {number} {n}" for n in range(120)],
                "complex_prompt": ["cat, 8k"] * 120,
                "image": [{"bytes": data, "path": None} for data in images],
                "image_sha256": [hashlib.sha256(data).hexdigest() for data in images],
            }
        )
        name = f"train-{number:05d}-of-00003.parquet"
        pq.write_table(table, folder / "data" / name, row_group_size=100)
    script = (
        "import sys, pyarrow as pa\n"
        "from adapter.data import load_split\n"
        "rows = load_split(sys.argv[1], 'train')\n"
        "print(len(rows), pa.default_memory_pool().max_memory())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(folder)], capture_output=True, text=True,
        timeout=120, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    count, peak = (int(value) for value in done.stdout.split()[-2:])
    assert count == 360
    assert peak < 24_000_000, peak  # one file's images are 24 MB
    rows = load_split(str(folder), "train")  # and the images are still there to read
    assert hashlib.sha256(read_images([rows.images[-1]])[0]).hexdigest() == rows.image_hashes[-1]


def test_hash_column_gaps_and_a_truncated_split_file(tmp_path) -> None:
    from tests.conftest import image_bytes

    data = image_bytes()
    table = pa.table(
        {
            "narrative_prompt": ["a cat", "a dog"],
            "complex_prompt": ["cat, 8k", "dog, 8k"],
            "image": [{"bytes": data, "path": None}, {"bytes": data, "path": None}],
            "image_sha256": [hashlib.sha256(data).hexdigest(), None],
        }
    )
    (tmp_path / "data").mkdir()
    pq.write_table(table, tmp_path / "data" / "train-00000-of-00002.parquet")
    rows = load_split(str(tmp_path), "train")
    assert rows.narrative_prompts == ["a cat"] and dict(rows.skipped) == {"no image": 1}
    whole = (tmp_path / "data" / "train-00000-of-00002.parquet").read_bytes()
    (tmp_path / "data" / "train-00001-of-00002.parquet").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InputError, match="is not a Parquet file"):
        load_split(str(tmp_path), "train")
