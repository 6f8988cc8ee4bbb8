"""``surd annotate push / pull / status`` against a real Label Studio server.

The session fixture ``label_studio`` (tests/label_studio.py) starts one server; each test uses its
own project (named after the test) and its own copy of a small demo workspace whose narratives
come from the rules rewriter (origin ``rules:v2``). Annotators are simulated through the SDK:
``create_annotation(..., completed_by=user)`` is what an annotator's submit does.
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from annotation.client import LabelStudioClient, Project
from annotation.ledger import Ledger
from annotation.pull import project_status, pull
from annotation.push import DEFAULT_IMAGE_URL, PushOptions, push, samples_to_review
from annotation.tasks import PREDICTION_MODEL_VERSION
from surd_builder.workspace import Workspace
from tests.conftest import run_surd
from tests.label_studio import narrated_workspace

N = 8
ORIGIN = "rules:v2"
QUIET = PushOptions(show_progress=False)
BOB = "bob@surd.local"
NEW_B = "three blue circles on a white background"
NEW_F = "two green triangles on a black background"
FOREIGN_CONFIG = (
    '<View><Image name="img" value="$image"/>'
    '<Choices name="c" toName="img"><Choice value="x"/></Choices></View>'
)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def template_workspace(tmp_path_factory) -> Path:
    """Built once per module: N demo samples, ingested, with rules narratives."""
    return narrated_workspace(tmp_path_factory.mktemp("annotation-template"), N).root


@pytest.fixture
def ws(template_workspace: Path, tmp_path: Path) -> Workspace:
    shutil.copytree(template_workspace, tmp_path / "ws")
    return Workspace.open(tmp_path / "ws")


@pytest.fixture
def client(label_studio) -> LabelStudioClient:
    return LabelStudioClient(label_studio.url, label_studio.api_key)


@dataclass(frozen=True)
class People:
    admin: int
    admin_email: str
    bob: int
    bob_email: str


@pytest.fixture(scope="module")
def people(label_studio) -> People:
    """The admin (the token's user) and a second annotator, bob (created once per server)."""
    client = LabelStudioClient(label_studio.url, label_studio.api_key)
    admin = client.whoami()
    by_email = {email: user_id for user_id, email in client.users().items()}
    bob = by_email.get(BOB)
    if bob is None:
        bob = client.sdk.users.create(email=BOB, username="bob", first_name="Bob").id
    return People(admin.id, admin.email, bob, BOB)


@pytest.fixture
def title(request) -> str:
    return request.node.name[:50]


# ----------------------------------------------------------------------------- helpers
def decision(choice: str) -> dict[str, Any]:
    return {
        "from_name": "decision",
        "to_name": "image",
        "type": "choices",
        "value": {"choices": [choice]},
    }


def text(value: str) -> dict[str, Any]:
    return {
        "from_name": "narrative_prompt",
        "to_name": "image",
        "type": "textarea",
        "value": {"text": [value]},
    }


def problems(*tags: str) -> dict[str, Any]:
    return {
        "from_name": "problems",
        "to_name": "image",
        "type": "choices",
        "value": {"choices": list(tags)},
    }


def by_id(table: pa.Table) -> dict[str, dict[str, Any]]:
    return {row["sample_id"]: row for row in table.to_pylist()}


def parts(ws: Workspace, table: str) -> list[Path]:
    return ws.table_parts(table)


def review_rows(ws: Workspace) -> list[dict[str, Any]]:
    """Every row in every part of the reviews table (not just the current ones)."""
    return [row for part in parts(ws, "reviews") for row in pq.read_table(part).to_pylist()]


def tasks_with_predictions(client: LabelStudioClient, project: Project) -> list[Any]:
    """The project's tasks (ascending id) with their predictions in full."""
    tasks = client.sdk.tasks.list(project=project.id, fields="all", page_size=1000)
    return sorted(tasks, key=lambda task: task.id)


def one_line_error(result) -> str:
    """The CLI failed the way a user-caused failure should: exit 7, one ``error:`` line."""
    output = result.stdout + result.stderr
    assert result.returncode == 7, output
    assert "Traceback" not in output, output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def table_cells(stdout: str, label: str) -> list[str]:
    """The cells of the rich table row that starts with ``label`` (border cells dropped)."""
    for line in stdout.splitlines():
        cells = [cell.strip() for cell in line.replace("|", "│").split("│")]
        if len(cells) > 2 and cells[1] == label:
            return cells[1:-1]
    raise AssertionError(f"no row {label!r} in:\n{stdout}")


@dataclass
class Scenario:
    project: Project
    ids: dict[str, str]  # letter -> sample_id
    tasks: dict[str, int]  # letter -> task id
    made: dict[str, Any]  # annotation label -> the SDK's annotation
    untouched: list[str]  # sample ids nobody annotated
    before: dict[str, dict[str, Any]]  # the dataset before any pull


def annotate_scenario(
    ws: Workspace, client: LabelStudioClient, title: str, people: People
) -> Scenario:
    """Push N samples and annotate six of them:

    A accepted as-is (admin), B corrected with a new text (admin), C rejected with problem tags
    (bob), D accepted by admin then rejected by bob (later), E skipped (bob), F given a new
    text but "accept" clicked (bob); the rest untouched.
    """
    before = by_id(ws.dataset())
    report = push(ws, client, title, QUIET)
    assert report.pushed == N
    ledger = Ledger(ws, client.url, report.project.id).read()
    order = sorted(ledger)
    ids = dict(zip("ABCDEF", order, strict=False))
    task = {letter: ledger[sample_id][0] for letter, sample_id in ids.items()}
    admin, bob = people.admin, people.bob
    made = {
        "A": client.create_annotation(task["A"], [decision("accept")], completed_by=admin),
        "B": client.create_annotation(
            task["B"], [decision("corrected"), text(NEW_B)], completed_by=admin
        ),
        "C": client.create_annotation(
            task["C"], [decision("reject"), problems("count", "colour")], completed_by=bob
        ),
        "D1": client.create_annotation(task["D"], [decision("accept")], completed_by=admin),
        "D2": client.create_annotation(task["D"], [decision("reject")], completed_by=bob),
        "E": client.create_annotation(task["E"], [], was_cancelled=True, completed_by=bob),
        "F": client.create_annotation(
            task["F"], [decision("accept"), text(NEW_F)], completed_by=bob
        ),
    }
    assert made["D1"].updated_at < made["D2"].updated_at
    return Scenario(report.project, ids, task, made, order[6:], before)


# ----------------------------------------------------------------------------- 1. round trip
def test_push_round_trip_and_idempotence(ws, client, title):
    report = push(ws, client, title, QUIET)
    assert report.created_project
    assert (report.candidates, report.already_in_project, report.pushed) == (N, 0, N)
    assert report.by_origin == {ORIGIN: N}

    samples = by_id(ws.dataset())
    tasks = tasks_with_predictions(client, report.project)
    assert len(tasks) == N
    assert {t.data["sample_id"] for t in tasks} == set(samples)
    for task in tasks:
        sample = samples[task.data["sample_id"]]
        assert task.data["complex_prompt"] == sample["complex_prompt"]
        assert task.data["narrative_prompt"] == sample["narrative_prompt"]
        assert task.data["narrative_origin"] == ORIGIN
        assert task.data["image"] == DEFAULT_IMAGE_URL.format(image_sha256=sample["image_sha256"])
        assert sample["image_sha256"] in task.data["image"]
        assert len(task.predictions) == 1
        prediction = task.predictions[0]
        # one model_version for every rewriter, the one the project selects: the label stream
        # pre-fills a task only from a prediction of the project's model_version
        assert prediction.model_version == PREDICTION_MODEL_VERSION
        assert prediction.result == [text(sample["narrative_prompt"])]

    # the export (what pull reads) has the same tasks, with the prediction as an id
    exported = client.export_tasks(report.project)
    assert sorted(t["id"] for t in exported) == [t.id for t in tasks]
    assert all(len(t["predictions"]) == 1 and not t["annotations"] for t in exported)

    ledger = Ledger(ws, client.url, report.project.id)
    entries = ledger.read()
    assert entries == {t.data["sample_id"]: (t.id, t.data["narrative_prompt"]) for t in tasks}

    again = push(ws, client, title, QUIET)
    assert not again.created_project and again.project == report.project
    assert (again.candidates, again.already_in_project, again.pushed) == (N, N, 0)
    assert len(client.task_sample_ids(report.project)) == N
    assert len(client.export_tasks(report.project)) == N

    # a lost ledger: the server is asked, nothing is sent twice and the ledger is rebuilt
    shutil.rmtree(ws.root / "annotation")
    third = push(ws, client, title, QUIET)
    assert (third.already_in_project, third.pushed) == (N, 0)
    assert len(client.export_tasks(report.project)) == N
    assert ledger.read() == entries


# ----------------------------------------------------------------------------- 2. pull
def test_pull_applies_each_decision_once(ws, client, title, people):
    scenario = annotate_scenario(ws, client, title, people)
    ids, made, before = scenario.ids, scenario.made, scenario.before
    samples_parts = parts(ws, "samples")
    narratives_parts = parts(ws, "narratives")

    report = pull(ws, client, title)
    assert report.tasks == N
    assert report.decided == 5
    assert report.written == {"accepted": 1, "corrected": 2, "rejected": 2}
    assert report.unchanged == 0
    assert report.pending == 3  # E (skipped) and the two untouched
    assert report.conflicts == 0 and report.unknown_samples == 0
    assert (report.several_annotators, report.agreeing) == (1, 0)
    assert report.agreement == 0.0

    after = by_id(ws.dataset())
    a = after[ids["A"]]
    assert a["review_status"] == "accepted"
    assert a["narrative_prompt"] == before[ids["A"]]["narrative_prompt"]
    assert a["narrative_origin"] == "human"
    assert a["reviewer"] == people.admin_email
    assert a["reviewed_at"] == made["A"].updated_at
    assert not a["review_tags"]

    b = after[ids["B"]]
    assert (b["review_status"], b["narrative_prompt"], b["narrative_origin"]) == (
        "corrected",
        NEW_B,
        "human",
    )
    assert b["reviewer"] == people.admin_email

    c = after[ids["C"]]
    assert c["review_status"] == "rejected"
    assert c["review_tags"] == ["count", "colour"]
    assert c["reviewer"] == people.bob_email
    assert c["narrative_prompt"] == before[ids["C"]]["narrative_prompt"]
    assert c["narrative_origin"] == ORIGIN
    assert c["rewrite_key"] == before[ids["C"]]["rewrite_key"]

    d = after[ids["D"]]  # latest policy: bob's later reject wins over admin's accept
    assert (d["review_status"], d["reviewer"]) == ("rejected", people.bob_email)
    assert d["reviewed_at"] == made["D2"].updated_at
    assert (d["narrative_prompt"], d["narrative_origin"]) == (
        before[ids["D"]]["narrative_prompt"],
        ORIGIN,
    )

    f = after[ids["F"]]  # "accept" clicked, but the text changed: the text is the evidence
    assert (f["review_status"], f["narrative_prompt"], f["narrative_origin"]) == (
        "corrected",
        NEW_F,
        "human",
    )
    assert f["reviewer"] == people.bob_email

    for sample_id in [ids["E"], *scenario.untouched]:
        assert after[sample_id] == before[sample_id]
        assert after[sample_id]["review_status"] == "pending"
        assert after[sample_id]["narrative_origin"] == ORIGIN

    rows = review_rows(ws)
    assert len(rows) == 5
    assert sorted(r["sample_id"] for r in rows) == sorted(ids[x] for x in "ABCDF")
    assert parts(ws, "samples") == samples_parts
    assert parts(ws, "narratives") == narratives_parts

    reviews_parts = parts(ws, "reviews")
    again = pull(ws, client, title)
    assert again.written == {}
    assert again.unchanged == again.decided == 5
    assert again.pending == 3
    assert parts(ws, "reviews") == reviews_parts
    assert by_id(ws.dataset()) == after


# ----------------------------------------------------------------------------- 3. unanimous
def test_pull_unanimous_leaves_disagreement_pending(ws, client, title, people, label_studio):
    scenario = annotate_scenario(ws, client, title, people)
    ids = scenario.ids

    status = project_status(ws, client, title, policy="unanimous")
    assert status.by_status["pending"] == 4 and status.by_status["rejected"] == 1

    result = run_surd(
        "annotate", "pull", "-p", title, "-w", str(ws.root), "--policy", "unanimous",
        env=label_studio.env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    # status read every task a moment ago: pull reads none again
    assert "4 decisions written; 0 of 8 tasks read" in result.stdout
    assert table_cells(result.stdout, "annotators disagree (left pending)")[1] == "1"
    assert table_cells(result.stdout, "pending (skipped or not done)")[1] == "3"
    assert table_cells(result.stdout, "agreement (tasks with 2+ annotators)")[1] == "0% of 1"

    after = by_id(ws.dataset())
    assert after[ids["D"]] == scenario.before[ids["D"]]
    assert after[ids["D"]]["review_status"] == "pending"
    assert {after[ids[x]]["review_status"] for x in "ABCF"} == {"accepted", "corrected", "rejected"}
    assert sorted(r["sample_id"] for r in review_rows(ws)) == sorted(ids[x] for x in "ABCF")

    report = pull(ws, client, title, policy="unanimous")
    assert (report.conflicts, report.pending, report.decided, report.written) == (1, 3, 4, {})


# ----------------------------------------------------------------------------- 4. newer wins
def test_newer_decision_replaces_older_and_older_never_wins(ws, client, title, people):
    first = push(ws, client, title, QUIET)
    other_title = f"{title[:44]}-other"
    other = push(ws, client, other_title, QUIET)
    assert first.pushed == other.pushed == N
    sample_id = sorted(Ledger(ws, client.url, first.project.id).read())[0]
    task = Ledger(ws, client.url, first.project.id).read()[sample_id][0]
    other_task = Ledger(ws, client.url, other.project.id).read()[sample_id][0]

    # an old accept in the other project, made before anything in the first
    old = client.create_annotation(other_task, [decision("accept")], completed_by=people.admin)
    accepted = client.create_annotation(task, [decision("accept")], completed_by=people.admin)
    assert pull(ws, client, title).written == {"accepted": 1}
    assert by_id(ws.dataset())[sample_id]["review_status"] == "accepted"

    # bob's later reject replaces the accept
    reject = client.create_annotation(task, [decision("reject")], completed_by=people.bob)
    assert reject.updated_at > accepted.updated_at
    report = pull(ws, client, title)
    assert report.written == {"rejected": 1}
    row = by_id(ws.dataset())[sample_id]
    assert (row["review_status"], row["reviewer"]) == ("rejected", people.bob_email)
    assert row["reviewed_at"] == reject.updated_at

    # pulling again, or pulling the older accept from the other project, changes nothing
    assert pull(ws, client, title).written == {}
    stale = pull(ws, client, other_title)
    assert stale.decided == 1 and stale.unchanged == 1 and stale.written == {}
    assert old.updated_at < reject.updated_at
    assert by_id(ws.dataset())[sample_id]["review_status"] == "rejected"
    assert len(review_rows(ws)) == 2

    # bob edits his annotation: the update is newer, so it is applied
    updated = client.call(
        "updating an annotation",
        client.sdk.annotations.update,
        id=reject.id,
        result=[decision("corrected"), text(NEW_B)],
    )
    assert updated.updated_at > reject.updated_at
    assert pull(ws, client, title).written == {"corrected": 1}
    row = by_id(ws.dataset())[sample_id]
    assert (row["review_status"], row["narrative_prompt"], row["narrative_origin"]) == (
        "corrected",
        NEW_B,
        "human",
    )
    assert pull(ws, client, other_title).written == {}
    assert by_id(ws.dataset())[sample_id]["narrative_prompt"] == NEW_B


# ----------------------------------------------------------------------------- 5. status
def test_status_counts_per_task_and_per_annotator(ws, client, title, people, label_studio):
    annotate_scenario(ws, client, title, people)

    status = project_status(ws, client, title)
    assert status.tasks == N
    assert dict(status.by_status) == {"pending": 3, "accepted": 1, "corrected": 2, "rejected": 2}
    assert set(status.by_annotator) == {people.admin_email, people.bob_email}
    # admin: A accepted, B corrected, D accepted; bob: C and D rejected, F corrected (E skipped)
    assert dict(status.by_annotator[people.admin_email]) == {"accepted": 2, "corrected": 1}
    assert dict(status.by_annotator[people.bob_email]) == {"rejected": 2, "corrected": 1}

    result = run_surd("annotate", "status", "-p", title, "-w", str(ws.root), env=label_studio.env())
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"project {title!r}: 8 tasks" in result.stdout
    # columns: pending, accepted, corrected, rejected
    assert table_cells(result.stdout, "all (decision per task)")[1:] == ["3", "1", "2", "2"]
    assert table_cells(result.stdout, people.admin_email)[1:] == ["", "2", "1", "0"]
    assert table_cells(result.stdout, people.bob_email)[1:] == ["", "0", "1", "2"]
    assert not parts(ws, "reviews")  # status writes nothing


# ----------------------------------------------------------------------------- 6. errors
def test_cli_errors_are_one_line_exit_7(ws, client, title, label_studio):
    workspace = ["-w", str(ws.root)]
    bad_key = {**label_studio.env(), "LABEL_STUDIO_API_KEY": "not-the-right-key"}
    for command in ("push", "pull"):
        result = run_surd("annotate", command, "-p", title, *workspace, env=bad_key)
        line = one_line_error(result)
        assert "API key" in line and "LABEL_STUDIO_API_KEY" in line
        assert "not-the-right-key" not in result.stdout + result.stderr

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    nowhere = {**label_studio.env(), "LABEL_STUDIO_URL": f"http://127.0.0.1:{port}"}
    line = one_line_error(run_surd("annotate", "pull", "-p", title, *workspace, env=nowhere))
    assert "cannot reach Label Studio" in line and str(port) in line

    missing = run_surd("annotate", "pull", "-p", title, *workspace, env=label_studio.env())
    assert "no project" in one_line_error(missing) and title in missing.stderr
    assert client.find_project(title) is None  # pull does not create a project

    foreign = f"{title[:42]}-foreign"
    created = client.sdk.projects.create(title=foreign, label_config=FOREIGN_CONFIG)
    for command in ("push", "pull"):
        result = run_surd("annotate", command, "-p", foreign, *workspace, env=label_studio.env())
        assert "labeling config" in one_line_error(result)
    assert client.task_sample_ids(Project(created.id, foreign)) == {}
    assert not (ws.root / "annotation").exists()

    bad_template = run_surd(
        "annotate", "push", "-p", title, *workspace, "--image-url-template", "http://x/img.png",
        env=label_studio.env(),
    )  # fmt: skip
    assert bad_template.returncode == 2 and "--image-url-template" in bad_template.stderr
    assert client.find_project(title) is None


# ----------------------------------------------------------------------------- 7. images
def test_embed_images_only_on_request(ws, client, title, label_studio):
    samples = by_id(ws.dataset())
    stored = ws.read_images(s["image_sha256"] for s in samples.values())

    embedded_title = f"{title[:44]}-embed"
    result = run_surd(
        "annotate", "push", "-p", embedded_title, "-w", str(ws.root), "--embed-images",
        "--no-progress", env=label_studio.env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "push: 8 tasks -> created project" in result.stdout
    embedded = client.export_tasks(client.project(embedded_title))
    assert len(embedded) == N
    for task in embedded:
        image = task["data"]["image"]
        prefix = "data:image/png;base64,"
        assert image.startswith(prefix)
        sha = samples[task["data"]["sample_id"]]["image_sha256"]
        assert base64.b64decode(image[len(prefix) :]) == stored[sha]

    url_title = f"{title[:44]}-urls"
    assert push(ws, client, url_title, QUIET).pushed == N
    for task in client.export_tasks(client.project(url_title)):
        assert "base64" not in json.dumps(task["data"])
        assert task["data"]["image"].startswith("http://127.0.0.1:8081/images/")

    template = "https://cdn.example.org/surd/{sample_id}.png?v={image_sha256}"
    cdn_title = f"{title[:44]}-cdn"
    options = PushOptions(image_url_template=template, show_progress=False)
    assert push(ws, client, cdn_title, options).pushed == N
    for task in client.export_tasks(client.project(cdn_title)):
        sample = samples[task["data"]["sample_id"]]
        assert task["data"]["image"] == (
            f"https://cdn.example.org/surd/{sample['sample_id']}.png?v={sample['image_sha256']}"
        )


# ----------------------------------------------------------------------------- 8. push order
def test_push_order_most_doubtful_first(ws, client, title):
    ids = sorted(by_id(ws.dataset()))
    scores = [0.30, 0.12, 0.25, 0.05, 0.40, 0.18]  # the last two samples have no scores
    scored = ids[: len(scores)]
    ws.write_table_part(
        "screening",
        pa.table(
            {
                "sample_id": scored,
                "clip_score": pa.array(scores, pa.float32()),
                "text_similarity": pa.array([s + 0.5 for s in scores], pa.float32()),
                "screening_key": [f"key-{n}" for n in range(len(scored))],
            }
        ),
    )
    expected = [s for _, s in sorted(zip(scores, scored, strict=True))] + ids[len(scores) :]
    assert samples_to_review(ws)["sample_id"].to_pylist() == expected

    report = push(ws, client, title, PushOptions(batch_size=3, show_progress=False))
    assert report.pushed == N
    assert len(list(Ledger(ws, client.url, report.project.id).folder.glob("part-*"))) == 3

    tasks = tasks_with_predictions(client, report.project)
    assert [t.data["sample_id"] for t in tasks] == expected
    assert [t.inner_id for t in tasks] == sorted(t.inner_id for t in tasks)
    clip = dict(zip(scored, scores, strict=True))
    for task in tasks:
        sample_id = task.data["sample_id"]
        if sample_id in clip:
            assert task.data["clip_score"] == pytest.approx(clip[sample_id], abs=1e-4)
            assert task.predictions[0].score == pytest.approx(clip[sample_id], abs=1e-4)
        else:
            assert "clip_score" not in task.data
            assert task.predictions[0].score is None


# ----------------------------------------------------------------------------- 9. cost
def test_pull_and_status_read_only_what_changed(ws, client, title, people, label_studio):
    scenario = annotate_scenario(ws, client, title, people)
    ids, task = scenario.ids, scenario.tasks
    first = pull(ws, client, title)
    assert first.read == 6  # the annotated tasks (E's skip too); never the two untouched
    assert first.written == {"accepted": 1, "corrected": 2, "rejected": 2}

    again = pull(ws, client, title)
    assert (again.read, again.written, again.pending, again.tasks) == (0, {}, 3, N)
    assert project_status(ws, client, title).read == 0

    # an annotation edited after the pull: read again, and its newer decision applied
    edited = "two red circles on a grey background"
    client.sdk.annotations.update(
        id=scenario.made["B"].id, result=[decision("corrected"), text(edited)]
    )
    changed = pull(ws, client, title)
    assert (changed.read, changed.written) == (1, {"corrected": 1})
    assert by_id(ws.dataset())[ids["B"]]["narrative_prompt"] == edited

    # a task annotated for the first time
    untouched = scenario.untouched[0]
    untouched_task = Ledger(ws, client.url, scenario.project.id).read()[untouched][0]
    client.create_annotation(untouched_task, [decision("accept")], completed_by=people.admin)
    newly = pull(ws, client, title)
    assert (newly.read, newly.written, newly.pending) == (1, {"accepted": 1}, 2)

    # an annotation deleted: the task is read again; status no longer counts its decision,
    # and pull does not take back the decision it applied
    client.sdk.annotations.delete(id=scenario.made["C"].id)
    status = project_status(ws, client, title)
    assert status.read == 1
    assert dict(status.by_status) == {"pending": 3, "accepted": 2, "corrected": 2, "rejected": 1}
    after_delete = pull(ws, client, title)
    assert after_delete.read == 0 and after_delete.written == {}
    assert by_id(ws.dataset())[ids["C"]]["review_status"] == "rejected"

    # a task deleted on the server leaves the counts
    client.sdk.tasks.delete(id=str(task["E"]))
    status = project_status(ws, client, title)
    assert status.tasks == N - 1 and status.by_status["pending"] == 2

    # a decided task deleted and another created before the next read (the count is the
    # same): its decision leaves the counts too
    client.sdk.tasks.delete(id=str(task["A"]))
    elsewhere = {"sample_id": "elsewhere", "image": "http://x/i.png", "complex_prompt": "k"}
    client.import_tasks(scenario.project, [{"data": {**elsewhere, "narrative_prompt": "n"}}])
    status = project_status(ws, client, title)
    assert status.tasks == N - 1
    assert dict(status.by_status) == {"pending": 3, "accepted": 1, "corrected": 2, "rejected": 1}

    # without the mirror (a new machine): everything is read again, nothing written twice
    mirror = Ledger(ws, client.url, scenario.project.id).folder / "pulled.parquet"
    mirror.unlink()
    fresh = pull(ws, client, title)
    assert (fresh.read, fresh.written, fresh.unchanged, fresh.pending) == (4, {}, 4, 3)
    assert mirror.exists()
    full = run_surd(
        "annotate", "pull", "-p", title, "-w", str(ws.root), "--full", env=label_studio.env()
    )  # fmt: skip
    assert full.returncode == 0, full.stdout + full.stderr
    assert "0 decisions written; 4 of 7 tasks read" in full.stdout


def test_repush_with_nothing_new_lists_no_tasks(ws, client, title):
    report = push(ws, client, title, QUIET)
    assert report.pushed == N and not report.listed_server
    again = push(ws, client, title, QUIET)
    assert (again.pushed, again.already_in_project, again.listed_server) == (0, N, False)

    # a task the ledger does not know (pushed from another machine): the counts disagree, the
    # server is asked, and the task is adopted instead of sent twice
    ledger = Ledger(ws, client.url, report.project.id)
    entries = ledger.read()
    lost = sorted(entries)[0]
    for part in ledger.folder.glob("part-*.parquet"):
        table = pq.read_table(part)
        part.unlink()
        kept = table.filter(pa.compute.not_equal(table["sample_id"], lost))
        if kept.num_rows:
            pq.write_table(kept, part)
    assert lost not in ledger.read()
    third = push(ws, client, title, QUIET)
    assert (third.pushed, third.listed_server) == (0, True)
    assert ledger.read() == entries
    assert len(tasks_with_predictions(client, report.project)) == N


def _rewrite(ws: Workspace, narratives: dict[str, str]) -> None:
    """New narratives for some samples, as a later rewrite would write them."""
    from datetime import UTC, datetime

    from surd_builder.schema import records_to_table, table_spec

    now = datetime.now(UTC)
    ws.write_table_part(
        "narratives",
        records_to_table(
            [
                {
                    "sample_id": sample_id,
                    "narrative_prompt": text,
                    "narrative_origin": "llm:test",
                    "rewrite_key": f"test-{sample_id}",
                    "updated_at": now,
                }
                for sample_id, text in narratives.items()
            ],
            table_spec("narratives").schema,
        ),
    )


def test_refresh_gives_unannotated_tasks_the_new_narrative(ws, client, title, people):
    report = push(ws, client, title, QUIET)
    ledger = Ledger(ws, client.url, report.project.id)
    entries = ledger.read()
    annotated, rewritten, *_ = sorted(entries)
    client.create_annotation(entries[annotated][0], [decision("accept")], completed_by=people.admin)
    new_text = {
        annotated: "five yellow stars on a black background",
        rewritten: "a single orange hexagon on a white background",
    }
    _rewrite(ws, new_text)

    stale = push(ws, client, title, QUIET)  # without --refresh: reported, nothing changed
    assert (stale.stale, stale.refreshed, stale.pushed) == (2, 0, 0)
    task = client.sdk.tasks.get(id=str(entries[rewritten][0]))
    assert task.data["narrative_prompt"] == entries[rewritten][1]

    # an ML backend's prediction on the task is not surd's to replace
    backend = client.sdk.predictions.create(
        task=entries[rewritten][0],
        result=[decision("accept")],
        model_version="some-backend",
    )
    refreshed = push(ws, client, title, PushOptions(refresh=True, show_progress=False))
    assert (refreshed.stale, refreshed.refreshed, refreshed.stale_annotated) == (2, 1, 1)
    tasks = {t.id: t for t in tasks_with_predictions(client, report.project)}
    updated = tasks[entries[rewritten][0]]
    assert updated.data["narrative_prompt"] == new_text[rewritten]
    assert updated.data["narrative_origin"] == "llm:test"
    assert updated.data["image"] == task.data["image"]  # the same address as before
    assert backend.id in [p.id for p in updated.predictions]
    ours = [p for p in updated.predictions if p.id != backend.id]
    assert [p.result for p in ours] == [[text(new_text[rewritten])]]
    assert [p.model_version for p in ours] == [PREDICTION_MODEL_VERSION]
    kept = tasks[entries[annotated][0]]  # annotated on the old text: left as it was
    assert kept.data["narrative_prompt"] == entries[annotated][1]
    assert ledger.read()[rewritten] == (entries[rewritten][0], new_text[rewritten])
    assert ledger.read()[annotated] == entries[annotated]

    # an annotator accepting the refreshed text accepts the new narrative; one who opened the
    # task before the refresh and accepts the old text accepts that text (not a correction)
    client.create_annotation(entries[rewritten][0], [decision("accept")], completed_by=people.admin)
    pulled = pull(ws, client, title)
    assert pulled.written == {"accepted": 2}
    after = by_id(ws.dataset())
    assert after[rewritten]["narrative_prompt"] == new_text[rewritten]
    assert after[annotated]["narrative_prompt"] == entries[annotated][1]  # what was shown
    client.create_annotation(
        entries[rewritten][0],
        [decision("accept"), text(entries[rewritten][1])],
        completed_by=people.bob,
    )
    late = pull(ws, client, title)
    assert late.written == {"accepted": 1}
    assert by_id(ws.dataset())[rewritten]["narrative_prompt"] == entries[rewritten][1]

    again = push(ws, client, title, PushOptions(refresh=True, show_progress=False))
    assert (again.stale, again.refreshed) == (0, 0)  # both decided: no longer up for review


def test_projects_prefill_in_the_label_stream(ws, client, title):
    report = push(ws, client, title, QUIET)
    project = client.sdk.projects.get(id=report.project.id)
    assert project.show_collab_predictions is True
    assert project.model_version == PREDICTION_MODEL_VERSION


def test_a_project_of_an_older_surd_keeps_prefilling(ws, client, title):
    """Older surd made projects without a model version and tagged predictions with the
    rewriter; Label Studio then selected the first import's. New tasks must use that one."""
    from annotation.config import label_config

    old = client.sdk.projects.create(title=title, label_config=label_config())
    client.sdk.projects.import_tasks(
        id=old.id,
        request=[
            {
                "data": {
                    "sample_id": "old-sample",
                    "image": "http://x/i.png",
                    "complex_prompt": "cat",
                    "narrative_prompt": "a cat",
                },
                "predictions": [{"model_version": ORIGIN, "result": [text("a cat")]}],
            }
        ],
    )
    assert client.sdk.projects.get(id=old.id).model_version == ORIGIN
    report = push(ws, client, title, QUIET)
    assert report.pushed == N and report.project.model_version == ORIGIN
    tasks = tasks_with_predictions(client, report.project)
    assert len(tasks) == N + 1
    assert {p.model_version for t in tasks for p in t.predictions} == {ORIGIN}
