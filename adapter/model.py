"""The SUR-adapter (Zhong et al., ACM MM 2023) as a diffusers-style model.

It sits on the frozen CLIP text-encoder output ``x`` (batch, 77, d) of the narrative prompt:

1. a Transformer encoder (``num_layers`` x [self-attention over the 77 tokens + feed-forward]);
2. an attention block: query = the encoder's output, key and value = ``x``, each sub-block with a
   pre-norm residual, then a 2-layer MLP with a residual;
3. a linear layer initialised to zero, weight AND bias, mixed back in:
   ``y = w * out(h) + (1 - w) * x`` with ``w = adapter_weight`` (0.1 in the released run).

A fresh adapter therefore returns exactly ``(1 - w) * x``. It also owns the projection of the
LLM's pooled hidden state to ``d`` used by the distillation loss: seeded, saved with the adapter,
trainable or frozen (``train_llm_projection``).

Choices that differ from the released code, each covered by a test:

- ``batch_first=True`` everywhere: attention runs over a sample's 77 tokens, never across the
  samples of a batch (the released encoder mixed batch-mates, and at inference with
  classifier-free guidance the conditional and unconditional prompts);
- the output layer's bias is zeroed too (the released one kept a random bias, so a fresh adapter
  was noisy);
- no unused modules (the released code registered an unused encoder layer and value projection).

``save_pretrained`` / ``from_pretrained`` write ``config.json`` and
``diffusion_pytorch_model.safetensors`` like any diffusers model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


@dataclass
class AdapterOutput:
    prompt_embeds: torch.Tensor  # y: what the UNet is conditioned on
    encoded: torch.Tensor  # the Transformer encoder's output (distilled towards the LLM)
    llm_projected: torch.Tensor | None = None  # the LLM vectors in the text width, when given


class SURAdapter(ModelMixin, ConfigMixin):
    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        embed_dim: int = 768,
        num_layers: int = 2,
        num_heads: int = 8,
        feedforward_dim: int = 2048,
        mlp_dim: int = 2048,
        dropout: float = 0.0,
        adapter_weight: float = 0.1,
        llm_dim: int = 5120,
        train_llm_projection: bool = False,
        projection_seed: int = 0,
    ):
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            embed_dim,
            num_heads,
            dim_feedforward=feedforward_dim,
            dropout=dropout,
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.query_norm = nn.LayerNorm(embed_dim)
        self.key_norm = nn.LayerNorm(embed_dim)
        self.cross_attention = nn.MultiheadAttention(
            embed_dim, num_heads, dropout=dropout, batch_first=True
        )
        self.mlp_norm = nn.LayerNorm(embed_dim)
        self.mlp = nn.Sequential(
            nn.Linear(embed_dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, embed_dim)
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

    def forward(
        self,
        text_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        llm_features: torch.Tensor | None = None,
    ) -> AdapterOutput:
        """``text_embeds``: (batch, tokens, embed_dim) from the frozen text encoder.
        ``attention_mask`` (batch, tokens), 1 = real token, masks padding keys if given.
        ``llm_features`` (batch, llm_dim), pooled LLM states, are projected in the same call
        (training), so a distributed wrapper sees every trained parameter used in forward."""
        padding = None if attention_mask is None else attention_mask == 0
        encoded = self.encoder(text_embeds, src_key_padding_mask=padding)
        query, keys = self.query_norm(encoded), self.key_norm(text_embeds)
        attended, _ = self.cross_attention(
            query, keys, text_embeds, key_padding_mask=padding, need_weights=False
        )
        hidden = encoded + attended
        hidden = hidden + self.mlp(self.mlp_norm(hidden))
        weight = self.config.adapter_weight
        prompt_embeds = weight * self.out(hidden) + (1.0 - weight) * text_embeds
        projected = None if llm_features is None else self.project_llm(llm_features)
        return AdapterOutput(prompt_embeds, encoded, projected)

    def project_llm(self, llm_features: torch.Tensor) -> torch.Tensor:
        """(batch, llm_dim) pooled LLM hidden states -> (batch, embed_dim)."""
        return self.llm_projection(llm_features.to(self.llm_projection.weight.dtype))
