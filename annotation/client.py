"""The only module that talks to Label Studio (through its SDK, ``label-studio-sdk`` 2.x).

Everything a user can get wrong about the connection ends here as one line: an unreachable
server, a rejected token, a project that does not exist or whose labeling config is not surd's.
The URL and key come from ``LABEL_STUDIO_URL`` / ``LABEL_STUDIO_API_KEY`` (the SDK's own names)
or the command line; both legacy tokens and personal access tokens work (the SDK tells them
apart). The key is never logged or written anywhere.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from annotation.config import check_label_config, label_config
from surd_builder.errors import ServiceError

T = TypeVar("T")


class AnnotationError(ServiceError):
    """The annotation server cannot do what was asked; the message says why and what to do."""


@dataclass(frozen=True)
class Project:
    id: int
    title: str


@contextmanager
def _errors(url: str, what: str) -> Iterator[None]:
    """SDK and HTTP errors as one-line :class:`AnnotationError`."""
    import httpx
    from label_studio_sdk.core.api_error import ApiError

    try:
        yield
    except ApiError as error:
        status = error.status_code
        if status in (401, 403):
            raise AnnotationError(
                f"Label Studio at {url} refused the API key (HTTP {status}) while {what}; "
                "check LABEL_STUDIO_API_KEY (a legacy token or a personal access token)"
            ) from None
        detail = error.body.get("detail") if isinstance(error.body, dict) else error.body
        raise AnnotationError(
            f"Label Studio at {url}: HTTP {status} while {what}: {str(detail)[:200]}"
        ) from None
    except httpx.TransportError as error:
        raise AnnotationError(
            f"cannot reach Label Studio at {url} while {what} ({type(error).__name__}); "
            "is it running? (scripts/label-studio.sh start)"
        ) from None


class LabelStudioClient:
    def __init__(self, url: str, api_key: str, timeout: float = 120.0):
        if not url:
            raise AnnotationError("no Label Studio URL: set LABEL_STUDIO_URL or pass --url")
        if not api_key:
            raise AnnotationError("no API key: set LABEL_STUDIO_API_KEY or pass --api-key")
        from label_studio_sdk.client import LabelStudio

        self.url = url.rstrip("/")
        self._sdk = LabelStudio(base_url=self.url, api_key=api_key, timeout=timeout)

    def call(self, what: str, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        with _errors(self.url, what):
            return function(*args, **kwargs)

    def whoami(self) -> Any:
        return self.call("checking the API key", self._sdk.users.whoami)

    def users(self) -> dict[int, str]:
        """user id -> e-mail (or username): how annotators are named in surd."""
        users = self.call("listing users", self._sdk.users.list)
        return {user.id: user.email or user.username or str(user.id) for user in users}

    def find_project(self, title: str) -> Project | None:
        projects = self.call("listing projects", lambda: list(self._sdk.projects.list(title=title)))
        matches = [p for p in projects if p.title == title]
        if len(matches) > 1:
            raise AnnotationError(
                f"{len(matches)} projects are called {title!r}; rename all but one"
            )
        return Project(matches[0].id, matches[0].title) if matches else None

    def project(self, title: str) -> Project:
        """An existing project, checked to have surd's labeling config."""
        project = self.find_project(title)
        if project is None:
            raise AnnotationError(
                f"no project {title!r} on {self.url} (surd annotate push creates it)"
            )
        self.check_config(project)
        return project

    def find_or_create_project(self, title: str, description: str = "") -> tuple[Project, bool]:
        project = self.find_project(title)
        if project is not None:
            self.check_config(project)
            return project, False
        created = self.call(
            "creating the project",
            self._sdk.projects.create,
            title=title,
            description=description,
            label_config=label_config(),
        )
        return Project(created.id, created.title), True

    def check_config(self, project: Project) -> None:
        details = self.call("reading the project", self._sdk.projects.get, id=project.id)
        problem = check_label_config(details.label_config or "")
        if problem:
            raise AnnotationError(
                f"project {project.title!r} does not use surd's labeling config ({problem}); "
                "use another project name"
            )

    def task_sample_ids(self, project: Project) -> dict[str, tuple[int, str | None]]:
        """sample_id -> (task id, the narrative the task shows) for every task in the project
        (pages through all of them)."""
        tasks = self.call(
            "listing tasks",
            lambda: list(
                self._sdk.tasks.list(project=project.id, page_size=1000, fields="task_only")
            ),
        )
        found: dict[str, tuple[int, str | None]] = {}
        for task in tasks:
            data = task.data or {}
            if data.get("sample_id"):
                found.setdefault(str(data["sample_id"]), (task.id, data.get("narrative_prompt")))
        return found

    def import_tasks(self, project: Project, tasks: list[dict[str, Any]]) -> list[int]:
        """Create ``tasks`` (with their predictions); their new ids, in order."""
        response = self.call(
            "importing tasks",
            self._sdk.projects.import_tasks,
            id=project.id,
            request=tasks,
            return_task_ids=True,
        )
        ids = list(response.task_ids or [])
        if len(ids) != len(tasks):
            raise AnnotationError(
                f"Label Studio created {len(ids)} tasks for {len(tasks)} sent; run push again "
                "(it only sends what is missing)"
            )
        return ids

    def export_tasks(self, project: Project) -> list[dict[str, Any]]:
        """Every task with its annotations, as Label Studio's JSON export gives them."""

        def download() -> bytes:
            chunks = self._sdk.projects.exports.download_sync(
                id=project.id, export_type="JSON", download_all_tasks=True
            )
            return chunks if isinstance(chunks, bytes) else b"".join(chunks)

        data = self.call("exporting annotations", download)
        try:
            return json.loads(data)
        except ValueError:
            raise AnnotationError("Label Studio's export was not JSON; try again") from None

    def create_annotation(self, task_id: int, result: list[dict], **fields: Any) -> Any:
        """For tests and scripted review: what an annotator's submit does."""
        return self.call(
            "creating an annotation",
            self._sdk.annotations.create,
            id=task_id,
            result=result,
            **fields,
        )

    @property
    def sdk(self) -> Any:
        """The SDK client, for what surd does not wrap (tests create users with it)."""
        return self._sdk
