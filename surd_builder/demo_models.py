"""Tiny random-weight models built from configs in code: surd's demo models and the tests' models.

``surd demo-models DIR`` (and ``surd quickstart``) write a tiny Stable Diffusion, a tiny causal LM
and a tiny CLIP with :func:`write_demo_models`, so ``surd train``, ``surd generate`` and
``surd eval`` run offline, on any machine, in seconds. The tests build the same models
(``tests/tiny_models.py`` imports them from here).

Every model and tokenizer/processor is built locally (no hub downloads) and written with
``save_pretrained``, so production code loads it by path through the normal ``from_pretrained``
route, exactly as it would a real checkpoint. Weights are random but seeded
(``torch.manual_seed(0)``), so outputs are deterministic yet meaningless. torch, diffusers and
transformers are imported inside the functions: importing this module is cheap.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Lowercase words typical of text-to-image prompts, so tokenized test prompts are mostly not <unk>.
_PROMPT_TEXT = """
a an the of and with in on at by for to from under over near behind beside through into
is are was while very one two three four five six seven eight nine ten
cat cats dog dogs fox foxes wolf wolves bird birds horse horses deer owl owls fish whale dragon
man men woman women girl boy child children knight wizard robot astronaut princess king queen
warrior samurai monk witch portrait face eyes hair hand flower flowers rose roses tree trees
castle house city street car ship boat train mountain mountains river lake ocean sea beach
forest jungle desert island sky clouds sun moon stars planet space galaxy field garden village
bridge tower temple road waterfall cave valley snow rain storm fog fire smoke light shadow
sword armor crown glass metal stone wood crystal candle lantern book
red orange yellow green blue purple pink brown black white gray grey golden silver dark bright
colorful pastel neon vibrant
big small tiny giant old young ancient futuristic beautiful cute happy sad angry fluffy
glowing shiny wet snowy sunny rainy foggy misty cozy epic magical mysterious detailed
running walking flying sitting standing sleeping swimming jumping dancing reading eating
fighting playing smiling looking holding wearing riding
night day morning evening sunset sunrise winter summer autumn spring underwater indoors outdoors
background foreground landscape scene room kitchen library cafe market
style art painting drawing sketch photo photograph illustration render concept digital oil
watercolor anime cartoon cinematic realistic photorealistic hyperrealistic surreal fantasy
minimalist abstract impressionism baroque cyberpunk steampunk vaporwave lowpoly pixel
8k 4k hd uhd hdr masterpiece artstation trending unreal engine octane highly sharp focus
intricate elegant dramatic lighting volumetric studio soft lens bokeh wide angle closeup
quality best award winning greg rutkowski artgerm mucha
system user assistant
"""
PROMPT_WORDS = _PROMPT_TEXT.split()
PUNCTUATION = [",", ".", ":"]

# Renders each message as "<s> role : content </s>" from vocab tokens only; the generation prompt
# opens an assistant turn ("<s> assistant :") for the model to continue.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<s> ' + message['role'] + ' : ' + message['content'] + ' </s> ' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s> assistant :' }}{% endif %}"
)


def _words_vocab(specials: list[str], extra_words: tuple[str, ...] = ()) -> dict[str, int]:
    """``specials`` first (ids 0..n-1, so pad/unk ids are stable), then words and punctuation,
    then ``extra_words`` not already there (so the ids of the others do not move)."""
    tokens = dict.fromkeys([*specials, *PROMPT_WORDS, *PUNCTUATION, *extra_words])
    return {token: index for index, token in enumerate(tokens)}


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers' progress bars off (restored afterwards): saving prints none."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def _save(directory: Path, model: Any, processor: Any) -> Path:
    """``save_pretrained`` both, quietly."""
    directory.mkdir(parents=True, exist_ok=True)
    with _no_progress_bars():
        model.save_pretrained(directory)
        processor.save_pretrained(directory)
    return directory


def save_tiny_causal_lm(
    directory: Path,
    chat_template: bool = False,
    hidden_size: int = 64,
    num_layers: int = 2,
    max_positions: int = 256,
    extra_words: tuple[str, ...] = (),
) -> Path:
    """Save a 2-layer Llama + word-level tokenizer, loadable via ``AutoModelForCausalLM``.

    The tokenizer pads on the left (what batched decoder-only generation needs) and decodes to
    space-separated words. ``chat_template=True`` adds a template for chat-style callers. The
    size options make bigger random models of the same kind for benchmarks; ``extra_words`` are
    added to the vocabulary (after the others, whose ids stay the same).
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = _words_vocab(["<pad>", "<unk>", "<s>", "</s>"], extra_words)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    # With no "##" pieces this decoder just joins tokens with spaces; cleanup=False keeps "a , b"
    # (not "a, b") so decoded text re-tokenizes to the same ids.
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        padding_side="left",
        model_max_length=max_positions,
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE

    torch.manual_seed(0)
    special_ids = dict(pad_token_id=vocab["<pad>"], bos_token_id=vocab["<s>"])
    special_ids["eos_token_id"] = vocab["</s>"]
    config = LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=len(vocab),
        max_position_embeddings=max_positions,
        **special_ids,
    )
    model = LlamaForCausalLM(config)
    # An explicit pad id keeps generate() from warning "Setting pad_token_id to eos_token_id".
    model.generation_config.update(**special_ids)
    return _save(Path(directory), model, tokenizer)


def save_tiny_blip(directory: Path) -> Path:
    """Save a 1-layer BLIP captioner + ``BlipProcessor`` (32x32 images, word-level BERT vocab).

    Loads with ``AutoModelForImageTextToText`` / ``BlipForConditionalGeneration`` and
    ``AutoProcessor``.
    """
    import torch
    from transformers import (
        BertTokenizerFast,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessorPil,
        BlipProcessor,
    )

    # Like the real checkpoint, the decoder starts from a "[DEC]" bos token and stops at "[SEP]";
    # making "[DEC]" the tokenizer's bos lets skip_special_tokens drop it from captions.
    vocab = _words_vocab(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"])
    tokenizer = BertTokenizerFast(vocab=vocab, bos_token="[DEC]", model_max_length=512)
    # The PIL backend: the default one needs torchvision and warns when it falls back.
    image_processor = BlipImageProcessorPil(size={"height": 32, "width": 32})

    torch.manual_seed(0)
    special_ids = dict(pad_token_id=vocab["[PAD]"], bos_token_id=vocab["[DEC]"])
    special_ids["eos_token_id"] = vocab["[SEP]"]
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = BlipConfig(
        text_config=dict(
            tower,
            vocab_size=len(vocab),
            encoder_hidden_size=32,
            # 512 like real BLIP: pipelines generate long captions from random weights.
            max_position_embeddings=512,
            sep_token_id=vocab["[SEP]"],
            **special_ids,
        ),
        vision_config=dict(tower, image_size=32, patch_size=8),
        projection_dim=16,
        image_text_hidden_size=16,
    )
    model = BlipForConditionalGeneration(config)
    model.generation_config.update(**special_ids)
    processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return _save(Path(directory), model, processor)


# A vision-language chat model's words: yes/no answers and the wording of surd's judge and vision
# rewriter instructions, on top of the prompt words ("-" for "text-to-image").
_VLM_TEXT = """
yes no you check image images descriptions text dataset answer word or sentence does this describe
what shows its subjects how many their colours they do setting without saying anything not show
write short plain english that says look say main subject there doing as actually them also get
keyword narrative prompt caption generated use only where confirms it name number colour place
never leave out words engines camera settings artist names -
"""
VLM_WORDS = tuple(_VLM_TEXT.split())
# SmolVLM's (Idefics3's) chat format: "<|im_start|>System: ...<end_of_utterance>\nUser:<image>...
# <end_of_utterance>\nAssistant:", each content a string or a list of text/image parts.
VLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}{% else %}"
    "{{ ':' if message['content'][0]['type'] == 'image' else ': ' }}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}{{ '<image>' }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
VLM_TILE = 32  # the tiny VLM's vision input: 32x32 tiles of 8x8 patches, 4 image tokens a tile


def save_tiny_vlm(directory: Path) -> Path:
    """Save a tiny Idefics3 (SmolVLM's architecture) chat VLM + ``Idefics3Processor``.

    Loads with ``AutoModelForImageTextToText`` and ``AutoProcessor``, for tests of code that runs
    a vision-language chat model (``vlm:`` rewriting and judging). Idefics3 rather than Qwen2-VL:
    Qwen2-VL/2.5-VL processors (like SmolVLM's and Pixtral's) need torchvision, which surd does
    not install; Idefics3's resolution is still dynamic: an image longer than one 32x32 tile is
    split into up to 2x2 tiles plus a global view, 4 image tokens each.

    The tokenizer is word-level over real words (lowercased first, so "Yes" is "yes"), with
    "yes" and "no" single tokens and the family's special tokens (``<image>``,
    ``<fake_token_around_image>``, ``<global-img>``, ``<row_i_col_j>``, ``<end_of_utterance>``,
    ``<|im_start|>``); it pads on the left. The chat template is SmolVLM's. Weights are random
    (seed 0), the language model's with ``initializer_range`` 0.1, so logits are of order 1 and
    greedy choices are not near-ties (batched generation equals one conversation at a time).
    """
    import torch
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3Processor,
        PreTrainedTokenizerFast,
    )

    image_tokens = ["<fake_token_around_image>", "<image>", "<global-img>"]
    # The processor looks up a token per tile position, up to 6x6 (it uses at most 2x2 here).
    image_tokens += [f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)]
    specials = ["<pad>", "<unk>", "<|im_start|>", "<end_of_utterance>", *image_tokens]
    vocab = _words_vocab(specials, (*demo_words(), *VLM_WORDS))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # Special tokens are matched before lowercasing and splitting, so "User:<image>" splits.
    backend.add_special_tokens([AddedToken(token, special=True) for token in specials])
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # as save_tiny_causal_lm
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        padding_side="left",
        model_max_length=1024,
    )
    # The PIL backend: the default one needs torchvision. Images are resized to a longest side
    # of 64 and cut into 32x32 tiles; one that fits a tile is not split (one global view).
    try:  # transformers >= 5.2x names the PIL processor apart from the torchvision one
        from transformers import Idefics3ImageProcessorPil as image_processor_class
    except ImportError:
        from transformers import Idefics3ImageProcessor as image_processor_class
    image_processor = image_processor_class(
        size={"longest_edge": 2 * VLM_TILE}, max_image_size={"longest_edge": VLM_TILE}
    )
    patch, scale_factor = 8, 2
    image_seq_len = (VLM_TILE // patch) ** 2 // scale_factor**2
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=image_seq_len,
        chat_template=VLM_CHAT_TEMPLATE,
    )

    torch.manual_seed(0)
    special_ids = dict(pad_token_id=vocab["<pad>"], bos_token_id=vocab["<|im_start|>"])
    special_ids["eos_token_id"] = vocab["<end_of_utterance>"]
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = Idefics3Config(
        vision_config=dict(tower, image_size=VLM_TILE, patch_size=patch),
        text_config=dict(
            model_type="llama",
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=len(vocab),
            max_position_embeddings=1024,
            **special_ids,
        ),
        scale_factor=scale_factor,
        image_token_id=vocab["<image>"],
        initializer_range=0.1,  # the text model's init (the vision tower keeps 0.02)
        **special_ids,
    )
    model = Idefics3ForConditionalGeneration(config)
    model.generation_config.update(**special_ids)
    return _save(Path(directory), model, processor)


def _clip_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE in CLIP's layout: 256 byte symbols, the same + "</w>", merges, specials."""
    # GPT-2/CLIP byte-to-unicode table: printable bytes map to themselves, the rest to U+0100+.
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)}
    printable |= set(range(ord("®"), ord("ÿ") + 1))
    shifted = iter(range(256, 512))
    symbols = [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]
    tokens = symbols + [symbol + "</w>" for symbol in symbols]
    # A few merges so some prompt words become one token (e.g. "cat" -> "cat</w>").
    merges = []
    for word in ["cat", "dog", "red", "the", "fox"]:
        merges += [(word[0], word[1]), (word[:2], word[2] + "</w>")]
        tokens += [word[:2], word + "</w>"]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(dict.fromkeys(tokens))}, merges


def _clip_text_config(vocab: dict[str, int], width: int, layers: int = 1) -> dict:
    """A CLIP text tower ``width`` wide with ``layers`` blocks over the :func:`_clip_bpe` vocab.

    One layer is enough where only the last hidden state is used (the tiny SD 1.x, the tiny CLIP);
    SD 2.x and SDXL read the penultimate one, which with one layer would be the bare embeddings.
    """
    return dict(
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=2,
        vocab_size=len(vocab),
        max_position_embeddings=77,
        # Real ids (not CLIP's legacy eos_token_id=2), so text pooling finds the eos token.
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )


def tiny_unet(text_width: int = 32, **config: Any):
    """The UNet of :func:`save_tiny_stable_diffusion`: 8x8 latents, random weights (seed 0).
    ``config`` adds or overrides ``UNet2DConditionModel`` settings (SD 2.x's linear projection
    and per-block heads)."""
    import torch
    from diffusers import UNet2DConditionModel

    settings: dict[str, Any] = dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=text_width,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
    )
    torch.manual_seed(0)
    return UNet2DConditionModel(**{**settings, **config})


def save_tiny_clip(directory: Path) -> Path:
    """Save a 1-layer CLIP (text + vision towers, 16-d projection) and its ``CLIPProcessor``.

    Loads with ``CLIPModel`` / ``AutoModel`` and ``AutoProcessor``. ``get_image_features`` and
    ``get_text_features`` return ``BaseModelOutputWithPooling``; the projected (batch, 16)
    embeddings are its ``.pooler_output``.
    """
    import torch
    from transformers import (
        CLIPConfig,
        CLIPImageProcessorPil,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    vocab, merges = _clip_bpe()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    # The PIL backend: the default one needs torchvision and warns when it falls back.
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )

    torch.manual_seed(0)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(
        text_config=_clip_text_config(vocab, 32),
        vision_config=dict(tower, image_size=32, patch_size=8),
        projection_dim=16,
    )
    model = CLIPModel(config)
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return _save(Path(directory), model, processor)


def save_tiny_stable_diffusion(directory: Path, text_width: int = 32) -> Path:
    """Save a tiny Stable Diffusion in diffusers layout (``model_index.json`` + 5 subfolders).

    32x32 images map to 8x8 latents (VAE with 3 blocks); the UNet's cross-attention and the CLIP
    text encoder are ``text_width`` wide. Loads with ``StableDiffusionPipeline.from_pretrained``
    and each part with its class's ``from_pretrained(directory, subfolder=...)``.
    """
    import torch
    from diffusers import DDPMScheduler

    unet = tiny_unet(text_width)
    torch.manual_seed(0)
    scheduler = DDPMScheduler(steps_offset=1, clip_sample=False)
    return _save_sd_pipeline(Path(directory), text_width, 1, unet, scheduler)


def _save_sd_pipeline(
    directory: Path, text_width: int, text_layers: int, unet: Any, scheduler: Any
) -> Path:
    """A ``StableDiffusionPipeline`` of ``unet``, ``scheduler``, the CLIP BPE tokenizer, a CLIP
    text encoder ``text_width`` wide with ``text_layers`` layers and the tiny VAE (built in that
    order from the current RNG state), saved in ``directory``."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab, merges = _clip_bpe()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    text_config = _clip_text_config(vocab, text_width, layers=text_layers)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    pipeline = StableDiffusionPipeline(
        vae=_tiny_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _save_pipeline(directory, pipeline)


def _tiny_vae(**config: Any):
    """The tiny SD's VAE: 3 blocks (8, 16, 16), so 32x32 images <-> 8x8x4 latents.

    Not seeded here: each caller seeds once before building its models, and building this in the
    same place keeps its weights (and the files of :func:`save_tiny_stable_diffusion`) the same.
    ``config`` adds or overrides ``AutoencoderKL`` settings (SDXL's ``force_upcast`` and scale).
    """
    from diffusers import AutoencoderKL

    settings: dict[str, Any] = dict(
        block_out_channels=(8, 16, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    return AutoencoderKL(**{**settings, **config})


def _save_pipeline(directory: Path, pipeline: Any) -> Path:
    """``save_pretrained`` a diffusers pipeline into ``directory`` (created), quietly."""
    directory.mkdir(parents=True, exist_ok=True)
    with _no_progress_bars():
        pipeline.save_pretrained(directory)
    return directory


# SD 2.x / SDXL's training noise schedule (also SD 1.x's, whose tiny model keeps DDPM's defaults).
_SD_BETAS: dict[str, Any] = dict(
    beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1
)


def save_tiny_sd2(directory: Path) -> Path:
    """Save a tiny Stable Diffusion 2.x in diffusers layout (``StableDiffusionPipeline``).

    The structure of SD 2.x at tiny size, so code paths that differ from SD 1.x get exercised:
    a 64-wide, 2-layer CLIP text encoder (SD 2.x's OpenCLIP is 1024 wide and its pipelines may
    read the penultimate layer, which must not be the bare embeddings), a UNet with
    ``use_linear_projection=True`` and one ``attention_head_dim`` per block (4, 8), and a
    ``v_prediction`` scheduler (SD 2.x 768 predicts velocity, not noise). As the tiny SD:
    32x32 images, 8x8x4 latents, seeded random weights.
    """
    from diffusers import DDPMScheduler

    width = 64
    unet = tiny_unet(width, attention_head_dim=(4, 8), use_linear_projection=True)  # seeds 0
    scheduler = DDPMScheduler(clip_sample=False, prediction_type="v_prediction", **_SD_BETAS)
    return _save_sd_pipeline(Path(directory), width, 2, unet, scheduler)


# The tiny SDXL's widths: its UNet attends to both encoders' penultimate states side by side
# (32 + 48 = 80) and conditions on the second one's pooled projection (24) plus six size/crop
# numbers, each embedded SDXL's way (sinusoids 8 wide): 24 + 6 * 8 = 72.
SDXL_TEXT_WIDTHS = (32, 48)
SDXL_POOLED_WIDTH = 24
SDXL_TIME_EMBED_DIM = 8


def save_tiny_sdxl(directory: Path) -> Path:
    """Save a tiny Stable Diffusion XL in diffusers layout (``StableDiffusionXLPipeline``).

    SDXL's structure at tiny size: two tokenizers (the same CLIP BPE here) and two text encoders,
    ``CLIPTextModel`` 32 wide and ``CLIPTextModelWithProjection`` 48 wide with a 24-d
    projection, 2 layers each (SDXL reads ``hidden_states[-2]``). Their penultimate states are
    concatenated into 80-wide prompt embeddings for the UNet's cross-attention; the pooled 24-d
    embedding and the ``(original size, crop top-left, target size)`` ids go into its
    ``"text_time"`` added embedding (``projection_class_embeddings_input_dim`` 24 + 6 * 8 = 72).
    The VAE is the tiny SD's (32x32 images <-> 8x8x4 latents) with SDXL's ``force_upcast`` and
    ``scaling_factor`` 0.13025; the scheduler has SDXL's noise schedule and timestep spacing. Saved
    with the pipeline's defaults (``force_zeros_for_empty_prompt``). Seeded random weights.
    """
    import torch
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    width, width_2 = SDXL_TEXT_WIDTHS
    vocab, merges = _clip_bpe()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    tokenizer_2 = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=width + width_2,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=1,
        attention_head_dim=(4, 8),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=SDXL_POOLED_WIDTH + 6 * SDXL_TIME_EMBED_DIM,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(**_clip_text_config(vocab, width, layers=2)))
    text_encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(
            **_clip_text_config(vocab, width_2, layers=2), projection_dim=SDXL_POOLED_WIDTH
        )
    )
    vae = _tiny_vae(force_upcast=True, scaling_factor=0.13025)
    # SDXL ships an Euler config with this schedule; DDPM with the same settings is
    # interchangeable (``from_config``) and, unlike Euler's ``set_timesteps`` here, warns nothing.
    scheduler = DDPMScheduler(
        clip_sample=False, prediction_type="epsilon", timestep_spacing="leading", **_SD_BETAS
    )
    pipeline = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
    )
    return _save_pipeline(Path(directory), pipeline)


# What `surd demo-models DIR` writes: three folders and a marker, written last (a complete set).
DEMO_MODELS_FILE = "surd-demo-models.json"
DEMO_IMAGE_SIZE = 32  # the tiny Stable Diffusion's image side (8x8 latents)
DEMO_LLM_LAYER = 2  # the tiny LLM's last block: `surd train --llm-layer 2`


@dataclass(frozen=True)
class DemoModels:
    """The folders of a demo-models set: ``sd/`` (diffusers layout), ``llm/``, ``clip/``."""

    root: Path

    @property
    def sd(self) -> Path:
        return self.root / "sd"

    @property
    def llm(self) -> Path:
        return self.root / "llm"

    @property
    def clip(self) -> Path:
        return self.root / "clip"


def demo_words() -> tuple[str, ...]:
    """The demo data's words (counts, colours, shapes), so its prompts tokenize without <unk>."""
    from surd_builder.demo import COLORS, COUNT_WORDS, SHAPES

    plurals = tuple(f"{shape}s" for shape in SHAPES)
    return (*COUNT_WORDS.values(), *COLORS, *SHAPES, *plurals, "background")


def write_demo_models(directory: Path | str, overwrite: bool = False) -> DemoModels:
    """Write the tiny Stable Diffusion, causal LM (with the demo's words) and CLIP into
    ``directory`` (missing or empty, unless ``overwrite``). Seeded: the same files every time."""
    from surd_builder.atomic import write_json_atomic
    from surd_builder.errors import OutputExistsError

    models = DemoModels(Path(directory))
    if models.root.is_dir() and any(models.root.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"{models.root} exists and is not empty (pass --overwrite to replace it)"
        )
    (models.root / DEMO_MODELS_FILE).unlink(missing_ok=True)
    save_tiny_stable_diffusion(models.sd)
    save_tiny_causal_lm(models.llm, extra_words=demo_words())
    save_tiny_clip(models.clip)
    marker = {"image_size": DEMO_IMAGE_SIZE, "llm_layer": DEMO_LLM_LAYER, "weights": "random"}
    write_json_atomic(marker, models.root / DEMO_MODELS_FILE)
    return models


def read_demo_models(directory: Path | str) -> DemoModels | None:
    """The demo models in ``directory`` if a complete set is there, else None."""
    models = DemoModels(Path(directory))
    return models if (models.root / DEMO_MODELS_FILE).is_file() else None
