"""The offline rewriter, the output cleaning every backend shares, and prompt templates."""

from __future__ import annotations

import random

import pytest

from pipelines.rewrite import RewriteStage
from pipelines.rewriters import make_rewriter, parse_spec
from pipelines.rewriters.cleaning import (
    ValidationBounds,
    clean_output,
    looks_like_keyword_list,
    validation_problem,
)
from pipelines.rewriters.rules import content_pieces, rewrite_by_rules, strip_prompt_syntax
from pipelines.rewriters.template import DEFAULT_TEMPLATE, PromptTemplate, load_template
from pipelines.runner import RunOptions, run_stage
from surd_builder.demo import random_scene
from surd_builder.errors import ConfigError, InputError
from surd_builder.schema import records_to_table, table_spec

# Realistic gallery prompts and the sentence the rules must build from them.
RULES_CASES = [
    (
        "3 red circles, blue background, flat vector art, minimalism, highly detailed, 8k",
        "three red circles on a blue background",
    ),
    (
        "portrait of an old fisherman, white beard, yellow raincoat, stormy sea, dramatic "
        "lighting, by greg rutkowski, highly detailed, 8k",
        "portrait of an old fisherman with white beard wearing a yellow raincoat by a stormy sea",
    ),
    (
        "(two cats:1.2), sleeping on a windowsill, sunny morning, cozy, masterpiece, "
        "best quality, <lora:catstyle:0.7>",
        "two cats sleeping on a windowsill, cozy, on a sunny morning",
    ),
    (
        "masterpiece, best quality, 1girl, solo, long hair, blue eyes, red dress, standing in a "
        "field of flowers, sunset, ((detailed face))",
        "a girl with long hair and blue eyes wearing a red dress standing in a field of flowers "
        "at sunset",
    ),
    (
        "a castle on a hill by greg rutkowski and alphonse mucha, fantasy, volumetric light, "
        "artstation, 8k",
        "a castle on a hill",
    ),
    (
        "cyberpunk city street at night, neon lights, rain, reflections, blade runner style, "
        "octane render, unreal engine 5, 35mm, f/1.8",
        "cyberpunk city street at night, neon lights, rain and reflections",
    ),
    (
        "a dog standing by the river, golden hour, shot on canon eos r5, 50mm",
        "a dog standing by the river at golden hour",
    ),
    (
        "an astronaut riding a horse on the moon --ar 16:9 --v 5",
        "an astronaut riding a horse on the moon",
    ),
    (
        "[cat:dog:0.5] sitting on a sofa, living room, [red|blue] pillow",
        "dog sitting on a sofa, red pillow, in a living room",
    ),
    (
        "photo of a room lit by candles, cozy, warm light",
        "a room lit by candles, cozy",
    ),
    (
        "tanjiro \\(demon slayer\\), holding a sword, forest",
        "tanjiro (demon slayer) holding a sword in a forest",
    ),
    ("a photo of 2 dogs playing in the snow, 4k, dslr", "two dogs playing in the snow"),
    # Pony/Danbooru meta tags, framing tags and bare artist names are boilerplate too
    (
        "score_9, score_8_up, score_7_up, 1boy, male focus, black hair, armor, battlefield",
        "a boy with black hair wearing an armor in a battlefield",
    ),
    (
        "2girls, holding hands, beach, sunset, detailed background",
        "two girls holding hands on a beach at sunset",
    ),
    ("cowboy shot, 1girl, standing, skirt, from below", "a girl standing wearing a skirt"),
    ("1girl, pink hair, cafe, :d, open mouth, blush", "a girl with pink hair in a cafe"),
    ("portrait of a knight, greg rutkowski, wlop, artgerm, alphonse mucha", "portrait of a knight"),
    ("(embedding:EasyNegative), a dog, park", "a dog in a park"),
    ("a stormy sea, matte painting by ivan aivazovsky, lightning", "a stormy sea, lightning"),
    (
        "a lone wolf, snowy mountains, rembrandt lighting, 50mm lens, national geographic photo",
        "a lone wolf in the snowy mountains",
    ),
    (
        "portrait of a woman, red hair, green eyes, freckles, smiling, forest background, "
        "by artgerm and wlop",
        "portrait of a woman with red hair, green eyes and freckles, smiling, on a forest "
        "background",
    ),
]


@pytest.mark.parametrize(("prompt", "expected"), RULES_CASES)
def test_rules_build_the_expected_sentence(prompt: str, expected: str) -> None:
    assert rewrite_by_rules(prompt) == expected
    # every expected sentence is also a valid narrative for the shared validation
    assert validation_problem(expected, prompt, ValidationBounds()) is None


def test_rules_keep_the_demo_semantics_exactly() -> None:
    """The demo knows what each image shows: count, colour, shape and background survive."""
    rng = random.Random(7)
    for _ in range(300):
        scene = random_scene(rng, max_count=6)
        assert rewrite_by_rules(scene.complex_prompt(rng)) == scene.narrative_prompt


def test_prompt_syntax_is_removed_but_content_kept() -> None:
    text = strip_prompt_syntax(
        "((red fox:1.3)), [snow], {forest}, <lora:x:0.5>, river::2 BREAK sky"
    )
    assert "red fox" in text and "snow" in text and "forest" in text and "sky" in text
    assert not any(mark in text for mark in "()[]{}<>:")
    assert content_pieces("8k, masterpiece, trending on artstation, by wlop") == []
    assert rewrite_by_rules("8k, masterpiece, trending on artstation") == ""


def test_rules_rewriter_fails_an_all_boilerplate_prompt_without_retrying(workspace) -> None:
    rows = [
        {
            "sample_id": "a",
            "source": "t",
            "source_item_id": "a",
            "complex_prompt": "a red fox, snow, 8k",
        },
        {
            "sample_id": "b",
            "source": "t",
            "source_item_id": "b",
            "complex_prompt": "8k, masterpiece",
        },
    ]
    workspace.write_table_part("samples", records_to_table(rows, table_spec("samples").schema))
    stage = RewriteStage(make_rewriter("rules"), max_attempts=3)
    assert stage.max_attempts == 1  # deterministic: a retry would give the same answer
    report = run_stage(stage, workspace, RunOptions(show_progress=False))
    assert (report.written, report.failed) == (1, 1)
    assert report.failures_by_reason == {"no-content": 1}
    narratives = workspace.read_table("narratives").to_pylist()
    assert [(r["sample_id"], r["narrative_prompt"]) for r in narratives] == [
        ("a", "a red fox in the snow")
    ]


@pytest.mark.parametrize(
    ("raw", "cleaned"),
    [
        ('"A red fox in the snow."', "A red fox in the snow."),
        ("Sure! Here is the narrative prompt:\n\n“a red fox in the snow”", "a red fox in the snow"),
        (
            "Narrative prompt: a red fox in the snow\nThis keeps the subject.",
            "a red fox in the snow",
        ),
        ("Here is the sentence: a red fox in the snow", "a red fox in the snow"),
        ("```\na red fox   in the snow\n```", "a red fox in the snow"),
        ("  \n\n", ""),
        (
            "**Narrative:** three red circles on a blue background",
            "three red circles on a blue background",
        ),
        ("Sure! Here's the rewritten prompt:\n\n> Three red circles", "Three red circles"),
        ("<think>\nthe user wants...\n</think>\nThree red circles.", "Three red circles."),
        ("<think> never finished", ""),
        ("Here is a red barn in a snowy field.", "Here is a red barn in a snowy field."),
        ("Short answer: three red circles", "three red circles"),
        ('1. "a cat on a mat"', "a cat on a mat"),
    ],
)
def test_clean_output(raw: str, cleaned: str) -> None:
    assert clean_output(raw) == cleaned


def test_validation_reasons() -> None:
    bounds = ValidationBounds(min_words=3, max_words=8)
    keywords = "red fox, snowy forest, 8k, masterpiece, artstation"
    assert validation_problem("", keywords, bounds) == "empty"
    assert validation_problem("a fox", keywords, bounds) == "too-short"
    assert validation_problem(" ".join(["word"] * 9), keywords, bounds) == "too-long"
    assert validation_problem("a (red fox:1.2) in snow", keywords, bounds) == "prompt-syntax"
    assert validation_problem("a fox <lora:x:1> in snow", keywords, bounds) == "prompt-syntax"
    assert validation_problem("red fox, snowy forest, 8k", keywords, bounds) == "keyword-list"
    assert validation_problem("a red fox in a snowy forest", keywords, bounds) is None
    assert looks_like_keyword_list("cat, dog, sun, moon, tree", "anything")
    assert not looks_like_keyword_list("a cat, a dog and the sun over a hill", "cat, dog")
    with pytest.raises(ValueError):
        ValidationBounds(min_words=5, max_words=4)


def test_template_messages_plain_text_and_digest(tmp_path) -> None:
    messages = DEFAULT_TEMPLATE.messages("red fox, {weird} braces, 8k")
    assert messages[0]["role"] == "system"
    assert [m["role"] for m in messages[1:]] == ["user", "assistant"] * 3 + ["user"]
    assert messages[-1]["content"] == "Keyword prompt: red fox, {weird} braces, 8k"
    plain = DEFAULT_TEMPLATE.plain_text("red fox")
    assert plain.endswith("Keyword prompt: red fox\nNarrative prompt:")
    assert "three red circles on a blue background" in plain

    path = tmp_path / "template.toml"
    path.write_text(
        'system = "Describe."\nuser = "Tags: {keyword_prompt}"\n'
        '[[examples]]\nkeyword_prompt = "cat, 8k"\nnarrative_prompt = "a cat"\n'
    )
    custom = load_template(path)
    assert custom.messages("dog")[-1]["content"] == "Tags: dog"
    assert custom.digest() != DEFAULT_TEMPLATE.digest()
    assert load_template(path).digest() == custom.digest()

    for text, message in [
        ('user = "no placeholder"', "must contain"),
        ('user = "{keyword_prompt} {nope}"', "unknown placeholder"),
        ('user = "{keyword_prompt}"\ncolour = 1', "unknown key"),
        ("user = ", "not valid TOML"),
    ]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_template(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_template(tmp_path / "missing.toml")
    assert PromptTemplate("s", "{caption} / {keyword_prompt}").uses_caption
    for user in ("nothing", "{caption} only"):  # the keyword prompt must reach the model
        with pytest.raises(ConfigError, match="must contain"):
            PromptTemplate("s", user)
    path.write_text('user = "{keyword_prompt}"\n[examples]\nkeyword_prompt = "a"\n')
    with pytest.raises(ConfigError, match=r"\[\[examples\]\]"):
        load_template(path)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("bogus", "unknown rewriter"),
        ("hf", "needs a target"),
        ("hf:", "needs a target"),
        ("rules:x", "takes no model"),
        ("openai:ftp://x", "http"),
    ],
)
def test_bad_rewriter_specs_are_one_line_errors(spec: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        make_rewriter(spec)


def test_parse_spec_and_origins() -> None:
    assert parse_spec("hf:Qwen/Qwen2.5-0.5B-Instruct") == ("hf", "Qwen/Qwen2.5-0.5B-Instruct")
    assert parse_spec("openai:http://127.0.0.1:8000/v1") == ("openai", "http://127.0.0.1:8000/v1")
    assert make_rewriter("rules").origin.startswith("rules")
    first = make_rewriter("hf:org/model-a")
    assert first.origin == "hf:org/model-a"
    assert first.cache_key("red fox", None) == make_rewriter("hf:org/model-a").cache_key(
        "red fox", None
    )
    assert first.cache_key("red fox", None) != make_rewriter("hf:org/model-b").cache_key(
        "red fox", None
    )
    assert first.cache_key("red fox", None) != first.cache_key("red fox, 8k", None)


def rules_rows(workspace, prompts: list[str]) -> None:
    rows = [
        {"sample_id": f"s{n}", "source": "t", "source_item_id": str(n), "complex_prompt": p}
        for n, p in enumerate(prompts)
    ]
    workspace.write_table_part("samples", records_to_table(rows, table_spec("samples").schema))


def test_tightened_bounds_redo_what_no_longer_passes(workspace) -> None:
    rules_rows(
        workspace, ["a red fox, snowy forest, 8k", "two cats sleeping on a sofa, artstation"]
    )
    first = run_stage(
        RewriteStage(make_rewriter("rules")), workspace, RunOptions(show_progress=False)
    )
    assert first.written == 2
    strict = RewriteStage(make_rewriter("rules"), ValidationBounds(min_words=1, max_words=3))
    report = run_stage(strict, workspace, RunOptions(show_progress=False))
    # both narratives are longer than three words: redone, failed, and retried by later runs
    assert report.already_done == 0 and report.processed == 2
    assert report.failures_by_reason == {"invalid-too-long": 2}
    again = run_stage(
        RewriteStage(make_rewriter("rules")), workspace, RunOptions(show_progress=False)
    )
    assert (again.already_done, again.processed) == (2, 0)


def test_human_decisions_are_never_rewritten(workspace) -> None:
    from datetime import UTC, datetime

    rules_rows(workspace, ["a red fox, snow", "two cats, sofa", "a castle, hill"])
    run_stage(RewriteStage(make_rewriter("rules")), workspace, RunOptions(show_progress=False))
    now = datetime.now(UTC)
    reviews = [
        # accepted as it was: the pull may leave the narrative to the rewriter's row
        {"sample_id": "s0", "review_status": "accepted", "reviewer": "bob", "reviewed_at": now},
        {
            "sample_id": "s1",
            "narrative_prompt": "two cats asleep on a red sofa",
            "narrative_origin": "human",
            "review_status": "corrected",
            "reviewer": "ann",
            "reviewed_at": now,
        },
    ]
    workspace.write_table_part("reviews", records_to_table(reviews, table_spec("reviews").schema))
    data = {row["sample_id"]: row for row in workspace.dataset().to_pylist()}
    assert data["s1"]["rewrite_key"] is None  # the human's narrative does not keep the rules' key
    assert data["s0"]["rewrite_key"] is not None
    # a changed rewriter would redo everything, except what a person decided
    template_stage = RewriteStage(make_rewriter("rules"))
    items = template_stage.plan(workspace)
    assert items["sample_id"].to_pylist() == ["s2"]
