"""``surd build rewrite``: write a narrative prompt for every sample with a keyword prompt.

Which samples: every sample with a keyword prompt (and, for captioners, a stored image), except
those whose narrative a human wrote, accepted or corrected (rewriting them would replace a
sentence a person approved) and, unless ``include_source_narratives``, those whose narrative came
with the source.

The cache: each narratives row carries its ``rewrite_key``, the hash of (backend, model, template,
generation settings, input). Every row ever written stays in the table's parts, so the table *is*
the cache: an input whose key has a stored answer gets that answer without running the model, a
re-run costs nothing, and a changed template or model redoes exactly the inputs whose key
changed. Samples that share a keyword prompt share a key and are generated once per batch (the
plan sorts by key so they meet in the same batch).

Every answer goes through :func:`~pipelines.rewriters.cleaning.clean_output` and
:func:`~pipelines.rewriters.cleaning.validation_problem`; an invalid answer is retried (sampling)
up to ``max_attempts`` times, then recorded as a failure with the validation reason. Cached and
current answers are re-validated, so tightened bounds redo exactly what no longer passes (a
narrative that fails again stays as it was, with a failure row saying why).

Before any input without a cached answer is rewritten, the plan checks the services the rewriter
needs (:meth:`~pipelines.rewriters.base.Rewriter.check_reachable`): a server that is down fails
the run at once, with one line, on the CLI and through ``run_stage`` alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.base import FAILURE_DETAIL, FAILURE_REASON, IMAGE_BYTES, Stage, WorkerNeeds
from pipelines.rewriters import ItemFailed, Rewriter, RewriteRequest
from pipelines.rewriters.cleaning import ValidationBounds, clean_output, validation_problem

if TYPE_CHECKING:
    from surd_builder.workspace import Workspace

CACHED_NARRATIVE = "cached_narrative"
# The narrative origins a rewrite leaves alone.
HUMAN_ORIGIN = "human"
HUMAN_DECISIONS = ("accepted", "corrected")
SOURCE_ORIGIN = "source"

ITEM_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("source_item_id", pa.string()),
        pa.field("complex_prompt", pa.string()),
        pa.field("image_sha256", pa.string()),
        pa.field("rewrite_key", pa.string()),
        pa.field(CACHED_NARRATIVE, pa.string()),
    ]
)


class RewriteStage(Stage):
    name: ClassVar[str] = "rewrite"
    output_table: ClassVar[str] = "narratives"

    def __init__(
        self,
        rewriter: Rewriter,
        bounds: ValidationBounds | None = None,
        max_attempts: int = 3,
        include_source_narratives: bool = False,
    ):
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.rewriter = rewriter
        self.bounds = bounds or ValidationBounds()
        self.max_attempts = max_attempts if rewriter.can_retry else 1
        self.include_source_narratives = include_source_narratives
        self.needs_images = rewriter.uses_image

    @property
    def cache_hits(self) -> int:
        """Answers taken from the cache by this stage object (its run's report has the total
        over every worker: ``stage_counts["cache_hits"]``)."""
        return self.counts["cache_hits"]

    def worker_needs(self) -> WorkerNeeds:
        return self.rewriter.worker_needs()

    def environment(self) -> tuple[str, ...]:
        return self.rewriter.environment()

    def params(self) -> dict[str, Any]:
        return {
            "rewriter": self.rewriter.params(),
            "origin": self.rewriter.origin,
            "min_words": self.bounds.min_words,
            "max_words": self.bounds.max_words,
            "max_attempts": self.max_attempts,
            "include_source_narratives": self.include_source_narratives,
        }

    # ----------------------------------------------------------------- plan (driver, I/O)
    def plan(self, workspace: Workspace) -> pa.Table:
        data = workspace.dataset()
        prompt = pc.utf8_trim_whitespace(data["complex_prompt"])
        wanted = pc.fill_null(pc.greater(pc.utf8_length(prompt), 0), False)
        origin = pc.fill_null(data["narrative_origin"], "")
        wanted = pc.and_(wanted, pc.not_equal(origin, HUMAN_ORIGIN))
        # a narrative a person accepted as it was is theirs too, whatever wrote it
        confirmed = pc.is_in(data["review_status"], pa.array(HUMAN_DECISIONS))
        wanted = pc.and_(wanted, pc.invert(confirmed))
        if not self.include_source_narratives:
            has_source_narrative = pc.and_(
                pc.equal(origin, SOURCE_ORIGIN), pc.is_valid(data["narrative_prompt"])
            )
            wanted = pc.and_(wanted, pc.invert(has_source_narrative))
        if self.rewriter.uses_image:
            wanted = pc.and_(wanted, pc.is_valid(data["image_sha256"]))
        data = data.filter(wanted)

        prompts = data["complex_prompt"].to_pylist()
        shas = data["image_sha256"].to_pylist()
        keys = [self.rewriter.cache_key(p, s) for p, s in zip(prompts, shas, strict=True)]
        cache = self._cached_answers(workspace, set(keys))
        items = pa.table(
            {
                "sample_id": data["sample_id"],
                "source": data["source"],
                "source_item_id": data["source_item_id"],
                "complex_prompt": prompts,
                "image_sha256": shas,
                "rewrite_key": keys,
                CACHED_NARRATIVE: [cache.get(k) for k in keys],
            },
            schema=ITEM_SCHEMA,
        )
        if pc.any(pc.is_null(items[CACHED_NARRATIVE])).as_py():
            # the rewriter will be asked: a server it needs that is down (an LLM server, a
            # captioner's merge server) stops the run here, on the driver, with one line, before
            # any worker starts, any model loads or any request is retried
            self.rewriter.check_reachable()
        return items.sort_by([("rewrite_key", "ascending"), ("sample_id", "ascending")])

    def _cached_answers(self, workspace: Workspace, keys: set[str]) -> dict[str, str]:
        """rewrite_key -> the latest stored narrative with that key, from all parts ever written
        (superseded rows included: they are still valid answers for their key)."""
        history = workspace.read_table_history(
            self.output_table, ["rewrite_key", "narrative_prompt"]
        )
        if history.num_rows == 0 or not keys:
            return {}
        history = history.filter(pc.is_in(history["rewrite_key"], pa.array(sorted(keys))))
        return dict(
            zip(
                history["rewrite_key"].to_pylist(),
                history["narrative_prompt"].to_pylist(),
                strict=True,
            )
        )

    def done_ids(self, workspace: Workspace, items: pa.Table) -> set[str]:
        """Samples whose current narrative was written for exactly this key and still passes
        validation under the current bounds (tightened bounds redo what no longer passes)."""
        current = workspace.read_table(self.output_table, ["rewrite_key", "narrative_prompt"])
        if current.num_rows == 0:
            return set()
        stored = {
            row["sample_id"]: (row["rewrite_key"], row["narrative_prompt"])
            for row in current.to_pylist()
        }
        done = set()
        for sample_id, key, prompt in zip(
            items["sample_id"].to_pylist(),
            items["rewrite_key"].to_pylist(),
            items["complex_prompt"].to_pylist(),
            strict=True,
        ):
            stored_key, narrative = stored.get(sample_id, (None, None))
            if (
                stored_key == key
                and narrative is not None
                and validation_problem(narrative, prompt, self.bounds) is None
            ):
                done.add(sample_id)
        return done

    # ----------------------------------------------------------------- process (pure)
    def process(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        answers: dict[str, str] = {}  # rewrite_key -> valid narrative
        failures: dict[str, tuple[str, str]] = {}  # rewrite_key -> (reason, detail)
        first_row: dict[str, dict[str, Any]] = {}
        for row in rows:
            first_row.setdefault(row["rewrite_key"], row)

        for key, row in first_row.items():
            cached = row[CACHED_NARRATIVE]
            if cached and validation_problem(cached, row["complex_prompt"], self.bounds) is None:
                answers[key] = cached
                self.count("cache_hits")
        pending = [key for key in first_row if key not in answers]
        for attempt in range(self.max_attempts):
            if not pending:
                break
            requests = [
                RewriteRequest(first_row[k]["complex_prompt"], first_row[k].get(IMAGE_BYTES))
                for k in pending
            ]
            raw_answers = self.rewriter.generate(requests, attempt)
            retry = []
            for key, raw in zip(pending, raw_answers, strict=True):
                if isinstance(raw, ItemFailed):
                    failures[key] = (raw.reason, raw.detail)
                    continue  # the backend already retried what can be retried
                narrative = clean_output(raw)
                problem = validation_problem(
                    narrative, first_row[key]["complex_prompt"], self.bounds
                )
                if problem is None:
                    answers[key] = narrative
                    failures.pop(key, None)
                else:
                    failures[key] = (f"invalid-{problem}", raw.strip()[:300])
                    retry.append(key)
            pending = retry

        origin = self.rewriter.origin
        out: dict[str, list[Any]] = {
            "sample_id": [],
            "source": [],
            "source_item_id": [],
            "narrative_prompt": [],
            "narrative_origin": [],
            "rewrite_key": [],
            FAILURE_REASON: [],
            FAILURE_DETAIL: [],
        }
        for row in rows:
            key = row["rewrite_key"]
            reason, detail = failures.get(key, (None, None)) if key not in answers else (None, None)
            out["sample_id"].append(row["sample_id"])
            out["source"].append(row["source"])
            out["source_item_id"].append(row["source_item_id"])
            out["narrative_prompt"].append(answers.get(key))
            out["narrative_origin"].append(origin if key in answers else None)
            out["rewrite_key"].append(key)
            out[FAILURE_REASON].append(reason)
            out[FAILURE_DETAIL].append(detail)
        return pa.table(out)
