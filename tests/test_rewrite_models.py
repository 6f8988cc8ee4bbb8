"""The in-process model backends (``hf`` causal LM, ``caption``) with tiny random models.

The answers are gibberish; what is checked is the machinery around them: left-padded batched
generation equal to one-at-a-time generation, the chat template, the cache (a re-run loads no
model), validation with retries, and image input for captioners.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.rewrite import RewriteStage
from pipelines.rewriters import make_rewriter
from pipelines.rewriters.base import RewriteRequest
from pipelines.rewriters.caption import CaptionOptions, CaptionRewriter
from pipelines.rewriters.cleaning import ValidationBounds
from pipelines.rewriters.hf import GenerationOptions, HFCausalLMRewriter
from pipelines.rewriters.openai_chat import ChatOptions, OpenAIChatRewriter
from pipelines.rewriters.template import DEFAULT_MERGE_TEMPLATE, PromptTemplate
from pipelines.runner import RunOptions, run_stage
from surd_builder.errors import InputError
from surd_builder.ids import sha256_hex
from surd_builder.schema import IMAGES_SCHEMA, records_to_table, table_spec
from tests.chat_server import ChatCompletionsServer
from tests.conftest import image_bytes
from tests.tiny_models import save_tiny_blip, save_tiny_causal_lm

# Short enough for the tiny model's 256 positions (the default template's examples are not).
SHORT = PromptTemplate("you write prompts", "{keyword_prompt}")
PROMPTS = [
    "red fox, snowy forest, 8k",
    "two cats sleeping on a sofa, cozy, masterpiece",
    "a castle",
    "blue dragon flying over a city at night, artstation, highly detailed",
    "an old wizard reading a book in a library",
]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "lm": save_tiny_causal_lm(root / "lm"),
        "chat": save_tiny_causal_lm(root / "chat", chat_template=True),
        "blip": save_tiny_blip(root / "blip"),
    }


def add_samples(workspace, prompts: list[str], images: list[bytes] | None = None) -> list[str]:
    rows = []
    for number, prompt in enumerate(prompts):
        row = {
            "sample_id": f"s{number:02d}",
            "source": "test",
            "source_item_id": str(number),
            "complex_prompt": prompt,
        }
        if images is not None:
            row["image_sha256"] = sha256_hex(images[number])
        rows.append(row)
    if images is not None:
        stored = {sha256_hex(data): data for data in images}
        workspace.write_images(
            records_to_table(
                [{"image_sha256": s, "image_bytes": d} for s, d in stored.items()], IMAGES_SCHEMA
            )
        )
    workspace.write_table_part("samples", records_to_table(rows, table_spec("samples").schema))
    return [row["sample_id"] for row in rows]


def hf(path: Path, batch_size: int = 16, template: PromptTemplate = SHORT) -> HFCausalLMRewriter:
    options = GenerationOptions(max_new_tokens=10, batch_size=batch_size, device="cpu")
    return HFCausalLMRewriter(str(path), template, options)


def test_batched_left_padded_generation_equals_one_at_a_time(models) -> None:
    requests = [RewriteRequest(p) for p in PROMPTS]
    batched = hf(models["lm"], batch_size=4)
    single = hf(models["lm"], batch_size=1)
    answers = batched.generate(requests, attempt=0)
    assert answers == single.generate(requests, attempt=0)
    assert all(isinstance(a, str) and a for a in answers)
    assert (batched.generate_calls, single.generate_calls) == (2, 5)
    tokenizer = batched.load()[0]
    assert tokenizer.padding_side == "left"
    # answers come back in input order although generation sorts by length
    assert batched.generate([requests[3], requests[0]], attempt=0) == [answers[3], answers[0]]


def test_chat_template_when_the_model_has_one(models) -> None:
    chat, plain = hf(models["chat"]), hf(models["lm"])
    rendered = chat.render(chat.load()[0], "red fox")
    assert rendered.startswith("<s> system : you write prompts </s>")
    assert rendered.endswith("<s> user : red fox </s> <s> assistant :")
    assert (
        plain.render(plain.load()[0], "red fox")
        == "you write prompts\n\nred fox\nNarrative prompt:"
    )
    assert all(isinstance(a, str) for a in chat.generate([RewriteRequest("red fox")], 0))


def test_stage_caches_by_key_and_reruns_load_no_model(workspace, models) -> None:
    # six samples, four distinct keyword prompts: four generations
    add_samples(workspace, [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[2], PROMPTS[3], PROMPTS[1]])
    rewriter = hf(models["lm"], batch_size=16)
    first = run_stage(RewriteStage(rewriter), workspace, RunOptions(show_progress=False))
    assert (first.written, first.failed) == (6, 0)
    assert rewriter.generate_calls == 1
    narratives = {r["sample_id"]: r for r in workspace.read_table("narratives").to_pylist()}
    assert narratives["s00"]["narrative_prompt"] == narratives["s02"]["narrative_prompt"]
    assert {r["narrative_origin"] for r in narratives.values()} == {f"hf:{models['lm']}"}
    assert all(r["rewrite_key"] for r in narratives.values())

    again = hf(models["lm"])
    report = run_stage(RewriteStage(again), workspace, RunOptions(show_progress=False))
    assert (report.already_done, report.processed) == (6, 0)
    forced_stage = RewriteStage(again)
    forced = run_stage(forced_stage, workspace, RunOptions(show_progress=False, force=True))
    assert forced.written == 6 and forced_stage.cache_hits == 4
    assert again._loaded is None  # every answer came from the cache: no model was loaded

    changed = hf(models["lm"], template=PromptTemplate("describe the image", "{keyword_prompt}"))
    redo = run_stage(RewriteStage(changed), workspace, RunOptions(show_progress=False))
    assert redo.processed == 6 and changed.generate_calls == 1


def test_invalid_answers_are_retried_by_sampling_then_failed(workspace, models) -> None:
    add_samples(workspace, PROMPTS[:3])
    rewriter = hf(models["lm"])
    stage = RewriteStage(rewriter, ValidationBounds(min_words=50, max_words=60), max_attempts=2)
    report = run_stage(stage, workspace, RunOptions(show_progress=False))
    assert (report.written, report.failed) == (0, 3)
    assert report.failures_by_reason == {"invalid-too-short": 3}
    assert rewriter.generate_calls == 2  # greedy, then one sampled retry of all three
    failures = workspace.read_failures("rewrite").to_pylist()
    assert all(f["detail"] for f in failures)  # the rejected raw answer, for debugging
    assert workspace.read_table("narratives").num_rows == 0
    # failed items are not done: a run with bounds they meet writes them
    retry = run_stage(RewriteStage(hf(models["lm"])), workspace, RunOptions(show_progress=False))
    assert retry.written == 3


def test_missing_model_folder_is_a_one_line_error(workspace, tmp_path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        make_rewriter(f"hf:{tmp_path / 'nope'}")  # before any work or heavy import
    with pytest.raises(InputError, match="does not exist"):
        make_rewriter(f"caption:{tmp_path / 'nope'}")


def demo_images() -> list[bytes]:
    return [image_bytes((200, 30, 30), (40, 24)), image_bytes((10, 100, 200), (16, 50), "JPEG")]


def test_captioner_batches_images_and_fails_unreadable_ones(models) -> None:
    images = demo_images()
    batched = CaptionRewriter(str(models["blip"]), CaptionOptions(max_new_tokens=6, device="cpu"))
    single = CaptionRewriter(
        str(models["blip"]), CaptionOptions(max_new_tokens=6, batch_size=1, device="cpu")
    )
    captions = batched.caption([images[0], b"not an image", images[1]], attempt=0)
    assert isinstance(captions[0], str) and isinstance(captions[2], str)
    assert captions[1].reason == "image-unreadable"
    assert single.caption(images, attempt=0) == [captions[0], captions[2]]


def test_caption_stage_reads_images_through_the_runner_and_keys_by_image(workspace, models) -> None:
    images = demo_images()
    # same keyword prompt, different images: the captioner's key includes the image
    add_samples(workspace, ["red fox", "red fox"], images)
    captioner = CaptionRewriter(str(models["blip"]), CaptionOptions(max_new_tokens=6, device="cpu"))
    stage = RewriteStage(captioner, ValidationBounds(min_words=1, max_words=60))
    assert stage.needs_images
    report = run_stage(stage, workspace, RunOptions(show_progress=False))
    assert (report.written, report.failed) == (2, 0)
    rows = workspace.read_table("narratives").to_pylist()
    assert len({r["rewrite_key"] for r in rows}) == 2
    assert {r["narrative_origin"] for r in rows} == {f"caption:{models['blip']}"}
    assert [r["narrative_prompt"] for r in rows] == captioner.caption(images, attempt=0)


def test_caption_merge_pass_sends_caption_and_keywords_to_a_language_model(
    workspace, models
) -> None:
    images = demo_images()
    add_samples(workspace, ["red fox, 8k", "blue bird, artstation"], images)
    with ChatCompletionsServer(
        responder=lambda body: "a small animal in a plain picture"
    ) as server:
        merge = OpenAIChatRewriter(
            server.base_url, "merge-model", DEFAULT_MERGE_TEMPLATE, ChatOptions(retries=0)
        )
        captioner = CaptionRewriter(
            str(models["blip"]), CaptionOptions(max_new_tokens=6, device="cpu"), merge
        )
        report = run_stage(RewriteStage(captioner), workspace, RunOptions(show_progress=False))
        sent = [
            body["messages"][-1]["content"]
            for (body, _), path in zip(server.requests, server.paths, strict=True)
            if path.endswith("/chat/completions")  # not the server check before the captioner
        ]
        assert server.paths[0] == "/v1/models"  # checked before the captioning model loads
    assert report.written == 2
    expected = captioner.caption(images, attempt=0)
    assert sorted(sent) == sorted(
        f"Caption: {caption}\nKeyword prompt: {prompt}"
        for caption, prompt in zip(expected, ["red fox, 8k", "blue bird, artstation"], strict=True)
    )
    rows = workspace.read_table("narratives").to_pylist()
    assert {r["narrative_prompt"] for r in rows} == {"a small animal in a plain picture"}
    assert {r["narrative_origin"] for r in rows} == {f"caption:{models['blip']}+openai:merge-model"}


def test_make_rewriter_builds_each_backend_from_settings(models, tmp_path) -> None:
    from surd_builder.config import RewriteSettings

    settings = RewriteSettings(model="m", merge_with="openai:http://127.0.0.1:9/v1")
    caption = make_rewriter(f"caption:{models['blip']}", settings)
    assert isinstance(caption, CaptionRewriter) and caption.merge.template.uses_caption
    with pytest.raises(InputError, match="merge-with"):
        make_rewriter(f"caption:{models['blip']}", RewriteSettings(merge_with="rules"))
    template = tmp_path / "t.toml"
    template.write_text('user = "Tags: {keyword_prompt}"')
    relative = make_rewriter("hf:x", RewriteSettings(template="t.toml"), base_dir=tmp_path)
    assert relative.template.user == "Tags: {keyword_prompt}"


def test_devices_this_machine_lacks_are_one_line_errors() -> None:
    import torch

    from surd_builder.models import resolve_device

    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(InputError, match="unknown device"):
        resolve_device("gpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(InputError, match="CUDA GPU"):
        resolve_device("cuda:64")
    if not torch.backends.mps.is_available():
        with pytest.raises(InputError, match="MPS"):
            resolve_device("mps")


def test_models_of_the_wrong_kind_are_refused(models, tmp_path) -> None:
    from pipelines.scorers import ClipScorer, TextEmbedder
    from tests.tiny_models import save_tiny_clip

    clip = save_tiny_clip(tmp_path / "clip")
    with pytest.raises(InputError, match="not CLIP"):
        ClipScorer(str(models["lm"]), device="cpu").load()
    with pytest.raises(InputError, match="text encoder"):
        TextEmbedder(str(clip), device="cpu").load()


def test_conditional_caption_prompt_is_not_part_of_the_narrative(models) -> None:
    captioner = CaptionRewriter(str(models["blip"]), CaptionOptions(prompt="a picture of"))
    assert captioner._without_prompt("A picture of a red fox") == "a red fox"
    assert captioner._without_prompt("a red fox") == "a red fox"
    answers = captioner.caption(demo_images(), attempt=0)
    assert all(not a.lower().startswith("a picture of") for a in answers)


def test_a_sample_whose_image_is_missing_fails_alone(workspace, models) -> None:
    images = demo_images()
    add_samples(workspace, ["red fox", "blue bird"], images)
    rows = [
        {
            "sample_id": "lost",
            "source": "test",
            "source_item_id": "lost",
            "complex_prompt": "green frog",
            "image_sha256": "0" * 64,  # not in the image store
        }
    ]
    workspace.write_table_part("samples", records_to_table(rows, table_spec("samples").schema))
    captioner = CaptionRewriter(str(models["blip"]), CaptionOptions(max_new_tokens=6, device="cpu"))
    report = run_stage(RewriteStage(captioner), workspace, RunOptions(show_progress=False))
    assert (report.written, report.failed) == (2, 1)
    assert report.failures_by_reason == {"no-image": 1}
