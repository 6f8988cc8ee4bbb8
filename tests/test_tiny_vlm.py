"""The tiny vision-language chat model (Idefics3) loads back, chats and batches like a real one."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from PIL import Image

from surd_builder.demo_models import PROMPT_WORDS, VLM_WORDS, demo_words, save_tiny_vlm

KEYWORDS = ["a red fox", "two cute cats sitting in a snowy forest , 8k , artstation", "castle"]
SYSTEM = (
    "You check image descriptions for a text-to-image dataset. Answer with one word: yes or no."
)


def images() -> list[Image.Image]:
    """Three sizes: 40x56 and 64x64 give 2x2 tiles + a global view, 90x30 gives 1x2 + global."""
    sizes_colors = [
        ((40, 56), (200, 30, 30)),
        ((64, 64), (10, 100, 200)),
        ((90, 30), (20, 200, 20)),
    ]
    return [Image.new("RGB", size, color) for size, color in sizes_colors]


def conversation(keywords: str) -> list[dict]:
    return [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": f"Keyword prompt: {keywords}"}],
        },
    ]


@pytest.fixture(scope="module")
def vlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_vlm(tmp_path_factory.mktemp("vlm") / "vlm")


def load(directory: Path):
    processor = transformers.AutoProcessor.from_pretrained(directory)
    model = transformers.AutoModelForImageTextToText.from_pretrained(directory)
    return processor, model


def test_vlm_is_small_and_deterministic(vlm: Path, tmp_path: Path) -> None:
    size = sum(path.stat().st_size for path in vlm.iterdir())
    assert size < 3_000_000
    again = save_tiny_vlm(tmp_path / "again")
    assert (again / "model.safetensors").read_bytes() == (vlm / "model.safetensors").read_bytes()

    processor, model = load(vlm)
    text = processor.apply_chat_template(
        conversation(KEYWORDS[0]), tokenize=False, add_generation_prompt=True
    )
    inputs = processor(text=[text], images=[images()[0]], return_tensors="pt")
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert output.shape[1] <= inputs["input_ids"].shape[1] + 8


def test_vlm_tokenizer_chat_template_and_config(vlm: Path) -> None:
    processor, model = load(vlm)
    assert isinstance(processor, transformers.Idefics3Processor)
    # The PIL backend here; with torchvision installed, AutoProcessor picks the torchvision one.
    assert type(processor.image_processor).__name__.startswith("Idefics3ImageProcessor")
    assert isinstance(model, transformers.Idefics3ForConditionalGeneration)
    tokenizer = processor.tokenizer
    assert tokenizer.padding_side == "left"

    # "yes" and "no" are single tokens in every spelling the judge tries, and different.
    yes, no = tokenizer.convert_tokens_to_ids(["yes", "no"])
    assert tokenizer.unk_token_id not in (yes, no) and yes != no
    for word, token_id in [("yes", yes), ("no", no)]:
        for spelling in (word, " " + word, word.capitalize(), word.upper()):
            assert tokenizer.encode(spelling, add_special_tokens=False) == [token_id]
    for word in (*PROMPT_WORDS, *demo_words(), *VLM_WORDS):
        assert tokenizer.convert_tokens_to_ids(word) != tokenizer.unk_token_id, word
    ids = tokenizer(SYSTEM, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids

    # The generation config names eos and pad: generate() needs no pad_token_id argument.
    ids_of = tokenizer.convert_tokens_to_ids
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id == ids_of("<pad>")
    assert model.generation_config.eos_token_id == ids_of("<end_of_utterance>")
    assert model.config.image_token_id == ids_of("<image>")

    text = processor.apply_chat_template(
        conversation("castle"), tokenize=False, add_generation_prompt=True
    )
    assert text == (
        f"<|im_start|>System: {SYSTEM}<end_of_utterance>\n"
        "User:<image>Keyword prompt: castle<end_of_utterance>\nAssistant:"
    )
    encoded = processor(text=[text], images=[[images()[2]]], return_tensors="pt")
    tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"][0])
    # A 90x30 image: two 32x32 tiles and the global view, 4 image tokens each.
    assert tokens.count("<image>") == 12
    assert [t for t in tokens if re.fullmatch(r"<row_\d_col_\d>", t)] == [
        "<row_1_col_1>",
        "<row_1_col_2>",
    ]
    assert "<unk>" not in tokens
    assert tokens[-4:] == ["castle", "<end_of_utterance>", "assistant", ":"]
    assert encoded["pixel_values"].shape == (1, 3, 3, 32, 32)


def generate(processor, model, texts: list[str], pictures: list) -> torch.Tensor:
    """The 8 greedy new tokens of each text, its images in ``pictures``."""
    inputs = processor(text=texts, images=pictures, padding=True, return_tensors="pt")
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    return output[:, inputs["input_ids"].shape[1] :]


def test_vlm_batched_greedy_equals_one_at_a_time(vlm: Path, capfd: pytest.CaptureFixture) -> None:
    processor, model = load(vlm)
    processor.tokenizer.padding_side = "left"
    pad = processor.tokenizer.pad_token_id
    texts = [
        processor.apply_chat_template(conversation(k), tokenize=False, add_generation_prompt=True)
        for k in KEYWORDS
    ]
    batch = processor(text=texts, images=images(), padding=True, return_tensors="pt")
    # 20, 20 and 12 image tokens and texts of different lengths: two rows are padded on the left.
    assert (batch["input_ids"] == model.config.image_token_id).sum(1).tolist() == [20, 20, 12]
    assert (batch["attention_mask"][:, 0] == 0).tolist() == [True, False, True]

    capfd.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batched = generate(processor, model, texts, [[image] for image in images()])
    assert capfd.readouterr().err == ""  # nor a logged warning (a missing pad id, say)
    assert batched.shape == (3, 8)
    # A flat list of images is split over the texts by their <image> counts: the same batch.
    for _ in range(2):
        assert generate(processor, model, texts, images()).tolist() == batched.tolist()
    for row, text, image in zip(batched, texts, images(), strict=True):
        single = generate(processor, model, [text], [[image]])[0]
        # A row that stopped early is padded afterwards in the batch; otherwise identical ids.
        assert row[: len(single)].tolist() == single.tolist()
        assert (row[len(single) :] == pad).all()
    words = processor.batch_decode(batched, skip_special_tokens=True)
    vocabulary = set(PROMPT_WORDS) | set(demo_words()) | set(VLM_WORDS) | {",", ".", ":"}
    assert all(text and set(text.split()) <= vocabulary for text in words)
