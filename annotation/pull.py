"""``surd annotate pull`` and ``surd annotate status``: read decisions back from Label Studio.

Pull exports the project's tasks with their annotations, turns each task's annotations into one
decision (:mod:`annotation.tasks`: reading rules and the ``latest`` / ``unanimous`` policy) and
writes it to the workspace's ``reviews`` table:

- accepted / corrected: ``narrative_prompt`` (the annotator's text), ``narrative_origin =
  human``, ``review_status``, ``reviewer`` (the annotator's e-mail), ``reviewed_at`` (the
  annotation's last update), and the problem tags;
- rejected: status, tags, reviewer and time, no narrative: the sample's narrative is then the
  rewriter's again, even if an earlier review had corrected it (a rejected sample is not
  exported, and a later accept brings a human text back);
- skipped or unanswered: nothing; the sample stays pending.

A decision is written only when it is newer than the sample's current review, so a re-pull
writes nothing and an old annotation never replaces a newer decision.

Cost: what changed, not what the project holds. The workspace mirrors what it last read of the
project (:mod:`annotation.mirror`: each task's update time and decisions); a pull lists only
the ids and times of tasks updated since the last read began, exports only those whose time
moved, and then applies the decisions of every mirrored task (a local step), so the outcome is
what reading every task would give. The first pull exports the annotated tasks (Label Studio's
task listing costs far more than its export: 6 s for the ids of 20,000 tasks); pending counts
come from the project's task count. Pull adds decisions; it
does not take one back: an annotation deleted in Label Studio, or (``unanimous``) a late
dissent, leaves the decision already pulled in place (review such samples again to change it).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from annotation.client import LabelStudioClient, Project
from annotation.ledger import Ledger
from annotation.mirror import Mirror, MirrorState, TaskState, next_since
from annotation.tasks import Decision, agreement, choose, decision_of, parse_time
from surd_builder.schema import records_to_table, table_spec
from surd_builder.workspace import Workspace

HUMAN_ORIGIN = "human"


@dataclass
class PullReport:
    project: str
    tasks: int = 0  # in the project
    read: int = 0  # tasks exported this time (new or changed since the last read)
    decided: int = 0
    written: dict[str, int] = field(default_factory=dict)  # review_status -> rows written
    unchanged: int = 0  # decisions already in the workspace (or older than what is)
    pending: int = 0  # tasks with no decision yet (skipped, unanswered)
    conflicts: int = 0  # unanimous policy: annotators disagree, left pending
    unknown_samples: int = 0  # tasks whose sample_id this workspace does not have
    several_annotators: int = 0
    agreeing: int = 0

    @property
    def agreement(self) -> float | None:
        return self.agreeing / self.several_annotators if self.several_annotators else None


@dataclass
class ProjectStatus:
    project: str
    tasks: int = 0
    read: int = 0
    by_status: Counter = field(default_factory=Counter)  # with "pending"
    by_annotator: dict[str, Counter] = field(default_factory=dict)


@dataclass
class ProjectRead:
    """The project as the mirror holds it after reading what changed."""

    project: Project
    tasks: dict[int, TaskState]  # every task read so far (never-annotated ones are not)
    read: int  # tasks exported this time
    users: dict[int, str]


def task_state(
    task: dict[str, Any],
    pushed: dict[str, tuple[int, str | None]],
    history: dict[str, list[str]] | None = None,
) -> TaskState:
    """One exported task as the mirror keeps it: its sample and its annotations' decisions."""
    data = task.get("data") or {}
    sample_id = str(data.get("sample_id") or "") or None
    # compare with what the annotator was shown: the task's own text (the ledger's copy only
    # for tasks pushed before surd put it in the task data), or a text it showed before a
    # refresh
    narrative = data.get("narrative_prompt")
    if narrative is None and sample_id is not None:
        narrative = pushed.get(sample_id, (None, None))[1]
    decisions: tuple[Decision, ...] = ()
    if sample_id is not None:
        earlier = (history or {}).get(sample_id, ())
        decisions = tuple(
            d
            for a in task.get("annotations") or []
            if (d := decision_of(a, sample_id, narrative, earlier)) is not None
        )
    return TaskState(sample_id, None, decisions)


def read_project(
    client: LabelStudioClient, workspace: Workspace, title: str, full: bool = False
) -> ProjectRead:
    """Bring the workspace's mirror of ``title`` up to date, reading only what changed
    (``full``: everything again, as on a first read)."""
    project = client.project(title)  # its task count, and the server's clock before reading
    ledger = Ledger(workspace, client.url, project.id)
    mirror = Mirror(ledger.folder)
    before = MirrorState() if full else mirror.read()
    tasks = dict(before.tasks)
    newest_listed = None
    times: dict[int, datetime | None] = {}
    if before.since is None:  # never read: every annotated task (skipped ones too)
        tasks = {}
        _, max_task_id = client.tasks_after(project, 0)
        exported = client.export_tasks(project, annotated_only=True)
    else:
        created, max_task_id = client.tasks_after(project, before.max_task_id)
        listed = client.task_times(project, since=before.since)
        times = {task_id: time for task_id, (time, _) in listed.items()}
        known_times = [time for time in times.values() if time is not None]
        newest_listed = max(known_times) if known_times else None
        todo = []
        for task_id, (time, annotations) in listed.items():
            held = tasks.get(task_id)
            if held is None and annotations == 0:
                # new, or changed without being annotated (say its prediction): nothing to
                # decide; kept while inside the overlap, so the next read does not fetch it
                tasks[task_id] = TaskState(None, time)
            elif held is None or time is None or held.updated_at is None or time > held.updated_at:
                todo.append(task_id)
        if (
            project.task_count is not None
            and before.task_count is not None
            and project.task_count < before.task_count + created
        ):
            # fewer tasks than before plus those created since: some were deleted; check the
            # ones held (only a task still there is exported)
            todo = sorted(set(todo) | {i for i, held in tasks.items() if held.decisions})
        exported = client.export_tasks(project, ids=todo) if todo else []
        for task_id in set(todo) - {task["id"] for task in exported}:
            tasks.pop(task_id, None)  # listed or held, not exported: deleted
    pushed, history = ledger.read_with_history() if exported else ({}, {})
    for task in exported:
        state = task_state(task, pushed, history)
        # the listing's time when there is one (taken before the export): if the task changed
        # in between, the next listing shows a newer time and it is read again
        time = times.get(task["id"]) or parse_time(task.get("updated_at"))
        tasks[task["id"]] = TaskState(state.sample_id, time, state.decisions)
    since = next_since(project.read_at, newest_listed)
    # a task with nothing to decide is needed only while the next listing can show it unchanged
    tasks = {
        task_id: state
        for task_id, state in tasks.items()
        if state.decisions or (state.updated_at is not None and state.updated_at >= since)
    }
    after = MirrorState(tasks, since, project.task_count, max(max_task_id, before.max_task_id))
    if after != before:
        mirror.write(after)
    return ProjectRead(project, tasks, len(exported), client.users())


def pull(
    workspace: Workspace,
    client: LabelStudioClient,
    title: str,
    policy: str = "latest",
    full: bool = False,
) -> PullReport:
    report = PullReport(title)
    with workspace.stage_lock("annotate"):
        project = read_project(client, workspace, title, full)
        users = project.users
        report.tasks = project.project.task_count or 0
        report.read = project.read
        of_samples = [s for s in project.tasks.values() if s.sample_id is not None]
        report.several_annotators, report.agreeing = agreement(
            list(s.decisions) for s in of_samples
        )
        known = set(workspace.read_table("samples", ["sample_id"])["sample_id"].to_pylist())
        current = {
            row["sample_id"]: row["reviewed_at"]
            for row in workspace.read_table("reviews", ["reviewed_at"]).to_pylist()
        }
        rows, now = [], datetime.now(UTC)
        for state in of_samples:
            sample_id = state.sample_id
            if sample_id not in known:
                report.unknown_samples += 1
                continue
            chosen = choose(list(state.decisions), policy)
            if chosen is None:
                report.conflicts += bool(state.decisions)
                continue
            if chosen.decided_at is None:  # no time to order it by: cannot apply it safely
                continue
            report.decided += 1
            decided_at = chosen.decided_at
            previous = current.get(sample_id)
            if previous is not None and previous >= decided_at:
                report.unchanged += 1
                continue
            rows.append(
                {
                    "sample_id": sample_id,
                    "narrative_prompt": chosen.narrative,
                    "narrative_origin": HUMAN_ORIGIN if chosen.narrative is not None else None,
                    "review_status": chosen.status,
                    "review_tags": list(chosen.tags),
                    "reviewer": users.get(chosen.annotator, str(chosen.annotator)),
                    "reviewed_at": decided_at,
                    "updated_at": now,
                }
            )
            report.written[chosen.status] = report.written.get(chosen.status, 0) + 1
        if rows:
            workspace.write_table_part(
                "reviews", records_to_table(rows, table_spec("reviews").schema)
            )
        # from the totals: every task neither decided, in conflict, nor of an unknown sample
        report.pending = max(
            0, report.tasks - report.decided - report.conflicts - report.unknown_samples
        )
        return report


def project_status(
    workspace: Workspace,
    client: LabelStudioClient,
    title: str,
    policy: str = "latest",
    full: bool = False,
) -> ProjectStatus:
    """Counts on the server: the decision of each task under ``policy`` (pending when none),
    and each annotator's own latest decisions. It writes no decision to the workspace, but
    like pull it reads only what changed and brings the mirror up to date."""
    project = read_project(client, workspace, title, full)
    users = project.users
    total = project.project.task_count or 0
    status = ProjectStatus(title, total, project.read)
    by_annotator: dict[str, Counter] = defaultdict(Counter)
    decided = 0
    for state in project.tasks.values():
        chosen = choose(list(state.decisions), policy)
        if chosen is not None:
            status.by_status[chosen.status] += 1
            decided += 1
        latest: dict[object, Decision] = {}
        ordered = sorted(state.decisions, key=lambda d: (d.decided_at is not None, d.decided_at))
        for decision in ordered:
            latest[decision.annotator] = decision
        for annotator, decision in latest.items():
            by_annotator[users.get(annotator, str(annotator))][decision.status] += 1
    status.by_status["pending"] += max(0, total - decided)  # from the totals
    status.by_annotator = dict(sorted(by_annotator.items()))
    return status
