"""``surd annotate push``: send the samples that need a human decision to Label Studio.

Which samples: those with a narrative prompt and an image whose review is still ``pending``
(auto-rejected ones too with ``include_auto_rejected``), most doubtful first
(:func:`surd_builder.review.review_priority`). Idempotent: a sample already in the ledger or already
a task of the project (asked of the server, so a lost ledger or a push from another machine is
no problem) is never sent again. The server's task list is read only when the ledger and the
server disagree on the number of tasks, so a re-push with nothing new costs two small requests.
Tasks go in batches; each batch's task ids are added to the ledger as soon as Label Studio
returns them, so an interrupted push resumes where it stopped.

``refresh``: tasks showing an older narrative than the workspace's current one (rewritten since
the push) get the new text in their data and prediction, unless someone already annotated them
(then the annotation stands, and pull compares it with what that annotator was shown).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from annotation.client import LabelStudioClient, Project
from annotation.image_files import image_file
from annotation.ledger import Ledger
from annotation.tasks import (
    DEFAULT_IMAGE_URL,
    IMAGE_PLACEHOLDERS,
    data_uri,
    image_url,
    sample_to_task,
)
from surd_builder.errors import InputError
from surd_builder.progress import progress_bar
from surd_builder.review import SCREEN_REVIEWER, SCREEN_SCORES, review_priority
from surd_builder.workspace import Workspace

# what a refresh rewrites in a task's data (the rest, the image address among it, stays)
_REFRESHED_FIELDS = ("narrative_prompt", "narrative_origin", *SCREEN_SCORES)
# what a task shows of a sample (annotation.tasks.sample_to_task)
_TASK_COLUMNS = [
    "sample_id",
    "source",
    "image_sha256",
    "image_format",
    "complex_prompt",
    "narrative_prompt",
    "narrative_origin",
    *SCREEN_SCORES,
]


@dataclass(frozen=True)
class PushOptions:
    image_url_template: str = DEFAULT_IMAGE_URL
    embed_images: bool = False  # base64 data URIs in the tasks: explicit only
    batch_size: int = 500
    limit: int | None = None
    include_auto_rejected: bool = False
    refresh: bool = False
    local_files: str | None = None  # a folder Label Studio serves (its project storage)
    show_progress: bool = True

    def __post_init__(self) -> None:
        if not self.embed_images and not any(
            p in self.image_url_template for p in IMAGE_PLACEHOLDERS
        ):
            raise InputError(
                "--image-url-template needs {image_sha256}, {sample_id} or {image_file}, e.g. "
                f"{DEFAULT_IMAGE_URL}"
            )
        if self.batch_size < 1:
            raise InputError("--batch-size must be at least 1")


@dataclass
class PushReport:
    project: Project
    created_project: bool
    candidates: int = 0
    already_in_project: int = 0
    pushed: int = 0
    stale: int = 0  # tasks showing an older narrative than the workspace's current one
    refreshed: int = 0  # of those, updated to the current one (refresh)
    stale_annotated: int = 0  # of those, left as they are: already annotated
    listed_server: bool = False  # whether the server's task list had to be read
    seconds: float = 0.0
    by_origin: dict[str, int] = field(default_factory=dict)


def samples_to_review(workspace: Workspace, include_auto_rejected: bool = False) -> pa.Table:
    """Samples that need a person, most doubtful first."""
    data = workspace.dataset()
    has_text = pc.fill_null(pc.greater(pc.utf8_length(data["narrative_prompt"]), 0), False)
    wanted = pc.and_(has_text, pc.is_valid(data["image_sha256"]))
    status = data["review_status"]
    pending = pc.equal(status, "pending")
    if include_auto_rejected:
        auto = pc.and_(
            pc.equal(status, "rejected"),
            pc.fill_null(pc.equal(data["reviewer"], SCREEN_REVIEWER), False),
        )
        pending = pc.or_(pending, auto)
    duplicate = pc.fill_null(
        pc.and_(
            pc.is_valid(data["duplicate_of"]),
            pc.not_equal(data["duplicate_of"], data["sample_id"]),
        ),
        False,
    )
    data = data.filter(pc.and_(pc.and_(wanted, pending), pc.invert(duplicate)))
    return data.take(review_priority(data))


def push(
    workspace: Workspace, client: LabelStudioClient, title: str, options: PushOptions
) -> PushReport:
    started = time.perf_counter()
    with workspace.stage_lock("annotate"):
        project, created = client.find_or_create_project(
            title, description="surd: check and correct narrative prompts"
        )
        report = PushReport(project, created)
        if options.local_files:
            client.ensure_local_storage(project, options.local_files)
        ledger = Ledger(workspace, client.url, project.id)
        known = ledger.read()
        on_server: dict[str, tuple[int, str | None]] = {}
        if not created and project.task_count != len(known):
            # tasks the server has but the ledger lacks (pushed from elsewhere, or a lost
            # ledger): adopt them, recorded with the narrative they show
            on_server = client.task_sample_ids(project)
            report.listed_server = True
        adopted = {s: t for s, t in on_server.items() if s not in known}
        candidates = samples_to_review(workspace, options.include_auto_rejected)
        report.candidates = candidates.num_rows
        if adopted:
            ids = sorted(adopted)
            ledger.add(ids, [adopted[s][0] for s in ids], [adopted[s][1] for s in ids])
            known = {**known, **adopted}
        current = dict(
            zip(
                candidates["sample_id"].to_pylist(),
                candidates["narrative_prompt"].to_pylist(),
                strict=True,
            )
        )
        stale = {
            s: task_id
            for s, (task_id, text) in known.items()
            if text is not None and s in current and text != current[s]
        }
        report.stale = len(stale)
        if options.refresh and stale:
            _refresh(client, project, ledger, candidates, stale, options, report)
        done = set(known)  # adopted tasks included
        todo = candidates.filter(
            pc.invert(pc.is_in(candidates["sample_id"], pa.array(sorted(done), pa.string())))
        )
        report.already_in_project = candidates.num_rows - todo.num_rows
        if options.limit is not None:
            todo = todo.slice(0, options.limit)
        rows = todo.select(_TASK_COLUMNS).to_pylist()
        with progress_bar("push", len(rows), options.show_progress) as advance:
            for start in range(0, len(rows), options.batch_size):
                batch = rows[start : start + options.batch_size]
                images = {}
                if options.embed_images:
                    images = workspace.read_images(r["image_sha256"] for r in batch)
                tasks = []
                for row in batch:
                    if options.embed_images:
                        image = data_uri(images[row["image_sha256"]])
                    else:
                        image = image_url(
                            options.image_url_template,
                            row["image_sha256"],
                            row["sample_id"],
                            image_file(row["image_sha256"], row["image_format"]),
                        )
                    tasks.append(sample_to_task(row, image, project.model_version))
                task_ids = client.import_tasks(project, tasks)
                ledger.add(
                    [r["sample_id"] for r in batch],
                    task_ids,
                    [r["narrative_prompt"] for r in batch],
                )
                report.pushed += len(batch)
                for row in batch:
                    origin = row["narrative_origin"] or "unknown"
                    report.by_origin[origin] = report.by_origin.get(origin, 0) + 1
                advance(len(batch))
        report.seconds = time.perf_counter() - started
        return report


def _refresh(
    client: LabelStudioClient,
    project: Project,
    ledger: Ledger,
    candidates: pa.Table,
    stale: dict[str, int],
    options: PushOptions,
    report: PushReport,
) -> None:
    """Bring stale, unannotated tasks to the current narrative (data and prediction)."""
    rows = {
        row["sample_id"]: row
        for row in candidates.filter(
            pc.is_in(candidates["sample_id"], pa.array(sorted(stale), pa.string()))
        )
        .select(_TASK_COLUMNS)
        .to_pylist()
    }
    tasks = client.export_tasks(project, ids=sorted(stale.values()))
    with progress_bar("refresh", len(tasks), options.show_progress) as advance:
        for task in tasks:
            advance(1)
            data = task.get("data") or {}
            sample_id = str(data.get("sample_id") or "")
            row = rows.get(sample_id)
            if row is None:
                continue
            if task.get("annotations") or task.get("drafts") or task.get("total_annotations"):
                # someone decided (or skipped, or is writing a draft) on what they were shown
                report.stale_annotated += 1
                continue
            # the same picture, the new text and scores: the task's image address stays
            updated = sample_to_task(row, data.get("image") or "", project.model_version)
            kept = {k: v for k, v in data.items() if k not in _REFRESHED_FIELDS}
            client.update_task(task["id"], {**kept, **updated["data"]})
            client.replace_narrative_prediction(task["id"], updated["predictions"][0])
            # recorded at once: a refresh that stops part way has the rest to do, no more
            ledger.add([sample_id], [task["id"]], [row["narrative_prompt"]])
            report.refreshed += 1
