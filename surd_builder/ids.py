"""Deterministic identifiers.

A ``sample_id`` is derived from the source name and the source's own item id, never drawn at
random: re-scraping or re-ingesting the same item yields the same id, which is what makes every
stage resumable and every re-run idempotent.
"""

from __future__ import annotations

import hashlib

SAMPLE_ID_HEX_CHARS = 32  # 128 bits: collisions are negligible far past a billion samples


def make_sample_id(source: str, source_item_id: str) -> str:
    """The stable id of item ``source_item_id`` of ``source`` (32 lowercase hex characters)."""
    if not source or not source_item_id:
        raise ValueError("sample ids need a non-empty source and source item id")
    # The unit separator cannot occur in either part by accident, so ("a", "bc") != ("ab", "c").
    key = f"{source}\x1f{source_item_id}".encode()
    return hashlib.sha256(key).hexdigest()[:SAMPLE_ID_HEX_CHARS]


_INVISIBLE_SPACES = str.maketrans(dict.fromkeys("\u200b\u200c\u200d\u2060\ufeff", " "))


def text_key(text: str) -> str:
    """A text as keys compare it: every run of whitespace (no-break and zero-width spaces
    included) one space, none at the ends. Stored prompts keep what the source wrote; caches and
    prompt dedupe compare through this, so two spellings of the same words share an answer."""
    return " ".join(text.translate(_INVISIBLE_SPACES).split())


def sha256_hex(data: bytes) -> str:
    """Content address of image bytes: the key of the workspace's image store."""
    return hashlib.sha256(data).hexdigest()


def check_split_fractions(test_fraction: float, validation_fraction: float) -> None:
    """Raise ``ValueError`` unless both fractions are >= 0 and leave room for a train split."""
    if test_fraction < 0 or validation_fraction < 0 or test_fraction + validation_fraction >= 1:
        raise ValueError("test and validation fractions must be >= 0 and sum to less than 1")


def split_for(sample_id: str, test_fraction: float, validation_fraction: float = 0.0) -> str:
    """Deterministic split of a sample from a hash of its id.

    The assignment depends only on the id and the fractions, so a sample keeps its split when the
    dataset grows; near-duplicates are removed before export so they cannot straddle splits.
    """
    check_split_fractions(test_fraction, validation_fraction)
    bucket = int(hashlib.sha256(f"split\x1f{sample_id}".encode()).hexdigest()[:15], 16) / 16**15
    if bucket < test_fraction:
        return "test"
    if bucket < test_fraction + validation_fraction:
        return "validation"
    return "train"
