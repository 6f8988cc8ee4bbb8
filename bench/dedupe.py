"""Benchmark: near-duplicate search, perceptual hashing and what dedupe merges (by hand, not
a test). Everything issue 24 asks for, in one run (about 10 minutes on 2 cores):

    .venv/bin/python bench/dedupe.py --json bench-dedupe.json

1. Search: ``--count`` random 64-bit hashes with 1% planted near-duplicate pairs (1..k bits
   apart), all pairs within ``k`` found by the multi-index search on 1 and ``--workers``
   threads (best and median of ``--repeat`` runs, after one call that compiles or loads the
   loop). Brute force's ns/pair is measured in the same run on a ``--subsample`` and
   extrapolated to ``N * (N - 1) / 2`` pairs, for the speedup and the goal (1M, k=8 in <= 5 s
   where brute force runs at 1 ns/pair, scaled). Exactness: the pairs found inside the subsample
   equal brute force's, every planted pair is found, 1 and ``--workers`` threads agree. Peak RSS
   (getrusage). Also 10k/50k/100k hashes, the sizes imagededup was timed at on this machine type
   (FACTS.md), for the ratio.
2. Hashing, one core: collection's check + hash (:func:`pipelines.records.inspect_and_hash`:
   one decode at a reduced DCT scale, checked and hashed: pHash, mirror and crop hashes, colour
   layouts) against imagehash's pHash with a full decode, same files, same run (goal 2.5x);
   also the check alone, the hash stage's signature alone, and the whole ingest stage. On real
   photos (crops of scikit-learn's two sample photos, when it is installed) and on photo-like
   images.
3. False merges among ``--flat`` distinct flat synthetic images (``bench/dedupe_quality.py``):
   pHash alone, with the colour check, with the variant hashes, with both.
4. Recall of mirrored and cropped re-posts of ``--photos`` photo-like images, with and without
   the colour check and the variant hashes (``bench/dedupe_quality.py``).

``--only`` picks sections (search, hashing, flat, variants).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # per core: no BLAS threads in the hashing
import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from pipelines.neardup import brute_force_pairs, near_pairs  # noqa: E402


def planted_hashes(count: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(unique hashes, the planted pairs as (value, value) rows)."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**63, count, dtype=np.int64).view(np.uint64)
    hashes |= rng.integers(0, 2, count).astype(np.uint64) << np.uint64(63)
    planted = count // 100
    sources, targets = rng.choice(count, planted), rng.choice(count, planted)
    pairs = []
    flip_counts = rng.integers(1, k + 1, planted)
    for source, target, flips in zip(sources, targets, flip_counts, strict=True):
        bits = rng.choice(64, flips, replace=False)
        hashes[target] = hashes[source] ^ np.uint64(sum(1 << int(b) for b in bits))
        pairs.append((hashes[source], hashes[target]))
    return np.unique(hashes), np.array(pairs, dtype=np.uint64)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def brute_force_ns_per_pair(hashes: np.ndarray, k: int, repeat: int) -> tuple[float, np.ndarray]:
    """Brute force's cost per pair on ``hashes`` (best of ``repeat``), and its pairs."""
    best, pairs = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        pairs = brute_force_pairs(hashes, k)
        best = min(best, time.perf_counter() - start)
    return best / (len(hashes) * (len(hashes) - 1) / 2) * 1e9, pairs


def bench_search(args, results: dict) -> None:
    hashes, planted = planted_hashes(args.count, args.k)
    count = len(hashes)
    start = time.perf_counter()
    near_pairs(hashes[:1000], args.k)  # compiles the loop, or loads it from numba's cache
    first_call = time.perf_counter() - start
    rss_before = peak_rss_mb()
    # every planted pair whose two values both survived (a later plant may overwrite one)
    ends = np.searchsorted(hashes, planted)
    alive = (hashes[np.minimum(ends, count - 1)] == planted).all(axis=1)
    planted_pairs = {tuple(sorted(p)) for p in ends[alive].tolist() if p[0] != p[1]}
    # the subsample: random hashes plus both ends of some planted pairs (random ones alone hold
    # almost no pairs); brute force runs on it in the same run, for exactness and its ns/pair
    # (the goal scales with that: 1M, k=8 in <= 5 s where brute force runs at 1 ns/pair)
    rng = np.random.default_rng(1)
    both = np.array(sorted(planted_pairs), dtype=np.int64).reshape(-1, 2)
    both = both[rng.choice(len(both), min(len(both), args.subsample // 40), replace=False)]
    rest = rng.choice(count, args.subsample - both.size, replace=False)
    sub = np.unique(np.concatenate([rest, both.ravel()]))
    ns_per_pair, sub_pairs = brute_force_ns_per_pair(hashes[sub], args.k, args.repeat)
    brute_seconds = count * (count - 1) / 2 * ns_per_pair * 1e-9
    rows, pairs = {}, {}
    for workers in sorted({1, args.workers}):
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            pairs[workers] = near_pairs(hashes, args.k, workers=workers)
            times.append(time.perf_counter() - start)
        rows[workers] = {
            "best_s": min(times),
            "median_s": float(np.median(times)),
            "all_s": times,
            "speedup_vs_brute_force": brute_seconds / min(times),
        }
    same_across_workers = all(np.array_equal(p, pairs[1]) for p in pairs.values())
    found = {tuple(p) for p in pairs[1].tolist()}
    planted_found = len(planted_pairs & found)
    # exactness on the subsample: the pairs found inside it are the brute-force pairs
    expected = {tuple(p) for p in sub[sub_pairs].tolist()}
    members = set(sub.tolist())
    inside = {p for p in found if p[0] in members and p[1] in members}
    subsample_exact = inside == expected
    # the goal (issue 24) is for 1M hashes, k=8: 5 s where brute force runs at 1 ns/pair
    goal = 5.0 * ns_per_pair if (count, args.k) == (1_000_000, 8) else None
    print(
        f"search {count:,} hashes, k={args.k} ({args.repeat} runs each; first call "
        f"{first_call:.2f} s; brute force {ns_per_pair:.2f} ns/pair here, so {brute_seconds:,.0f} s"
        f" at {count:,}" + (f"; the goal is <= {goal:.1f} s)" if goal else ")")
    )
    print("| workers | best s | median s | vs brute force | goal met |")
    print("|---|---|---|---|---|")
    for workers, row in rows.items():
        print(
            f"| {workers} | {row['best_s']:.2f} | {row['median_s']:.2f} | "
            f"{row['speedup_vs_brute_force']:,.0f}x | "
            f"{'-' if goal is None else 'yes' if row['best_s'] <= goal else 'NO'} |"
        )
    print(
        f"{len(pairs[1]):,} pairs; planted found: {planted_found:,} of {len(planted_pairs):,};"
        f" equal to brute force on {len(sub):,} hashes ({len(both)} planted pairs, the rest "
        f"random): {subsample_exact} ({len(expected)} pairs); "
        f"same on 1 and {args.workers} workers: {same_across_workers}; "
        f"peak RSS {peak_rss_mb():.0f} MB ({rss_before:.0f} MB before the search)"
    )
    results["search"] = {
        "hashes": count,
        "k": args.k,
        "first_call_s": first_call,
        "brute_force_ns_per_pair": ns_per_pair,
        "brute_force_extrapolated_s": brute_seconds,
        "goal_s": goal,
        "by_workers": rows,
        "pairs": len(pairs[1]),
        "planted_pairs": len(planted_pairs),
        "planted_found": planted_found,
        "subsample": len(sub),
        "subsample_planted_pairs": len(both),
        "subsample_pairs": len(expected),
        "subsample_exact": subsample_exact,
        "same_across_workers": same_across_workers,
        "peak_rss_mb": peak_rss_mb(),
        "rss_before_search_mb": rss_before,
    }
    # the sizes FACTS.md timed imagededup 0.3.3 at on this machine type (12.4 s at 10k, 400 s at
    # 50k, ~30 min extrapolated at 100k): the same hash sets sizes here, for the ratio
    results["small"] = {}
    for size in (10_000, 50_000, 100_000):
        small, _ = planted_hashes(size, args.k, seed=2)
        start = time.perf_counter()
        near_pairs(small, args.k)
        results["small"][size] = time.perf_counter() - start
        print(f"search {size:,} hashes, 1 worker: {results['small'][size]:.3f} s")


def photo(seed: int, size: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    pixels = np.zeros((size, size, 3))
    for _ in range(12):
        cx, cy, radius = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.4)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * radius**2))
        pixels += blob[..., None] * rng.uniform(-120, 120, 3)
    pixels += 128 + rng.normal(0, 12, pixels.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def real_photos(count: int, size: int) -> list[bytes]:
    """``count`` JPEGs of real photographs: square crops (250-427 px) of the two photos
    scikit-learn ships (a temple in China, a flower), resized to ``size`` and saved at quality
    85-95, so they have a real photo's entropy; [] when scikit-learn is not installed."""
    from PIL import Image

    try:
        from sklearn.datasets import load_sample_images
    except ImportError:
        return []
    import random

    sources = [Image.fromarray(array) for array in load_sample_images().images]
    rng, out = random.Random(0), []
    for index in range(count):
        source = sources[index % len(sources)]
        side = rng.randint(250, min(source.size))
        x, y = rng.randint(0, source.width - side), rng.randint(0, source.height - side)
        image = source.crop((x, y, x + side, y + side)).resize((size, size), Image.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=rng.choice((85, 90, 95)))
        out.append(buffer.getvalue())
    return out


def _imagehash_full(data: bytes) -> str:
    import imagehash
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return str(imagehash.phash(image.convert("RGB")))


def _per_second(function, images: list[bytes], rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for data in images:
            function(data)
        best = min(best, time.perf_counter() - started)
    return len(images) / best


def _ingest_seconds(images: list[bytes]) -> float:
    """Seconds the whole ingest stage (one worker) takes over ``images`` as files: planning,
    file reads, the check and hash, SHA-256, the image store and the Parquet parts."""
    import tempfile

    from pipelines.ingest import IngestStage
    from pipelines.runner import RunOptions, run_stage
    from surd_builder.workspace import Workspace

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        photos = root / "photos"
        photos.mkdir()
        for index, data in enumerate(images):
            (photos / f"{index:05d}.jpg").write_bytes(data)
            (photos / f"{index:05d}.txt").write_text(f"a photo, number {index}")
        workspace = Workspace.create(root / "ws")
        os.sync()  # the files' own writes are not the stage's: flushed before it starts
        report = run_stage(IngestStage(photos), workspace, RunOptions(show_progress=False))
        hashed = workspace.read_table("hashes").num_rows
        assert report.written == hashed == len(images), (report.written, hashed)
        return report.seconds


def _ingest_rate(images: list[bytes]) -> float:
    """Images per second through the whole ingest stage (one worker), after a warm-up run on
    a few of them (imports, first-call caches); best of two runs."""
    _ingest_seconds(images[:10])
    return len(images) / min(_ingest_seconds(images) for _ in range(2))


def bench_hashing(args, results: dict) -> None:
    """Decode + check + hash per second on one core, against imagehash's pHash with a full
    decode, on the same files in the same run (best of ``--rounds``, interleaved)."""
    from pipelines.perceptual import image_signature
    from pipelines.records import inspect_and_hash, inspect_image

    sets = {"real photos": real_photos(args.images, args.size)}
    sets["photo-like"] = [photo(seed, args.size) for seed in range(args.images)]
    results["hashing"] = {"size": args.size, "goal_ratio": 2.5}
    print(
        f"hashing, {args.size} px JPEGs, one core (best of {args.rounds}; ingest stage: what each "
        "image adds to a whole run, reads, check + hash, SHA-256, image store, Parquet)"
    )
    print(
        "| images | imagehash, full decode | check + hash (collection) | vs imagehash | goal | "
        "check alone | hash alone (hash stage) | whole ingest stage |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, images in sets.items():
        if not images:
            print(f"| {name} | (scikit-learn not installed: its sample photos are not here) |")
            continue
        rates = {
            "imagehash_full": _per_second(_imagehash_full, images, args.rounds),
            "check_and_hash": _per_second(
                lambda data: inspect_and_hash(data, "bench"), images, args.rounds
            ),
            "check_only": _per_second(
                lambda data: inspect_image(data, "bench"), images, args.rounds
            ),
            "hash_only": _per_second(image_signature, images, args.rounds),
        }
        rates["ingest_stage"] = _ingest_rate(images)
        ratio = rates["check_and_hash"] / rates["imagehash_full"]
        print(
            f"| {name} ({len(images)}, {np.mean([len(d) for d in images]) / 1024:.0f} KiB) | "
            f"{rates['imagehash_full']:,.0f}/s | {rates['check_and_hash']:,.0f}/s | {ratio:.2f}x | "
            f"{'yes' if ratio >= 2.5 else 'NO'} | {rates['check_only']:,.0f}/s | "
            f"{rates['hash_only']:,.0f}/s | {rates['ingest_stage']:,.0f}/s |"
        )
        results["hashing"][name] = {**rates, "ratio": ratio, "images": len(images)}


def bench_quality(args, results: dict) -> None:
    """False merges on flat synthetic images; recall of mirrored and cropped re-posts with and
    without the colour check and the variant hashes (bench/dedupe_quality.py's sections)."""
    import dedupe_quality

    quality = argparse.Namespace(flat=args.flat, photos=args.photos, crop=[], seed=0)
    if "flat" in args.only:
        dedupe_quality.bench_flat(quality, results)
    if "variants" in args.only:
        dedupe_quality.bench_variants(quality, results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--subsample", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3, help="search runs per worker count")
    parser.add_argument("--images", type=int, default=300, help="JPEGs per hashing set")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3, help="hashing passes (best counts)")
    parser.add_argument("--flat", type=int, default=10_000, help="distinct flat images")
    parser.add_argument("--photos", type=int, default=200, help="photo-like images re-posted")
    parser.add_argument(
        "--only", nargs="*", default=["search", "hashing", "flat", "variants"], help="sections"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results: dict = {}
    if "search" in args.only:
        bench_search(args, results)
    if "hashing" in args.only:
        bench_hashing(args, results)
    if {"flat", "variants"} & set(args.only):
        bench_quality(args, results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
