"""The only module that talks to Label Studio (through its SDK, ``label-studio-sdk`` 2.x).

Everything a user can get wrong about the connection ends here as one line: an unreachable
server, a rejected token, a project that does not exist or whose labeling config is not surd's.
The URL and key come from ``LABEL_STUDIO_URL`` / ``LABEL_STUDIO_API_KEY`` (the SDK's own names)
or the command line; both legacy tokens and personal access tokens work (the SDK tells them
apart). The key is never logged or written anywhere.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

from annotation.config import check_label_config, label_config
from annotation.tasks import PREDICTION_MODEL_VERSION, parse_time
from surd_builder.errors import ServiceError

T = TypeVar("T")
# Label Studio's data-manager filters take datetimes in exactly this form (anything else: HTTP 500)
FILTER_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
EXPORT_IDS_PER_REQUEST = 300  # ids[]=... in a GET: well under common 8 KiB request-line limits
LISTING_PAGE_SIZE = 100_000  # one page where the server allows it (TASK_API_PAGE_SIZE_MAX)


class AnnotationError(ServiceError):
    """The annotation server cannot do what was asked; the message says why and what to do."""


@dataclass(frozen=True)
class Project:
    id: int
    title: str
    task_count: int | None = field(default=None, compare=False)  # when it was read
    # the server's clock when it was read (its Date header): where the next read of what
    # changed may start
    read_at: datetime | None = field(default=None, compare=False)
    # the prediction version the project pre-fills from ("Label All Tasks" uses only that one)
    model_version: str = field(default=PREDICTION_MODEL_VERSION, compare=False)


def _is_narrative_prediction(result: Any) -> bool:
    return any(
        isinstance(item, dict) and item.get("from_name") == "narrative_prompt"
        for item in result or []
    )


def _task_query(ordering: list[str], only: tuple[str, str, str, Any] | None = None) -> str:
    """A data-manager ``query`` for ``GET /api/tasks``: the ordering and at most one filter,
    ``(filter, operator, type, value)``, e.g. ``("filter:tasks:id", "greater", "Number", 5)``."""
    query: dict[str, Any] = {"ordering": ordering}
    if only is not None:
        name, operator, kind, value = only
        query["filters"] = {
            "conjunction": "and",
            "items": [{"filter": name, "operator": operator, "type": kind, "value": value}],
        }
    return json.dumps(query)


def _server_time(date_header: str | None) -> datetime | None:
    """An HTTP Date header as aware UTC (None when absent or unreadable)."""
    if not date_header:
        return None
    try:
        return parsedate_to_datetime(date_header).astimezone(UTC)
    except (TypeError, ValueError):
        return None


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
        if isinstance(error.body, dict) and error.body.get("validation_errors"):
            # Label Studio's reason ("Validation error" alone says nothing)
            detail = f"{detail}: {json.dumps(error.body['validation_errors'])}"
        raise AnnotationError(
            f"Label Studio at {url}: HTTP {status} while {what}: {str(detail)[:300]}"
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
        """An existing project, checked to have surd's labeling config, with its task count."""
        project = self.find_project(title)
        if project is None:
            raise AnnotationError(
                f"no project {title!r} on {self.url} (surd annotate push creates it)"
            )
        return self.check_config(project)

    def find_or_create_project(self, title: str, description: str = "") -> tuple[Project, bool]:
        project = self.find_project(title)
        if project is not None:
            return self.check_config(project), False
        created = self.call(
            "creating the project",
            self._sdk.projects.create,
            title=title,
            description=description,
            label_config=label_config(),
            # pre-fill every task from surd's prediction, in the label stream too
            show_collab_predictions=True,
            model_version=PREDICTION_MODEL_VERSION,
        )
        return Project(created.id, created.title, task_count=0), True

    def check_config(self, project: Project) -> Project:
        """``project`` with its task count, after checking it has surd's labeling config. Only
        the fields read are asked for: every count Label Studio adds is a query per request."""
        response = self.call(
            "reading the project",
            self._sdk.projects.with_raw_response.get,
            id=project.id,
            request_options={
                "additional_query_parameters": {
                    "include": "id,title,label_config,task_number,model_version"
                }
            },
        )
        details = response.data
        problem = check_label_config(details.label_config or "")
        if problem:
            raise AnnotationError(
                f"project {project.title!r} does not use surd's labeling config ({problem}); "
                "use another project name"
            )
        return Project(
            project.id,
            project.title,
            task_count=details.task_number,
            read_at=_server_time(response.headers.get("date")),
            # a project of an older surd selects its first rewriter's version: new predictions
            # take that one, so they pre-fill there as its first tasks do
            model_version=details.model_version or PREDICTION_MODEL_VERSION,
        )

    def task_times(
        self, project: Project, since: datetime | None = None
    ) -> dict[int, tuple[datetime | None, int]]:
        """task id -> (the task's ``updated_at``, how many annotations it has, skips included),
        for tasks updated at or after ``since`` (all when None). Label Studio bumps the time
        when an annotation is created, edited or deleted, so this is what changed; only these
        fields travel (``include``), ordered by id so pages do not shift when a task is updated
        during the listing."""
        updated_since = None
        if since is not None:
            value = since.astimezone(UTC).strftime(FILTER_TIME_FORMAT)
            updated_since = ("filter:tasks:updated_at", "greater_or_equal", "Datetime", value)
        query = _task_query(["tasks:id"], updated_since)

        def listing() -> dict[int, tuple[datetime | None, int]]:
            pages = self._sdk.tasks.list(
                project=project.id,
                fields="task_only",
                include="id,updated_at,total_annotations,cancelled_annotations",
                query=query,
                page_size=LISTING_PAGE_SIZE,
            )
            return {
                task.id: (
                    parse_time(task.updated_at),
                    (task.total_annotations or 0) + (task.cancelled_annotations or 0),
                )
                for task in pages
            }

        return self.call("listing changed tasks", listing)

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

    def tasks_after(self, project: Project, task_id: int) -> tuple[int, int]:
        """(how many tasks have an id above ``task_id``, the project's highest task id): Label
        Studio's ids only grow, so this counts the tasks created since ``task_id`` was the
        newest, in one small request (one row, the total from the server)."""
        query = _task_query(["-tasks:id"], ("filter:tasks:id", "greater", "Number", task_id))

        def first_page() -> tuple[int, int]:
            pages = self._sdk.tasks.list(
                project=project.id,
                fields="task_only",
                include="id",
                query=query,
                page_size=1,
            )
            newest = next(iter(pages.items or []), None)
            total = getattr(pages.response, "total", None)
            return (total or 0), (newest.id if newest is not None else task_id)

        return self.call("counting new tasks", first_page)

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

    def export_tasks(
        self,
        project: Project,
        ids: Sequence[int] | None = None,
        annotated_only: bool = False,
    ) -> list[dict[str, Any]]:
        """Tasks with their annotations, as Label Studio's JSON export gives them: every task,
        only those with an annotation (``annotated_only``, skipped ones included), or the tasks
        ``ids`` (several requests of :data:`EXPORT_IDS_PER_REQUEST`)."""
        if ids is None:
            return self._export(project, download_all_tasks=not annotated_only)
        ids = list(ids)
        tasks: list[dict[str, Any]] = []
        for start in range(0, len(ids), EXPORT_IDS_PER_REQUEST):
            chunk = ids[start : start + EXPORT_IDS_PER_REQUEST]
            # the server reads ``ids[]`` (the SDK's own ``ids`` parameter is ignored by it)
            tasks.extend(self._export(project, download_all_tasks=True, task_ids=chunk))
        return tasks

    def _export(
        self, project: Project, download_all_tasks: bool, task_ids: list[int] | None = None
    ) -> list[dict[str, Any]]:
        options = {"additional_query_parameters": {"ids[]": task_ids}} if task_ids else None

        def download() -> bytes:
            chunks = self._sdk.projects.exports.download_sync(
                id=project.id,
                export_type="JSON",
                download_all_tasks=download_all_tasks,
                request_options=options,
            )
            return chunks if isinstance(chunks, bytes) else b"".join(chunks)

        data = self.call("exporting annotations", download)
        try:
            return json.loads(data)
        except ValueError:
            raise AnnotationError("Label Studio's export was not JSON; try again") from None

    def ensure_local_storage(self, project: Project, path: str) -> None:
        """The project's Local files storage for ``path`` (made once, never synced: the tasks
        exist already). Label Studio serves ``/data/local-files/?d=...`` only to users of a
        project with a storage above the file, and only with LOCAL_FILES_SERVING_ENABLED."""
        storages = self.call(
            "listing local storages", self._sdk.import_storage.local.list, project=project.id
        )
        if any((storage.path or "").rstrip("/") == path.rstrip("/") for storage in storages):
            return
        self.call(
            "adding a local files storage (needs LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true "
            "and the folder under LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT)",
            self._sdk.import_storage.local.create,
            project=project.id,
            path=path,
            title="surd images",
            use_blob_urls=False,
        )

    def update_task(self, task_id: int, data: dict[str, Any]) -> None:
        """Replace a task's data (Label Studio replaces it whole; it does not merge)."""
        self.call("updating a task", self._sdk.tasks.update, id=str(task_id), data=data)

    def replace_narrative_prediction(self, task_id: int, prediction: dict[str, Any]) -> None:
        """``prediction`` as the task's narrative prediction: surd's (those whose result fills
        the narrative text area) are updated in place, the first one, or deleted, the rest;
        any other prediction (an ML backend's) is left alone."""
        existing = self.call(
            "listing a task's predictions", self._sdk.predictions.list, task=task_id
        )
        ours = [p.id for p in existing if _is_narrative_prediction(p.result)]
        fields = {
            "result": prediction["result"],
            "model_version": prediction["model_version"],
            "score": prediction.get("score"),  # None clears an old score
        }
        if not ours:
            self.call("creating a prediction", self._sdk.predictions.create, task=task_id, **fields)
            return
        first, *others = ours
        self.call("updating a prediction", self._sdk.predictions.update, id=first, **fields)
        for other in others:
            self.call("deleting a prediction", self._sdk.predictions.delete, id=other)

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
