"""Which ``X-Robots-Tag`` header values opt an image out of surd (the rules are described in
``pipelines.optout``): header parsing only, so the fetcher applies it to every image response
without depending on the robots.txt policy, which depends on the fetcher.
"""

from __future__ import annotations

import re

PRODUCT_TOKEN = "surd"
OPT_OUT_DIRECTIVES = frozenset({"noai", "noimageai", "noindex", "noimageindex", "none"})
# directives that carry a value after a colon, so "name: value" is not an agent scope
VALUED_DIRECTIVES = frozenset(
    {"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"}
)
# a product token scoping X-Robots-Tag directives ("googlebot: noindex"); a date fragment of
# "unavailable_after: Friday, 25-Jun-30 15:00:00 GMT" has spaces, so it is never one
AGENT_TOKEN = re.compile(r"^[a-z0-9_*.-]+$")


def x_robots_opt_outs(header_values: list[str], agent: str = PRODUCT_TOKEN) -> list[str]:
    """The opt-out directives among ``X-Robots-Tag`` header values that apply to ``agent``."""
    found: list[str] = []
    for value in header_values:
        scope: str | None = None  # None: every agent
        for piece in value.split(","):
            piece = piece.strip().lower()
            name, colon, rest = piece.partition(":")
            name = name.strip()
            if colon and name not in VALUED_DIRECTIVES and AGENT_TOKEN.match(name):
                scope, piece = name, rest.strip()
            if piece in OPT_OUT_DIRECTIVES and scope in (None, "*", agent):
                found.append(piece if scope is None else f"{scope}: {piece}")
    return list(dict.fromkeys(found))
