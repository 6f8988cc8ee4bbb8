"""Progress bars for long work (rich), written to stderr so stdout stays clean for results."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

stderr_console = Console(stderr=True)


@contextlib.contextmanager
def progress_bar(
    description: str, total: int, enabled: bool = True, show_failed: bool = False
) -> Iterator[Callable[..., None]]:
    """Yield ``advance(n, **fields)``: moves the bar by ``n`` items and updates shown counters
    (``failed=3`` with ``show_failed``). With ``enabled=False`` nothing is drawn."""
    if not enabled:
        yield lambda n, **fields: None
        return
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
    ]
    if show_failed:
        columns.append(TextColumn("{task.fields[bytes_rate]} failed {task.fields[failed]}"))
    columns += [TimeElapsedColumn(), TimeRemainingColumn()]
    progress = Progress(*columns, console=stderr_console, transient=False)
    with progress:
        task = progress.add_task(description, total=total, failed=0, rate="", bytes_rate="")

        def advance(n: int, **fields: object) -> None:
            progress.update(task, advance=n, **fields)
            speed = progress.tasks[task].speed
            if speed:
                progress.update(task, rate=f"{speed:,.1f} items/s")

        yield advance
