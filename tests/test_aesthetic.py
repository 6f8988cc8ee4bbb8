"""Aesthetic scores: LAION-style heads (random weights) over a tiny random CLIP's image embeddings.

Mechanics only: loading both LAION formats (.pth, .safetensors), the maths against the heads'
own modules and a hand computation, width checks, thresholds re-deciding without recomputing,
and the cache key following the head file's content. What a real head says about real pictures
is the LAION models' business, not something random weights can show.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipelines.aesthetic import AestheticHead
from pipelines.ingest import IngestStage
from pipelines.runner import RunOptions, run_stage
from pipelines.scorers import ClipScorer
from pipelines.screen import LOW_AESTHETIC_TAG, ScreenStage, Thresholds
from surd_builder.demo import make_demo_folder
from surd_builder.errors import InputError
from surd_builder.ids import text_key
from surd_builder.review import SCREEN_REVIEWER, SCREEN_SCORES, review_priority
from surd_builder.workspace import Workspace
from tests.conftest import image_bytes, run_surd
from tests.tiny_models import save_tiny_clip

DEMO_COUNT = 8
QUIET = RunOptions(show_progress=False)
CLIP_WIDTH = 16  # save_tiny_clip's projection_dim


# ----------------------------------------------------------------------------- heads
class ImprovedPredictor(torch.nn.Module):
    """christophschuhmann/improved-aesthetic-predictor's MLP as its scripts build it
    (``relu=True``: the reluMSE variant, a ReLU after every Linear but the last)."""

    def __init__(self, width: int, relu: bool = False):
        super().__init__()

        def act():
            return [torch.nn.ReLU()] if relu else []

        self.layers = torch.nn.Sequential(
            torch.nn.Linear(width, 1024),
            *act(),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128),
            *act(),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64),
            *act(),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            *act(),
            torch.nn.Linear(16, 1),
        )

    def forward(self, x):
        return self.layers(x)


def make_head(kind: str, width: int = CLIP_WIDTH, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if kind == "linear":  # LAION-Aesthetics V1: sa_0_4_vit_l_14_linear.pth
        head = torch.nn.Linear(width, 1)
    else:
        head = ImprovedPredictor(width, relu=kind == "relu")
    with torch.no_grad():  # a spread of scores around LAION's 1..10, like a trained head
        last = head if kind == "linear" else head.layers[-1]
        last.weight.mul_(40.0)
        last.bias.fill_(5.0)
    return head.eval()


def save_head(head: torch.nn.Module, path: Path) -> Path:
    state = {key: value.contiguous() for key, value in head.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def by_hand(head: torch.nn.Module, embedding: torch.Tensor, kind: str) -> float:
    """The head's maths in numpy, from its state dict, on the L2-normalised embedding."""
    state = {key: value.double().numpy() for key, value in head.state_dict().items()}
    x = embedding.double().numpy()
    x = x / np.linalg.norm(x)
    if kind == "linear":
        return float((state["weight"] @ x + state["bias"])[0])
    indices = sorted({int(key.split(".")[1]) for key in state})
    for position, index in enumerate(indices):
        x = state[f"layers.{index}.weight"] @ x + state[f"layers.{index}.bias"]
        if kind == "relu" and position < len(indices) - 1:
            x = np.maximum(x, 0.0)
    return float(x[0])


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip") / "clip")


@pytest.fixture(scope="module")
def clip(clip_dir) -> ClipScorer:
    scorer = ClipScorer(str(clip_dir), device="cpu")
    scorer.load()
    return scorer


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo") / "shapes"
    make_demo_folder(folder, count=DEMO_COUNT, seed=3, size=32)
    return folder


@pytest.fixture
def ingested(workspace: Workspace, demo_folder) -> Workspace:
    report = run_stage(IngestStage(demo_folder, source="demo"), workspace, QUIET)
    assert report.written == DEMO_COUNT
    return workspace


@pytest.fixture
def head_path(tmp_path) -> Path:
    return save_head(make_head("mlp"), tmp_path / "heads" / "sac+logos+ava1-l14-linearMSE.pth")


def screening(workspace: Workspace) -> dict[str, dict]:
    return {row["sample_id"]: row for row in workspace.read_table("screening").to_pylist()}


def screen(workspace, clip, head_file=None, thresholds=None):
    aesthetic = AestheticHead(str(head_file)) if head_file is not None else None
    stage = ScreenStage(clip, thresholds=thresholds, aesthetic=aesthetic)
    return stage, run_stage(stage, workspace, QUIET)


def threshold_in_widest_gap(scores: dict[str, float]) -> tuple[float, set[str]]:
    ordered = sorted(scores.values())
    width, index = max((ordered[i + 1] - ordered[i], i) for i in range(len(ordered) - 1))
    assert width > 0, ordered
    threshold = (ordered[index] + ordered[index + 1]) / 2
    return threshold, {sid for sid, value in scores.items() if value < threshold}


def assert_one_line_error(result, fragment: str, code: int = 2) -> None:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and fragment in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout


# ----------------------------------------------------------------------------- 1. the heads
@pytest.mark.parametrize("kind", ["mlp", "relu", "linear"])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_head_loads_and_scores_like_its_module_and_by_hand(clip, tmp_path, kind, suffix):
    head = make_head(kind)
    path = save_head(head, tmp_path / f"head{suffix}")
    loaded = AestheticHead(str(path))
    assert loaded.input_width == CLIP_WIDTH
    assert loaded.identity() == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()

    images = [
        image_bytes((200, 30, 30), (40, 24)),
        b"not an image",
        image_bytes((10, 100, 200), (16, 50)),
        image_bytes((240, 210, 40), (64, 64)),
    ]
    texts = ["a red square", "broken", "a blue bar", "a yellow square"]
    scores, embeddings = clip.scores_and_image_features(images, texts)
    assert scores == clip.scores(images, texts)  # the same pass the CLIP score always made
    assert embeddings[1] is None and scores[1] is None
    assert all(tuple(embeddings[i].shape) == (CLIP_WIDTH,) for i in (0, 2, 3))

    results = loaded.scores(embeddings)
    assert results[1] is None  # an unreadable image has no score
    present = [0, 2, 3]
    with torch.no_grad():
        module = head(torch.stack([embeddings[i] for i in present]))[:, 0].tolist()
    for position, index in enumerate(present):
        expected = by_hand(head, embeddings[index], kind)
        assert math.isclose(results[index], expected, rel_tol=1e-5, abs_tol=1e-5)
        assert math.isclose(results[index], module[position], rel_tol=1e-5, abs_tol=1e-5)
    assert len({round(results[i], 4) for i in present}) == 3  # the scores depend on the image

    # the head normalises what it is given (a raw, unnormalised embedding scores the same)
    scaled = loaded.scores([embeddings[0] * 7.5])[0]
    assert math.isclose(scaled, results[0], rel_tol=1e-5, abs_tol=1e-5)
    assert loaded.scores([]) == [] and loaded.scores([None]) == [None]

    # the object travels to workers without its tensors and loads again there
    copy = pickle.loads(pickle.dumps(loaded))
    assert copy._loaded is None and copy.scores(embeddings) == results


def test_both_formats_of_one_head_give_the_same_scores(clip, tmp_path):
    head = make_head("mlp", seed=4)
    pth = AestheticHead(str(save_head(head, tmp_path / "head.pth")))
    safetensors = AestheticHead(str(save_head(head, tmp_path / "head.safetensors")))
    _, embeddings = clip.scores_and_image_features(
        [image_bytes((90, 200, 10)), image_bytes((5, 5, 5))], ["x", "y"]
    )
    assert pth.scores(embeddings) == safetensors.scores(embeddings)


def test_widths_come_from_the_tensors_and_a_mismatch_is_one_line(ingested, clip, tmp_path):
    # a ViT-B/32-sized head (512) loads; its width is read, not assumed to be 768
    vit_b = AestheticHead(str(save_head(make_head("mlp", 512), tmp_path / "b32.pth")))
    assert vit_b.input_width == 512
    vit_l = AestheticHead(str(save_head(make_head("linear", 768), tmp_path / "l14.pth")))
    assert vit_l.input_width == 768
    with pytest.raises(InputError) as error:
        vit_l.check_clip(clip)  # the tiny CLIP's config says 16
    message = str(error.value)
    assert "\n" not in message and "768" in message and "16" in message
    assert "clip-vit-large-patch14" in message
    with pytest.raises(InputError, match="768-wide"):  # when the stage plans: before any work
        ScreenStage(clip, aesthetic=vit_l).plan(ingested)
    ScreenStage(
        clip, aesthetic=AestheticHead(str(save_head(make_head("mlp"), tmp_path / "ok.pth")))
    ).plan(ingested)
    _, embeddings = clip.scores_and_image_features([image_bytes()], ["x"])
    with pytest.raises(InputError, match="512-wide"):
        vit_b.scores(embeddings)  # the same check where the embeddings are scored


def test_files_that_are_not_heads_are_one_line_errors_and_never_run_code(tmp_path):
    def error_of(path: Path) -> str:
        with pytest.raises(InputError) as error:
            AestheticHead(str(path)).load()
        assert "\n" not in str(error.value)
        return str(error.value)

    with pytest.raises(InputError, match="does not exist"):
        AestheticHead(str(tmp_path / "missing.pth"))
    with pytest.raises(InputError, match="is a folder"):
        AestheticHead(str(tmp_path))

    # a pickle that would run code when loaded with weights_only=False
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"weight": torch.zeros(1, 4), "bias": Payload()}, tmp_path / "evil.pth")
    assert "not a state dict of tensors" in error_of(tmp_path / "evil.pth")
    assert not marker.exists()

    (tmp_path / "garbage.pth").write_bytes(b"\x00\x01 not a checkpoint")
    assert "not a state dict of tensors" in error_of(tmp_path / "garbage.pth")
    torch.save({"encoder.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    assert "not a LAION aesthetic head" in error_of(tmp_path / "other.pth")
    state = make_head("mlp").state_dict()
    state["layers.9.weight"], state["layers.9.bias"] = torch.zeros(1, 1), torch.zeros(1)
    torch.save(state, tmp_path / "layout.pth")
    assert "layers.{0,2,4,6,7,9}" in error_of(tmp_path / "layout.pth")
    state = make_head("mlp").state_dict()
    state["layers.4.weight"] = torch.zeros(64, 100)
    torch.save(state, tmp_path / "chain.pth")
    assert "reads 100 values" in error_of(tmp_path / "chain.pth")
    torch.save({"weight": torch.zeros(3, 16), "bias": torch.zeros(3)}, tmp_path / "three.pth")
    assert "gives 3 values" in error_of(tmp_path / "three.pth")


# ----------------------------------------------------------------------------- 2. the stage
def test_stage_stores_scores_and_thresholds_re_decide_without_recomputing(
    ingested, clip, head_path
):
    stage, report = screen(ingested, clip, head_path)
    assert report.written == DEMO_COUNT and stage.scored == DEMO_COUNT
    rows = screening(ingested)
    head = AestheticHead(str(head_path))
    for sample in ingested.dataset().to_pylist():
        row = rows[sample["sample_id"]]
        image = ingested.read_images([sample["image_sha256"]])[sample["image_sha256"]]
        clip_scores, embeddings = clip.scores_and_image_features(
            [image], [sample["narrative_prompt"]]
        )
        # the score is the head over this image's embedding; the CLIP score is unchanged by it
        assert math.isclose(row["aesthetic_score"], head.scores(embeddings)[0], abs_tol=1e-4)
        assert math.isclose(row["clip_score"], clip_scores[0], abs_tol=1e-4)
        assert row["review_status"] is None
    scores = {sid: row["aesthetic_score"] for sid, row in rows.items()}

    # a threshold between the observed scores rejects exactly the samples below it, tagged
    threshold, below = threshold_in_widest_gap(scores)
    assert below and len(below) < DEMO_COUNT
    stage, report = screen(ingested, clip, head_path, Thresholds(min_aesthetic_score=threshold))
    assert stage.scored == 0 and report.processed == len(below)
    data = {row["sample_id"]: row for row in ingested.dataset().to_pylist()}
    for sample_id, row in data.items():
        assert row["aesthetic_score"] == scores[sample_id]  # not recomputed
        if sample_id in below:
            assert row["review_status"] == "rejected"
            assert row["review_tags"] == [LOW_AESTHETIC_TAG]
            assert row["reviewer"] == SCREEN_REVIEWER
        else:
            assert row["review_status"] == "pending" and row["review_tags"] is None

    # the same threshold again: nothing to do; another one: re-decided, still not recomputed
    stage, report = screen(ingested, clip, head_path, Thresholds(min_aesthetic_score=threshold))
    assert report.already_done == DEMO_COUNT and stage.scored == 0
    above_all = max(scores.values()) + 1.0
    stage, report = screen(ingested, clip, head_path, Thresholds(min_aesthetic_score=above_all))
    assert stage.scored == 0 and report.processed == DEMO_COUNT - len(below)
    assert {row["review_status"] for row in screening(ingested).values()} == {"rejected"}
    stage, report = screen(ingested, clip, head_path)  # no threshold: all come back
    assert stage.scored == 0 and report.processed == DEMO_COUNT
    data = ingested.dataset().to_pylist()
    assert {row["review_status"] for row in data} == {"pending"}
    assert {row["sample_id"]: row["aesthetic_score"] for row in data} == scores

    # the picture's beauty is not a review priority: the order ignores the column
    assert "aesthetic_score" not in SCREEN_SCORES
    table = ingested.dataset().select(["sample_id", "aesthetic_score"])
    order = table["sample_id"].take(review_priority(table)).to_pylist()
    assert order == sorted(scores)


def test_cache_key_follows_the_head_file_and_is_unchanged_without_one(
    ingested, clip, head_path, tmp_path
):
    sha, narrative, keywords = "ab" * 32, "a red fox", "red fox, 8k"
    without = ScreenStage(clip).screening_key(sha, narrative, keywords)
    # the key every workspace screened before aesthetic scores existed has
    identity = {
        "clip": clip.model,
        "text": None,
        "image": sha,
        "narrative": text_key(narrative),
        "keywords": None,
    }
    canonical = json.dumps(identity, sort_keys=True, ensure_ascii=False)
    assert without == hashlib.sha256(canonical.encode()).hexdigest()[:32]

    def key(path: Path) -> str:
        stage = ScreenStage(clip, aesthetic=AestheticHead(str(path)))
        return stage.screening_key(sha, narrative, keywords)

    first = key(head_path)
    assert first != without
    moved = shutil.copy(head_path, tmp_path / "elsewhere.pth")
    assert key(Path(moved)) == first  # the content counts, not the file's name

    stage, _ = screen(ingested, clip)  # a workspace screened before it had a head
    no_head = screening(ingested)
    stage, report = screen(ingested, clip, head_path)
    assert stage.scored == DEMO_COUNT  # the head is part of the key: scored anew
    before = screening(ingested)
    save_head(make_head("mlp", seed=9), head_path)  # another head at the same path
    assert key(head_path) != first
    stage, report = screen(ingested, clip, head_path)
    assert stage.scored == DEMO_COUNT and report.already_done == 0
    after = screening(ingested)
    for sample_id, row in after.items():
        assert row["screening_key"] != before[sample_id]["screening_key"]
        assert row["aesthetic_score"] != before[sample_id]["aesthetic_score"]
        assert row["clip_score"] == before[sample_id]["clip_score"]  # same CLIP, same cosine

    # screening without the head again finds its first keys and scores: nothing recomputed
    stage, report = screen(ingested, clip)
    assert stage.scored == 0 and report.processed == DEMO_COUNT
    again = screening(ingested)
    for sample_id, row in again.items():
        assert row["screening_key"] == no_head[sample_id]["screening_key"]
        assert row["clip_score"] == no_head[sample_id]["clip_score"]
        assert row["aesthetic_score"] is None


def test_a_head_needs_a_clip_model(head_path):
    with pytest.raises(ValueError, match="CLIP"):
        ScreenStage(aesthetic=AestheticHead(str(head_path)), judge=object())


# ----------------------------------------------------------------------------- 3. the CLI
def test_cli_aesthetic(ingested, clip_dir, head_path, tmp_path):
    ws = str(ingested.root)
    result = run_surd("build", "screen", "-w", ws, "--aesthetic-model", str(head_path))
    assert_one_line_error(result, "give --clip-model too")
    result = run_surd(
        "build", "screen", "-w", ws, "--clip-model", str(clip_dir), "--min-aesthetic-score", "5"
    )
    assert_one_line_error(result, "--min-aesthetic-score works only with --aesthetic-model")

    # the scores this head gives here, from the stage in this process on a copy: a threshold
    # between them must reject some samples and keep others
    copy, scratch = tmp_path / "copy", tmp_path / "scratch"
    shutil.copytree(ingested.root, copy)
    shutil.copytree(ingested.root, scratch)
    screen(Workspace.open(scratch), ClipScorer(str(clip_dir), device="cpu"), head_path)
    expected = {
        sid: row["aesthetic_score"] for sid, row in screening(Workspace.open(scratch)).items()
    }
    threshold, below = threshold_in_widest_gap(expected)
    assert below and len(below) < DEMO_COUNT

    # a ViT-L/14-wide head named in the copy's surd.toml, relative to that workspace
    wide = save_head(make_head("mlp", 768), copy / "heads" / "l14.pth")
    (copy / "surd.toml").write_text('[screen]\naesthetic_model = "heads/l14.pth"\n')
    common = ("build", "screen", "--clip-model", str(clip_dir), "--device", "cpu", "--no-progress")
    with ThreadPoolExecutor(max_workers=2) as pool:
        mismatch = pool.submit(run_surd, *common, "-w", str(copy))
        scored = pool.submit(
            run_surd,
            *common,
            "-w",
            ws,
            "--aesthetic-model",
            str(head_path),
            "--min-aesthetic-score",
            str(threshold),
        )
        mismatch, scored = mismatch.result(), scored.result()

    assert_one_line_error(mismatch, "768-wide")
    assert str(wide) in mismatch.stderr
    assert "screening" not in {p.name for p in (copy / "tables").iterdir()}

    assert scored.returncode == 0, scored.stderr
    data = {row["sample_id"]: row for row in Workspace.open(ws).dataset().to_pylist()}
    assert data.keys() == expected.keys()
    for sample_id, row in data.items():
        assert math.isclose(row["aesthetic_score"], expected[sample_id], abs_tol=1e-5)
        if sample_id in below:
            assert row["review_status"] == "rejected"
            assert row["review_tags"] == [LOW_AESTHETIC_TAG]
        else:
            assert row["review_status"] == "pending"
    # the CLI's key is the stage's with this head (the head's content hash in it)
    scratch_rows = screening(Workspace.open(scratch))
    assert {sid: row["screening_key"] for sid, row in screening(Workspace.open(ws)).items()} == {
        sid: row["screening_key"] for sid, row in scratch_rows.items()
    }
