"""Using and measuring the adapter: the diffusers pipeline, `surd generate`, `surd eval`."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from adapter.evaluate import EvalCase, evaluate, load_suite
from adapter.generate import GenerateOptions, compare_grid
from adapter.metrics import (
    attribute_correct,
    clip_iqa,
    clip_score,
    frechet_distance,
    kernel_distance,
)
from adapter.model import SURAdapter
from adapter.pipeline import load_pipeline
from surd_builder.cli import app
from surd_builder.clip import ClipScorer
from tests.conftest import write_demo_dataset
from tests.tiny_models import save_tiny_clip, save_tiny_stable_diffusion


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    sd = save_tiny_stable_diffusion(root / "sd")
    torch.manual_seed(1)
    adapters = {}
    for name, weight in (("active", 0.3), ("off", 0.0)):
        adapter = SURAdapter(
            embed_dim=32, num_heads=4, feedforward_dim=64, mlp_dim=64, llm_dim=16,
            adapter_weight=weight,
        )  # fmt: skip
        with torch.no_grad():  # as after training: the output layer is no longer zero
            adapter.out.weight.normal_(0, 0.5)
        adapter.save_pretrained(root / name)
        adapters[name] = root / name
    return {"sd": sd, "clip": save_tiny_clip(root / "clip"), **adapters}


def images(pipeline, prompts, seeds, use_adapter=True) -> np.ndarray:
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    return pipeline(
        prompts, num_inference_steps=2, generator=generators, output_type="np",
        use_adapter=use_adapter,
    ).images  # fmt: skip


def test_the_pipeline_applies_the_adapter_exactly_when_its_weight_is_non_zero(models) -> None:
    active = load_pipeline(str(models["sd"]), models["active"], device="cpu")
    prompts = ["three red cats", "a dog on a beach"]
    with_adapter = images(active, prompts, [0, 1])
    without = images(active, prompts, [0, 1], use_adapter=False)
    assert with_adapter.shape == (2, 32, 32, 3)
    assert np.abs(with_adapter - without).max() > 1e-3
    assert active.use_adapter  # a call without it does not stick

    off = load_pipeline(str(models["sd"]), models["off"], device="cpu")
    assert np.array_equal(images(off, prompts, [0, 1]), images(off, prompts, [0, 1], False))

    # both the prompt and the negative prompt go through the adapter
    raw, raw_negative = active.encode_prompt(prompts, "cpu", 1, True, [""] * 2, **{})
    assert raw is not None and raw_negative is not None
    active.use_adapter = False
    plain, plain_negative = active.encode_prompt(prompts, "cpu", 1, True, [""] * 2)
    active.use_adapter = True
    adapter = active.adapter
    assert torch.allclose(raw, adapter(plain).prompt_embeds, atol=1e-5)
    assert torch.allclose(raw_negative, adapter(plain_negative).prompt_embeds, atol=1e-5)

    # embeddings from this pipeline's encode_prompt are used as given, not adapted twice
    from_embeds = active(
        prompt_embeds=raw, negative_prompt_embeds=raw_negative, num_inference_steps=2,
        generator=[torch.Generator().manual_seed(s) for s in (0, 1)], output_type="np",
    ).images  # fmt: skip
    assert np.allclose(from_embeds, with_adapter, atol=1e-5)

    # an image does not depend on the other prompts of its batch (no batch mixing, also
    # between the conditional and unconditional halves of classifier-free guidance)
    alone = images(active, prompts[:1], [0])
    assert np.allclose(alone[0], with_adapter[0], atol=1e-4)


def test_generate_writes_images_and_a_side_by_side_grid(models, tmp_path) -> None:
    result = CliRunner().invoke(
        app,
        [
            "generate", "three dogs playing in the snow", "--base-model", str(models["sd"]),
            "--adapter", str(models["active"]), "--output", str(tmp_path / "out"), "--seed", "3",
            "--seed", "4", "--compare", "--steps", "2", "--device", "cpu", "--no-progress",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == [
        "000-three-dogs-playing-in-the-snow-compare.png",
        "000-three-dogs-playing-in-the-snow-seed3.png",
        "000-three-dogs-playing-in-the-snow-seed4.png",
    ]
    grid = Image.open(tmp_path / "out" / names[0]).convert("RGB")
    # the layout is fixed by the labels and the image size: the same grid of blanks shows it
    blank = [Image.new("RGB", (32, 32), (255, 255, 255))] * 2
    layout = compare_grid("three dogs playing in the snow", [3, 4], blank, blank)
    assert grid.size == layout.image.size
    plain = (64, 64)  # 2 columns (without | with) x 2 seeds of 32 px, unlabelled
    assert grid.size[0] >= plain[0] and grid.size[1] > plain[1] + layout.header_height - 1
    header = np.asarray(grid)[: layout.header_height]
    assert (header < 128).any()  # the prompt and the column headers are drawn in dark ink
    assert np.array_equal(header, np.asarray(layout.image)[: layout.header_height])

    def cell(row: int, column: int) -> np.ndarray:
        x, y, width, _ = layout.cells[row][column]
        left = x + (width - 32) // 2
        return np.asarray(grid)[y : y + 32, left : left + 32]

    right_top, left_top = cell(0, 1), cell(0, 0)
    seed3 = np.asarray(Image.open(tmp_path / "out" / names[1]).convert("RGB"))
    assert np.abs(right_top.astype(int) - seed3.astype(int)).max() <= 2  # the adapter's image
    pipeline = load_pipeline(str(models["sd"]), models["active"], device="cpu")
    without = pipeline(
        "three dogs playing in the snow", num_inference_steps=2, use_adapter=False,
        generator=torch.Generator().manual_seed(3), negative_prompt="",
    ).images[0]  # fmt: skip
    # ... the left one is without it (batched with the other column: float sums may differ)
    assert np.abs(left_top.astype(int) - np.asarray(without).astype(int)).max() <= 2

    missing = CliRunner().invoke(
        app,
        ["generate", "x", "--base-model", str(models["sd"]), "--adapter", str(tmp_path),
         "--device", "cpu"],
    )  # fmt: skip
    assert missing.exit_code == 2 and "no adapter there" in missing.output


class SolidPipeline:
    """Stands in for a SURAdapterPipeline: one solid image per prompt, red without the adapter,
    blue with it."""

    def __call__(self, prompts, use_adapter, **_):
        from types import SimpleNamespace

        colour = (40, 60, 220) if use_adapter else (220, 40, 40)
        return SimpleNamespace(images=[Image.new("RGB", (64, 64), colour) for _ in prompts])


def test_the_validation_grid_is_labelled_with_prompts_and_column_headers() -> None:
    from adapter.validation import validation_grid
    from surd_builder.pictures import BACKGROUND, labelled_grid

    long = "an old man reading a book under a tree, " * 12 + "the end"
    prompts = ["three dogs playing in the snow", long]
    grid = validation_grid(SolidPipeline(), prompts, 0, 2, 7.5)
    pixels = np.asarray(grid).astype(int)
    assert grid.width >= 2 * 64 and grid.height > 2 * 64  # taller than the plain 2 x 2 grid
    unlabelled = labelled_grid([[Image.new("RGB", (64, 64))] * 2] * 2)
    assert grid.height > unlabelled.image.height  # by the header and the prompt bands
    # the same labels over blanks give the layout: a header band of dark ink on grey first
    layout = labelled_grid(
        [[Image.new("RGB", (64, 64))] * 2] * 2, ("without adapter", "with adapter"), prompts
    )
    assert grid.size == layout.image.size
    header = pixels[: layout.header_height]
    assert layout.header_height > 0 and (header < 100).all(axis=2).sum() > 20  # ink, not band
    assert np.array_equal(np.asarray(layout.image)[: layout.header_height], header)
    # above the first row: its prompt; the images where the layout says, red left, blue right
    (x0, y0, w0, _), (x1, y1, w1, _) = layout.cells[0]
    label = pixels[layout.header_height : y0]
    assert (np.abs(label - BACKGROUND).sum(axis=2) > 200).sum() > 20  # the prompt's ink
    left, right = x0 + (w0 - 64) // 2, x1 + (w1 - 64) // 2
    assert (pixels[y0 + 32, left + 32] == (220, 40, 40)).all()
    assert (pixels[y1 + 32, right + 32] == (40, 60, 220)).all()
    # the long prompt is cut to three lines with an ellipsis
    from surd_builder.pictures import ELLIPSIS, font, font_size_for, wrap

    lines = wrap(long, font(font_size_for(64)), layout.image.width - 2 * 4, 3)
    assert len(lines) == 3 and lines[-1].endswith(ELLIPSIS)


def test_wrapping_fits_the_width_and_cuts_with_an_ellipsis() -> None:
    from surd_builder.pictures import ELLIPSIS, fit, font, text_width, wrap

    face = font(14)
    text = "a red car parked in front of a blue house " * 5
    lines = wrap(text, face, 200, max_lines=10)
    assert len(lines) > 1 and all(text_width(face, line) <= 200 for line in lines)
    assert " ".join(lines) == " ".join(text.split())  # nothing lost when it fits
    cut = wrap(text, face, 200, max_lines=2)
    assert len(cut) == 2 and cut[-1].endswith(ELLIPSIS) and text_width(face, cut[-1]) <= 200
    word = wrap("x" * 200, face, 100, max_lines=3)  # a word longer than a line is broken
    assert all(text_width(face, line) <= 100 for line in word) and word[-1].endswith(ELLIPSIS)
    assert fit("short", face, 200) == "short"
    assert fit("sample-" * 20, face, 80).endswith(ELLIPSIS)


def test_attribute_accuracy_and_the_scores_on_constructed_embeddings() -> None:
    basis = np.eye(4, dtype=np.float32)
    # image 0 looks like option 0 (its attribute), image 1 like its option 2 (an alternative)
    image_features = np.stack([basis[0], basis[2]])
    options = np.stack([basis[[0, 1, 2]], basis[[0, 1, 2]]])
    assert attribute_correct(image_features, options).tolist() == [True, False]
    assert clip_score(image_features, basis[[0, 0]]).tolist() == [100.0, 0.0]
    good, bad = basis[0], basis[1]
    quality = clip_iqa(np.stack([basis[0], basis[1]]), good, bad)
    assert quality[0] > 0.99 and quality[1] < 0.01

    rng = np.random.default_rng(0)
    sample = rng.normal(size=(400, 3))
    same = rng.normal(size=(400, 3))
    shifted = same + np.array([2.0, 0.0, 0.0])
    assert frechet_distance(sample, same) < 0.1
    assert frechet_distance(sample, shifted) == pytest.approx(4.0, abs=0.5)  # mean shift^2
    # covariance counts too: S vs 4S gives tr(5S - 2 * 2S) = tr(S), about 3 here
    assert frechet_distance(same, 2 * same) == pytest.approx(np.trace(np.cov(same.T)), rel=0.01)
    assert frechet_distance(sample[:1], same) is None and kernel_distance(sample[:1], same) == (
        None,
        None,
    )

    # a case with fewer alternatives than another is judged among its own options only: the
    # padding repeats one of its alternatives (a zero vector would win every negative contest)
    from adapter.evaluate import _pad_options

    attribute, alternative = np.array([1.0, 0, 0, 0]), np.array([0, 1.0, 0, 0])
    padded = _pad_options(
        np.stack([attribute, alternative, attribute, alternative, basis[2], basis[3]]),
        [EvalCase("a", "x", "a", ("b",)), EvalCase("c", "x", "a", ("b", "c", "d"))],
        width=4,
    )
    image = -np.array([0.5, 0.9, 0.9, 0.9]) / np.linalg.norm([0.5, 0.9, 0.9, 0.9])
    assert attribute_correct(image[None], padded[:1]).tolist() == [True]
    assert abs(kernel_distance(sample, same)[0]) < 0.01
    assert kernel_distance(sample, shifted)[0] > 0.1


def test_the_shipped_suite_covers_the_three_categories() -> None:
    cases = load_suite()
    assert Counter(case.category for case in cases) == {
        "action": 10,
        "colour": 10,
        "counting": 10,
    }
    assert all(case.attribute and len(case.alternatives) == 3 for case in cases)


def test_eval_writes_metrics_and_a_report_that_references_only_existing_files(
    models, tmp_path
) -> None:
    pipeline = load_pipeline(str(models["sd"]), models["active"], device="cpu")
    scorer = ClipScorer(str(models["clip"]), device="cpu")
    cases = [
        EvalCase("three red cats", "counting", "three cats", ("one cat", "two cats")),
        EvalCase("a blue car", "colour", "a blue car", ("a red car", "a green car", "a car")),
        EvalCase("a plain narrative prompt from the test split", "test"),
    ]
    reference = [Image.new("RGB", (32, 32), (i * 20, 100, 200 - i * 20)) for i in range(6)]
    out = tmp_path / "eval"
    options = GenerateOptions(seeds=[0, 1], num_inference_steps=2, batch_size=3)
    result = evaluate(
        pipeline, scorer, cases, out, options, scorer.image_features(reference).numpy()
    )
    assert result.images_per_variant == 6
    document = json.loads((out / "metrics.json").read_text())
    for variant in ("with", "without"):
        values = document["metrics"][variant]
        assert 0.0 <= values["semantic_accuracy"] <= 1.0 and 0.0 <= values["clip_iqa"] <= 1.0
        assert values["fid_clip"] >= 0.0 and "kid_clip" in values
    assert set(document["per_category"]) == {"colour", "counting", "test"}
    assert document["per_category"]["test"]["with"]["semantic_accuracy"] is None
    assert len(document["per_image"]) == 6
    # the JSON's CLIP score is the CLIP score of the saved images
    first = document["per_image"][0]
    saved = Image.open(out / "images" / "with" / "case-000-seed0.png").convert("RGB")
    features = scorer.image_features([saved]).numpy()
    prompt = scorer.text_features([cases[0].prompt]).numpy()
    assert clip_score(features, prompt)[0] == pytest.approx(first["clip_score_with"], abs=0.5)

    page = (out / "report.html").read_text()
    sources = re.findall(r"src='([^']+)'", page)
    assert len(sources) == 12  # 3 cases x 2 seeds x (without, with)
    assert all((out / source).is_file() for source in sources)
    assert "missing" not in page


def eval_args(models, *extra: str) -> list[str]:
    return [
        "eval", "--base-model", str(models["sd"]), "--adapter", str(models["active"]),
        "--clip-model", str(models["clip"]), "--device", "cpu", "--steps", "2", "--no-progress",
        *extra,
    ]  # fmt: skip


def test_a_bad_prompt_file_is_a_one_line_error(models, tmp_path) -> None:
    suite = tmp_path / "suite.toml"
    suite.write_text('[[case]]\nprompt = "two cats"\n')
    result = CliRunner().invoke(app, eval_args(models, "--prompts", str(suite)))
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"error: {suite}: case 1 lacks category"]
    suite.write_text(
        '[[case]]\nprompt = "two cats"\ncategory = "counting"\nattribute = "two cats"\n'
        'alternatives = "one cat"\n'
    )
    result = CliRunner().invoke(app, eval_args(models, "--prompts", str(suite)))
    assert result.exit_code == 2 and "must be a list of strings" in result.output


def test_eval_from_the_command_line_with_test_prompts_and_reference_images(
    models, tmp_path
) -> None:
    data = write_demo_dataset(tmp_path / "demo", count=24, held_out=6)
    suite = tmp_path / "suite.toml"
    suite.write_text(
        '[[case]]\nprompt = "two red circles"\ncategory = "counting"\n'
        'attribute = "two circles"\nalternatives = ["one circle", "three circles"]\n'
    )
    out = tmp_path / "eval"
    result = CliRunner().invoke(
        app,
        eval_args(
            models, "--no-default-prompts", "--prompts", str(suite), "--data", str(data),
            "--data-prompts", "2", "--reference", str(data), "--seed", "5", "--output", str(out),
        ),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    document = json.loads((out / "metrics.json").read_text())
    assert [case["category"] for case in document["cases"]] == ["counting", "test", "test"]
    assert document["reference_images"] == 24  # both splits' images
    assert document["settings"]["clip_dtype"] == "float32"
    assert document["metrics"]["with"]["kid_clip"] is not None
    assert "clip_score" in result.output and "report:" in result.output
