"""Near-duplicate search over 64-bit hashes: all pairs within Hamming distance ``k``, fast.

Multi-index hashing (Norouzi et al., CVPR 2012). Split the 64 bits into ``m`` chunks. If two
hashes differ in at most ``k`` bits, then by pigeonhole at least one chunk differs in at most
``r = k // m`` bits. So for every chunk, every hash probes the buckets of all chunk values within
``r`` bits of its own, and each candidate pair found that way is verified with a vectorised
popcount of the XOR. The result is exactly the brute-force set of pairs, at a cost that grows
about linearly with ``N`` when chunks are about ``log2 N`` bits wide (buckets then hold about one
hash each). ``m`` is chosen by a cost model; buckets are a dense CSR table (chunks are at most
22 bits, a few MB), so a probe is two array lookups, all in numpy.

Identical hashes are collapsed first (re-uploads are common and would make one bucket
quadratic); callers get pairs of unique hashes plus the inverse map.
"""

from __future__ import annotations

from itertools import combinations
from math import comb

import numpy as np

MAX_CHUNK_BITS = 22


def hex_to_uint64(hex_hashes: list[str]) -> np.ndarray:
    return np.array([int(h, 16) for h in hex_hashes], dtype=np.uint64)


def _chunk_bounds(chunks: int) -> list[tuple[int, int]]:
    """(shift, width) of each chunk, widths as equal as possible, covering all 64 bits."""
    bounds, shift = [], 0
    for index in range(chunks):
        width = 64 // chunks + (1 if index < 64 % chunks else 0)
        bounds.append((shift, width))
        shift += width
    return bounds


def _probe_masks(width: int, radius: int) -> np.ndarray:
    masks = [0]
    for flips in range(1, radius + 1):
        for bits in combinations(range(width), flips):
            masks.append(sum(1 << b for b in bits))
    return np.array(masks, dtype=np.int64)


def choose_chunks(count: int, k: int) -> int:
    """The number of chunks with the lowest estimated cost (probes plus candidates)."""
    best, best_cost = None, float("inf")
    # at least 3 chunks (at most 22 bits each, for the dense table); for k < 3 that is still
    # more chunks than differing bits, so a shared chunk is exact (radius 0)
    for chunks in range(3, max(k + 1, 3) + 1):
        width = 64 // chunks
        radius = k // chunks
        probes = sum(comb(width, i) for i in range(radius + 1))
        candidates_per_probe = count / 2**width
        cost = chunks * probes * count * (1.0 + candidates_per_probe)
        if cost < best_cost:
            best, best_cost = chunks, cost
    return best


def near_pairs(
    hashes: np.ndarray, k: int, chunks: int | None = None, workers: int = 1
) -> np.ndarray:
    """All pairs ``(i, j)``, ``i < j``, of rows of ``hashes`` (uint64, distinct values) whose
    Hamming distance is at most ``k``, as an ``(n, 2)`` int64 array sorted by ``(i, j)``.

    With ``workers > 1`` the probes are split across processes (worth it from ~100k hashes)."""
    if not 0 <= k < 64:
        raise ValueError("k must be in 0..63")
    count = len(hashes)
    if count < 2:
        return np.empty((0, 2), dtype=np.int64)
    chunks = chunks or choose_chunks(count, k)
    if chunks < 3:
        raise ValueError("chunks must be at least 3 (at most 22 bits each)")
    radius = k // chunks
    tasks = []
    for shift, width in _chunk_bounds(chunks):
        masks = _probe_masks(width, radius)
        parts = max(1, min(workers, len(masks)))
        tasks += [(shift, width, part, k) for part in np.array_split(masks, parts)]
    found = []
    if workers <= 1:
        for task in tasks:
            found += _chunk_pairs(hashes, *task)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            workers, mp_context=context, initializer=_set_shared, initargs=(hashes,)
        ) as pool:
            for pairs in pool.map(_shared_chunk_pairs, tasks):
                found += pairs
    if not found:
        return np.empty((0, 2), dtype=np.int64)
    pairs = np.concatenate(found)
    if pairs.size == 0:
        return pairs.reshape(0, 2)
    codes = np.unique(pairs[:, 0] * count + pairs[:, 1])  # a pair may be found by several chunks
    return np.stack([codes // count, codes % count], axis=1)


_shared: dict[str, np.ndarray] = {}


def _set_shared(hashes: np.ndarray) -> None:
    _shared["hashes"] = hashes


def _shared_chunk_pairs(task: tuple) -> list[np.ndarray]:
    return _chunk_pairs(_shared["hashes"], *task)


def _chunk_pairs(
    hashes: np.ndarray, shift: int, width: int, masks: np.ndarray, k: int
) -> list[np.ndarray]:
    """Verified pairs found through one chunk and the given probe masks. Hashes are visited in
    order of their chunk value, so the table lookups of nearby probes hit nearby memory."""
    keys = ((hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)).astype(np.int32)
    order = np.argsort(keys, kind="stable").astype(np.int64)
    sorted_keys = keys[order]
    counts = np.bincount(sorted_keys, minlength=2**width).astype(np.int32)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    # unsigned on purpose: np.bitwise_count counts the bits of the ABSOLUTE value of signed ints
    sorted_hashes = hashes.astype(np.uint64)[order]
    found = []
    for mask in masks:
        probed = sorted_keys ^ np.int32(mask)
        sizes = counts[probed]
        has = np.flatnonzero(sizes)
        if has.size == 0:
            continue
        sizes = sizes[has].astype(np.int64)
        left = np.repeat(has, sizes)  # positions in sorted order
        offsets = np.cumsum(sizes) - sizes
        right = np.repeat(starts[probed[has]] - offsets, sizes) + np.arange(left.size)
        keep = left < right  # each unordered pair once
        left, right = left[keep], right[keep]
        close = np.bitwise_count(sorted_hashes[left] ^ sorted_hashes[right]) <= k
        a, b = order[left[close]], order[right[close]]
        found.append(np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1))
    return found


def brute_force_pairs(hashes: np.ndarray, k: int) -> np.ndarray:
    """The reference: every pair checked (O(N^2); tests and benchmark subsamples only)."""
    unsigned = hashes.astype(np.uint64)  # see _chunk_pairs: never count bits of signed ints
    found = []
    for i in range(len(hashes) - 1):
        distance = np.bitwise_count(unsigned[i] ^ unsigned[i + 1 :])
        js = np.nonzero(distance <= k)[0] + i + 1
        found.append(np.stack([np.full(js.size, i), js], axis=1))
    if not found:
        return np.empty((0, 2), dtype=np.int64)
    return np.concatenate(found).astype(np.int64)


def clusters(count: int, pairs: np.ndarray) -> np.ndarray:
    """Connected components (union-find's result): a cluster label per row."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix(
        (np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(count, count)
    )
    return connected_components(graph, directed=False)[1]
