from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pyarrow as pa
import pytest
from PIL import Image

from pipelines.base import Stage
from pipelines.ingest import IngestStage
from pipelines.runner import RunOptions, run_stage
from surd_builder.errors import InputError, WorkspaceError
from surd_builder.ids import make_sample_id, sha256_hex
from surd_builder.status import workspace_status
from surd_builder.workspace import Workspace
from tests.conftest import REPO, image_bytes, sidecar_folder, write_image

QUIET = RunOptions(batch_size=4, show_progress=False)


def test_sidecar_prompts_and_image_store(tmp_path, workspace):
    folder = tmp_path / "in"
    prompts = sidecar_folder(folder, 6)
    write_image(folder / "nested" / "photo.jpg", size=(40, 30), fmt="JPEG")
    (folder / "nested" / "photo.caption").write_text("  a photo,\n\nbokeh  ")
    report = run_stage(IngestStage(folder), workspace, QUIET)
    assert (report.planned, report.written, report.failed, report.new_images) == (7, 7, 0, 7)

    rows = {r["source_item_id"]: r for r in workspace.read_table("samples").to_pylist()}
    assert set(rows) == {*prompts, "nested/photo.jpg"}
    for name, prompt in prompts.items():
        assert rows[name]["complex_prompt"] == prompt
        assert rows[name]["sample_id"] == make_sample_id("in", name)
        assert (rows[name]["width"], rows[name]["height"], rows[name]["image_format"]) == (
            24,
            16,
            "PNG",
        )
    photo = rows["nested/photo.jpg"]
    assert photo["complex_prompt"] == "a photo,\n\nbokeh"  # as written, ends trimmed
    assert (photo["width"], photo["height"], photo["image_format"]) == (40, 30, "JPEG")
    # bytes are stored unchanged and addressed by their sha256
    original = (folder / "nested" / "photo.jpg").read_bytes()
    assert photo["image_sha256"] == sha256_hex(original)
    assert workspace.read_images([photo["image_sha256"]])[photo["image_sha256"]] == original


def test_metadata_jsonl_and_csv(tmp_path, workspace):
    jsonl = tmp_path / "jsonl"
    write_image(jsonl / "a.png")
    write_image(jsonl / "b.png", color=(1, 2, 3))
    (jsonl / "b.txt").write_text("sidecar loses to metadata")
    lines = [
        {
            "file_name": "a.png",
            "prompt": "cat, 8k",
            "narrative_prompt": "a cat",
            "seed": 7,
            "steps": "20",
            "cfg_scale": 6.5,
            "nsfw": "false",
        },
        {
            "file_name": "b.png",
            "prompt": "dog, 8k",
            "negative_prompt": "blurry",
            "model_name": "sd15",
        },
    ]
    (jsonl / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    run_stage(IngestStage(jsonl), workspace, QUIET)

    csv_folder = tmp_path / "csv"
    write_image(csv_folder / "c.png")
    (csv_folder / "metadata.csv").write_text(
        'file_name,text,narrative\nc.png,"bird, flying",a bird\n'
    )
    run_stage(IngestStage(csv_folder, narrative_column="narrative"), workspace, QUIET)

    rows = {r["source_item_id"]: r for r in workspace.read_table("samples").to_pylist()}
    assert rows["a.png"]["complex_prompt"] == "cat, 8k"
    assert (rows["a.png"]["narrative_prompt"], rows["a.png"]["narrative_origin"]) == (
        "a cat",
        "source",
    )
    assert (rows["a.png"]["seed"], rows["a.png"]["steps"], rows["a.png"]["nsfw"]) == (7, 20, False)
    assert rows["a.png"]["cfg_scale"] == pytest.approx(6.5)
    assert rows["b.png"]["complex_prompt"] == "dog, 8k"
    assert rows["b.png"]["narrative_origin"] is None
    assert (rows["b.png"]["negative_prompt"], rows["b.png"]["model_name"]) == ("blurry", "sd15")
    assert (rows["c.png"]["complex_prompt"], rows["c.png"]["narrative_prompt"]) == (
        "bird, flying",
        "a bird",
    )
    assert rows["c.png"]["source"] == "csv"


def test_bad_items_are_counted_failures_and_retried(tmp_path, workspace, monkeypatch):
    folder = tmp_path / "in"
    sidecar_folder(folder, 2)
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (folder / "corrupt.txt").write_text("corrupt")
    truncated = image_bytes(size=(64, 64), fmt="JPEG")
    (folder / "truncated.jpg").write_bytes(truncated[: len(truncated) // 2])
    (folder / "truncated.txt").write_text("truncated")
    write_image(folder / "latin1.png")
    (folder / "latin1.txt").write_bytes("caf\xe9, 8k".encode("latin-1"))
    write_image(folder / "noprompt.png")
    write_image(folder / "badseed.png")
    (folder / "big.png").write_bytes(image_bytes(size=(80, 80)))
    (folder / "big.txt").write_text("big")
    (folder / "heavy.png").write_bytes(image_bytes(size=(30, 30)) + b"\0" * 5000)
    (folder / "heavy.txt").write_text("heavy file")
    (folder / "metadata.jsonl").write_text(
        json.dumps({"file_name": "gone.png", "prompt": "x"})
        + "\n"
        + json.dumps({"file_name": "badseed.png", "prompt": "x", "seed": "abc"})
        + "\n"
        + json.dumps({"file_name": "../escape.png", "prompt": "x"})
        + "\n"
    )
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 80x80 > 2x the limit: a "bomb"

    report = run_stage(IngestStage(folder, max_image_bytes=4096), workspace, QUIET)
    assert report.written == 3
    assert report.failures_by_reason == {
        "bad-file-name": 1,
        "bad-metadata": 1,
        "missing-file": 1,
        "no-prompt": 1,
        "not-an-image": 2,
        "too-large": 2,
    }
    failures = {r["source_item_id"]: r for r in workspace.read_failures("ingest").to_pylist()}
    assert failures["badseed.png"]["reason"] == "bad-metadata"
    assert workspace_status(workspace).failures[("ingest", "not-an-image")] == 2
    samples = {r["source_item_id"]: r for r in workspace.read_table("samples").to_pylist()}
    assert samples["latin1.png"]["complex_prompt"] == "café, 8k"  # a legacy file is read

    # fix one item: the re-run retries only failures, and the fixed one stops being outstanding
    (folder / "noprompt.txt").write_text("now with a prompt")
    again = run_stage(IngestStage(folder, max_image_bytes=4096), workspace, QUIET)
    assert (again.already_done, again.processed, again.written) == (3, 8, 1)
    outstanding = workspace.read_failures("ingest", outstanding_in="samples")
    assert "noprompt.png" not in outstanding["source_item_id"].to_pylist()
    assert ("ingest", "no-prompt") not in workspace_status(workspace).failures
    assert outstanding.num_rows == 7
    assert "heavy.png" in outstanding["source_item_id"].to_pylist()


def test_rerun_skips_done_and_force_redoes_without_duplicates(tmp_path, workspace):
    folder = tmp_path / "in"
    sidecar_folder(folder, 5)
    first = run_stage(IngestStage(folder), workspace, QUIET)
    second = run_stage(IngestStage(folder), workspace, QUIET)
    assert (first.written, second.already_done, second.processed) == (5, 5, 0)
    (folder / "img-000.txt").write_text("edited prompt")
    forced = run_stage(IngestStage(folder), workspace, RunOptions(force=True, show_progress=False))
    assert (forced.processed, forced.new_images) == (5, 0)
    dataset = workspace.dataset()
    assert dataset.num_rows == 5
    assert "edited prompt" in dataset["complex_prompt"].to_pylist()
    assert [r["status"] for r in workspace.runs()] == ["completed"] * 3


def test_worker_processes_give_the_same_samples(tmp_path):

    folder = tmp_path / "in"
    sidecar_folder(folder, 12)
    single = Workspace.create(tmp_path / "one")
    pooled = Workspace.create(tmp_path / "two")
    run_stage(IngestStage(folder), single, QUIET)
    run_stage(IngestStage(folder), pooled, RunOptions(batch_size=3, workers=2, show_progress=False))
    columns = ["sample_id", "complex_prompt", "image_sha256", "width"]
    one = single.read_table("samples").select(columns).sort_by("sample_id")
    two = pooled.read_table("samples").select(columns).sort_by("sample_id")
    assert one.equals(two) and one.num_rows == 12


def test_input_errors(tmp_path, workspace):
    with pytest.raises(InputError, match="does not exist"):
        run_stage(IngestStage(tmp_path / "nope"), workspace, QUIET)
    folder = tmp_path / "in"
    sidecar_folder(folder, 1)
    # one bad row is skipped alone (tests/test_ingest_corpus.py); a file with no usable row,
    # or one that is not text at all, is not a metadata file
    (folder / "metadata.jsonl").write_text("{broken\n[1, 2]\n")
    with pytest.raises(InputError, match=r"metadata.jsonl:1: not valid JSON .*no usable row"):
        run_stage(IngestStage(folder), workspace, QUIET)
    (folder / "metadata.jsonl").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(InputError, match="metadata.jsonl is not a text file"):
        run_stage(IngestStage(folder), workspace, QUIET)
    (folder / "metadata.jsonl").unlink()
    run_stage(IngestStage(folder, source="shared"), workspace, QUIET)
    other = tmp_path / "other"
    sidecar_folder(other, 1)
    with pytest.raises(InputError, match="was ingested from"):
        run_stage(IngestStage(other, source="shared"), workspace, QUIET)
    with pytest.raises(InputError, match="may only use"):
        IngestStage(other, source="bad name!")


@pytest.mark.parametrize("stop_signal", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_ingest_stopped_part_way_then_resumed_has_every_sample_once(
    tmp_path, workspace, stop_signal
):
    """Stop a real `surd build ingest` while it is stuck on one item (kill -9, or Ctrl-C),
    then run it again."""
    folder = tmp_path / "in"
    prompts = sidecar_folder(folder, 23)
    # The run must stop at this item, after the batches before it (sorted first) were written.
    # A sitecustomize hooks its collection. For kill -9 the child reads a byte from a FIFO: the
    # open blocks until the test opens the other end, the read until the test closes it, which
    # it does only after the kill. For Ctrl-C the child raises SIGINT itself at this item
    # (signal.raise_signal: Python's handler runs before it returns, as for a key press), since
    # a SIGINT sent from outside can land between the child's open() and read() of the FIFO,
    # be handled by no bytecode before the read blocks, and leave it blocked for good; and
    # only opening the FIFO let the child run on past the item once the test had opened it (on
    # a loaded machine it finished the run before the signal came). Ingest refuses pipes (a
    # pipe named x.png would hang it), hence the hook.
    write_image(folder / "zzz-blocking.png")
    (folder / "zzz-blocking.txt").write_text("the last one")
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    if stop_signal == signal.SIGINT:
        # Python's own Ctrl-C handler, as in a terminal: a suite started in the background
        # (`nohup ... &`) hands its children SIGINT ignored, and Python keeps it so
        stop = (
            "        import signal\n"
            "        signal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "        signal.raise_signal(signal.SIGINT)\n"
        )
    else:
        stop = f"        with open({str(gate)!r}, 'rb') as gate:\n            gate.read(1)\n"
    (hooks / "sitecustomize.py").write_text(
        "import pipelines.ingest as ingest\n"
        "collect = ingest.IngestStage._collect\n"
        "def gated(self, item, identity):\n"
        "    if item['source_item_id'] == 'zzz-blocking.png':\n"
        f"{stop}"
        "    return collect(self, item, identity)\n"
        "ingest.IngestStage._collect = gated\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hooks), str(REPO)])}
    command = [
        sys.executable,
        "-m",
        "surd_builder",
        "build",
        "ingest",
        str(folder),
        "-w",
        str(workspace.root),
        "--batch-size",
        "5",
        "--workers",
        "1",
        "--no-progress",
    ]
    child = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        if stop_signal == signal.SIGKILL:
            fd = os.open(gate, os.O_WRONLY)  # returns once the ingest has opened the gate
            # the child is now held at the gate, after writing every batch before this item's
            child.send_signal(stop_signal)
            _, stderr = child.communicate(timeout=60)
            os.close(fd)
        else:
            _, stderr = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()

    partial = workspace.read_table("samples")
    assert partial.num_rows == 20  # four whole batches of 5; the fifth stopped with its batch
    if stop_signal == signal.SIGKILL:
        assert child.returncode == -signal.SIGKILL
        assert workspace.runs()[-1]["status"] == "running"  # no chance to finish
        assert workspace_status(workspace).last_runs["ingest"]["status"] == "killed"
    else:
        assert child.returncode == 130
        assert stderr.strip().splitlines() == [
            "error: interrupted: 20 samples written by this run are kept; "
            "run the same command again to continue"
        ]
        assert workspace.runs()[-1]["status"] == "interrupted"
        assert workspace.runs()[-1]["counts"]["written"] == 20

    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    final = workspace.read_table("samples")
    items = final["source_item_id"].to_pylist()
    assert sorted(items) == sorted([*prompts, "zzz-blocking.png"])  # each exactly once
    assert workspace.runs()[-1]["counts"]["already_done"] == 20
    stored, _ = workspace.image_stats()
    assert stored == len(set(final["image_sha256"].to_pylist()))


def test_file_names_seeds_symlinks_and_unicode_names(tmp_path, workspace):
    folder = tmp_path / "Bilder ünï"
    write_image(folder / "a.png")
    write_image(folder / "sub" / "c.png", color=(9, 9, 9))
    rows = [
        {"file_name": "./a.png", "prompt": "a", "seed": 12345678901234567},
        {"file_name": "sub\\c.png", "prompt": "c", "seed": "98765432109876543", "steps": "20.0"},
    ]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    elsewhere = tmp_path / "elsewhere"
    write_image(elsewhere / "linked.png", color=(5, 5, 5))
    (elsewhere / "linked.txt").write_text("through a symlink")
    (folder / "link").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "loop").symlink_to(folder, target_is_directory=True)  # must not recurse forever

    report = run_stage(IngestStage(folder), workspace, QUIET)
    assert (report.written, report.failed) == (2, 1)
    samples = {r["source_item_id"]: r for r in workspace.read_table("samples").to_pylist()}
    assert set(samples) == {"a.png", "sub/c.png"}  # nothing is read through the link out
    failures = workspace.read_failures("ingest").to_pylist()
    assert [(f["source_item_id"], f["reason"]) for f in failures] == [("link", "outside-folder")]
    assert samples["a.png"]["seed"] == 12345678901234567  # exact past 2**53
    assert (samples["sub/c.png"]["seed"], samples["sub/c.png"]["steps"]) == (98765432109876543, 20)
    assert samples["a.png"]["source"] == "Bilder-ünï"


def test_nothing_to_ingest_is_an_error(tmp_path, workspace):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(InputError, match="no images in"):
        run_stage(IngestStage(empty), workspace, QUIET)
    folder = tmp_path / "in"
    sidecar_folder(folder, 1)
    with pytest.raises(InputError, match="no metadata.jsonl or metadata.csv for --prompt-column"):
        run_stage(IngestStage(folder, prompt_column="caption"), workspace, QUIET)
    assert workspace.read_state("ingest") == {}  # a failed start claims no source name


def test_limit_makes_progress_across_runs(tmp_path, workspace):
    folder = tmp_path / "in"
    sidecar_folder(folder, 7)
    limited = RunOptions(limit=3, show_progress=False)
    counts = [run_stage(IngestStage(folder), workspace, limited).written for _ in range(4)]
    assert counts == [3, 3, 1, 0]
    assert workspace.read_table("samples").num_rows == 7


def test_a_stage_runs_under_its_lock(tmp_path, workspace):
    folder = tmp_path / "in"
    sidecar_folder(folder, 1)
    with workspace.stage_lock("ingest"), pytest.raises(WorkspaceError, match="already running"):
        run_stage(IngestStage(folder), workspace, QUIET)
    assert workspace.runs() == []


def test_rows_are_written_only_after_their_images(tmp_path, workspace, monkeypatch):
    """A crash while storing a batch's images must not leave rows that point at no image."""
    folder = tmp_path / "in"
    sidecar_folder(folder, 10)
    real_write_images = Workspace.write_images
    calls = []

    def failing_second_time(self, images):
        calls.append(images.num_rows)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_write_images(self, images)

    monkeypatch.setattr(Workspace, "write_images", failing_second_time)
    with pytest.raises(OSError):
        run_stage(IngestStage(folder), workspace, QUIET)
    rows = workspace.read_table("samples")
    assert rows.num_rows == 4  # the first batch only
    stored = Workspace.open(workspace.root).image_index()
    assert set(rows["image_sha256"].to_pylist()) <= set(stored)
    assert workspace.runs()[-1]["status"] == "failed"


class UppercaseNarratives(Stage):
    """A second stage, written the way later stages will be: reads samples, writes narratives."""

    name = "uppercase"
    output_table = "narratives"

    def plan(self, workspace):
        return workspace.read_table(
            "samples", columns=["source", "source_item_id", "complex_prompt"]
        )

    def process(self, batch):
        upper = [p.upper() for p in batch["complex_prompt"].to_pylist()]
        return pa.table(
            {
                "sample_id": batch["sample_id"],
                "narrative_prompt": upper,
                "narrative_origin": ["test:upper"] * batch.num_rows,
                "failure_reason": [None if "13" not in p else "unlucky" for p in upper],
            }
        )


def test_a_second_stage_follows_the_same_contract(tmp_path, workspace):
    folder = tmp_path / "in"
    sidecar_folder(folder, 15)
    run_stage(IngestStage(folder), workspace, QUIET)
    report = run_stage(UppercaseNarratives(), workspace, QUIET)
    assert (report.written, report.failed, report.failures_by_reason) == (14, 1, {"unlucky": 1})
    narratives = workspace.read_table("narratives")
    assert narratives["updated_at"].null_count == 0  # stamped by the runner
    rows = {r["source_item_id"]: r for r in workspace.dataset().to_pylist()}
    assert rows["img-002.png"]["narrative_prompt"] == "2 RED FOXES, SNOWY FOREST, 8K, ARTSTATION"
    assert rows["img-002.png"]["narrative_origin"] == "test:upper"
    assert rows["img-013.png"]["narrative_origin"] is None  # failed: keeps the sample's own
    again = run_stage(UppercaseNarratives(), workspace, QUIET)
    assert (again.already_done, again.processed) == (14, 1)  # only the failure is retried
