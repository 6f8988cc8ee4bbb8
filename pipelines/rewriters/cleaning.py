"""Cleaning and validating a rewriter's output before it may become a narrative prompt.

Language models wrap their answer ("Sure! Here is the sentence: ..."), quote it, add a second
line of explanation, or, when they fail, hand the keyword list back. None of that may be stored
as a narrative prompt. :func:`clean_output` removes the wrapping that is safe to remove;
:func:`validation_problem` says why what is left is still unusable, so the stage can retry the
item and, after its last attempt, record it as failed with that reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# A reasoning model's hidden thoughts (an unclosed block means it never got to the answer).
_THINKING = re.compile(r"<think(?:ing)?>.*?(?:</think(?:ing)?>|\Z)", re.IGNORECASE | re.DOTALL)
# Markdown around a line: quote marks, list bullets, numbering, headings.
_MARKDOWN_PREFIX = re.compile(r"^(?:>\s*|[-*+•]\s+|\d+[.)]\s+|#+\s+)+")
# An interjection opening the answer: "Sure! ...", "Okay, ...".
_INTERJECTION = re.compile(
    r"^(?:sure|okay|ok|certainly|of course|absolutely)\b[\s!.,:]*", re.IGNORECASE
)
# A whole line that only introduces the answer: "Here is the narrative prompt:". The colon is
# required: "Here is a red barn in a field." is an answer.
_PREAMBLE_LINE = re.compile(
    r"^(?:here(?:'s| is| are)\b[^:]*:|(?:the )?(?:rewritten|narrative|plain|short|final)\b[^:]*:)"
    r"\s*$",
    re.IGNORECASE,
)
# A label before the answer on the same line: "Narrative prompt: a cat ...".
_LABEL = re.compile(
    r"^(?:here(?:'s| is| are)\b[^:]{0,60}:"
    r"|(?:(?:short |final )?answer|narrative(?: prompt)?|sentence|output|description|caption"
    r"|rewritten(?: prompt)?|plain sentence|assistant|prompt|result)\s*:)\s*",
    re.IGNORECASE,
)
_QUOTES = "\"'`“”‘’«»*_"
# Prompt syntax that must never reach a narrative: weights, LoRA tags, Midjourney parameters.
_PROMPT_SYNTAX = re.compile(r"<[a-z]+:[^>]*>|\([^()]*:\s*[\d.]+\)|\w::[\d.]|(?:^|\s)--[a-z]+\b")
_WORD = re.compile(r"[\w'-]+")


@dataclass(frozen=True)
class ValidationBounds:
    """What a narrative prompt may look like. Bounds are applied to cached outputs too, so
    tightening them redoes exactly the outputs that no longer pass."""

    min_words: int = 2
    max_words: int = 60

    def __post_init__(self) -> None:
        if not 1 <= self.min_words <= self.max_words:
            raise ValueError("need 1 <= min_words <= max_words")


def clean_output(text: str) -> str:
    """The narrative sentence inside a model's raw answer (may be empty)."""
    text = _THINKING.sub("", text.replace("\r", "")).strip()
    text = re.sub(r"^```\w*\n?|\n?```$", "", text).strip()
    for line in text.split("\n"):
        previous = None
        while line != previous:  # peel wrappers until nothing changes: "> **Answer:** \"...\""
            previous = line
            line = _MARKDOWN_PREFIX.sub("", line.strip()).replace("**", "").replace("__", "")
            line = _INTERJECTION.sub("", line)
            if _PREAMBLE_LINE.match(line):
                line = ""
                break
            line = _LABEL.sub("", line, count=1).strip().strip(_QUOTES).strip()
        line = re.sub(r"\s+", " ", line)
        if line:
            return line
    return ""


def _chunks(text: str) -> list[str]:
    return [c for c in (re.sub(r"\s+", " ", c).strip().lower() for c in text.split(",")) if c]


def looks_like_keyword_list(output: str, complex_prompt: str) -> bool:
    """True when ``output`` is a tag list rather than a sentence: it keeps style tags as pieces
    of their own ("..., 8k, masterpiece"), or is mostly short comma-separated pieces, or mostly
    the keyword prompt's own pieces handed back."""
    from pipelines.rewriters.rules import is_boilerplate

    pieces = _chunks(output)
    if len(pieces) >= 2 and any(is_boilerplate(p) for p in pieces):
        return True
    if len(pieces) >= 4 and sum(len(p.split()) for p in pieces) / len(pieces) <= 3:
        return True
    keywords = set(_chunks(complex_prompt))
    if len(pieces) >= 3 and keywords:
        return sum(p in keywords for p in pieces) / len(pieces) >= 0.75
    return False


def validation_problem(output: str, complex_prompt: str, bounds: ValidationBounds) -> str | None:
    """Why ``output`` (already cleaned) is not a usable narrative prompt, or None if it is.

    The returned words are the failure reasons the stage records: ``empty``, ``too-short``,
    ``too-long``, ``prompt-syntax``, ``keyword-list``.
    """
    if not output:
        return "empty"
    words = len(_WORD.findall(output))
    if words < bounds.min_words:
        return "too-short"
    if words > bounds.max_words:
        return "too-long"
    if _PROMPT_SYNTAX.search(output.lower()):
        return "prompt-syntax"
    if looks_like_keyword_list(output, complex_prompt):
        return "keyword-list"
    return None
