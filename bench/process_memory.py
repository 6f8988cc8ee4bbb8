"""Sampling a process tree's memory from ``/proc``: its summed RSS/PSS (``smaps_rollup``) and
what it maps of the files under a folder (``smaps``), for bench/train_memory.py's measured runs
and its step timing's own memory. Linux only; no third-party imports."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any


def smaps_rollup(pid: int) -> dict[str, int]:
    """The kB fields of ``/proc/<pid>/smaps_rollup`` (empty if the process is gone)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return {}
    values = {}
    for line in text.splitlines()[1:]:
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[name] = int(parts[0])
    return values


def process_tree(root: int) -> list[int]:
    """``root`` and its descendants, from every process's parent in ``/proc/*/stat``."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        parent = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def mapped_under(pid: int, prefix: str) -> tuple[int, int]:
    """(Rss, Pss) in kB of ``pid``'s mappings of files under ``prefix``, from
    ``/proc/<pid>/smaps`` ((0, 0) if the process is gone)."""
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return 0, 0
    rss = pss = 0
    inside = False
    for line in text.splitlines():
        head = line.split(None, 5)
        if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):
            inside = len(head) == 6 and head[5].startswith(prefix)  # a mapping's header line
        elif inside and line.startswith("Rss:"):
            rss += int(line.split()[1])
        elif inside and line.startswith("Pss:"):
            pss += int(line.split()[1])
    return rss, pss


class TreeSampler(threading.Thread):
    """Polls a process tree's smaps_rollup every ``interval`` s, keeping each sum's peak; about
    once a second also its full smaps, for what it maps of the files under ``mapped_prefix``
    (the cache folder)."""

    SUMS = ("Rss", "Pss", "Pss_Anon", "Pss_File", "Anonymous")

    def __init__(self, root: int, interval: float, mapped_prefix: str | None = None):
        super().__init__(daemon=True)
        self.root, self.interval, self.prefix = root, interval, mapped_prefix
        self.stop = threading.Event()
        self.peaks = dict.fromkeys(self.SUMS, 0)
        self.peak_single_rss, self.peak_processes, self.samples = 0, 0, 0
        # at the once-a-second samples: the cache's mapped pages, and PSS without them
        self.peak_cache_rss = self.peak_cache_pss = self.peak_pss_without_cache = 0
        # [s, Rss, Pss, Pss_Anon, cache Rss, cache Pss] (kB), about once a second
        self.timeline: list[list[float]] = []
        self.per_process: dict[int, dict[str, Any]] = {}  # pid -> its command and peaks
        self.started = time.monotonic()

    def run(self) -> None:
        last_detail = -1.0
        while not self.stop.is_set():
            sums = dict.fromkeys(self.SUMS, 0)
            pids = process_tree(self.root)
            for pid in pids:
                values = smaps_rollup(pid)
                for name in self.SUMS:
                    sums[name] += values.get(name, 0)
                self.peak_single_rss = max(self.peak_single_rss, values.get("Rss", 0))
                self._per_process(pid, values)
            for name in self.SUMS:
                self.peaks[name] = max(self.peaks[name], sums[name])
            self.peak_processes = max(self.peak_processes, len(pids))
            self.samples += 1
            now = time.monotonic() - self.started
            if now - last_detail >= 1.0:
                cache_rss = cache_pss = 0
                if self.prefix:
                    for pid in pids:
                        rss, pss = mapped_under(pid, self.prefix)
                        cache_rss, cache_pss = cache_rss + rss, cache_pss + pss
                self.peak_cache_rss = max(self.peak_cache_rss, cache_rss)
                self.peak_cache_pss = max(self.peak_cache_pss, cache_pss)
                self.peak_pss_without_cache = max(
                    self.peak_pss_without_cache, sums["Pss"] - cache_pss
                )
                self.timeline.append([round(now, 1), sums["Rss"], sums["Pss"], sums["Pss_Anon"],
                                      cache_rss, cache_pss])  # fmt: skip
                last_detail = now
            self.stop.wait(self.interval)

    def _per_process(self, pid: int, values: dict[str, int]) -> None:
        if not values:
            return
        if pid not in self.per_process:
            try:
                words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                words = []
            command = " ".join(word.decode(errors="replace") for word in words[:4])
            self.per_process[pid] = {"command": command, "rss_mib": 0.0, "pss_mib": 0.0,
                                     "pss_anon_mib": 0.0}  # fmt: skip
        entry = self.per_process[pid]
        for key, name in (("rss_mib", "Rss"), ("pss_mib", "Pss"), ("pss_anon_mib", "Pss_Anon")):
            entry[key] = max(entry[key], values.get(name, 0) / 1024)

    def result(self) -> dict[str, Any]:
        return {
            "peak_rss_mib": self.peaks["Rss"] / 1024,
            "peak_pss_mib": self.peaks["Pss"] / 1024,
            "peak_pss_anon_mib": self.peaks["Pss_Anon"] / 1024,
            "peak_pss_file_mib": self.peaks["Pss_File"] / 1024,
            "peak_anonymous_mib": self.peaks["Anonymous"] / 1024,
            "peak_single_process_rss_mib": self.peak_single_rss / 1024,
            "peak_cache_mapped_rss_mib": self.peak_cache_rss / 1024,
            "peak_cache_mapped_pss_mib": self.peak_cache_pss / 1024,
            "peak_pss_without_cache_mib": self.peak_pss_without_cache / 1024,
            "peak_processes": self.peak_processes,
            "per_process_peaks": [
                entry for entry in self.per_process.values() if entry["rss_mib"] >= 20
            ],  # fmt: skip
            "memory_samples": self.samples,
            "timeline_kib": self.timeline,
        }
