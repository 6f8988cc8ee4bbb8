"""The compiled near-duplicate search against brute force, on the inputs its shortcuts could get
wrong: planted pairs at every distance up to k and just past it, flips on chunk seams, equal
values, values at the edges of key blocks and tables, crowded buckets, any chunking, and worker
threads. Exactness only (bench/dedupe.py times it)."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.neardup import (
    BLOCK_BITS,
    _chunk_bounds,
    brute_force_pairs,
    choose_chunks,
    near_pairs,
)


def random_hashes(rng: np.random.Generator, count: int) -> np.ndarray:
    hashes = rng.integers(0, 2**63, count, dtype=np.int64).view(np.uint64)
    return hashes | (rng.integers(0, 2, count).astype(np.uint64) << np.uint64(63))


def flip(value: np.uint64, bits) -> np.uint64:
    return value ^ np.uint64(sum(1 << int(b) for b in bits))


def planted(count: int, k: int, seed: int, equal: int = 0) -> np.ndarray:
    """Random hashes, a fifth of them replaced by copies of others with 0..k+2 bits flipped
    (some on chunk seams), and ``equal`` exact duplicates; not deduplicated, not sorted."""
    rng = np.random.default_rng(seed)
    hashes = random_hashes(rng, count)
    seams = sorted({s for chunks in (3, 4, 5) for s, _ in _chunk_bounds(chunks)} | {63})
    for target in rng.choice(count, count // 5, replace=False):
        source = rng.integers(count)
        flips = int(rng.integers(0, k + 3))
        if rng.random() < 0.3:  # bits on both sides of the chunk boundaries
            near_seams = [b for s in seams for b in (s - 1, s) if 0 <= b < 64]
            bits = rng.choice(near_seams, min(flips, len(near_seams)), replace=False)
        else:
            bits = rng.choice(64, flips, replace=False)
        hashes[target] = flip(hashes[source], bits)
    if equal:
        hashes[rng.choice(count, equal, replace=False)] = hashes[rng.choice(count, equal)]
    return hashes


def check(hashes: np.ndarray, k: int, **kwargs) -> np.ndarray:
    expected = brute_force_pairs(hashes, k)
    found = near_pairs(hashes, k, **kwargs)
    assert found.dtype == np.int64 and found.shape == (len(expected), 2)
    assert np.array_equal(found, expected), (k, kwargs)
    return expected


@pytest.mark.parametrize("k", range(13))
@pytest.mark.parametrize("workers", [1, 2])
def test_planted_pairs_at_every_k(k: int, workers: int) -> None:
    hashes = planted(1200, k, seed=k, equal=30)
    expected = check(hashes, k, workers=workers)
    assert len(expected) >= 100  # planted copies within k (and the equal values) are found


@pytest.mark.parametrize("k", [0, 2, 3, 5, 8, 11])
def test_any_valid_chunking_gives_the_same_pairs(k: int) -> None:
    hashes = np.unique(planted(900, k, seed=100 + k))
    for chunks in range(3, min(max(k + 1, 3), 12) + 1):
        for workers in (1, 2):
            check(hashes, k, chunks=chunks, workers=workers)


@pytest.mark.parametrize("count", [2, 3, 5, 2**BLOCK_BITS - 1, 2**BLOCK_BITS, 2**BLOCK_BITS + 1])
@pytest.mark.parametrize("k", [0, 1, 6, 12])
def test_small_sizes_around_block_and_task_counts(count: int, k: int) -> None:
    hashes = planted(count, k, seed=count * 13 + k, equal=1 if count > 2 else 0)
    for workers in (1, 2, 3):
        check(hashes, k, workers=workers)


def test_sizes_where_the_chosen_chunking_changes() -> None:
    k = 8
    changes = [
        n for n in range(100, 20_000, 100) if choose_chunks(n, k) != choose_chunks(n + 100, k)
    ]
    assert changes  # more hashes: wider chunks
    for n in changes[:3]:
        for count in (n, n + 100):
            check(planted(count, k, seed=count), k, workers=2)


def test_values_on_the_edges_of_blocks_and_tables() -> None:
    """Chunk values 0, all ones, and either side of every key block edge, in every chunk,
    each with neighbours a few bits away (on and across the block bits)."""
    rng = np.random.default_rng(7)
    values = []
    for shift, width in _chunk_bounds(3):
        edges = [0, (1 << width) - 1]
        for block in range(1, 6):
            edge = block << BLOCK_BITS
            edges += [edge - 1, edge, edge + 1]
        for edge in edges:
            for _ in range(4):
                base = random_hashes(rng, 1)[0]
                base &= ~np.uint64(((1 << width) - 1) << shift)
                values.append(base | np.uint64(edge << shift))
    values = np.array(values, dtype=np.uint64)
    near = [flip(v, rng.choice(64, rng.integers(1, 10), replace=False)) for v in values]
    seam = [
        flip(v, [BLOCK_BITS - 1, BLOCK_BITS, 21, 22, 42, 43, 63][: rng.integers(1, 8)])
        for v in values
    ]
    hashes = np.concatenate([values, near, seam, random_hashes(rng, 300)])
    for k in (1, 4, 8, 10):
        for workers in (1, 2):
            assert len(check(hashes, k, workers=workers)) > 0


def test_crowded_buckets_and_many_pairs() -> None:
    """Hundreds of hashes within a few bits of one centre (buckets of many hashes, the pair
    list growing far past its first size), and a whole chunk shared by every hash."""
    rng = np.random.default_rng(11)
    centre = random_hashes(rng, 1)[0]
    ball = [flip(centre, rng.choice(64, rng.integers(0, 5), replace=False)) for _ in range(400)]
    shared = random_hashes(rng, 300) & ~np.uint64((1 << 22) - 1)  # chunk 0 is 0 for all
    hashes = np.concatenate([np.array(ball, dtype=np.uint64), shared, random_hashes(rng, 300)])
    for k in (3, 8, 12):
        for workers in (1, 2):
            assert len(check(hashes, k, workers=workers)) > 1000 or k < 8


def test_signed_input_and_the_top_bit() -> None:
    rng = np.random.default_rng(3)
    hashes = planted(800, 8, seed=3)
    hashes[::3] |= np.uint64(1 << 63)
    hashes[1] = hashes[0] ^ np.uint64((1 << 63) | 0b1111111)  # 8 bits apart, top bit included
    expected = check(hashes, 8)
    assert np.array_equal(near_pairs(hashes.view(np.int64), 8, workers=2), expected)
    assert [0, 1] in expected.tolist()
    top = np.array([(1 << 64) - 1, 1 << 63, 0, (1 << 63) - 1], dtype=np.uint64)
    assert near_pairs(top, 1).tolist() == [[0, 3], [1, 2]]
    assert near_pairs(top, 0).tolist() == []
    assert near_pairs(rng.integers(0, 9, 1).astype(np.uint64), 5).shape == (0, 2)


def test_a_larger_set_on_two_threads() -> None:
    """Enough hashes for the 21- and 22-bit chunks, checked on a subsample and planted pairs."""
    rng = np.random.default_rng(21)
    hashes = np.unique(random_hashes(rng, 200_000))
    sources = rng.choice(len(hashes), 2000, replace=False)
    targets = []
    for s in sources:
        targets.append(flip(hashes[s], rng.choice(64, rng.integers(1, 9), replace=False)))
    hashes = np.concatenate([hashes, np.array(targets, dtype=np.uint64)])
    one, two = near_pairs(hashes, 8), near_pairs(hashes, 8, workers=2)
    assert np.array_equal(one, two)
    found = {tuple(p) for p in one.tolist()}
    planted_pairs = {(int(s), len(hashes) - 2000 + i) for i, s in enumerate(sources)}
    assert planted_pairs <= found
    sub = np.sort(np.concatenate([rng.choice(len(hashes), 3000, replace=False), sources[:50]]))
    sub = np.unique(np.concatenate([sub, len(hashes) - 2000 + np.arange(50)]))
    expected = {tuple(p) for p in sub[brute_force_pairs(hashes[sub], 8)].tolist()}
    members = set(sub.tolist())
    inside = {p for p in found if p[0] in members and p[1] in members}
    assert inside == expected and len(expected) >= 50
