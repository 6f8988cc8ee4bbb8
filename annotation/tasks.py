"""Pure conversions between surd samples and Label Studio tasks and annotations.

No I/O here: push and pull call these on plain dicts, so the rules below are tested on their own.

Reading an annotation (``decision_of``):

- a cancelled (skipped) annotation is no decision: the sample stays pending;
- ``reject`` -> ``rejected`` with the problem tags; the narrative is left as it was;
- otherwise the narrative is the annotation's text area, or the pushed narrative when the
  annotator submitted without touching it; ``corrected`` when that text differs from what was
  pushed, ``accepted`` when it does not (whatever of accept/corrected was clicked: the text is
  the evidence);
- an annotation with neither a decision nor an edited text is incomplete and ignored.

Several annotations on one task (``choose``): ``latest`` (default) takes the most recently
updated decision; ``unanimous`` applies only decisions all annotators share (same status and
text), and leaves the sample pending otherwise.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from annotation.config import PROBLEM_TAGS
from surd_builder.review import SCREEN_SCORES

POLICIES = ("latest", "unanimous")
# names the reading rules below: change it with them, so mirrors of decisions read under other
# rules (annotation.mirror) are read again
DECISION_RULES = "1"
IMAGE_PLACEHOLDERS = ("{image_sha256}", "{sample_id}", "{image_file}")
# `surd annotate serve-images` on its default address; the query keeps browsers from reusing
# copies cached from a server that sent no CORS header (annotation/images.py)
DEFAULT_IMAGE_URL = "http://127.0.0.1:8081/images/{image_sha256}?cors=1"
# The model_version surd's projects select and their predictions carry: Label Studio's "Label
# All Tasks" stream pre-fills a task from a prediction only when the prediction's model_version
# is the project's, and one project mixes narratives of several rewriters (the rewriter is in
# the task data, ``narrative_origin``). A project of an older surd keeps its own version, and
# new predictions there take that one (annotation.client.Project.model_version).
PREDICTION_MODEL_VERSION = "surd-narrative"


@dataclass(frozen=True)
class Decision:
    sample_id: str
    annotator: int | None
    status: str  # accepted | corrected | rejected
    narrative: str | None
    tags: tuple[str, ...] = field(default_factory=tuple)
    decided_at: datetime | None = None
    annotation_id: int | None = None

    def same_verdict(self, other: Decision) -> bool:
        return (self.status, self.narrative) == (other.status, other.narrative)


def image_url(template: str, image_sha256: str, sample_id: str, image_file: str = "") -> str:
    """``template`` with the sample's values; ``{image_file}`` is ``<sha256>.<ext>``, the name
    ``surd annotate write-images`` gives the file (annotation.image_files)."""
    return (
        template.replace("{image_sha256}", image_sha256)
        .replace("{sample_id}", sample_id)
        .replace("{image_file}", image_file)
    )


def data_uri(image: bytes) -> str:
    """The image inline (only on explicit request: it bloats Label Studio's database)."""
    return f"data:{media_type(image)};base64,{base64.b64encode(image).decode()}"


def media_type(data: bytes) -> str:
    """The image's media type from its first bytes."""
    for magic, kind in MAGIC_TYPES:
        if data.startswith(magic) and (kind != "image/webp" or data[8:12] == b"WEBP"):
            return kind
    return "application/octet-stream"


MAGIC_TYPES = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF8", "image/gif"),
    (b"RIFF", "image/webp"),
    (b"BM", "image/bmp"),
)


def sample_to_task(
    sample: dict[str, Any], image: str, model_version: str = PREDICTION_MODEL_VERSION
) -> dict[str, Any]:
    """A task for one sample: the data the config shows, and the current narrative as a
    prediction so the text area opens pre-filled; ``model_version`` is the one the project
    pre-fills from (:data:`PREDICTION_MODEL_VERSION` in projects surd made)."""
    narrative = sample.get("narrative_prompt") or ""
    data = {
        "image": image,
        "complex_prompt": sample.get("complex_prompt") or "",
        "narrative_prompt": narrative,
        "sample_id": sample["sample_id"],
        "source": sample.get("source") or "",
        "narrative_origin": sample.get("narrative_origin") or "",
    }
    for score in SCREEN_SCORES:
        if sample.get(score) is not None:
            data[score] = round(float(sample[score]), 4)
    task: dict[str, Any] = {"data": data}
    if narrative:
        prediction: dict[str, Any] = {
            "model_version": model_version,
            "result": [
                {
                    "from_name": "narrative_prompt",
                    "to_name": "image",
                    "type": "textarea",
                    "value": {"text": [narrative]},
                }
            ],
        }
        if sample.get("clip_score") is not None:
            prediction["score"] = round(float(sample["clip_score"]), 4)
        task["predictions"] = [prediction]
    return task


def parse_time(value: Any) -> datetime | None:
    """A Label Studio time (ISO text, or a datetime from the SDK's models) as aware UTC; None
    when there is none or it does not parse."""
    if value is None or value == "":
        return None
    if not isinstance(value, datetime):
        try:
            value = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            return None
    # Label Studio stores UTC
    return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)


def decision_of(
    annotation: dict[str, Any],
    sample_id: str,
    pushed_narrative: str | None,
    shown_before: Iterable[str] = (),
) -> Decision | None:
    """The decision one annotation records (see the module docstring), or None.

    ``shown_before``: narratives the task showed before ``push --refresh`` replaced them. A
    text equal to one of them is that text accepted (the annotator opened the task before the
    refresh), not a correction."""
    if annotation.get("was_cancelled"):
        return None
    choice, text, tags = None, None, []
    for item in annotation.get("result") or []:
        value = item.get("value") or {}
        if item.get("from_name") == "decision" and value.get("choices"):
            choice = value["choices"][0]
        elif item.get("from_name") == "narrative_prompt" and value.get("text"):
            text = " ".join(str(t) for t in value["text"]).strip() or None  # cleared: no edit
        elif item.get("from_name") == "problems":
            tags = [t for t in value.get("choices") or [] if t in PROBLEM_TAGS]
    pushed = (pushed_narrative or "").strip()
    earlier = {t.strip() for t in shown_before}
    edited = text is not None and text != pushed and text not in earlier
    if choice is None and not edited:
        return None
    common = {
        "sample_id": sample_id,
        "annotator": annotation.get("completed_by"),
        "tags": tuple(tags),
        "decided_at": parse_time(annotation.get("updated_at") or annotation.get("created_at")),
        "annotation_id": annotation.get("id"),
    }
    if choice == "reject":
        return Decision(status="rejected", narrative=None, **common)
    narrative = text if text else pushed  # an earlier text accepted is that text
    if not narrative:
        return None  # accepted an empty narrative: nothing to record
    return Decision(status="corrected" if edited else "accepted", narrative=narrative, **common)


def choose(decisions: list[Decision], policy: str = "latest") -> Decision | None:
    """The decision that counts for a task under ``policy``; None when none does."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r} (known: {', '.join(POLICIES)})")
    if not decisions:
        return None
    ordered = sorted(
        decisions, key=lambda d: (d.decided_at is not None, d.decided_at, d.annotation_id or 0)
    )
    if policy == "latest":
        return ordered[-1]
    if all(d.same_verdict(ordered[-1]) for d in ordered):
        return ordered[-1]
    return None


def agreement(tasks: Iterable[list[Decision]]) -> tuple[int, int]:
    """(tasks decided by two or more annotators, how many of them all agree), comparing each
    annotator's latest decision by status and text."""
    several = agreeing = 0
    for decisions in tasks:
        latest: dict[Any, Decision] = {}
        for decision in sorted(decisions, key=lambda d: (d.decided_at is not None, d.decided_at)):
            latest[decision.annotator] = decision
        if len(latest) < 2:
            continue
        several += 1
        verdicts = list(latest.values())
        agreeing += all(v.same_verdict(verdicts[0]) for v in verdicts)
    return several, agreeing
