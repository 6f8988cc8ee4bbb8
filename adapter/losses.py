"""The SUR-adapter's three losses, as pure functions of tensors.

total = quality + eta_llm * distillation + eta_prompt * prompt_alignment

- quality: the frozen UNet's noise-prediction error when conditioned on the adapter's output
  (epsilon or v-prediction target; optional min-SNR-gamma weighting, Hang et al. 2023);
- distillation: KL(softmax(enc / T) || softmax(llm / T)) over the feature dimension, per token,
  with the projected LLM vector broadcast over the tokens;
- prompt alignment: KL(softmax(y / T) || softmax(c / T)) per token, ``c`` the keyword prompt's
  embedding; for SDXL the pooled embeddings are aligned the same way, as one more token.

Both KLs take the adapter's side as the first argument, as the paper writes them, and are
scaled as the released code's ``F.kl_div(..., reduction="batchmean") * T**2``: summed over the
77 tokens (and features), averaged over samples. The released etas (1e-5) assume that scale; a
per-token mean would make both terms 77 times weaker.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def kl_per_token(source: torch.Tensor, target: torch.Tensor, temperature: float = 1.0):
    """KL(softmax(source / T) || softmax(target / T)) of each token, softmax over the last
    (feature) dimension, summed over tokens, averaged over the batch, times T**2 (so gradients
    keep their size as T changes); ``target`` broadcasts (e.g. (batch, 1, d) over tokens)."""
    log_p = F.log_softmax(source.float() / temperature, dim=-1)
    log_q = F.log_softmax(target.float() / temperature, dim=-1)
    per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
    return per_token.sum(-1).mean() * temperature**2


def distillation_loss(encoded: torch.Tensor, llm_projected: torch.Tensor, temperature: float = 1.0):
    """``encoded`` (batch, tokens, d) vs ``llm_projected`` (batch, d), broadcast over tokens."""
    return kl_per_token(encoded, llm_projected.unsqueeze(1), temperature)


def prompt_alignment_loss(
    prompt_embeds: torch.Tensor,
    keyword_embeds: torch.Tensor,
    temperature: float = 1.0,
    pooled: torch.Tensor | None = None,
    keyword_pooled: torch.Tensor | None = None,
):
    """Per-token KL of the adapted narrative embedding to the keyword prompt's; with SDXL's
    pooled embeddings (batch, pooled_dim) given, their KL is added as that of one more token."""
    loss = kl_per_token(prompt_embeds, keyword_embeds, temperature)
    if pooled is not None and keyword_pooled is not None:
        loss = loss + kl_per_token(pooled.unsqueeze(1), keyword_pooled.unsqueeze(1), temperature)
    return loss


def noise_prediction_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    snr: torch.Tensor | None = None,
    min_snr_gamma: float | None = None,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """MSE of the UNet's prediction; with ``min_snr_gamma``, per-sample weights
    min(SNR, gamma) / SNR (epsilon) or min(SNR, gamma) / (SNR + 1) (v-prediction)."""
    per_sample = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    per_sample = per_sample.mean(dim=list(range(1, per_sample.ndim)))
    if min_snr_gamma is None or snr is None:
        return per_sample.mean()
    clipped = torch.clamp(snr, max=min_snr_gamma)
    weights = clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr
    return (per_sample * weights).mean()


@dataclass
class LossTerms:
    quality: torch.Tensor
    distillation: torch.Tensor
    prompt_alignment: torch.Tensor
    total: torch.Tensor


def total_loss(
    quality: torch.Tensor,
    distillation: torch.Tensor,
    prompt_alignment: torch.Tensor,
    eta_llm: float = 1e-5,
    eta_prompt: float = 1e-5,
) -> LossTerms:
    """The weighted sum (released defaults: both etas 1e-5), with every term kept for logging."""
    total = quality + eta_llm * distillation + eta_prompt * prompt_alignment
    return LossTerms(quality, distillation, prompt_alignment, total)
