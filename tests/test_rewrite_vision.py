"""Narratives and judgements from what the image shows, over real HTTP: ``openai: --with-image``
and ``screen --judge openai:``, against the loopback chat server (``tests/chat_server.py``).

The images are real files ingested into a real workspace: a 1600x1000 JPEG photo stand-in that
must arrive downscaled, a small PNG that must arrive byte for byte, and two images that share a
keyword prompt (one request each: the image is part of the cache key).
"""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pipelines.ingest import IngestStage
from pipelines.judge import JUDGE_TEMPLATE, OpenAIJudge, logprob_score, make_judge
from pipelines.rewrite import RewriteStage
from pipelines.rewriters import RewriteRequest, RewriterUnavailable, make_rewriter
from pipelines.rewriters.base import ItemFailed
from pipelines.rewriters.rules import RulesRewriter
from pipelines.rewriters.template import DEFAULT_VISION_TEMPLATE, PromptTemplate
from pipelines.rewriters.vision import model_image, upload_image
from pipelines.runner import RunOptions, run_stage
from pipelines.screen import LOW_JUDGE_TAG, ScreenStage, Thresholds
from surd_builder.config import RewriteSettings, ScreenSettings
from surd_builder.errors import InputError
from surd_builder.workspace import Workspace
from tests.chat_server import ChatCompletionsServer, image_urls, message_text
from tests.conftest import run_surd

MODEL = "vision-model"
COMPLETIONS = "/v1/chat/completions"
QUIET = RunOptions(show_progress=False)
SHARED_PROMPT = "one green circle, white background, flat, 8k"
PROMPTS = {
    "photo.jpg": "2 red foxes, snowy forest, 8k, artstation",
    "small.png": "a blue square, flat vector art, trending on artstation",
    "shared-a.png": SHARED_PROMPT,
    "shared-b.png": SHARED_PROMPT,
}


# ----------------------------------------------------------------------------- fixtures
def photo(size: tuple[int, int] = (1600, 1000)) -> bytes:
    """A smooth gradient photo stand-in (JPEG), so a downscale is comparable pixel by pixel."""
    width, height = size
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    pixels = np.concatenate(
        [
            np.broadcast_to(x, (height, width, 1)),
            np.broadcast_to(y, (height, width, 1)),
            np.full((height, width, 1), 90, np.float32),
        ],
        axis=2,
    ).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def png(color: tuple[int, int, int], size: tuple[int, int] = (40, 24)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("vision") / "images"
    folder.mkdir()
    files = {
        "photo.jpg": photo(),
        "small.png": png((20, 40, 220)),
        "shared-a.png": png((20, 200, 40)),
        "shared-b.png": png((30, 180, 60), (36, 36)),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
        (folder / name).with_suffix(".txt").write_text(PROMPTS[name])
    return folder


@pytest.fixture
def ingested(workspace: Workspace, image_folder: Path) -> Workspace:
    report = run_stage(IngestStage(image_folder, source="vision"), workspace, QUIET)
    assert report.written == len(PROMPTS)
    return workspace


def stored_images(workspace: Workspace) -> dict[str, bytes]:
    """keyword prompt's file name -> the stored image's bytes."""
    data = workspace.dataset().to_pylist()
    images = workspace.images.read([row["image_sha256"] for row in data])
    return {row["source_item_id"]: images[row["image_sha256"]] for row in data}


def decoded(url: str) -> bytes:
    header, _, payload = url.partition(",")
    assert header in ("data:image/jpeg;base64", "data:image/png;base64"), header
    return base64.b64decode(payload, validate=True)


def describing_responder(body: dict[str, Any]) -> str:
    """A sentence naming the first keyword and the size of the image the server received."""
    text = message_text(body["messages"][-1]["content"])
    subject = text.removeprefix("Keyword prompt: ").split(",")[0].strip()
    urls = image_urls(body)
    if not urls:
        return f"{subject} without any picture"
    with Image.open(io.BytesIO(decoded(urls[0]))) as image:
        width, height = image.size
    return f"{subject} in a picture {width} pixels wide and {height} high"


@pytest.fixture
def server():
    with ChatCompletionsServer(model=MODEL, responder=describing_responder) as running:
        yield running


def vision_rewriter(server: ChatCompletionsServer, **settings: Any):
    values = {"with_image": True, "model": MODEL, "retries": 1, **settings}
    return make_rewriter(f"openai:{server.base_url}", RewriteSettings(**values))


def bodies(server: ChatCompletionsServer) -> list[dict[str, Any]]:
    return [b for (b, _), p in zip(server.requests, server.paths, strict=True) if p == COMPLETIONS]


def judged(server: ChatCompletionsServer) -> list[dict[str, Any]]:
    """The judge's questions (not the image checks before a run, which ask for one token)."""
    return [body for body in bodies(server) if body.get("logprobs") and body["max_tokens"] > 1]


def narratives(workspace: Workspace) -> dict[str, str]:
    by_id = {r["sample_id"]: r["source_item_id"] for r in workspace.dataset().to_pylist()}
    return {
        by_id[r["sample_id"]]: r["narrative_prompt"]
        for r in workspace.read_table("narratives").to_pylist()
    }


# ----------------------------------------------------------------------------- images
def test_upload_image_keeps_small_files_and_downscales_the_rest_once() -> None:
    small = png((1, 2, 3))
    assert upload_image(small, 768).data == small  # byte for byte: no generation loss
    big = upload_image(photo(), 768)
    assert (big.width, big.height) == (768, 480) and big.mime == "image/jpeg"
    with Image.open(io.BytesIO(big.data)) as image:
        assert image.size == (768, 480)
    webp = io.BytesIO()
    Image.new("RGB", (20, 10), (5, 6, 7)).save(webp, format="WEBP")
    assert upload_image(webp.getvalue(), 768).mime == "image/jpeg"  # llama.cpp reads no WebP
    with pytest.raises(ItemFailed, match="image-unreadable"):
        upload_image(b"not an image", 768)


def test_transparent_and_turned_images_are_shown_as_a_viewer_shows_them() -> None:
    rgba = Image.new("RGBA", (10, 6), (0, 0, 0, 0))
    buffer = io.BytesIO()
    rgba.save(buffer, format="PNG")
    assert model_image(buffer.getvalue(), 768).getpixel((0, 0)) == (255, 255, 255)
    turned = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to show
    Image.new("RGB", (30, 10), (200, 0, 0)).save(turned, format="JPEG", exif=exif)
    assert model_image(turned.getvalue(), 768).size == (10, 30)
    sent = upload_image(turned.getvalue(), 768)
    assert (sent.width, sent.height) == (10, 30) and sent.data != turned.getvalue()


def test_vision_template_places_the_image_where_the_template_says() -> None:
    part = {"type": "image"}
    default = DEFAULT_VISION_TEMPLATE.user_parts("a cat", part)
    assert default == [part, {"type": "text", "text": "Keyword prompt: a cat"}]
    after = PromptTemplate("", "Keyword prompt: {keyword_prompt}\n{image}\nDescribe it.")
    assert after.user_parts("a cat", part) == [
        {"type": "text", "text": "Keyword prompt: a cat"},
        part,
        {"type": "text", "text": "Describe it."},
    ]
    no_placeholder = PromptTemplate("", "Keywords: {keyword_prompt}")
    assert no_placeholder.user_parts("a cat", part)[0] == part  # first when not placed


def test_options_that_cannot_see_the_image_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="--with-image is for openai"):
        make_rewriter("hf:/nowhere", RewriteSettings(with_image=True))
    template = tmp_path / "t.toml"
    template.write_text('user = "{image} {keyword_prompt}"\n')
    with pytest.raises(InputError, match="does not see images"):
        make_rewriter("rules", RewriteSettings(template=str(template)))
    with pytest.raises(InputError, match="needs --with-image"):
        make_judge("openai:http://127.0.0.1:9/v1", ScreenSettings(judge_model="m"))
    with pytest.raises(InputError, match="needs --judge-model"):
        make_judge("openai:http://127.0.0.1:9/v1", ScreenSettings(with_image=True))


# ----------------------------------------------------------------------------- rewriting
def test_each_request_carries_the_text_and_the_stored_image_downscaled(server, ingested) -> None:
    chat = vision_rewriter(server)
    report = run_stage(RewriteStage(chat), ingested, QUIET)
    assert report.written == len(PROMPTS) and report.failed == 0
    stored = stored_images(ingested)
    sent = bodies(server)[1:]  # the first is the 8x8 image check
    assert len(sent) == len(PROMPTS)  # a shared keyword prompt with two images: two requests
    by_prompt: dict[str, list[dict]] = {}
    for body in sent:
        system, user = body["messages"]
        assert system == {"role": "system", "content": DEFAULT_VISION_TEMPLATE.system}
        image_part, text_part = user["content"]
        assert text_part["type"] == "text" and image_part["type"] == "image_url"
        keywords = text_part["text"].removeprefix("Keyword prompt: ")
        by_prompt.setdefault(keywords, []).append(body)
    for name, prompt in PROMPTS.items():
        urls = sorted(decoded(image_urls(b)[0]) for b in by_prompt[prompt])
        if name == "photo.jpg":
            (sent_bytes,) = urls
            with (
                Image.open(io.BytesIO(sent_bytes)) as image,
                Image.open(io.BytesIO(stored[name])) as original,
            ):
                assert image.size == (768, 480)
                expected = np.asarray(original.convert("RGB").resize((768, 480)), np.float32)
                difference = np.abs(np.asarray(image.convert("RGB"), np.float32) - expected)
                assert difference.mean() < 3.0  # the same picture, only smaller
        elif name == "small.png":
            assert urls == [stored[name]]  # sent as stored
    assert sorted(
        urls_ for b in by_prompt[SHARED_PROMPT] for urls_ in map(decoded, image_urls(b))
    ) == sorted([stored["shared-a.png"], stored["shared-b.png"]])
    written = narratives(ingested)
    assert written["photo.jpg"] == "2 red foxes in a picture 768 pixels wide and 480 high"
    assert written["small.png"] == "a blue square in a picture 40 pixels wide and 24 high"


def test_cache_key_covers_image_and_image_size_and_a_rerun_asks_nothing(server, ingested) -> None:
    chat = vision_rewriter(server)
    run_stage(RewriteStage(chat), ingested, QUIET)
    asked = len(bodies(server))
    again = RewriteStage(vision_rewriter(server))
    run_stage(again, ingested, RunOptions(show_progress=False, force=True))
    assert len(bodies(server)) == asked and again.cache_hits == len(PROMPTS)
    smaller = RewriteStage(vision_rewriter(server, image_max_side=256))
    run_stage(smaller, ingested, QUIET)
    assert smaller.cache_hits == 0  # what the model saw changed: every answer is redone
    assert (
        narratives(ingested)["photo.jpg"] == "2 red foxes in a picture 256 pixels wide and 160 high"
    )
    text_only = make_rewriter(f"openai:{server.base_url}", RewriteSettings(model=MODEL))
    assert text_only.cache_key("a", "sha") != chat.cache_key("a", "sha")
    assert chat.cache_key("a", "sha-1") != chat.cache_key("a", "sha-2")


def test_an_unreadable_or_missing_image_fails_alone(server) -> None:
    chat = vision_rewriter(server)
    answers = chat.generate(
        [
            RewriteRequest("a red fox, 8k", b"\x89PNG broken"),
            RewriteRequest("a blue square, flat", png((0, 0, 255))),
            RewriteRequest("a green circle", None),
        ],
        0,
    )
    assert isinstance(answers[0], ItemFailed) and answers[0].reason == "image-unreadable"
    assert answers[1] == "a blue square in a picture 40 pixels wide and 24 high"
    assert isinstance(answers[2], ItemFailed) and answers[2].reason == "no-image"
    assert len(bodies(server)) == 1  # only the readable one was sent


@pytest.mark.parametrize(
    ("refusal", "message"),
    [
        ("vllm", "http-400: vision-model is not a multimodal model"),
        ("llama.cpp", "http-500: image input is not supported by this server"),
    ],
)
def test_a_server_without_image_support_stops_the_run_with_exit_7(
    ingested, refusal, message
) -> None:
    with ChatCompletionsServer(
        model=MODEL, accepts_images=False, image_refusal=refusal
    ) as text_only:
        chat = vision_rewriter(text_only)
        with pytest.raises(RewriterUnavailable, match=f"did not take an image .*{message}"):
            chat.check_reachable()
        result = run_surd(
            "build",
            "rewrite",
            "-w",
            str(ingested.root),
            "--rewriter",
            f"openai:{text_only.base_url}",
            "--model",
            MODEL,
            "--with-image",
            "--no-progress",
        )
        assert result.returncode == 7, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "did not take an image" in lines[0], result.stderr
        assert "--with-image" in lines[0] and "Traceback" not in result.stderr
        # the check is the only completion request: no sample was sent, retried or failed
        checks = len(bodies(text_only))  # the rewriter's own check above, then the CLI's
        assert checks == (2 if refusal == "vllm" else 4)  # a 500 is asked once more (load?)
        assert all(body["max_tokens"] == 1 for body in bodies(text_only))
    assert ingested.read_table("narratives").num_rows == 0
    assert ingested.read_failures("rewrite").num_rows == 0


# ----------------------------------------------------------------------------- judging
def judge_logprobs(body: dict[str, Any]) -> list[tuple[str, float]]:
    """P(yes) = 0.8 for a narrative that mentions foxes, 0.2 otherwise (plus noise tokens)."""
    fox = "fox" in message_text(body["messages"][-1]["content"])
    yes = 0.8 if fox else 0.2
    return [("Yes", math.log(yes * 0.9)), ("No", math.log((1 - yes) * 0.9)), (" maybe", -5.0)]


def with_narratives(workspace: Workspace) -> Workspace:
    run_stage(RewriteStage(RulesRewriter()), workspace, QUIET)
    return workspace


def judge_stage(server: ChatCompletionsServer, minimum: float | None = None) -> ScreenStage:
    settings = ScreenSettings(judge_model=MODEL, with_image=True, retries=1)
    judge = make_judge(f"openai:{server.base_url}", settings)
    assert isinstance(judge, OpenAIJudge)
    return ScreenStage(judge=judge, thresholds=Thresholds(min_judge_score=minimum))


def test_judge_reads_logprobs_rejects_below_the_threshold_and_caches(ingested) -> None:
    workspace = with_narratives(ingested)
    with ChatCompletionsServer(
        model=MODEL, responder=lambda body: "Yes", first_token_logprobs=judge_logprobs
    ) as server:
        run_stage(judge_stage(server, minimum=0.5), workspace, QUIET)
        probe, *questions = bodies(server)
        assert probe["logprobs"] is True and probe["max_tokens"] == 1  # checked before any work
        assert questions == judged(server) and len(questions) == len(PROMPTS)
        judged_bodies = questions
        for body in judged_bodies:
            assert body["logprobs"] is True and body["top_logprobs"] == 10
            assert body["max_tokens"] == 4 and body["temperature"] == 0.0
            image_part, text_part = body["messages"][-1]["content"]
            assert image_part["type"] == "image_url" and text_part["text"].startswith("Sentence: ")
        rows = {r["sample_id"]: r for r in workspace.read_table("screening").to_pylist()}
        items = {r["sample_id"]: r["source_item_id"] for r in workspace.dataset().to_pylist()}
        scores = {items[s]: round(r["judge_score"], 4) for s, r in rows.items()}
        assert scores == {
            "photo.jpg": 0.8,
            "small.png": 0.2,
            "shared-a.png": 0.2,
            "shared-b.png": 0.2,
        }
        rejected = {items[s] for s, r in rows.items() if r["review_status"] == "rejected"}
        assert rejected == {"small.png", "shared-a.png", "shared-b.png"}
        assert all(r["review_tags"] == [LOW_JUDGE_TAG] for r in rows.values() if r["review_status"])
        asked = len(bodies(server))
        run_stage(judge_stage(server, minimum=0.1), workspace, QUIET)  # moves, never re-asks
        assert len(bodies(server)) == asked  # not even the image check: nothing to ask
        assert all(
            r["review_status"] is None for r in workspace.read_table("screening").to_pylist()
        )


def test_judge_without_logprobs_parses_the_answer_and_retries_what_it_cannot(ingested) -> None:
    workspace = with_narratives(ingested)
    answers = {"fox": "Yes.", "square": "No, it is not.", "circle": "I cannot tell"}

    def responder(body: dict[str, Any]) -> str:
        text = message_text(body["messages"][-1]["content"])
        return next((a for k, a in answers.items() if k in text), "Yes")

    with ChatCompletionsServer(model=MODEL, responder=responder) as server:
        stage = judge_stage(server)
        run_stage(stage, workspace, QUIET)
        rows = workspace.read_table("screening").to_pylist()
        items = {r["sample_id"]: r["source_item_id"] for r in workspace.dataset().to_pylist()}
        scores = {items[r["sample_id"]]: r["judge_score"] for r in rows}
        assert scores == {"photo.jpg": 1.0, "small.png": 0.0}  # the others are failure rows
        failures = workspace.read_failures("screen").to_pylist()
        assert sorted((items[f["sample_id"]], f["reason"], f["detail"]) for f in failures) == [
            ("shared-a.png", "judge-unparsed", "i cannot tell"),
            ("shared-b.png", "judge-unparsed", "i cannot tell"),
        ]
        asked = len(judged(server))
        answers["circle"] = "yes"
        run_stage(judge_stage(server), workspace, QUIET)  # only the unparsed two are asked again
        assert len(judged(server)) == asked + 2
        rows = workspace.read_table("screening").to_pylist()
        assert sorted(r["judge_score"] for r in rows) == [0.0, 1.0, 1.0, 1.0]


def test_logprob_score_sums_spellings_and_falls_back_to_the_text() -> None:
    def document(content: str, top: list[tuple[str, float]] | None) -> dict:
        logprobs = None
        if top is not None:
            alternatives = [{"token": t, "logprob": lp} for t, lp in top]
            logprobs = {"content": [{**alternatives[0], "top_logprobs": alternatives}]}
        return {"choices": [{"message": {"content": content}, "logprobs": logprobs}]}

    spelled = [("yes", math.log(0.3)), (" Yes", math.log(0.3)), ("no", math.log(0.2))]
    assert logprob_score(document("yes", spelled)) == pytest.approx(0.75)
    marked = [("\u2581Yes", math.log(0.6)), ("\u0120no", math.log(0.2)), ("No.", math.log(0.2))]
    assert logprob_score(document("Yes", marked)) == pytest.approx(0.6)
    opening = {
        "choices": [
            {
                "message": {"content": "\nNo"},
                "logprobs": {
                    "content": [
                        {"token": "\n", "logprob": -0.01, "top_logprobs": []},
                        {
                            "token": "No",
                            "logprob": math.log(0.9),
                            "top_logprobs": [
                                {"token": "No", "logprob": math.log(0.9)},
                                {"token": "Yes", "logprob": math.log(0.1)},
                            ],
                        },
                    ]
                },
            }
        ]
    }
    assert logprob_score(opening) == pytest.approx(0.1)  # the newline token is skipped
    assert logprob_score(document("No", None)) == 0.0
    assert logprob_score(document("Yes!", [("Sure", -0.1)])) == 1.0  # no yes/no among them
    with pytest.raises(ItemFailed, match="judge-unparsed"):
        logprob_score(document("perhaps", None))
    assert JUDGE_TEMPLATE.places_image


def screen_with_openai_judge(workspace, server):
    """``surd build screen`` with the server as the openai judge, images sent."""
    return run_surd(
        "build",
        "screen",
        "-w",
        str(workspace.root),
        "--judge",
        f"openai:{server.base_url}",
        "--judge-model",
        MODEL,
        "--with-image",
        "--no-progress",
    )


def test_cli_judge_against_a_text_only_server_is_one_line_exit_7(ingested) -> None:
    workspace = with_narratives(ingested)
    with ChatCompletionsServer(model=MODEL, accepts_images=False) as text_only:
        result = screen_with_openai_judge(workspace, text_only)
    assert result.returncode == 7, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "did not take an image" in result.stderr
    assert workspace.read_table("screening").num_rows == 0


def test_review_priority_and_annotation_tasks_read_the_judge_score() -> None:
    import pyarrow as pa

    from annotation.tasks import sample_to_task
    from surd_builder.review import review_priority

    data = pa.table(
        {
            "sample_id": ["a", "b", "c"],
            "clip_score": pa.array([None, None, None], pa.float32()),
            "text_similarity": pa.array([None, None, None], pa.float32()),
            "judge_score": pa.array([0.9, 0.1, None], pa.float32()),
        }
    )
    assert review_priority(data).to_pylist() == [1, 0, 2]  # least believed first, unjudged last
    task = sample_to_task({"sample_id": "b", "judge_score": 0.1234567}, "http://x/b.png")
    assert task["data"]["judge_score"] == 0.1235


# ----------------------------------------------------------------------------- hostile images
def encoded(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def hostile_images() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, what must come out): formats, modes and shapes a gallery serves."""
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8))
    palette = Image.new("P", (40, 30), 0)
    palette.putpalette([0, 0, 0, 250, 0, 0] + [0] * 762)
    animation = io.BytesIO()
    red, blue = Image.new("RGB", (30, 20), (255, 0, 0)), Image.new("RGB", (30, 20), (0, 0, 255))
    red.save(animation, format="GIF", save_all=True, append_images=[blue])
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90 degrees counter-clockwise to show
    whole = encoded(noise, "JPEG")
    return {
        "cmyk-jpeg": (encoded(noise.convert("CMYK"), "JPEG"), "rgb"),
        "16-bit-png": (
            encoded(Image.fromarray(np.full((10, 12), 32896, np.uint16)), "PNG"),
            "grey-128",
        ),
        "transparent-la-png": (encoded(Image.new("LA", (20, 10), (0, 0)), "PNG"), "white"),
        "transparent-palette": (encoded(palette, "PNG", transparency=0), "white"),
        "animated-gif": (animation.getvalue(), "red"),
        "one-pixel": (encoded(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), "as-stored"),
        "4000x3-strip": (encoded(Image.new("RGB", (4000, 3), (100, 9, 9)), "JPEG"), "768x1"),
        "exif-rotated": (encoded(noise, "JPEG", exif=exif), "300x400"),
        "tiff": (encoded(noise, "TIFF"), "rgb"),
        "webp-with-alpha": (encoded(noise.convert("RGBA"), "WEBP"), "rgb"),
        "truncated-jpeg": (whole[: len(whole) // 2], "unreadable"),
        "empty": (b"", "unreadable"),
        "svg": (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "unreadable"),
    }


@pytest.mark.parametrize("name", sorted(hostile_images()))
def test_hostile_images_reach_the_model_as_a_viewer_shows_them(name: str) -> None:
    data, expected = hostile_images()[name]
    if expected == "unreadable":
        for prepare in (upload_image, model_image):
            with pytest.raises(ItemFailed, match="image-unreadable"):
                prepare(data, 768)
        return
    sent = upload_image(data, 768)
    with Image.open(io.BytesIO(sent.data)) as image:
        image.load()
        assert image.format in ("JPEG", "PNG") and image.size == (sent.width, sent.height)
        assert max(image.size) <= 768
        shown = model_image(data, 768)
        assert shown.mode == "RGB" and shown.size == image.size  # both routes see one picture
        if expected == "as-stored":
            assert sent.data == data
            return
        assert sent.data != data and image.mode in ("RGB", "L")
        pixels = np.asarray(image.convert("RGB"), np.float32)
        if expected == "grey-128":  # 16 bits scaled, not clipped to white
            assert abs(pixels.mean() - 128) < 1.5
        elif expected == "white":
            assert pixels.min() >= 250
        elif expected == "red":  # an animation's first frame
            assert pixels[..., 0].mean() > 200 and pixels[..., 2].mean() < 50
        elif "x" in expected:
            assert image.size == tuple(int(v) for v in expected.split("x"))


# ----------------------------------------------------------------------------- client costs
class ConnectionCountingServer(ChatCompletionsServer):
    """Counts the TCP connections clients open."""

    connections = 0

    def process_request(self, request, client_address) -> None:
        self.connections += 1
        super().process_request(request, client_address)


def test_batches_reuse_their_connections_and_encode_images_on_the_sending_threads(
    monkeypatch,
) -> None:
    import threading

    import pipelines.rewriters.openai_chat as openai_chat

    encoded_on: set[str] = set()
    real_upload = openai_chat.upload_image

    def recording_upload(data: bytes, max_side: int):
        encoded_on.add(threading.current_thread().name)
        return real_upload(data, max_side)

    monkeypatch.setattr(openai_chat, "upload_image", recording_upload)
    with ConnectionCountingServer(model=MODEL, responder=describing_responder) as server:
        chat = vision_rewriter(server, concurrency=4)
        chat.check_reachable()
        before = server.connections
        for batch in range(3):
            requests = [RewriteRequest(f"{n} red foxes, 8k", png((n, batch, 9))) for n in range(8)]
            answers = chat.generate(requests, 0)
            assert all(isinstance(a, str) for a in answers)
        # 24 requests over 3 batches: each of the 4 sending threads keeps its connection
        assert server.connections - before <= 4
    assert encoded_on and all(name.startswith("surd-chat") for name in encoded_on)


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_no_smaller_than_the_target() -> None:
    from surd_builder.viewing import open_image

    image, stored = open_image(photo((3000, 2000)), 768)
    assert stored == (3000, 2000) and image.size == (1500, 1000)  # 1/2: 1/4 would be < 768
    image, _ = open_image(photo((3000, 2000)), 256)
    assert image.size == (375, 250)  # 1/8
    assert upload_image(photo((3000, 2000)), 768).width == 768
    exact = photo((1536, 1024))  # decoded at exactly 768 wide: still a resized upload
    sent = upload_image(exact, 768)
    assert sent.data != exact and (sent.width, sent.height) == (768, 512)


def test_damaged_images_only_ever_fail_as_unreadable() -> None:
    """Seeded fuzzing: bytes of real encodings with a few bytes changed. Whatever the decoder
    raises (a TIFF's broken second frame raises TypeError, a broken PNG SyntaxError) must be
    the sample's failure, never an exception that ends the run."""
    import random
    import warnings

    rng = np.random.default_rng(1)
    base = Image.fromarray(rng.integers(0, 255, (45, 60, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    seeds = [
        encoded(base, "JPEG", exif=exif),
        encoded(base, "PNG"),
        encoded(base, "GIF"),
        encoded(base, "TIFF", exif=exif),
        encoded(base, "WEBP"),
        encoded(Image.fromarray(np.full((20, 25), 40000, np.uint16)), "PNG"),
    ]
    chooser = random.Random(0)
    outcomes = {"ok": 0, "failed": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about corrupt EXIF blocks
        for _ in range(1000):  # the old decoding let a TypeError out at the 629th
            data = bytearray(chooser.choice(seeds))
            for _ in range(chooser.randint(1, 8)):
                data[chooser.randrange(len(data))] = chooser.randrange(256)
            for prepare in (upload_image, model_image):
                try:
                    prepare(bytes(data), 32)
                    outcomes["ok"] += 1
                except ItemFailed as failure:
                    assert failure.reason == "image-unreadable"
                    outcomes["failed"] += 1
    assert outcomes["ok"] > 0 and outcomes["failed"] > 0  # both kinds were exercised


def test_a_judge_server_refusing_logprobs_stops_before_any_work(ingested) -> None:
    workspace = with_narratives(ingested)
    with ChatCompletionsServer(model=MODEL, accepts_logprobs=False) as server:
        result = screen_with_openai_judge(workspace, server)
        assert result.returncode == 7, result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert "did not take an image and logprobs, top_logprobs" in line
        assert "logprobs is not supported" in line
        assert [body["max_tokens"] for body in bodies(server)] == [1]  # the check alone
        probe_image = decoded(image_urls(bodies(server)[0])[0])
        with Image.open(io.BytesIO(probe_image)) as image:
            assert image.size == (64, 64)  # above every processor's minimum side
    assert workspace.read_table("screening").num_rows == 0


def test_judge_options_without_a_judge_are_one_line_errors(ingested) -> None:
    for option in (["--min-judge-score", "0.5"], ["--judge-model", MODEL]):
        result = run_surd(
            "build", "screen", "-w", str(ingested.root), "--text-model", "minilm", *option
        )
        assert result.returncode == 2, result.stderr
        assert "only with --judge" in result.stderr and "Traceback" not in result.stderr
