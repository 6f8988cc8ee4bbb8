"""The instruction a language model gets: system text, few-shot examples, the user message.

One template serves chat models (as a list of messages) and plain causal LMs without a chat
template (as one text ending where the answer should start). Users replace it with a TOML file::

    system = "You rewrite text-to-image prompts ..."
    user = "Keyword prompt: {keyword_prompt}"

    [[examples]]
    keyword_prompt = "3 red circles, blue background, 8k"
    narrative_prompt = "three red circles on a blue background"

``user`` may use ``{keyword_prompt}``, for the caption-merge pass ``{caption}``, and for
rewriters that see the image (``vlm:``, ``openai: --with-image``) ``{image}``: where the image
goes in the user turn (at the start when the template does not say). Nothing else. Its hash is
part of the rewrite cache key, so editing the template redoes exactly the outputs it could change.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from surd_builder.errors import ConfigError

PLACEHOLDERS = ("keyword_prompt", "caption", "image")
IMAGE_PLACEHOLDER = "{image}"
# One content part of a multimodal user turn: {"type": "text", "text": ...} or the image's part.
ContentPart = dict[str, Any]
ANSWER_LABEL = "Narrative prompt:"


@dataclass(frozen=True)
class Example:
    keyword_prompt: str
    narrative_prompt: str
    caption: str = ""


@dataclass(frozen=True)
class PromptTemplate:
    system: str
    user: str
    examples: tuple[Example, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        used = set(re.findall(r"{(\w+)}", self.user))
        unknown = used - set(PLACEHOLDERS)
        if unknown:
            raise ConfigError(
                f"template: unknown placeholder {{{sorted(unknown)[0]}}} "
                f"(allowed: {', '.join('{' + p + '}' for p in PLACEHOLDERS)})"
            )
        if "keyword_prompt" not in used:
            raise ConfigError("template: the user message must contain {keyword_prompt}")

    @property
    def uses_caption(self) -> bool:
        return "{caption}" in self.user

    @property
    def places_image(self) -> bool:
        return IMAGE_PLACEHOLDER in self.user

    def digest(self) -> str:
        """Stable hash of everything that shapes the model's input."""
        canonical = json.dumps(asdict(self), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def user_message(self, keyword_prompt: str, caption: str = "") -> str:
        # plain replacement, not str.format: prompts are full of braces
        text = self.user.replace(IMAGE_PLACEHOLDER, "")
        return text.replace("{keyword_prompt}", keyword_prompt).replace("{caption}", caption)

    def user_parts(self, keyword_prompt: str, image_part: ContentPart) -> list[ContentPart]:
        """The user turn of a model that sees the image: text parts around ``image_part``,
        placed where ``{image}`` stands (first when the template has no ``{image}``)."""
        user = self.user if self.places_image else IMAGE_PLACEHOLDER + self.user
        before, _, after = user.partition(IMAGE_PLACEHOLDER)
        parts: list[ContentPart] = []
        for text, is_image in ((before, False), ("", True), (after, False)):
            if is_image:
                parts.append(image_part)
                continue
            text = text.replace(IMAGE_PLACEHOLDER, "")  # a second {image}: one image per turn
            text = text.replace("{keyword_prompt}", keyword_prompt).strip()
            if text:
                parts.append({"type": "text", "text": text})
        return parts

    def vision_messages(
        self, keyword_prompt: str, image_part: ContentPart, parts_everywhere: bool = False
    ) -> list[dict[str, Any]]:
        """Chat messages for a model that sees the image: the item's user turn holds
        ``image_part``; examples stay text turns (they have no image). ``parts_everywhere``
        writes every content as a list of parts, which some processors' chat templates need
        (the OpenAI format takes plain strings for text-only turns)."""

        def text(value: str) -> str | list[ContentPart]:
            return [{"type": "text", "text": value}] if parts_everywhere else value

        messages: list[dict[str, Any]] = []
        if self.system.strip():
            messages.append({"role": "system", "content": text(self.system)})
        for example in self.examples:
            messages.append(
                {"role": "user", "content": text(self.user_message(example.keyword_prompt))}
            )
            messages.append({"role": "assistant", "content": text(example.narrative_prompt)})
        messages.append({"role": "user", "content": self.user_parts(keyword_prompt, image_part)})
        return messages

    def messages(self, keyword_prompt: str, caption: str = "") -> list[dict[str, str]]:
        """Chat messages: system, then each example as a user/assistant turn, then the item."""
        messages = [{"role": "system", "content": self.system}]
        for example in self.examples:
            messages.append(
                {
                    "role": "user",
                    "content": self.user_message(example.keyword_prompt, example.caption),
                }
            )
            messages.append({"role": "assistant", "content": example.narrative_prompt})
        messages.append({"role": "user", "content": self.user_message(keyword_prompt, caption)})
        return messages

    def plain_text(self, keyword_prompt: str, caption: str = "") -> str:
        """One completion prompt for models without a chat template."""
        parts = [self.system.strip(), ""]
        for example in self.examples:
            parts += [
                self.user_message(example.keyword_prompt, example.caption),
                f"{ANSWER_LABEL} {example.narrative_prompt}",
                "",
            ]
        parts += [self.user_message(keyword_prompt, caption), ANSWER_LABEL]
        return "\n".join(parts)


_SYSTEM = (
    "You rewrite prompts for a text-to-image model. A keyword prompt is a comma-separated list "
    "of subjects, attributes and style tags, often with weights like (word:1.2) or tags like "
    "<lora:name:0.8>. Write ONE short, plain English sentence that says what the image shows. "
    "Keep every subject, number, colour, action and the setting. Leave out quality and style "
    "words (8k, masterpiece, highly detailed, trending on artstation), render engines, camera "
    "settings and artist names. Do not add anything the keywords do not say. Answer with the "
    "sentence only."
)

DEFAULT_EXAMPLES = (
    Example(
        "3 red circles, blue background, flat vector art, 8k, trending on artstation",
        "three red circles on a blue background",
    ),
    Example(
        "portrait of an old fisherman, white beard, yellow raincoat, stormy sea, dramatic "
        "lighting, by greg rutkowski, highly detailed, 8k",
        "an old fisherman with a white beard in a yellow raincoat by a stormy sea",
    ),
    Example(
        "(two cats:1.2), sleeping on a windowsill, sunny morning, cozy, masterpiece, best "
        "quality, <lora:catstyle:0.7>",
        "two cats sleeping on a windowsill on a sunny morning",
    ),
)

DEFAULT_TEMPLATE = PromptTemplate(
    system=_SYSTEM, user="Keyword prompt: {keyword_prompt}", examples=DEFAULT_EXAMPLES
)

# For ``caption:... --merge-with ...``: the caption is what is visible, the keywords add detail.
DEFAULT_MERGE_TEMPLATE = PromptTemplate(
    system=(
        "You write one short, plain English sentence describing an image for a text-to-image "
        "dataset. You get a caption written from the image itself and the keyword prompt the "
        "image was generated with. The caption is the truth about what is visible; use the "
        "keyword prompt only for details that agree with it (names, numbers, colours, the "
        "setting). Leave out quality and style words, render engines, camera settings and "
        "artist names. Answer with the sentence only."
    ),
    user="Caption: {caption}\nKeyword prompt: {keyword_prompt}",
    examples=(
        Example(
            "portrait of a knight, golden armor, castle courtyard, by artgerm, 8k, octane render",
            "a knight in golden armor standing in a castle courtyard",
            caption="a man in armor standing in front of a building",
        ),
    ),
)


# For rewriters that see the image (``vlm:``, ``openai: --with-image``): one call that sees the
# image and the keywords, the image deciding what is true.
DEFAULT_VISION_TEMPLATE = PromptTemplate(
    system=(
        "You write one short, plain English sentence that says what an image shows, for a "
        "text-to-image dataset. Look at the image and say its main subject, how many there "
        "are, their colours, what they are doing and the setting, as the image actually shows "
        "them. You also get the keyword prompt the image was generated with: use a keyword "
        "only where the image confirms it (a name, a number, a colour, the place), and never "
        "describe what the image does not show. Leave out quality and style words (8k, "
        "masterpiece, highly detailed), render engines, camera settings and artist names. "
        "Answer with the sentence only."
    ),
    user="{image}Keyword prompt: {keyword_prompt}",
)


def load_template(path: Path) -> PromptTemplate:
    """A template from a TOML file (see the module docstring); errors are one line."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"template file {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not valid TOML ({error})") from None
    unknown = set(data) - {"system", "user", "examples"}
    if unknown:
        raise ConfigError(
            f"{path}: unknown key {sorted(unknown)[0]!r} (known: system, user, examples)"
        )
    if not isinstance(data.get("system", ""), str) or not isinstance(data.get("user"), str):
        raise ConfigError(f"{path}: 'system' and 'user' must be strings ('user' is required)")
    if not isinstance(data.get("examples", []), list):
        raise ConfigError(f"{path}: write examples as [[examples]] tables (one per example)")
    examples = []
    for number, entry in enumerate(data.get("examples", []), 1):
        try:
            examples.append(Example(**{k: str(v) for k, v in entry.items()}))
        except (TypeError, AttributeError):
            raise ConfigError(
                f"{path}: example {number} needs keyword_prompt and narrative_prompt "
                "(and optionally caption), nothing else"
            ) from None
    try:
        return PromptTemplate(data.get("system", ""), data["user"], tuple(examples))
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
