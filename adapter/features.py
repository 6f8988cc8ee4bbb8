"""LLM features of narrative prompts, computed once and cached.

The SUR-adapter distils from one transformer block of an LLM: the released vectors are LLaMA-13B
block 40 of 40, *before* the final norm, mean-pooled over the prompt's tokens. transformers'
``output_hidden_states`` gives the last block's output *after* the final norm for Llama-style
models, so the block's output is taken with a forward hook on the block itself: block ``N`` of
any depth means the same thing for every architecture.

Poolings (:data:`POOLINGS`):

- ``mean``: the mean over every attended token, the tokenizer's own BOS/EOS included: what the
  released SUR-adapter did.
- ``mean-no-special``: the mean over the text's own tokens only, without the special tokens around
  or in it (BOS, EOS, CLS, SEP, padding; see :func:`content_token_mask`). In Llama-family models
  the BOS position carries "massive activations" in the middle blocks (Sun et al. 2024), which
  can dominate a plain mean; this pooling leaves it out.
- ``last``: the last attended token (wherever padding sits).

The vectors are kept in an :class:`adapter.cache.ArrayCache` under :meth:`cache_identity` (model,
layer, pooling, dtype), like the Stable Diffusion inputs in :mod:`adapter.frozen_inputs`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from adapter.cache import model_fingerprint
from surd_builder.errors import InputError
from surd_builder.models import (
    batched,
    dtype_name,
    load_pretrained,
    resolve_device,
    resolve_dtype,
)

POOLINGS = ("mean", "mean-no-special", "last")


def content_token_mask(tokenizer: Any, encoded: Any) -> Any:
    """(batch, tokens) long tensor: 1 where a position holds a token of the text itself.

    A position is *not* content when it is padding (attention mask 0), a token the tokenizer
    added around the text (its ``special_tokens_mask``: BOS, EOS, CLS, SEP), or a special token
    written in the text (an id in ``tokenizer.all_special_ids``, e.g. a literal ``<s>``). The
    unknown token is content: it stands for a piece of the text. ``encoded`` is the tokenizer's
    output with ``return_special_tokens_mask=True`` (without it, only ids are looked at).
    """
    import torch

    ids, attended = encoded["input_ids"], encoded["attention_mask"]
    special_ids = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
    special = torch.isin(ids, torch.tensor(sorted(special_ids), dtype=ids.dtype, device=ids.device))
    added = encoded.get("special_tokens_mask")
    if added is not None:
        special = special | added.bool()
    return attended * ~special


def pool_hidden(
    hidden: Any, attention_mask: Any, pooling: str, content_mask: Any | None = None
) -> Any:
    """Pool (batch, tokens, hidden) float states to (batch, hidden) by ``pooling``.

    ``mean-no-special`` needs ``content_mask`` (:func:`content_token_mask`); a text with no
    content token at all (only special tokens, or empty) falls back to the mean over all its
    attended tokens, i.e. to ``mean``, so every text still gets a vector.
    """
    import torch

    if pooling == "last":  # the last real token, wherever padding sits
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = (attention_mask * positions).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0]), last]
    if pooling == "mean-no-special":
        if content_mask is None:
            raise ValueError("mean-no-special pooling needs the content mask")
        empty = content_mask.sum(1, keepdim=True) == 0
        attention_mask = torch.where(empty, attention_mask, content_mask)
    elif pooling != "mean":
        raise InputError(f"pooling must be one of: {', '.join(POOLINGS)}")
    mask = attention_mask.unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def decoder_blocks(model: Any) -> Any:
    """The list of transformer blocks of a causal LM (Llama/Qwen/Mistral, GPT-2 style)."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        module = model
        for name in path.split("."):
            module = getattr(module, name, None)
            if module is None:
                break
        if module is not None:
            return module
    raise InputError(f"cannot find the transformer blocks of a {type(model).__name__}")


class LLMFeatureExtractor:
    """Pooled output of block ``layer`` (1-based, 1..number of blocks) for each text."""

    cache_kind = "llm"  # the cache folder's name (adapter.train_caches)

    def __init__(
        self,
        model: str,
        layer: int,
        pooling: str = "mean",
        batch_size: int = 32,
        device: str = "auto",
        dtype: str = "auto",
    ):
        if pooling not in POOLINGS:
            raise InputError(f"pooling must be one of: {', '.join(POOLINGS)}")
        self.model, self.layer, self.pooling, self.batch_size = model, layer, pooling, batch_size
        self.device_option, self.dtype_option = device, dtype
        self._loaded: tuple[Any, Any, str] | None = None
        self.computed = 0  # texts run through the model by this object (tests, reports)

    def cache_identity(self) -> str:
        dtype = resolve_dtype(self.dtype_option, resolve_device(self.device_option))
        model = model_fingerprint(self.model)
        return f"llm\x1f{model}\x1f{self.layer}\x1f{self.pooling}\x1f{dtype}"

    def resolved_dtype_name(self) -> str:
        """The dtype the cache identity names (``auto`` resolved on this machine)."""
        return dtype_name(resolve_dtype(self.dtype_option, resolve_device(self.device_option)))

    def remote_factory(self) -> Callable[[], LLMFeatureExtractor]:
        """A picklable recipe for this extractor in another process (a Ray worker): the dtype
        its cache identity names (resolved here), on that worker's GPU if it has one."""
        return functools.partial(
            LLMFeatureExtractor, self.model, self.layer, self.pooling, self.batch_size,
            device="auto", dtype=self.resolved_dtype_name(),
        )  # fmt: skip

    def hidden_size(self) -> int:
        _tokenizer, model, _device = self.load()
        return int(model.config.hidden_size)

    def check_layer(self) -> None:
        """Fail on a layer out of range from the model's config alone, before hours of other
        work; :meth:`load` checks again against the loaded blocks. A model that cannot be
        reached is not an error here: its vectors may all be cached."""
        from transformers import AutoConfig

        try:
            config = load_pretrained(AutoConfig.from_pretrained, self.model, "LLM config")
        except InputError:
            return  # unreachable now; fine while its vectors are cached, else load() says so
        config = getattr(config, "text_config", None) or config
        blocks = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
        if blocks is not None and not 1 <= self.layer <= blocks:
            raise InputError(
                f"--llm-layer {self.layer} is out of range: {self.model} has blocks 1..{blocks}"
            )

    def load(self) -> tuple[Any, Any, str]:
        if self._loaded is None:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            device = resolve_device(self.device_option)
            dtype = resolve_dtype(self.dtype_option, device)
            tokenizer = load_pretrained(AutoTokenizer.from_pretrained, self.model, "tokenizer")
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            model = load_pretrained(
                AutoModelForCausalLM.from_pretrained, self.model, "language model", dtype=dtype
            )
            blocks = decoder_blocks(model)
            if not 1 <= self.layer <= len(blocks):
                raise InputError(
                    f"--llm-layer {self.layer} is out of range: {self.model} has blocks "
                    f"1..{len(blocks)}"
                )
            self._loaded = (tokenizer, model.to(device).eval(), device)
        return self._loaded

    def __call__(self, texts: list[str]) -> np.ndarray:
        """(len(texts), hidden) float32."""
        import torch

        tokenizer, model, device = self.load()
        block = decoder_blocks(model)[self.layer - 1]
        captured: dict[str, Any] = {}

        def keep_output(_module, _inputs, output) -> None:
            captured["hidden"] = output[0] if isinstance(output, tuple) else output

        rows = []
        handle = block.register_forward_hook(keep_output)
        try:
            for chunk in batched(texts, self.batch_size):
                content = None
                if self.pooling == "mean-no-special":
                    encoded = tokenizer(
                        chunk, return_tensors="pt", padding=True, return_special_tokens_mask=True
                    ).to(device)
                    content = content_token_mask(tokenizer, encoded)
                    del encoded["special_tokens_mask"]  # not a model input
                else:
                    encoded = tokenizer(chunk, return_tensors="pt", padding=True).to(device)
                with torch.inference_mode():
                    model(**encoded)
                hidden = captured["hidden"].float()
                pooled = pool_hidden(hidden, encoded["attention_mask"], self.pooling, content)
                rows.append(pooled.cpu().numpy())
                self.computed += len(chunk)
        finally:
            handle.remove()
        return np.concatenate(rows).astype(np.float32) if rows else np.zeros((0, 0), np.float32)
