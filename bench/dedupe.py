"""Benchmark: near-duplicate search and perceptual hashing (run by hand, not a test).

    .venv/bin/python bench/dedupe.py --json bench-dedupe.json

1. Search: ``--count`` random 64-bit hashes with 1% planted near-duplicate pairs (0..k bits
   apart), all pairs within ``k`` found by the multi-index search on 1 and ``--workers``
   processes; recall against brute force on a ``--subsample`` (the brute-force pairs inside the
   subsample must all be found), and every planted pair must be found. Also 10k/50k/100k
   hashes, the sizes imagededup was timed at on this machine type (FACTS.md), for the ratio.
2. Hashing: JPEG decode + pHash per second on one core, draft mode vs full decode, on
   photo-like 512 px images, and how far the draft hash is from the full-decode one.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines.dedupe import image_hash  # noqa: E402
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


def bench_search(args, results: dict) -> None:
    hashes, planted = planted_hashes(args.count, args.k)
    rows = {}
    pairs = None
    for workers in sorted({1, args.workers}):
        start = time.perf_counter()
        pairs = near_pairs(hashes, args.k, workers=workers)
        rows[workers] = time.perf_counter() - start
        print(f"search {len(hashes):,} hashes, k={args.k}, {workers} proc: {rows[workers]:.2f} s")
    found = {tuple(p) for p in pairs.tolist()}
    # every planted pair whose two values both survived (a later plant may overwrite one)
    ends = np.searchsorted(hashes, planted)
    alive = (hashes[np.minimum(ends, len(hashes) - 1)] == planted).all(axis=1)
    planted_pairs = {tuple(sorted(p)) for p in ends[alive].tolist() if p[0] != p[1]}
    planted_recall = len(planted_pairs & found) / len(planted_pairs)
    # and exactness on a random subsample against brute force
    sub = np.sort(np.random.default_rng(1).choice(len(hashes), args.subsample, replace=False))
    expected = {tuple(p) for p in sub[brute_force_pairs(hashes[sub], args.k)].tolist()}
    recall = len(expected & found) / len(expected) if expected else 1.0
    print(
        f"recall of {len(planted_pairs):,} planted pairs: {planted_recall:.4f}; "
        f"vs brute force on {args.subsample:,} random hashes: {recall:.4f} of {len(expected)}"
    )
    results["search"] = {
        "hashes": len(hashes),
        "k": args.k,
        "seconds_by_workers": rows,
        "pairs": len(pairs),
        "planted_recall": planted_recall,
        "planted_pairs": len(planted_pairs),
        "subsample_recall": recall,
        "subsample_pairs": len(expected),
    }
    # the sizes FACTS.md timed imagededup 0.3.3 at on this machine type (12.4 s at 10k, 400 s at
    # 50k, ~30 min extrapolated at 100k): the same hash sets sizes here, for the ratio
    results["small"] = {}
    for count in (10_000, 50_000, 100_000):
        small, _ = planted_hashes(count, args.k, seed=2)
        start = time.perf_counter()
        near_pairs(small, args.k)
        results["small"][count] = time.perf_counter() - start
        print(f"search {count:,} hashes, 1 proc: {results['small'][count]:.3f} s")


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


def bench_hashing(args, results: dict) -> None:
    images = [photo(seed, args.size) for seed in range(args.images)]
    rates, hashes = {}, {}
    for draft in (True, False):
        start = time.perf_counter()
        hashes[draft] = [image_hash(data, draft=draft) for data in images]
        rates[draft] = len(images) / (time.perf_counter() - start)
    distance = [
        bin(int(a, 16) ^ int(b, 16)).count("1")
        for a, b in zip(hashes[True], hashes[False], strict=True)
    ]
    print(
        f"pHash {args.size}px JPEG, 1 core: draft {rates[True]:,.0f}/s, full {rates[False]:,.0f}/s;"
        f" draft vs full: mean {np.mean(distance):.2f} bits, max {max(distance)}, "
        f"identical {np.mean(np.array(distance) == 0):.0%}"
    )
    results["hashing"] = {
        "size": args.size,
        "draft_per_s": rates[True],
        "full_per_s": rates[False],
        "mean_bits": float(np.mean(distance)),
        "max_bits": int(max(distance)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--subsample", type=int, default=20_000)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results: dict = {}
    bench_search(args, results)
    bench_hashing(args, results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
