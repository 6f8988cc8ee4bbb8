"""``surd build screen``: score every sample so doubtful ones reach reviewers first.

Four scores, each optional (give at least one model):

- ``clip_score``: image <-> narrative prompt (does the sentence say what the image shows?);
- ``text_similarity``: narrative <-> keyword prompt, with prompt syntax (weights, LoRA tags)
  removed first (did the rewrite keep the meaning?);
- ``judge_score``: a vision-language model's probability that the narrative matches the image
  (:mod:`pipelines.judge`; it reads the sentence, so it sees wrong counts and colours);
- ``aesthetic_score``: a LAION-style aesthetic head over the CLIP image embedding the CLIP score
  computes in the same pass (:mod:`pipelines.aesthetic`; about 1..10). It is about the picture,
  not the narrative, so review priority does not read it (``review.SCREEN_SCORES``).

Thresholds (``min_clip_score``, ``min_text_similarity``, ``min_judge_score``,
``min_aesthetic_score``) auto-reject: the screening row then carries ``review_status =
rejected``, ``reviewer = surd-screen`` and tags naming the low scores. The screening table comes
before ``reviews`` in the join, so a human's decision still wins, and a re-run with other
thresholds moves samples in or out without recomputing a score: scores are cached by
``screening_key`` (models + image + both prompts + the judge + the aesthetic head's file hash),
and a sample is done only when its key and its verdict under the current thresholds both match
what is stored.

:func:`surd_builder.review.review_priority` orders samples most doubtful first; the annotation
stage pushes tasks in that order.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.aesthetic import AestheticHead
from pipelines.base import (
    FAILURE_DETAIL,
    FAILURE_REASON,
    IMAGE_BYTES,
    Stage,
    WorkerNeeds,
    shared_device,
)
from pipelines.judge import Judge
from pipelines.rewriters.base import ItemFailed
from pipelines.rewriters.rules import strip_prompt_syntax
from pipelines.scorers import ClipScorer, TextEmbedder
from surd_builder.ids import text_key
from surd_builder.review import SCREEN_REVIEWER, SCREEN_SCORES
from surd_builder.schema import SAMPLE_SCHEMA
from surd_builder.workspace import utc_now

if TYPE_CHECKING:
    from surd_builder.workspace import Workspace

LOW_CLIP_TAG = "low-clip-score"
LOW_TEXT_TAG = "low-text-similarity"
LOW_JUDGE_TAG = "low-judge-score"
LOW_AESTHETIC_TAG = "low-aesthetic-score"
AESTHETIC_SCORE = "aesthetic_score"
# each one's column, in the order Thresholds.tags takes them: the review scores, then the
# picture's own (cached like them, but not a review priority)
SCORES = (*SCREEN_SCORES, AESTHETIC_SCORE)
CACHED = tuple(f"cached_{score}" for score in SCORES)


@dataclass(frozen=True)
class Thresholds:
    min_clip_score: float | None = None
    min_text_similarity: float | None = None
    min_judge_score: float | None = None
    min_aesthetic_score: float | None = None

    def tags(
        self,
        clip_score: float | None,
        text_similarity: float | None,
        judge_score: float | None = None,
        aesthetic_score: float | None = None,
    ) -> list[str]:
        """The problems a sample's scores show (empty: it passes). A missing score never
        rejects: no evidence is not evidence of a bad sample."""
        checks = (
            (self.min_clip_score, clip_score, LOW_CLIP_TAG),
            (self.min_text_similarity, text_similarity, LOW_TEXT_TAG),
            (self.min_judge_score, judge_score, LOW_JUDGE_TAG),
            (self.min_aesthetic_score, aesthetic_score, LOW_AESTHETIC_TAG),
        )
        return [
            tag
            for minimum, score, tag in checks
            if minimum is not None and score is not None and score < minimum
        ]


class ScreenStage(Stage):
    name: ClassVar[str] = "screen"
    output_table: ClassVar[str] = "screening"

    def __init__(
        self,
        clip: ClipScorer | None = None,
        text: TextEmbedder | None = None,
        thresholds: Thresholds | None = None,
        judge: Judge | None = None,
        aesthetic: AestheticHead | None = None,
    ):
        if clip is None and text is None and judge is None:
            raise ValueError("screening needs a CLIP model, a text model or a judge")
        if aesthetic is not None and clip is None:
            raise ValueError("an aesthetic head reads CLIP image embeddings: give a CLIP model")
        self.clip, self.text, self.judge = clip, text, judge
        self.aesthetic = aesthetic
        self.thresholds = thresholds or Thresholds()
        self.needs_images = clip is not None or judge is not None

    @property
    def scored(self) -> int:
        """Samples this stage object scored with a model (not from the cache); the run's
        report has the total over every worker (``stage_counts["scored"]``)."""
        return self.counts["scored"]

    def worker_needs(self) -> WorkerNeeds:
        models = [model for model in (self.clip, self.text, self.judge) if model is not None]
        needs = WorkerNeeds(device=shared_device(*(model.device_option for model in models)))
        if self.judge is not None and self.clip is None and self.text is None:
            return self.judge.worker_needs()  # a server judge: threads waiting, not a device
        return needs

    def environment(self) -> tuple[str, ...]:
        return self.judge.environment() if self.judge is not None else ()

    def params(self) -> dict[str, Any]:
        return {
            "clip_model": self.clip.model if self.clip else None,
            "text_model": self.text.model if self.text else None,
            "judge": self.judge.identity() if self.judge else None,
            "min_clip_score": self.thresholds.min_clip_score,
            "min_text_similarity": self.thresholds.min_text_similarity,
            "min_judge_score": self.thresholds.min_judge_score,
            "aesthetic_model": self.aesthetic.path if self.aesthetic else None,
            "min_aesthetic_score": self.thresholds.min_aesthetic_score,
        }

    def screening_key(self, image_sha256: str | None, narrative: str, keywords: str) -> str:
        identity = {
            "clip": self.clip.model if self.clip else None,
            "text": self.text.model if self.text else None,
            "image": image_sha256 if (self.clip or self.judge) else None,
            "narrative": text_key(narrative),
            "keywords": text_key(keywords) if self.text else None,
        }
        if self.judge is not None:  # absent otherwise: keys of earlier screenings stay valid
            identity["judge"] = self.judge.identity()
        if self.aesthetic is not None:  # likewise
            identity["aesthetic"] = self.aesthetic.identity()
        canonical = json.dumps(identity, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()[:32]

    # ----------------------------------------------------------------- plan (driver, I/O)
    def plan(self, workspace: Workspace) -> pa.Table:
        data = workspace.dataset()
        data = data.filter(
            pc.fill_null(pc.greater(pc.utf8_length(data["narrative_prompt"]), 0), False)
        )
        shas = data["image_sha256"].to_pylist()
        narratives = data["narrative_prompt"].to_pylist()
        keywords = [k or "" for k in data["complex_prompt"].to_pylist()]
        keys = [
            self.screening_key(s, n, k) for s, n, k in zip(shas, narratives, keywords, strict=True)
        ]
        # every row ever written: a narrative changed and changed back finds its old scores
        stored = workspace.read_table_history(self.output_table, ["screening_key", *SCORES])
        by_key = {
            key: scores
            for key, *scores in zip(
                stored["screening_key"].to_pylist(),
                *(stored[score].to_pylist() for score in SCORES),
                strict=True,
            )
            if key is not None
        }
        cached = [by_key.get(k, (None,) * len(SCORES)) for k in keys]
        if not all(k in by_key for k in keys):
            if self.judge is not None:
                self.judge.check_reachable()  # a judge server that is down or refuses images
            if self.aesthetic is not None and self.clip is not None:
                self.aesthetic.check_clip(self.clip)  # a head for another CLIP: now, not later
        return pa.table(
            {
                "sample_id": data["sample_id"],
                "source": data["source"],
                "source_item_id": data["source_item_id"],
                "image_sha256": pa.array(shas, pa.string()),
                "narrative_prompt": pa.array(narratives, pa.string()),
                "complex_prompt": pa.array(keywords, pa.string()),
                "screening_key": pa.array(keys, pa.string()),
                "has_cache": pa.array([k in by_key for k in keys]),
                **{
                    name: pa.array([c[position] for c in cached], pa.float32())
                    for position, name in enumerate(CACHED)
                },
            }
        )

    def done_ids(self, workspace: Workspace, items: pa.Table) -> set[str]:
        """Same key and the same verdict under the current thresholds as stored."""
        current = workspace.read_table(
            self.output_table, ["screening_key", *SCORES, "review_status"]
        )
        stored = {row["sample_id"]: row for row in current.to_pylist()}
        done = set()
        for sample_id, key in zip(
            items["sample_id"].to_pylist(), items["screening_key"].to_pylist(), strict=True
        ):
            row = stored.get(sample_id)
            if row is None or row["screening_key"] != key:
                continue
            rejected = bool(self.thresholds.tags(*(row[score] for score in SCORES)))
            if rejected == (row["review_status"] == "rejected"):
                done.add(sample_id)
        return done

    # ----------------------------------------------------------------- process (pure)
    def process(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        clip_scores = [r[CACHED[0]] for r in rows]
        text_scores = [r[CACHED[1]] for r in rows]
        judge_scores = [r[CACHED[2]] for r in rows]
        aesthetic_scores = [r[CACHED[3]] for r in rows]
        failures: dict[int, ItemFailed] = {}
        todo = [i for i, r in enumerate(rows) if not r["has_cache"]]
        if self.clip is not None:
            with_image = [i for i in todo if rows[i].get(IMAGE_BYTES) is not None]
            images = [rows[i][IMAGE_BYTES] for i in with_image]
            narratives = [rows[i]["narrative_prompt"] for i in with_image]
            if self.aesthetic is None:
                scores = self.clip.scores(images, narratives)
            else:  # the head reads the image embeddings the CLIP score computed
                scores, embeddings = self.clip.scores_and_image_features(images, narratives)
                for index, value in zip(with_image, self.aesthetic.scores(embeddings), strict=True):
                    aesthetic_scores[index] = value
            for index, score in zip(with_image, scores, strict=True):
                clip_scores[index] = score
        with_keywords = [i for i in todo if rows[i]["complex_prompt"].strip()]
        if self.text is not None and with_keywords:
            similarities = self.text.similarities(
                [rows[i]["narrative_prompt"] for i in with_keywords],
                [strip_prompt_syntax(rows[i]["complex_prompt"]) for i in with_keywords],
            )
            for index, similarity in zip(with_keywords, similarities, strict=True):
                text_scores[index] = similarity
        if self.judge is not None:
            with_image = [i for i in todo if rows[i].get(IMAGE_BYTES) is not None]
            verdicts = self.judge.scores(
                [rows[i][IMAGE_BYTES] for i in with_image],
                [rows[i]["narrative_prompt"] for i in with_image],
            )
            for index, verdict in zip(with_image, verdicts, strict=True):
                if isinstance(verdict, ItemFailed):
                    # a failure row (reason, detail) instead of the screening row: the sample
                    # is not done, so the next run asks again
                    failures[index] = verdict
                else:
                    judge_scores[index] = verdict
        self.count("scored", len(todo))

        now = utc_now()
        tags = [
            self.thresholds.tags(*scores)
            for scores in zip(clip_scores, text_scores, judge_scores, aesthetic_scores, strict=True)
        ]
        timestamp = SAMPLE_SCHEMA.field("reviewed_at").type
        failed = [failures.get(index) for index in range(len(rows))]
        return pa.table(
            {
                "sample_id": batch["sample_id"],
                "source": batch["source"],
                "source_item_id": batch["source_item_id"],
                "clip_score": pa.array(clip_scores, pa.float32()),
                "text_similarity": pa.array(text_scores, pa.float32()),
                "judge_score": pa.array(judge_scores, pa.float32()),
                AESTHETIC_SCORE: pa.array(aesthetic_scores, pa.float32()),
                "screening_key": batch["screening_key"],
                "review_status": pa.array(["rejected" if t else None for t in tags], pa.string()),
                "review_tags": pa.array([t or None for t in tags], pa.list_(pa.string())),
                "reviewer": pa.array([SCREEN_REVIEWER if t else None for t in tags], pa.string()),
                "reviewed_at": pa.array([now if t else None for t in tags], timestamp),
                FAILURE_REASON: pa.array([f.reason if f else None for f in failed], pa.string()),
                FAILURE_DETAIL: pa.array([f.detail if f else None for f in failed], pa.string()),
            }
        )
