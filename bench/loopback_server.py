"""The loopback image server and the CPU accounting behind ``bench/scrape.py``'s timings.

Kept apart from the benchmark so that its main file is the comparison itself: starting nginx
(or Python's ``http.server``) on 127.0.0.1 with a ``robots.txt`` and an ``X-Robots-Tag``,
waiting for it, finding its processes, waiting until the machine is idle, and timing a command
line (wall time, its process tree's CPU, the server's, and the rest of the machine's).
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

NGINX_CONF = """
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  types {{ image/jpeg jpg; text/plain txt; }}
  server {{
    listen 127.0.0.1:{port}; root {images}; keepalive_requests 100000;
    location = /robots.txt {{ root {root}; }}
    location / {{ add_header X-Robots-Tag "{x_robots_tag}"; }}
  }}
  client_body_temp_path {root}/tmp; proxy_temp_path {root}/tmp; fastcgi_temp_path {root}/tmp;
  uwsgi_temp_path {root}/tmp; scgi_temp_path {root}/tmp;
}}
"""
ROBOTS_TXT = "User-agent: *\nDisallow: /private/\n\nUser-agent: badbot\nDisallow: /\n"
X_ROBOTS_TAG = "otherbot: noai"  # parsed by both tools; applies to neither


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(root: Path, images: Path, port: int) -> tuple[subprocess.Popen | None, str]:
    (root / "robots.txt").write_text(ROBOTS_TXT)
    if shutil.which("nginx"):
        (root / "tmp").mkdir()
        conf = NGINX_CONF.format(root=root, images=images, port=port, x_robots_tag=X_ROBOTS_TAG)
        (root / "nginx.conf").write_text(conf)
        subprocess.run(["nginx", "-c", str(root / "nginx.conf")], check=True)
        return None, "nginx"
    shutil.copy(root / "robots.txt", images / "robots.txt")
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=images,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return server, "python http.server (no X-Robots-Tag)"


def wait_until_up(url: str) -> None:
    import urllib.request

    for _ in range(200):
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"server at {url} did not come up")


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


TICK = os.sysconf("SC_CLK_TCK")


def machine_busy() -> float:
    """CPU seconds all processes of the machine have used since boot (``/proc/stat``)."""
    with open("/proc/stat") as stat:
        fields = [int(f) for f in stat.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / TICK  # all but idle and iowait


def process_cpu(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total / TICK


def server_pids(root: Path) -> list[int]:
    """nginx's master and workers (their CPU is the server's, counted for neither tool)."""
    try:
        master = int((root / "nginx.pid").read_text())
    except (OSError, ValueError):
        return []
    pids = [master]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == master:
                pids.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            pass
    return pids


def wait_until_idle(limit: float, timeout: float) -> float:
    """Wait (up to ``timeout`` s) until the machine's other load is under ``limit`` cores over
    a second; returns the load of the last second."""
    deadline = time.monotonic() + timeout
    while True:
        before, start = machine_busy(), time.perf_counter()
        time.sleep(1.0)
        load = (machine_busy() - before) / (time.perf_counter() - start)
        if load < limit or time.monotonic() > deadline:
            return load


def timed(
    command: list[str], env: dict[str, str], log: Path, server: list[int]
) -> dict[str, float]:
    """Wall seconds, CPU seconds of the command's process tree, of the server, and of everything
    else on the machine during the run (``other_cores``: other load, in cores), exit status."""
    os.sync()  # earlier runs' writes are not flushed during this one
    busy, served = machine_busy(), process_cpu(server)
    cpu, start = children_cpu(), time.perf_counter()
    with log.open("wb") as out:
        status = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    seconds, cpu = time.perf_counter() - start, children_cpu() - cpu
    served = process_cpu(server) - served
    other = max(0.0, machine_busy() - busy - cpu - served)
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "server_cpu_seconds": served,
        "other_cores": other / seconds,
        "status": status,
    }
