"""Reading a local folder safely: which files under it are images, and the rule for opening them.

A folder people point ``surd build ingest`` at is not a tidy dataset: it holds OS and photo-tool
litter, hidden files, links (some looping, some leading out of it), unreadable subfolders and
file names that are not valid UTF-8. This module is the one place that walks such a folder and
decides what may be read under it (nothing whose real path leaves it), apart from the ingest
stage in :mod:`pipelines.ingest` that turns the images found into samples, so the rule is
written once and read on its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.records import ItemRejected

IMAGE_EXTENSIONS = frozenset(
    {
        *(".png", ".apng", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".bmp", ".dib", ".gif"),
        *(".tif", ".tiff", ".tga", ".ppm", ".pgm", ".pbm", ".pnm", ".ico", ".jp2", ".j2k"),
        *(".jpx", ".avif", ".qoi", ".pcx", ".psd"),
    }
)
# What operating systems and photo tools leave in folders: never items, never reported. Names
# starting with a dot (.DS_Store, AppleDouble ._x.jpg, .thumbnails/, .Trash-1000/) are hidden
# too.
LITTER_NAMES = frozenset(
    {
        "__macosx",
        "@eadir",
        "thumbs.db",
        "ehthumbs.db",
        "desktop.ini",
        "$recycle.bin",
        "system volume information",
        "#recycle",
        "#snapshot",
    }
)


def display_name(relative: str) -> str:
    """A relative path as text that any file can hold: a name that is not valid UTF-8 (from an
    old Windows or Mac disk) has each undecodable byte written ``\\xNN``, one spelling per
    file, so it is an item like any other (its id, its failure rows) and is opened by its
    real bytes."""
    return os.fsencode(relative).decode("utf-8", "backslashreplace")


def is_litter(name: str) -> bool:
    return name.startswith(".") or name.lower() in LITTER_NAMES


@dataclass
class Found:
    """What a walk of the input folder found: images by relative path (the path each is read
    by), and entries refused with a reason (``outside-folder``: a link leading out)."""

    images: dict[str, str] = field(default_factory=dict)  # relative path -> real path
    refused: dict[str, tuple[str, str]] = field(default_factory=dict)  # path -> (reason, why)


class FolderRoot:
    """The folder the user named, and the one rule for reading under it: nothing whose real
    path (every link resolved) leaves it is read."""

    def __init__(self, folder: Path):
        self.path = Path(folder)
        self.real = os.path.realpath(folder)

    def contains(self, real: str) -> bool:
        return real == self.real or real.startswith(self.real.rstrip(os.sep) + os.sep)

    def resolve(self, relative: str, what: str) -> str:
        """Real path of ``relative``; :class:`ItemRejected` when a link leads out of the folder."""
        real = os.path.realpath(self.path / relative)
        if not self.contains(real):
            raise ItemRejected("outside-folder", f"{display_name(relative)}: {what} links out")
        return real

    def walk(self) -> Found:
        """Image files under the folder, each real file once, as sorted posix paths relative to
        it. Folders and files are taken where they really are first; a link inside the folder
        is followed once, for what no real path reached (a loop, or a second link to a folder
        already walked, adds nothing); a link leading out is refused. Hidden entries and OS
        litter are skipped."""
        found = Found()
        by_real: dict[str, str] = {}
        walked: set[str] = set()
        folders: list[tuple[str, str]] = [(str(self.path), "")]
        linked_folders: list[tuple[str, str]] = []
        linked_files: list[tuple[str, str]] = []
        while folders or linked_folders:
            directory, prefix = folders.pop() if folders else linked_folders.pop(0)
            real_directory = os.path.realpath(directory)
            if real_directory in walked:
                continue
            walked.add(real_directory)
            try:
                entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
            except OSError as error:
                found.refused[prefix.rstrip("/") or "."] = ("unreadable", str(error.strerror))
                continue
            for entry in entries:
                if is_litter(entry.name):
                    continue
                relative = prefix + entry.name
                image = Path(entry.name).suffix.lower() in IMAGE_EXTENSIONS
                try:
                    if entry.is_symlink():
                        real = os.path.realpath(entry.path)
                        if not self.contains(real):
                            if image or os.path.isdir(real):
                                found.refused[relative] = ("outside-folder", "a link out of it")
                        elif os.path.isdir(real):
                            linked_folders.append((entry.path, relative + "/"))
                        elif image:
                            linked_files.append((relative, real))
                    elif entry.is_dir(follow_symlinks=False):
                        folders.append((entry.path, relative + "/"))
                    elif image:  # not a link, in a resolved folder: its real path is known
                        by_real.setdefault(os.path.join(real_directory, entry.name), relative)
                except OSError:
                    continue
            folders.sort(reverse=True)  # popped from the end: walked in name order
        for relative, real in sorted(linked_files):
            if os.path.isfile(real):
                by_real.setdefault(real, relative)
            else:
                found.refused[relative] = ("missing-file", "a link to nothing")
        found.images = {relative: real for real, relative in by_real.items()}
        return found
