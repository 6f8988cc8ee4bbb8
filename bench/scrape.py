"""Benchmark: download throughput of `surd build scrape urls` on loopback, and img2dataset's.

    .venv/bin/python bench/scrape.py --count 5000 [--img2dataset /path/to/venv/bin/img2dataset]

Serves ``count`` photo-like 512 px JPEGs (~90 KB) from nginx on 127.0.0.1 when ``nginx`` is on the
PATH (as a real server would), else from Python's threading HTTP server, writes a URL list, then
times surd's scrape stage (threads, full image check, Parquet writes) and, when given, img2dataset
on the same list (no resize, no re-encode, parquet output) in its own virtualenv. Prints images/s,
CPU seconds and the ratio; ``--json`` writes the numbers.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest_export import make_images  # noqa: E402

from pipelines.download import FetchOptions  # noqa: E402
from pipelines.runner import RunOptions, run_stage  # noqa: E402
from pipelines.scrape import ScrapeStage  # noqa: E402
from pipelines.sources.urls import UrlListSource  # noqa: E402
from surd_builder.workspace import Workspace  # noqa: E402

NGINX_CONF = """
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  types {{ image/jpeg jpg; }}
  server {{ listen 127.0.0.1:{port}; root {root}/in; keepalive_requests 100000; }}
  client_body_temp_path {root}/tmp; proxy_temp_path {root}/tmp; fastcgi_temp_path {root}/tmp;
  uwsgi_temp_path {root}/tmp; scgi_temp_path {root}/tmp;
}}
"""


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(root: Path, port: int) -> tuple[subprocess.Popen | None, str]:
    if shutil.which("nginx"):
        (root / "tmp").mkdir()
        (root / "nginx.conf").write_text(NGINX_CONF.format(root=root, port=port))
        subprocess.run(["nginx", "-c", str(root / "nginx.conf")], check=True)
        return None, "nginx"
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=root / "in",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return server, "python http.server"


def wait_until_up(url: str) -> None:
    import requests

    for _ in range(200):
        try:
            if requests.get(url, timeout=1).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.05)
    raise SystemExit(f"server at {url} did not come up")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1, help="surd worker processes")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--no-decode-check", action="store_true", help="header check only")
    parser.add_argument("--img2dataset", help="img2dataset executable in its own venv")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    results: dict[str, object] = {
        "count": args.count,
        "size": args.size,
        "surd_workers": args.workers,
        "surd_threads": args.threads,
        "surd_decode_check": not args.no_decode_check,
    }
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        root.chmod(0o755)  # nginx workers run as an unprivileged user
        input_bytes = make_images(root / "in", args.count, args.size)
        results["input_mib"] = input_bytes / 2**20
        port = free_port()
        server, kind = start_server(root, port)
        results["server"] = kind
        base = f"http://127.0.0.1:{port}"
        try:
            wait_until_up(f"{base}/photo-000000.jpg")
            listing = root / "urls.csv"
            with listing.open("w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(["url", "caption"])
                for n in range(args.count):
                    writer.writerow([f"{base}/photo-{n:06d}.jpg", f"{n} foxes, snowy forest, 8k"])

            workspace = Workspace.create(root / "ws")
            stage = ScrapeStage(
                UrlListSource(listing),
                FetchOptions(allow_private=True),
                threads=args.threads,
                decode_check=not args.no_decode_check,
            )
            cpu, start = cpu_seconds(), time.perf_counter()
            options = RunOptions(
                batch_size=args.batch_size, workers=args.workers, show_progress=False
            )
            report = run_stage(stage, workspace, options)
            seconds = time.perf_counter() - start
            assert report.written == args.count, report
            results["surd_images_per_s"] = args.count / seconds
            results["surd_seconds"] = seconds
            results["surd_cpu_seconds"] = cpu_seconds() - cpu

            if args.img2dataset:
                out = root / "i2d"
                command = [
                    args.img2dataset, "--url_list", str(listing), "--input_format", "csv",
                    "--url_col", "url", "--caption_col", "caption", "--output_folder", str(out),
                    "--output_format", "parquet", "--processes_count", str(os.cpu_count() or 2),
                    "--thread_count", str(args.threads), "--resize_mode", "no",
                    "--skip_reencode", "True", "--disable_all_reencoding", "True",
                    "--enable_wandb", "False", "--number_sample_per_shard", "1000",
                ]  # fmt: skip
                cpu, start = cpu_seconds(), time.perf_counter()
                subprocess.run(command, check=True, capture_output=True)
                seconds = time.perf_counter() - start
                results["img2dataset_images_per_s"] = args.count / seconds
                results["img2dataset_seconds"] = seconds
                results["img2dataset_cpu_seconds"] = cpu_seconds() - cpu
                results["surd_over_img2dataset"] = (
                    results["surd_images_per_s"] / results["img2dataset_images_per_s"]
                )
        finally:
            if server is not None:
                server.terminate()
            elif (root / "nginx.pid").exists():
                subprocess.run(["nginx", "-c", str(root / "nginx.conf"), "-s", "stop"], check=False)

    for key, value in results.items():
        print(
            f"{key:<28} {value:>12,.2f}" if isinstance(value, float) else f"{key:<28} {value!s:>12}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
