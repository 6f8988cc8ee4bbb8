from __future__ import annotations

import json
import random

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from surd_builder.demo import (
    COLORS,
    COUNT_WORDS,
    ShapeScene,
    make_demo_folder,
    read_demo_params,
)
from surd_builder.errors import OutputExistsError


def test_demo_is_deterministic(tmp_path):
    make_demo_folder(tmp_path / "a", count=5, seed=11, size=48)
    make_demo_folder(tmp_path / "b", count=5, seed=11, size=48)
    make_demo_folder(tmp_path / "c", count=5, seed=12, size=48)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["metadata.jsonl", *(f"shape-{i:05d}.png" for i in range(5)), "surd-demo.json"]
    assert all(
        (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files
    )
    assert (tmp_path / "a" / "metadata.jsonl").read_text() != (
        tmp_path / "c" / "metadata.jsonl"
    ).read_text()
    with pytest.raises(OutputExistsError):
        make_demo_folder(tmp_path / "a", count=1)
    make_demo_folder(tmp_path / "a", count=2, seed=1, overwrite=True)  # smaller: no leftovers
    assert len(list((tmp_path / "a").glob("*.png"))) == 2
    assert read_demo_params(tmp_path / "a") == {"count": 2, "seed": 1, "size": 128}


def test_images_show_what_the_prompts_say(tmp_path):
    scenes = make_demo_folder(tmp_path, count=30, seed=5, size=96)
    rows = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    for scene, row in zip(scenes, rows, strict=True):
        pixels = np.asarray(Image.open(tmp_path / row["file_name"]).convert("RGB")).astype(int)
        shape_mask = np.abs(pixels - COLORS[scene.color]).sum(axis=2) < 30
        background_share = (np.abs(pixels - COLORS[scene.background]).sum(axis=2) < 30).mean()
        _, blobs = ndimage.label(shape_mask)
        assert blobs == scene.count, row
        assert background_share > 0.4
        assert row["narrative_prompt"].startswith(
            f"{COUNT_WORDS[scene.count]} {scene.color} {scene.shape}"
        )
        assert row["narrative_prompt"].endswith(f"{scene.background} background")
        assert row["complex_prompt"].startswith(f"{scene.count} {scene.color} {scene.shape}")
        assert f"{scene.background} background" in row["complex_prompt"]


def test_prompt_wording():
    rng = random.Random(0)
    assert (
        ShapeScene(3, "red", "circle", "blue").narrative_prompt
        == "three red circles on a blue background"
    )
    assert (
        ShapeScene(1, "white", "square", "orange").narrative_prompt
        == "one white square on an orange background"
    )
    keywords = ShapeScene(3, "red", "circle", "blue").complex_prompt(rng).split(", ")
    assert keywords[:2] == ["3 red circles", "blue background"] and len(keywords) == 6
