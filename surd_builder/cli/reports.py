"""Tables a command prints at its end: the run report of a stage, the export report."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

console = Console()


def print_run_report(report) -> None:
    console.print(f"[bold]{report.stage}[/bold]: {report.status} in {report.seconds:.1f} s")
    table = Table()
    table.add_column("count")
    table.add_column("value", justify="right")
    for key in ("planned", "already_done", "processed", "written", "failed", "new_images"):
        table.add_row(key.replace("_", " "), f"{getattr(report, key):,}")
    table.add_row("image MiB", f"{report.image_bytes / 2**20:,.1f}")
    for reason, number in report.failures_by_reason.items():
        table.add_row(f"  failed: {reason}", f"{number:,}")
    for name, number in report.stage_counts.items():
        table.add_row(name.replace("_", " "), f"{number:,}")
    console.print(table)


def print_export_report(report) -> None:
    console.print(f"[bold]export[/bold]: {report.exported:,} samples -> {report.out}")
    table = Table()
    table.add_column("count")
    table.add_column("value", justify="right")
    table.add_row("in workspace", f"{report.in_workspace:,}")
    for split, number in report.by_split.items():
        table.add_row(f"split {split}", f"{number:,}")
    for reason, number in report.skipped.items():
        table.add_row(f"left out: {reason}", f"{number:,}")
    clusters = report.clusters or {}
    if clusters.get("clusters"):
        table.add_row("near-duplicate clusters", f"{clusters['clusters']:,}")
        table.add_row("  duplicates dropped", f"{clusters.get('duplicates_dropped', 0):,}")
        table.add_row("  duplicates kept", f"{clusters.get('duplicates_kept', 0):,}")
    table.add_row("files", f"{len(report.files):,}")
    table.add_row("MiB written", f"{report.bytes_written / 2**20:,.1f}")
    console.print(table)
