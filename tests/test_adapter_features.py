"""LLM features: the output of one block (before any final norm), pooled, cached on disk."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adapter.cache import ArrayCache, cache_key, fill_cache
from adapter.features import LLMFeatureExtractor, decoder_blocks
from surd_builder.errors import InputError
from tests.tiny_models import save_tiny_causal_lm

TEXTS = ["a red fox in the snow", "two cats", "an old wizard reading a book in a library"]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return save_tiny_causal_lm(tmp_path_factory.mktemp("lm") / "lm")


def test_block_output_is_taken_before_the_final_norm_and_pooled(lm) -> None:
    first = LLMFeatureExtractor(str(lm), layer=1, pooling="mean", device="cpu")
    last = LLMFeatureExtractor(str(lm), layer=2, pooling="mean", device="cpu")
    features = first(TEXTS)
    assert features.shape == (3, 64) and features.dtype == np.float32
    tokenizer, model, _ = first.load()
    assert len(decoder_blocks(model)) == 2
    for index, text in enumerate(TEXTS):
        encoded = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            states = model(**encoded, output_hidden_states=True).hidden_states
        # hidden_states[1] is block 1's output: the same vector, mean-pooled
        assert np.allclose(features[index], states[1][0].mean(0).numpy(), atol=1e-5)
        # the last entry has Llama's final norm applied; block 2's own output does not
        assert not np.allclose(last([text])[0], states[-1][0].mean(0).numpy(), atol=1e-3)
    # batched (left-padded) equals one at a time, for both poolings
    assert np.allclose(features, np.stack([first([t])[0] for t in TEXTS]), atol=1e-5)
    by_last = LLMFeatureExtractor(str(lm), layer=1, pooling="last", device="cpu")
    assert np.allclose(by_last(TEXTS), np.stack([by_last([t])[0] for t in TEXTS]), atol=1e-5)
    encoded = tokenizer(TEXTS[2], return_tensors="pt")
    with torch.no_grad():
        states = model(**encoded, output_hidden_states=True).hidden_states
    assert np.allclose(by_last([TEXTS[2]])[0], states[1][0, -1].numpy(), atol=1e-5)


def test_layer_out_of_range_and_bad_pooling_are_one_line_errors(lm) -> None:
    with pytest.raises(InputError, match=r"blocks 1\.\.2"):
        LLMFeatureExtractor(str(lm), layer=3, device="cpu").load()
    with pytest.raises(InputError, match="pooling"):
        LLMFeatureExtractor(str(lm), layer=1, pooling="max")


def test_cache_hits_on_a_second_run_and_keys_include_the_layer(lm, tmp_path) -> None:
    cache = ArrayCache(tmp_path / "cache")

    def cached(extractor: LLMFeatureExtractor, texts: list[str]) -> np.ndarray:
        keys = [cache_key(extractor.cache_identity(), text) for text in texts]
        fill_cache(cache, keys, texts, extractor, 2, "llm", show_progress=False)
        return cache.load(keys)

    first = LLMFeatureExtractor(str(lm), layer=2, device="cpu")
    texts = [*TEXTS, TEXTS[0]]  # a repeated text is computed once
    vectors = cached(first, texts)
    assert first.computed == 3 and vectors.shape == (4, 64) and vectors.dtype == np.float32
    assert np.array_equal(vectors[0], vectors[3])
    assert np.allclose(vectors[:3], first(TEXTS), atol=1e-6)
    again = LLMFeatureExtractor(str(lm), layer=2, device="cpu")
    assert np.array_equal(cached(again, texts), vectors)
    assert again.computed == 0 and again._loaded is None  # nothing loaded, nothing computed
    other_layer = LLMFeatureExtractor(str(lm), layer=1, device="cpu")
    cached(other_layer, TEXTS)
    assert other_layer.computed == 3
    assert len(list((tmp_path / "cache").glob("part-*.keys.npy"))) == 4  # 2 batches + 2
