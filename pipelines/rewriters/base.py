"""The one interface every rewriting backend implements.

A rewriter turns a list of requests (keyword prompt, and the image for captioners) into raw
answers, one per request. Everything around that is the rewrite stage's job and the same for all
backends: the cache, cleaning and validation, retries of invalid answers, failure rows. So a
backend only has to say who it is (:meth:`Rewriter.identity`, part of the cache key) and how it
generates (:meth:`Rewriter.generate`).
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from pipelines.base import WorkerNeeds
from surd_builder.errors import ServiceError
from surd_builder.ids import text_key


@dataclass(frozen=True)
class RewriteRequest:
    complex_prompt: str
    image: bytes | None = None  # only for rewriters with ``uses_image``
    caption: str = ""  # what a captioner saw, for a merge pass (``{caption}`` in the template)


class ItemFailed(Exception):
    """One request failed for good (after the backend's own retries): recorded, not raised."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


class RewriterUnavailable(ServiceError):
    """The backend cannot work at all (model missing, server refusing the key): stop the run
    with one line instead of failing every item the same way."""


class Rewriter(ABC):
    #: backend name, the part of ``--rewriter`` before the colon
    backend: ClassVar[str]
    #: whether requests carry the image (captioners)
    uses_image: ClassVar[bool] = False
    #: whether another attempt can give another answer (sampling); the rules cannot
    can_retry: ClassVar[bool] = True

    def __init__(self, model: str):
        self.model = model

    @property
    def origin(self) -> str:
        """``narrative_origin`` of what this rewriter writes."""
        return f"{self.backend}:{self.model}"

    def identity(self) -> dict[str, Any]:
        """Everything that changes the answers: backend, model, template, generation settings.
        Subclasses extend it; it must be JSON-serialisable."""
        return {"backend": self.backend, "model": self.model}

    def cache_key(self, complex_prompt: str, image_sha256: str | None) -> str:
        """The rewrite cache key of one input: equal keys, equal (cached) answers."""
        identity = json.dumps(self.identity(), sort_keys=True, ensure_ascii=False)
        parts = [identity, text_key(complex_prompt)]  # the stored prompt is exact; keys are not
        if self.uses_image:
            parts.append(image_sha256 or "")
        return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]

    @abstractmethod
    def generate(self, requests: list[RewriteRequest], attempt: int) -> list[str | ItemFailed]:
        """One raw answer (or :class:`ItemFailed`) per request, in order. ``attempt`` counts
        from 0; later attempts are retries of answers that failed validation, so a backend
        should vary its answer (e.g. sample instead of greedy decoding)."""

    def params(self) -> dict[str, Any]:
        """What the manifest records about this rewriter (never secrets)."""
        return self.identity()

    def worker_needs(self) -> WorkerNeeds:
        """What one worker running this rewriter needs on a cluster (``Stage.worker_needs``):
        one CPU by default; model backends name their device."""
        return WorkerNeeds()

    def environment(self) -> tuple[str, ...]:
        """Environment variables it reads (``Stage.environment``)."""
        return ()

    def check_reachable(self) -> None:
        """Raise :class:`RewriterUnavailable` when a service this rewriter needs (an LLM server)
        cannot be reached; quick, and called before loading any model (a captioner checks its
        merge pass's server first). Nothing to check by default."""
        return None
