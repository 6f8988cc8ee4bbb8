"""The tests' tiny offline models: surd's own demo models (``surd_builder/demo_models.py``).

Tests and benchmarks import them from here; the recipes (seeded, built from configs in code,
loaded back through ``from_pretrained``) live in the package, where ``surd demo-models`` uses them.
"""

from __future__ import annotations

from surd_builder.demo_models import (  # noqa: F401 (re-exported for the tests and benchmarks)
    CHAT_TEMPLATE,
    PROMPT_WORDS,
    PUNCTUATION,
    SDXL_POOLED_WIDTH,
    SDXL_TEXT_WIDTHS,
    SDXL_TIME_EMBED_DIM,
    _clip_bpe,
    _clip_text_config,
    save_tiny_blip,
    save_tiny_causal_lm,
    save_tiny_clip,
    save_tiny_sd2,
    save_tiny_sdxl,
    save_tiny_stable_diffusion,
    save_tiny_vlm,
    tiny_unet,
)
