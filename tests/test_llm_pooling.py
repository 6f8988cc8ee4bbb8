"""``mean-no-special`` pooling: the mean over the text's own tokens, without BOS/EOS/padding.

The tiny Llama's tokenizer adds no BOS; real Llama tokenizers do (a post-processor puts ``<s>``
first), so most tests give the tiny tokenizer that post-processor, as a Llama checkpoint has it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adapter.features import POOLINGS, LLMFeatureExtractor, pool_hidden
from surd_builder.errors import InputError
from tests.tiny_models import save_tiny_causal_lm

# different lengths, so a batch is left-padded; one has a literal "</s>" in the text
TEXTS = [
    "a red fox in the snow",
    "two cats",
    "an old wizard reading a book in a library at night",
    "a dog </s> on a beach",
]


@pytest.fixture(scope="module")
def plain_lm(tmp_path_factory):
    return save_tiny_causal_lm(tmp_path_factory.mktemp("lm") / "lm")


@pytest.fixture(scope="module")
def bos_lm(tmp_path_factory):
    """The tiny Llama whose tokenizer puts ``<s>`` before every text, like Llama's own."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    directory = save_tiny_causal_lm(tmp_path_factory.mktemp("bos-lm") / "lm")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    bos = (tokenizer.bos_token, tokenizer.bos_token_id)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[bos]
    )
    tokenizer.save_pretrained(directory)
    return directory


def extractor(lm, pooling: str, layer: int = 1, batch_size: int = 32) -> LLMFeatureExtractor:
    return LLMFeatureExtractor(str(lm), layer, pooling, batch_size=batch_size, device="cpu")


def block_states(features: LLMFeatureExtractor, text: str) -> tuple[list[int], torch.Tensor]:
    """The ids of ``text`` alone (no padding) and block ``features.layer``'s output for them."""
    tokenizer, model, _ = features.load()
    encoded = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        states = model(**encoded, output_hidden_states=True).hidden_states
    return encoded["input_ids"][0].tolist(), states[features.layer][0]


def test_the_pooling_names() -> None:
    assert POOLINGS == ("mean", "mean-no-special", "last")


def test_mean_no_special_is_the_mean_over_the_texts_own_tokens(bos_lm) -> None:
    features = extractor(bos_lm, "mean-no-special")
    vectors = features(TEXTS)  # one left-padded batch of different lengths
    assert vectors.shape == (len(TEXTS), 64) and vectors.dtype == np.float32
    tokenizer, _, _ = features.load()
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    for index, text in enumerate(TEXTS):
        ids, hidden = block_states(features, text)
        assert ids[0] == tokenizer.bos_token_id  # the tokenizer added a BOS
        keep = [position for position, token in enumerate(ids) if token not in special]
        assert len(keep) == len(text.split()) - text.split().count("</s>")
        assert np.allclose(vectors[index], hidden[keep].mean(0).numpy(), atol=1e-5)
    # the batch equals one text at a time, and batches of 3 (padding differs) too
    alone = np.stack([features([text])[0] for text in TEXTS])
    assert np.allclose(vectors, alone, atol=1e-5)
    assert np.allclose(extractor(bos_lm, "mean-no-special", batch_size=3)(TEXTS), alone, atol=1e-5)
    deeper = extractor(bos_lm, "mean-no-special", layer=2)
    alone = np.stack([deeper([text])[0] for text in TEXTS])
    assert np.allclose(deeper(TEXTS), alone, atol=1e-5)


def test_it_differs_from_mean_which_keeps_the_bos(bos_lm) -> None:
    by_mean = extractor(bos_lm, "mean")(TEXTS)
    no_special = extractor(bos_lm, "mean-no-special")(TEXTS)
    for index, text in enumerate(TEXTS):
        assert not np.allclose(by_mean[index], no_special[index], atol=1e-4)
        _ids, hidden = block_states(extractor(bos_lm, "mean"), text)
        assert np.allclose(by_mean[index], hidden.mean(0).numpy(), atol=1e-5)  # BOS included


def test_without_special_tokens_it_equals_mean_and_unknown_words_count(plain_lm) -> None:
    # the plain tiny tokenizer adds nothing: every token is the text's, <unk> included
    texts = ["a red fox in the snow", "two cats", "a qwertyuiop cat"]
    tokenizer, _, _ = extractor(plain_lm, "mean").load()
    assert tokenizer.unk_token_id in tokenizer(texts[2])["input_ids"]
    no_special = extractor(plain_lm, "mean-no-special")(texts)
    assert np.allclose(no_special, extractor(plain_lm, "mean")(texts), atol=1e-6)


def test_a_text_of_only_special_tokens_falls_back_to_mean(bos_lm) -> None:
    texts = ["", "</s> <s>", "two cats"]  # "" is just the added BOS
    no_special = extractor(bos_lm, "mean-no-special")(texts)
    by_mean = extractor(bos_lm, "mean")(texts)
    assert np.isfinite(no_special).all() and np.abs(no_special[:2]).sum(1).min() > 0
    assert np.allclose(no_special[:2], by_mean[:2], atol=1e-6)
    assert not np.allclose(no_special[2], by_mean[2], atol=1e-4)


def test_cache_identities_and_remote_recipes_keep_the_pooling(bos_lm) -> None:
    identities = {extractor(bos_lm, pooling).cache_identity() for pooling in POOLINGS}
    assert len(identities) == len(POOLINGS)
    assert extractor(bos_lm, "mean-no-special").remote_factory()().pooling == "mean-no-special"
    with pytest.raises(InputError, match="mean-no-special"):
        LLMFeatureExtractor(str(bos_lm), layer=1, pooling="mean_no_special")
    with pytest.raises(ValueError, match="content mask"):
        pool_hidden(torch.zeros(1, 2, 3), torch.ones(1, 2, dtype=torch.long), "mean-no-special")
