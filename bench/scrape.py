"""Benchmark: `surd build scrape urls` against img2dataset, same URL list, same run, alternated.

    .venv/bin/python bench/scrape.py --count 2000 --img2dataset /path/to/venv/bin/img2dataset

Serves ``count`` photo-like 512 px JPEGs (~90 KB) from nginx on 127.0.0.1 (``apt-get install
nginx``; Python's threading HTTP server when nginx is not on the PATH, much slower, so the ratio
then says little), with a ``robots.txt`` that allows the images and an ``X-Robots-Tag`` scoped to
another agent on every image (both tools parse it, neither is opted out). Then, ``--rounds``
times, runs both command lines on the same URL list, alternating which goes first:

- surd's real CLI, ``surd build scrape urls LIST -w WS --allow-host 127.0.0.1:PORT`` (falling
  back to ``--allow-private`` where the CLI has no ``--allow-host``) with every check on: full
  decode check, X-Robots-Tag, robots.txt, takedown requests, atomic Parquet commits;
- img2dataset (its own virtualenv) with no resize and no re-encoding, Parquet output, the same
  processes and threads (``--processes_count WORKERS --thread_count THREADS``), its defaults
  otherwise (sha256, EXIF extraction, X-Robots-Tag check; no robots.txt, no decode).

Each CLI runs in a fresh workspace / output folder and is timed from start to exit; CPU seconds
are its process tree's (user + system, from ``RUSAGE_CHILDREN``; nginx is not counted for
either). Prints images/s, CPU seconds and the surd/img2dataset ratio per round and their
medians; ``--json`` writes every number. ``--data DIR`` keeps the generated images there for
later runs (20,000 take minutes to make).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.ingest_export import make_images  # noqa: E402
from bench.loopback_server import (  # noqa: E402
    free_port,
    server_pids,
    start_server,
    timed,
    wait_until_idle,
    wait_until_up,
)

SURD_SCRIPT = Path(sys.executable).with_name("surd")


def write_listing(path: Path, base: str, count: int) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["url", "caption"])
        for n in range(count):
            writer.writerow([f"{base}/photo-{n:06d}.jpg", f"{n} foxes, snowy forest, 8k"])


def ensure_images(folder: Path, count: int, size: int) -> None:
    """``photo-000000.jpg``... in ``folder``, made once (kept with ``--data``)."""
    stamp = folder / f".made-{size}px"
    have = 0
    if stamp.is_file():
        have = int(stamp.read_text())
    if have >= count:
        return
    if folder.exists():
        shutil.rmtree(folder)
    make_images(folder, count, size)
    stamp.write_text(str(count))


class Surd:
    name = "surd"

    def __init__(self, args, root: Path, port: int):
        self.args, self.root, self.port = args, root, port
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get(
            "PYTHONPATH", "")]).rstrip(os.pathsep)}  # fmt: skip
        self.base = [*args.surd.split(), "build", "scrape", "urls"]
        self.host_flag = ["--allow-host", f"127.0.0.1:{port}"]

    def command(self, listing: Path, workspace: Path) -> list[str]:
        a = self.args
        return [
            *self.base, str(listing), "-w", str(workspace), *self.host_flag,
            "--threads", str(a.threads), "--workers", str(a.workers),
            "--batch-size", str(a.batch_size), "--no-progress", *a.surd_arg,
        ]  # fmt: skip

    def prepare(self, workspace: Path) -> None:
        if workspace.exists():
            shutil.rmtree(workspace)
        subprocess.run(
            [*self.args.surd.split(), "init", str(workspace)],
            env=self.env, check=True, capture_output=True,
        )  # fmt: skip

    def probe(self, listing: Path, count: int) -> None:
        """A small warm-up run, which also finds the flag that lets it fetch from loopback:
        ``--allow-host HOST:PORT``, ``--allow-host HOST``, else ``--allow-private``."""
        workspace = self.root / "probe-surd"
        host = f"127.0.0.1:{self.port}"
        for flag in (["--allow-host", host], ["--allow-host", "127.0.0.1"], ["--allow-private"]):
            self.host_flag = flag
            self.prepare(workspace)
            run = subprocess.run(
                self.command(listing, workspace), env=self.env, capture_output=True, text=True
            )
            if run.returncode == 0 and self.written(workspace) == count:
                break
        else:
            raise SystemExit(f"surd probe failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
        shutil.rmtree(workspace)

    def written(self, workspace: Path) -> int:
        from surd_builder.workspace import Workspace

        return len(Workspace(workspace).sample_ids("samples"))


class Img2dataset:
    name = "img2dataset"

    def __init__(self, args, root: Path):
        self.args, self.root = args, root
        self.env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}

    def command(self, listing: Path, out: Path) -> list[str]:
        a = self.args
        return [
            a.img2dataset, "--url_list", str(listing), "--input_format", "csv",
            "--url_col", "url", "--caption_col", "caption", "--output_folder", str(out),
            "--output_format", "parquet", "--processes_count", str(a.workers),
            "--thread_count", str(a.threads), "--resize_mode", "no",
            "--skip_reencode", "True", "--disable_all_reencoding", "True",
            "--enable_wandb", "False", "--number_sample_per_shard", str(a.i2d_shard),
        ]  # fmt: skip

    def prepare(self, out: Path) -> None:
        if out.exists():
            shutil.rmtree(out)

    def probe(self, listing: Path, count: int) -> None:
        out = self.root / "probe-i2d"
        run = subprocess.run(self.command(listing, out), env=self.env, capture_output=True)
        if run.returncode != 0:
            raise SystemExit(f"img2dataset probe failed:\n{run.stdout[-2000:]}{run.stderr[-2000:]}")
        shutil.rmtree(out)

    def written(self, out: Path) -> int:
        import pyarrow.parquet as pq

        return sum(
            pq.read_table(part, columns=["status"])["status"].to_pylist().count("success")
            for part in out.glob("*.parquet")
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=16, help="downloads per process (both)")
    parser.add_argument("--workers", type=int, default=2, help="processes (both)")
    parser.add_argument("--batch-size", type=int, default=256, help="surd items per batch")
    parser.add_argument("--i2d-shard", type=int, default=1000, help="img2dataset shard size")
    parser.add_argument(
        "--surd",
        default=str(SURD_SCRIPT) if SURD_SCRIPT.is_file() else f"{sys.executable} -m surd_builder",
        help="surd's command line (default: the venv's `surd`; this checkout goes first on "
        "PYTHONPATH)",
    )
    parser.add_argument(
        "--surd-arg", action="append", default=[], help="extra argument for surd (repeat)"
    )
    parser.add_argument("--img2dataset", help="img2dataset executable in its own venv")
    parser.add_argument("--only", choices=("surd", "img2dataset"), help="run one tool only")
    parser.add_argument("--data", type=Path, help="keep the generated images in this folder")
    parser.add_argument(
        "--max-other",
        type=float,
        default=0.15,
        help="other load (cores) tolerated during a timed run; waited out before each run",
    )
    parser.add_argument("--idle-timeout", type=float, default=120.0, help="longest wait, s")
    parser.add_argument("--retries", type=int, default=2, help="reruns of a disturbed run")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    # a killed bench still stops its server and removes its scratch folder
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    results: dict[str, object] = {
        "count": args.count,
        "size": args.size,
        "workers": args.workers,
        "threads": args.threads,
        "surd_batch_size": args.batch_size,
        "surd_extra_args": args.surd_arg,
        "img2dataset_shard": args.i2d_shard,
        "load_before": os.getloadavg()[0],
        "cpus": os.cpu_count(),
    }
    with tempfile.TemporaryDirectory(dir=args.data) as scratch:
        root = Path(scratch)
        root.chmod(0o755)  # nginx workers run as an unprivileged user
        images = (args.data / "in") if args.data else root / "in"
        ensure_images(images, args.count, args.size)
        results["input_mib"] = (
            sum(images.joinpath(f"photo-{n:06d}.jpg").stat().st_size for n in range(args.count))
            / 2**20
        )
        for n in range(args.count):  # into the page cache, for the first run as for the last
            images.joinpath(f"photo-{n:06d}.jpg").read_bytes()
        port = free_port()
        server, kind = start_server(root, images, port)
        results["server"] = kind
        base = f"http://127.0.0.1:{port}"
        tools = []
        try:
            wait_until_up(f"{base}/photo-000000.jpg")
            listing, probe_listing = root / "urls.csv", root / "probe.csv"
            write_listing(listing, base, args.count)
            write_listing(probe_listing, base, min(args.count, 64))
            if args.only != "img2dataset":
                tools.append(Surd(args, root, port))
            if args.img2dataset and args.only != "surd":
                tools.append(Img2dataset(args, root))
            for tool in tools:
                tool.probe(probe_listing, min(args.count, 64))
            if tools and isinstance(tools[0], Surd):
                results["surd_host_flag"] = " ".join(tools[0].host_flag)
            rounds = []
            pids = server_pids(root)
            for number in range(args.rounds):
                order = tools if number % 2 == 0 else tools[::-1]
                row: dict[str, object] = {"round": number + 1, "first": order[0].name}
                for tool in order:
                    target = root / f"out-{tool.name}"
                    for attempt in range(args.retries + 1):
                        tool.prepare(target)
                        os.sync()
                        wait_until_idle(args.max_other, args.idle_timeout)
                        log = root / f"{tool.name}-{number + 1}.log"
                        run = timed(tool.command(listing, target), tool.env, log, pids)
                        if run["status"] != 0:
                            raise SystemExit(f"{tool.name} failed:\n{log.read_text()}")
                        written = tool.written(target)
                        if written != args.count:
                            raise SystemExit(
                                f"{tool.name} stored {written} of {args.count}:\n{log.read_text()}"
                            )
                        shutil.rmtree(target)
                        if run["other_cores"] <= args.max_other:
                            break
                        redone = ", redone" if attempt < args.retries else ""
                        print(
                            f"  ({tool.name}: other load {run['other_cores']:.2f} cores during the"
                            f" run, attempt {attempt + 1}{redone})",
                            flush=True,
                        )
                    seconds, cpu = run["seconds"], run["cpu_seconds"]
                    row[f"{tool.name}_images_per_s"] = args.count / seconds
                    row[f"{tool.name}_seconds"] = seconds
                    row[f"{tool.name}_cpu_seconds"] = cpu
                    row[f"{tool.name}_cpu_us_per_image"] = cpu / args.count * 1e6
                    row[f"{tool.name}_server_cpu_seconds"] = run["server_cpu_seconds"]
                    row[f"{tool.name}_other_cores"] = run["other_cores"]
                if len(tools) == 2:
                    row["ratio"] = row["surd_images_per_s"] / row["img2dataset_images_per_s"]
                rounds.append(row)
                print(
                    "  ".join(
                        f"{k}={v:,.2f}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in row.items()
                    ),
                    flush=True,
                )
            results["rounds"] = rounds
            for key in rounds[0] if rounds else ():
                if isinstance(rounds[0][key], float):
                    results[f"median_{key}"] = statistics.median(r[key] for r in rounds)
        finally:
            if server is not None:
                server.terminate()
            elif (root / "nginx.pid").exists():
                subprocess.run(
                    ["nginx", "-c", str(root / "nginx.conf"), "-s", "stop"],
                    check=False,
                    capture_output=True,
                )

    for key, value in results.items():
        if key == "rounds":
            continue
        print(
            f"{key:<34} {value:>12,.2f}" if isinstance(value, float) else f"{key:<34} {value!s:>12}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
