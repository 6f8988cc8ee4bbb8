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
writes nothing and an old annotation never replaces a newer decision. Pull adds decisions; it
does not take one back: an annotation deleted in Label Studio, or (``unanimous``) a late
dissent, leaves the decision already pulled in place (review such samples again to change it).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime

from annotation.client import LabelStudioClient
from annotation.ledger import Ledger
from annotation.tasks import Decision, agreement, choose, decision_of
from surd_builder.schema import records_to_table, table_spec
from surd_builder.workspace import Workspace

HUMAN_ORIGIN = "human"


@dataclass
class PullReport:
    project: str
    tasks: int = 0
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
    by_status: Counter = field(default_factory=Counter)  # with "pending"
    by_annotator: dict[str, Counter] = field(default_factory=dict)


def task_decisions(
    client: LabelStudioClient, workspace: Workspace, title: str
) -> tuple[list[tuple[str, list[Decision]]], dict[int, str], int]:
    """([(sample_id, decisions of its task)], user id -> name, number of tasks)."""
    project = client.project(title)
    exported = client.export_tasks(project)
    pushed = Ledger(workspace, client.url, project.id).read()
    users = client.users()
    result = []
    for task in exported:
        sample_id = str((task.get("data") or {}).get("sample_id") or "")
        if not sample_id:
            continue
        # compare with what the annotator was shown: the task's own text (the ledger's copy
        # only for tasks pushed before surd put it in the task data)
        narrative = (task.get("data") or {}).get("narrative_prompt")
        if narrative is None:
            narrative = pushed.get(sample_id, (None, None))[1]
        decisions = [
            d
            for a in task.get("annotations") or []
            if (d := decision_of(a, sample_id, narrative)) is not None
        ]
        result.append((sample_id, decisions))
    return result, users, len(exported)


def pull(
    workspace: Workspace, client: LabelStudioClient, title: str, policy: str = "latest"
) -> PullReport:
    report = PullReport(title)
    with workspace.stage_lock("annotate"):
        tasks, users, report.tasks = task_decisions(client, workspace, title)
        report.several_annotators, report.agreeing = agreement(d for _, d in tasks)
        known = set(workspace.read_table("samples", ["sample_id"])["sample_id"].to_pylist())
        current = {
            row["sample_id"]: row["reviewed_at"]
            for row in workspace.read_table("reviews", ["reviewed_at"]).to_pylist()
        }
        rows, now = [], datetime.now(UTC)
        for sample_id, decisions in tasks:
            if sample_id not in known:
                report.unknown_samples += 1
                continue
            chosen = choose(decisions, policy)
            if chosen is None:
                if decisions:
                    report.conflicts += 1
                else:
                    report.pending += 1
                continue
            if chosen.decided_at is None:  # no time to order it by: cannot apply it safely
                report.pending += 1
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
        return report


def project_status(
    workspace: Workspace, client: LabelStudioClient, title: str, policy: str = "latest"
) -> ProjectStatus:
    """Counts on the server, without writing anything: the decision of each task under
    ``policy`` (pending when none), and each annotator's own latest decisions."""
    tasks, users, total = task_decisions(client, workspace, title)
    status = ProjectStatus(title, total)
    by_annotator: dict[str, Counter] = defaultdict(Counter)
    for _, decisions in tasks:
        chosen = choose(decisions, policy)
        status.by_status[chosen.status if chosen else "pending"] += 1
        latest: dict[object, Decision] = {}
        for decision in sorted(decisions, key=lambda d: (d.decided_at is not None, d.decided_at)):
            latest[decision.annotator] = decision
        for annotator, decision in latest.items():
            by_annotator[users.get(annotator, str(annotator))][decision.status] += 1
    status.by_status["pending"] += total - len(tasks)  # tasks without a sample_id
    status.by_annotator = dict(sorted(by_annotator.items()))
    return status
