"""A synthetic demo dataset whose semantics can be checked.

Each image shows N shapes of one colour on a plain background, and its two prompts say exactly
that: the narrative prompt "three red circles on a blue background" and the keyword prompt
"3 red circles, blue background, flat vector art, minimalism, highly detailed, 8k". Because the
count, colour, shape and background are known, later stages can check themselves against them
(a rewriter must keep them; an adapter trained on this data must learn them). It is the embedded
default of the quickstart: no network and no binary files in git.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from surd_builder.atomic import atomic_path
from surd_builder.errors import OutputExistsError

PARAMS_FILE = "surd-demo.json"
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
STYLE_KEYWORDS = (
    "flat vector art",
    "minimalism",
    "highly detailed",
    "8k",
    "trending on artstation",
    "sharp focus",
    "clean background",
    "digital illustration",
)


@dataclass(frozen=True)
class ShapeScene:
    """What one demo image shows."""

    count: int
    color: str
    shape: str
    background: str

    @property
    def narrative_prompt(self) -> str:
        noun = self.shape if self.count == 1 else f"{self.shape}s"
        article = "an" if self.background[0] in "aeiou" else "a"
        count = COUNT_WORDS[self.count]
        return f"{count} {self.color} {noun} on {article} {self.background} background"

    def complex_prompt(self, rng: random.Random) -> str:
        noun = self.shape if self.count == 1 else f"{self.shape}s"
        styles = rng.sample(STYLE_KEYWORDS, k=4)
        return ", ".join(
            [f"{self.count} {self.color} {noun}", f"{self.background} background", *styles]
        )


def random_scene(rng: random.Random, max_count: int = 4) -> ShapeScene:
    color, background = rng.sample(sorted(COLORS), k=2)
    return ShapeScene(rng.randint(1, max_count), color, rng.choice(SHAPES), background)


def render(scene: ShapeScene, size: int, rng: random.Random):
    """Draw ``scene`` as a ``size`` x ``size`` RGB image; shapes sit in distinct grid cells so they
    never overlap and can be counted."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), COLORS[scene.background])
    draw = ImageDraw.Draw(image)
    grid = 3
    cell = size / grid
    for index in rng.sample(range(grid * grid), k=scene.count):
        row, col = divmod(index, grid)
        radius = cell * rng.uniform(0.28, 0.4)
        cx = (col + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell
        cy = (row + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        fill = COLORS[scene.color]
        if scene.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif scene.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon(
                [(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)],
                fill=fill,
            )
    return image


def make_demo_folder(
    out: Path | str, count: int = 200, seed: int = 0, size: int = 128, overwrite: bool = False
) -> list[ShapeScene]:
    """Write ``count`` PNG images and a ``metadata.jsonl`` (HF imagefolder layout) to ``out``.

    The same ``seed`` gives the same files. Returns the scenes in file order.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"{out} exists and is not empty (pass --overwrite to replace it)")
    if count < 1 or size < 16:
        raise ValueError("count must be >= 1 and size >= 16")
    out.mkdir(parents=True, exist_ok=True)
    # an earlier, larger demo must not leave images behind that the new metadata does not list
    for stale in [*out.glob("shape-*.png"), out / "metadata.jsonl", out / PARAMS_FILE]:
        stale.unlink(missing_ok=True)
    rng = random.Random(seed)
    scenes = []
    lines = []
    for number in range(count):
        scene = random_scene(rng)
        file_name = f"shape-{number:05d}.png"
        with atomic_path(out / file_name) as temp:
            render(scene, size, rng).save(temp, format="PNG")
        lines.append(
            json.dumps(
                {
                    "file_name": file_name,
                    "complex_prompt": scene.complex_prompt(rng),
                    "narrative_prompt": scene.narrative_prompt,
                    "license": "CC0-1.0",
                    **{f"scene_{k}": v for k, v in asdict(scene).items()},
                }
            )
        )
        scenes.append(scene)
    with atomic_path(out / "metadata.jsonl") as temp:
        temp.write_text("\n".join(lines) + "\n")
    with atomic_path(out / PARAMS_FILE) as temp:  # last: marks a complete demo folder
        temp.write_text(json.dumps({"count": count, "seed": seed, "size": size}) + "\n")
    return scenes


def read_demo_params(folder: Path | str) -> dict:
    """``{count, seed, size}`` of a complete demo folder; ``{}`` if there is none."""
    try:
        return json.loads((Path(folder) / PARAMS_FILE).read_text())
    except (OSError, ValueError):
        return {}


def write_demo_dataset(folder: Path, count: int = 160, held_out: int = 32) -> Path:
    """The demo shapes as a training set in the export's layout (``export/data/{train,test}-
    00000-of-00001.parquet``, HF image structs, 32 px images); returns the export folder. What
    the tests and ``bench/gpu_check.sh`` train the tiny models on."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = folder / "images"
    make_demo_folder(images, count=count, size=32)
    rows = [json.loads(line) for line in (images / "metadata.jsonl").read_text().splitlines()]

    def table(selected: list[dict]) -> pa.Table:
        return pa.table(
            {
                "narrative_prompt": [row["narrative_prompt"] for row in selected],
                "complex_prompt": [row["complex_prompt"] for row in selected],
                "image": [
                    {"bytes": (images / row["file_name"]).read_bytes(), "path": row["file_name"]}
                    for row in selected
                ],
            }
        )

    data = folder / "export" / "data"
    data.mkdir(parents=True)
    pq.write_table(table(rows[:-held_out]), data / "train-00000-of-00001.parquet")
    pq.write_table(table(rows[-held_out:]), data / "test-00000-of-00001.parquet")
    return folder / "export"
