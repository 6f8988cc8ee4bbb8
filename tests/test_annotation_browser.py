"""An annotator's session in a real browser: headless Chromium against a real Label Studio and
``surd annotate serve-images``, using only the UI (clicks and keys).

What people need and the API tests cannot see: the image is drawn (Label Studio fetches it
with CORS), the keyword prompt is read-only text, the narrative text area opens pre-filled with
the rewriter's text, and accept / edit-and-correct / reject-with-tags made by clicking reach the
workspace through ``pull`` exactly. The page must reach no host but Label Studio's and the image
server's. Screenshots go to ``test-artifacts/``.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from annotation.client import LabelStudioClient
from annotation.images import ImageServer
from annotation.pull import pull
from annotation.push import PushOptions, push
from surd_builder.workspace import Workspace
from tests.browser import chromium, requested_hosts, screenshot  # noqa: F401 (a fixture)
from tests.conftest import run_surd
from tests.label_studio import ADMIN, narrated_workspace

EDITED = "three small red triangles on a deep blue background"
WAIT_SECONDS = 60


@pytest.fixture
def reviewed_workspace(tmp_path: Path) -> Workspace:
    """Four demo samples with rules narratives; images 64 px so they are visibly drawn."""
    return narrated_workspace(tmp_path, 4, size=64)


@pytest.fixture
def image_server(reviewed_workspace: Workspace):
    server = ImageServer(reviewed_workspace, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


class Annotator:
    """What a person does in Label Studio's editor, through the page only.

    The editor re-renders while a task loads (an element found a moment ago may be gone), so
    every look-up and click is retried until it holds or ``WAIT_SECONDS`` pass."""

    def __init__(self, session, base_url: str):
        from selenium.common.exceptions import (
            ElementClickInterceptedException,
            NoSuchElementException,
            StaleElementReferenceException,
        )
        from selenium.webdriver.support.ui import WebDriverWait

        self.session, self.base_url = session, base_url
        self.wait = WebDriverWait(
            session,
            WAIT_SECONDS,
            ignored_exceptions=(
                ElementClickInterceptedException,
                NoSuchElementException,
                StaleElementReferenceException,
            ),
        )

    def _find(self, css: str):
        from selenium.webdriver.common.by import By

        return self.session.find_element(By.CSS_SELECTOR, css)

    def _click(self, find, what: str) -> None:
        """Click what ``find()`` returns, finding it again if the page re-rendered it."""

        def click(session) -> bool:
            element = find()
            session.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
            element.click()
            return True

        self.wait.until(click, message=f"could not click {what}")

    def log_in(self, email: str, password: str) -> None:
        from selenium.webdriver.common.by import By

        self.session.get(f"{self.base_url}/user/login/")
        self.session.find_element(By.NAME, "email").send_keys(email)
        self.session.find_element(By.NAME, "password").send_keys(password)
        self._click(lambda: self._find("button[type=submit]"), "log in")
        self.wait.until(lambda s: "/user/login" not in s.current_url, message="login failed")

    def open_task(self, project_id: int, task_id: int) -> None:
        self.session.get(f"{self.base_url}/projects/{project_id}/data?task={task_id}")
        self.wait.until(
            lambda s: self.editor_image_width() is not None,
            message=f"task {task_id}: the editor drew no image in {WAIT_SECONDS} s (CORS?)",
        )
        self.wait.until(lambda s: self.narrative(), message="no narrative shown")

    def editor_image_width(self) -> int | None:
        """The natural width of the image the editor drew (None while it has none): a
        picture that failed to load (no CORS header) never gets one."""
        return self.session.execute_script(
            "const img = document.querySelector('.lsf-main-view .lsf-image img');"
            "return img && img.complete && img.naturalWidth > 0 ? img.naturalWidth : null;"
        )

    def keyword_prompt(self) -> dict:
        """The keyword prompt's text and what kind of element shows it."""
        return self.wait.until(
            lambda s: s.execute_script(
                "const e = document.querySelector('.lsf-main-view .lsf-richtext__line');"
                "return e && {text: e.innerText, tag: e.tagName.toLowerCase(),"
                " editable: e.isContentEditable};"
            )
        )

    def narrative(self) -> str:
        return self.wait.until(
            lambda s: self._find(".lsf-main-view [data-testid=htx-textbox-content]").text
        )

    def edit_narrative(self, new_text: str) -> None:
        from selenium.webdriver.common.keys import Keys

        self._click(lambda: self._find("[data-testid=htx-textbox-edit-button]"), "edit")

        def type_text(session) -> bool:
            box = self._find("[data-testid=htx-textbox-input]")
            box.send_keys(Keys.CONTROL, "a")
            box.send_keys(new_text)
            return box.get_attribute("value") == new_text

        self.wait.until(type_text, message="could not type the narrative")
        self._click(lambda: self._find("[data-testid=htx-textbox-save]"), "save")
        self.wait.until(lambda s: self.narrative() == new_text, message="edit not saved")

    def choose(self, value: str) -> None:
        from selenium.webdriver.common.by import By

        css = f".lsf-main-view input.ant-checkbox-input[name='{value}']"
        self._click(lambda: self._find(css).find_element(By.XPATH, "./ancestor::label"), value)
        self.wait.until(lambda s: self._find(css).is_selected(), message=f"{value} not chosen")

    def submit(self) -> None:
        self._click(lambda: self._find("[data-testid=bottombar-submit-button]"), "submit")
        # once saved, the editor offers to update the annotation instead
        self.wait.until(
            lambda s: self._find("[data-testid=bottombar-update-button]"), message="not saved"
        )


def test_an_annotator_decides_three_tasks_in_the_browser(
    chromium,  # noqa: F811 (the fixture)
    label_studio,
    reviewed_workspace: Workspace,
    image_server: ImageServer,
) -> None:
    from selenium.webdriver.common.by import By

    client = LabelStudioClient(label_studio.url, label_studio.api_key)
    title = "browser review"
    options = PushOptions(image_url_template=image_server.url_template, show_progress=False)
    report = push(reviewed_workspace, client, title, options)
    assert report.pushed == 4
    samples = {row["sample_id"]: row for row in reviewed_workspace.dataset().to_pylist()}
    tasks = {
        str(task.data["sample_id"]): task.id
        for task in client.sdk.tasks.list(project=report.project.id, fields="all")
    }
    accepted, corrected, rejected, untouched = sorted(tasks)

    person = Annotator(chromium, label_studio.url)
    password = (label_studio.data_dir / "admin-password").read_text().strip()
    person.log_in(ADMIN, password)

    # what the annotator sees
    person.open_task(report.project.id, tasks[accepted])
    assert person.editor_image_width() == 64
    keywords = person.keyword_prompt()
    assert keywords["text"] == samples[accepted]["complex_prompt"]
    assert keywords["tag"] not in ("input", "textarea") and keywords["editable"] is False
    assert not chromium.find_elements(By.CSS_SELECTOR, ".lsf-main-view [contenteditable=true]")
    assert person.narrative() == samples[accepted]["narrative_prompt"]  # pre-filled
    shot = screenshot(chromium, "annotation-task")
    assert shot.stat().st_size > 10_000

    # three decisions, by clicks and keys only
    person.choose("accept")
    person.submit()

    person.open_task(report.project.id, tasks[corrected])
    assert person.narrative() == samples[corrected]["narrative_prompt"]
    person.edit_narrative(EDITED)
    person.choose("corrected")
    person.submit()

    person.open_task(report.project.id, tasks[rejected])
    person.choose("reject")
    person.choose("subject")
    person.choose("count")
    screenshot(chromium, "annotation-task-rejected")
    person.submit()

    hosts = requested_hosts(chromium)
    image_host = image_server.url.split("://", 1)[1]
    label_studio_host = label_studio.url.split("://", 1)[1]
    assert image_host in hosts  # the images came from serve-images
    assert hosts <= {image_host, label_studio_host}, f"the page reached out to {hosts}"

    # pull applies exactly those three decisions
    pulled = pull(reviewed_workspace, client, title)
    assert pulled.written == {"accepted": 1, "corrected": 1, "rejected": 1}
    assert pulled.pending == 1
    reviews = {r["sample_id"]: r for r in reviewed_workspace.read_table("reviews").to_pylist()}
    assert set(reviews) == {accepted, corrected, rejected}
    assert reviews[accepted]["review_status"] == "accepted"
    assert reviews[accepted]["narrative_prompt"] == samples[accepted]["narrative_prompt"]
    assert reviews[corrected]["review_status"] == "corrected"
    assert reviews[corrected]["narrative_prompt"] == EDITED
    assert reviews[rejected]["review_status"] == "rejected"
    assert reviews[rejected]["narrative_prompt"] is None
    assert sorted(reviews[rejected]["review_tags"]) == ["count", "subject"]
    assert {r["reviewer"] for r in reviews.values()} == {ADMIN}
    assert untouched not in reviews
    assert pull(reviewed_workspace, client, title).written == {}  # applied once


def test_label_studio_serves_written_images_from_its_local_storage(
    chromium,  # noqa: F811 (the fixture)
    label_studio,
    reviewed_workspace: Workspace,
) -> None:
    """The other route: images written as files, served by Label Studio itself (same origin)."""
    client = LabelStudioClient(label_studio.url, label_studio.api_key)
    folder = label_studio.files_root / "surd-images"
    result = run_surd(
        "annotate", "write-images", "-w", str(reviewed_workspace.root), "--output", str(folder),
        "--no-progress",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 written" in result.stdout
    samples = reviewed_workspace.dataset().to_pylist()
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"{s['image_sha256']}.png" for s in samples
    )
    template = "/data/local-files/?d=surd-images/{image_file}"
    options = PushOptions(image_url_template=template, local_files=str(folder), show_progress=False)
    report = push(reviewed_workspace, client, "browser local files", options)
    again = push(reviewed_workspace, client, "browser local files", options)  # storage made once
    assert report.pushed == 4 and again.pushed == 0
    storages = client.sdk.import_storage.local.list(project=report.project.id)
    assert [s.path for s in storages] == [str(folder)]

    person = Annotator(chromium, label_studio.url)
    person.log_in(ADMIN, (label_studio.data_dir / "admin-password").read_text().strip())
    task_id = next(iter(client.sdk.tasks.list(project=report.project.id, fields="task_only"))).id
    person.open_task(report.project.id, task_id)
    assert person.editor_image_width() == 64
    screenshot(chromium, "annotation-task-local-files")
    assert requested_hosts(chromium) == {label_studio.url.split("://", 1)[1]}
