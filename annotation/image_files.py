"""``surd annotate write-images``: the images as plain files, for Label Studio's own local
storage (same origin as Label Studio: no CORS, no image server to run).

Each image becomes ``<folder>/<sha256>.<ext>`` (the name the ``{image_file}`` placeholder of
``push --image-url-template`` gives), written atomically; files already there are left alone,
so a second run writes only what is new and an interrupted one resumes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from surd_builder.atomic import atomic_path
from surd_builder.progress import progress_bar
from surd_builder.workspace import Workspace

# PIL's format names (the samples' image_format) -> the extension browsers and Label Studio
# (mimetypes) read the type from
EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp"}
READ_BATCH = 256  # images read from the store at a time: memory stays bounded


def image_file(image_sha256: str, image_format: str | None) -> str:
    """The file name of an image (``{image_file}`` in URL templates)."""
    return f"{image_sha256}.{EXTENSIONS.get((image_format or '').upper(), 'img')}"


@dataclass
class WriteReport:
    images: int = 0
    written: int = 0
    present: int = 0
    bytes_written: int = 0


def write_image_files(
    workspace: Workspace,
    folder: Path,
    images: Iterable[tuple[str, str | None]],
    show_progress: bool = True,
) -> WriteReport:
    """Write ``(image_sha256, image_format)`` images into ``folder`` as :func:`image_file`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    wanted = dict(images)
    report = WriteReport(images=len(wanted))
    todo = []
    for sha, image_format in sorted(wanted.items()):
        if (folder / image_file(sha, image_format)).is_file():
            report.present += 1
        else:
            todo.append(sha)
    with progress_bar("write images", len(todo), show_progress) as advance:
        for start in range(0, len(todo), READ_BATCH):
            batch = todo[start : start + READ_BATCH]
            for sha, data in workspace.read_images(batch).items():
                with atomic_path(folder / image_file(sha, wanted[sha])) as temp:
                    Path(temp).write_bytes(data)
                report.written += 1
                report.bytes_written += len(data)
            advance(len(batch))
    return report
