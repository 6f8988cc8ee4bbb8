"""The SUR-adapter (Zhong et al., ACM MM 2023) as a diffusers-style model.

It sits on the frozen CLIP text-encoder output ``x`` (batch, 77, d) of the narrative prompt,
with the structure of the released code:

1. a Transformer encoder (``num_layers`` x [self-attention over the 77 tokens + feed-forward],
   post-norm, ReLU, dropout: PyTorch's defaults, which the released code used);
2. an attention block: query = a projection of the encoder's output, key = a projection of
   ``x``, value = ``x`` itself; the attended values plus ``x`` (residual), then a 2-layer ReLU MLP
   with a residual;
3. a linear layer initialised to zero, weight AND bias, mixed back in:
   ``y = w * out(h) + (1 - w) * x`` with ``w = adapter_weight`` (0.1 in the released run).

A fresh adapter therefore returns exactly ``(1 - w) * x``. For Stable Diffusion XL
(``family="sdxl"``) ``x`` is the 2048-wide concatenation of both text encoders' penultimate states,
and the UNet also takes a pooled embedding ``p`` (``pooled_dim`` wide, 1280). With
``pooled_head`` (the default for SDXL) a small head adapts it the same way:
``p' = w * head([p, mean over tokens of the encoder's output]) + (1 - w) * p`` (a 2-layer ReLU MLP
whose last layer starts at zero), so what the encoder distils from the LLM reaches the pooled
vector too, and the quality and prompt-alignment losses train it; without the head ``p`` is
passed through unchanged. It also owns the projection of the
LLM's pooled hidden state to ``d`` used by the distillation loss: seeded, saved with the adapter,
trainable or frozen (``train_llm_projection``; the released one was frozen, unseeded, unsaved).

Choices that differ from the released code, each covered by a test:

- ``batch_first=True``: attention runs over a sample's 77 tokens, never across the samples of a
  batch (the released encoder mixed batch-mates, and at inference with classifier-free guidance
  the conditional and unconditional prompts);
- the output layer's bias is zeroed too (the released one kept a random bias, so a fresh adapter
  was noisy);
- no unused modules (the released code registered an unused encoder layer and value projection);
- the attention block may use several heads (``attention_heads``; 1 is the released block).

``save_pretrained`` / ``from_pretrained`` write ``config.json`` and
``diffusion_pytorch_model.safetensors`` like any diffusers model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


@dataclass
class AdapterOutput:
    prompt_embeds: torch.Tensor  # y: what the UNet is conditioned on
    encoded: torch.Tensor  # the Transformer encoder's output (distilled towards the LLM)
    llm_projected: torch.Tensor | None = None  # the LLM vectors in the text width, when given
    pooled_embeds: torch.Tensor | None = None  # SDXL: the pooled embedding the UNet takes


class TokenAttention(nn.Module):
    """softmax(q(query) k(keys)^T / sqrt(head dim)) @ keys: the values are the unprojected
    text embeddings, as in the released block, so the output stays in ``x``'s space."""

    def __init__(self, embed_dim: int, heads: int = 1):
        super().__init__()
        if embed_dim % heads:
            raise ValueError(f"attention_heads {heads} does not divide embed_dim {embed_dim}")
        self.heads = heads
        self.query = nn.Linear(embed_dim, embed_dim)
        self.key = nn.Linear(embed_dim, embed_dim)

    def forward(
        self, query: torch.Tensor, keys: torch.Tensor, padding: torch.Tensor | None = None
    ) -> torch.Tensor:
        batch, tokens, width = query.shape

        def split(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.view(batch, -1, self.heads, width // self.heads).transpose(1, 2)

        mask = None if padding is None else ~padding[:, None, None, :]
        attended = F.scaled_dot_product_attention(
            split(self.query(query)), split(self.key(keys)), split(keys), attn_mask=mask
        )
        return attended.transpose(1, 2).reshape(batch, tokens, width)


class SURAdapter(ModelMixin, ConfigMixin):
    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        embed_dim: int = 768,
        num_layers: int = 2,
        num_heads: int = 8,
        feedforward_dim: int = 2048,
        mlp_dim: int = 768,
        dropout: float = 0.1,
        adapter_weight: float = 0.1,
        llm_dim: int = 5120,
        train_llm_projection: bool = False,
        projection_seed: int = 0,
        attention_heads: int = 1,
        family: str = "sd",
        pooled_dim: int = 0,
        pooled_head: bool = False,
    ):
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            embed_dim,
            num_heads,
            dim_feedforward=feedforward_dim,
            dropout=dropout,
            batch_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.attention = TokenAttention(embed_dim, attention_heads)
        self.mlp = nn.Sequential(
            nn.Linear(embed_dim, mlp_dim), nn.ReLU(), nn.Linear(mlp_dim, embed_dim)
        )
        self.out = nn.Linear(embed_dim, embed_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        # the LLM feature projection, seeded so that two fresh adapters agree
        generator = torch.Generator().manual_seed(projection_seed)
        self.llm_projection = nn.Linear(llm_dim, embed_dim)
        bound = 1.0 / llm_dim**0.5
        with torch.no_grad():
            self.llm_projection.weight.uniform_(-bound, bound, generator=generator)
            self.llm_projection.bias.uniform_(-bound, bound, generator=generator)
        self.llm_projection.requires_grad_(train_llm_projection)
        self.pooled_mlp = None
        if pooled_dim and pooled_head:
            self.pooled_mlp = nn.Sequential(
                nn.Linear(pooled_dim + embed_dim, mlp_dim),
                nn.ReLU(),
                nn.Linear(mlp_dim, pooled_dim),
            )
            nn.init.zeros_(self.pooled_mlp[2].weight)
            nn.init.zeros_(self.pooled_mlp[2].bias)

    def forward(
        self,
        text_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        llm_features: torch.Tensor | None = None,
        pooled_embeds: torch.Tensor | None = None,
    ) -> AdapterOutput:
        """``text_embeds``: (batch, tokens, embed_dim) from the frozen text encoder.
        ``attention_mask`` (batch, tokens), 1 = real token, masks padding keys if given (Stable
        Diffusion conditions on all 77 tokens, so training passes none).
        ``llm_features`` (batch, llm_dim), pooled LLM states, are projected in the same call
        (training), so a distributed wrapper sees every trained parameter used in forward.
        ``pooled_embeds`` (batch, pooled_dim), SDXL's pooled embedding, comes back adapted by the
        pooled head (or unchanged without one)."""
        padding = None if attention_mask is None else attention_mask == 0
        encoded = self.encoder(text_embeds, src_key_padding_mask=padding)
        hidden = self.attention(encoded, text_embeds, padding) + text_embeds
        hidden = hidden + self.mlp(hidden)
        weight = self.config.adapter_weight
        prompt_embeds = weight * self.out(hidden) + (1.0 - weight) * text_embeds
        projected = None if llm_features is None else self.project_llm(llm_features)
        pooled = pooled_embeds
        if pooled_embeds is not None and self.pooled_mlp is not None:
            summary = encoded.mean(dim=1) if padding is None else _mean_over(encoded, ~padding)
            head = self.pooled_mlp(torch.cat([pooled_embeds, summary], dim=-1))
            pooled = weight * head + (1.0 - weight) * pooled_embeds
        return AdapterOutput(prompt_embeds, encoded, projected, pooled)

    def project_llm(self, llm_features: torch.Tensor) -> torch.Tensor:
        """(batch, llm_dim) pooled LLM hidden states -> (batch, embed_dim)."""
        return self.llm_projection(llm_features.to(self.llm_projection.weight.dtype))


def _mean_over(states: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The mean of (batch, tokens, width) ``states`` over the tokens where ``keep``."""
    weights = keep.unsqueeze(-1).to(states.dtype)
    return (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)
