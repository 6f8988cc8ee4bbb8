"""Near-duplicate search over 64-bit hashes: all pairs within Hamming distance ``k``, fast.

Multi-index hashing (Norouzi et al., CVPR 2012). Split the 64 bits into ``m`` chunks. If two
hashes differ in at most ``k`` bits, then by pigeonhole at least one chunk differs in at most
``r = k // m`` bits. So for every chunk, every hash probes the buckets of all chunk values within
``r`` bits of its own, and each candidate found that way is verified with a popcount of the XOR.
The result is exactly the brute-force set of pairs, at a cost that grows about linearly with
``N`` when chunks are about ``log2 N`` bits wide (buckets then hold about one hash each). ``m``
is chosen by a cost model; buckets are a dense CSR table (chunks are at most 22 bits, 16 MB).

The probe and verify loop is compiled (numba, no GIL, so ``workers`` are threads). What makes
it fast, measured at 1M hashes and k = 8 (3 chunks, ~740 probes per hash, ~0.5 hash a bucket):

* Key blocks. The chunk values are cut into blocks of ``2**BLOCK_BITS`` values, and the probe
  masks grouped by their bits above the block, so one block probes one other block for a whole
  group of masks: the two blocks' table rows and hashes stay in L1. Each unordered pair of
  buckets is probed once, from the smaller value: whole blocks are skipped for that (no branch
  per hash) except for the masks inside a block.
* No branch per probe. The hash is checked against the first hash of the probed bucket always
  (one spare hash after the end makes that read safe); the rare probes that hit, or whose bucket
  holds two or more hashes, are written to a short list handled afterwards.
* Each pair once. A pair is kept only by the first chunk that finds it (the earlier chunks'
  distances are checked then, on the few pairs within ``k``), so there is no dedup of
  candidates, only a sort of the result.

Identical values are allowed (they are 0 bits apart, found through every bucket, kept once),
but a bucket of many equal hashes costs the square of its size: callers collapse duplicates
first (:func:`pipelines.dedupe._near_edges`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from itertools import combinations
from math import comb

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic

MAX_CHUNK_BITS = 22
# chunk values per key block: a block's table rows (4 bytes each) and hashes (~8 bytes per
# value at a million hashes) stay in L1 next to the probed block's; 8 was fastest at 1M
BLOCK_BITS = 8
# blocks are dealt to this many tasks per worker thread (by stride, so tasks cost about the same)
TASKS_PER_WORKER = 4


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
    """All pairs ``(i, j)``, ``i < j``, of rows of ``hashes`` (64-bit values, normally distinct)
    whose Hamming distance is at most ``k``, as an ``(n, 2)`` int64 array sorted by ``(i, j)``.

    With ``workers > 1`` the probes run on that many threads (the compiled loop holds no GIL)."""
    if not 0 <= k < 64:
        raise ValueError("k must be in 0..63")
    # unsigned on purpose: np.bitwise_count counts the bits of the ABSOLUTE value of signed ints
    # (brute_force_pairs), and the compiled loop shifts; int64 input keeps its bits
    values = np.ascontiguousarray(np.asarray(hashes).astype(np.uint64, copy=False))
    count = len(values)
    if count < 2:
        return np.empty((0, 2), dtype=np.int64)
    if count >= 2**31:
        raise ValueError("at most 2**31 - 1 hashes (the tables hold 32-bit positions)")
    chunks = chunks or choose_chunks(count, k)
    if chunks < 3:
        raise ValueError("chunks must be at least 3 (at most 22 bits each)")
    radius = k // chunks
    bounds = _chunk_bounds(chunks)
    workers = max(1, int(workers))
    tasks_per_chunk = 1 if workers == 1 else workers * TASKS_PER_WORKER
    plans = [_plan(index, bounds, radius) for index in range(len(bounds))]

    def build(plan: tuple) -> tuple:
        return _build(values, plan[0], plan[1])

    def probe(task: tuple) -> np.ndarray:
        plan, table, first, step = task
        shift, width, block_bits, masks, groups, earlier = plan
        starts, order, sorted_hashes = table
        return _probe(
            starts, order, sorted_hashes, shift, width, block_bits, masks, groups,
            earlier, radius, k, first, step,
        )  # fmt: skip

    if workers == 1:
        found = []
        for plan in plans:  # one chunk's tables at a time
            found.append(probe((plan, build(plan), 0, 1)))
    else:
        with ThreadPoolExecutor(workers) as pool:
            tables = list(pool.map(build, plans))
            tasks = [
                (plan, table, first, tasks_per_chunk)
                for plan, table in zip(plans, tables, strict=True)
                for first in range(tasks_per_chunk)
            ]
            found = list(pool.map(probe, tasks))
    pairs = np.concatenate(found)
    if len(pairs) == 0:
        return np.empty((0, 2), dtype=np.int64)
    codes = np.sort(pairs[:, 0] * count + pairs[:, 1])  # each pair is found exactly once
    return np.stack([codes // count, codes % count], axis=1)


def _plan(index: int, bounds: list[tuple[int, int]], radius: int) -> tuple:
    """What the compiled loop needs for chunk ``index``: its masks sorted by their bits above
    the block (``groups`` are the starts of equal runs, plus the end), and the earlier chunks
    as (shift, value mask) rows."""
    shift, width = bounds[index]
    block_bits = min(BLOCK_BITS, width)
    masks = _probe_masks(width, radius)
    masks = masks[np.lexsort((masks, masks >> block_bits))]
    high = masks >> block_bits
    groups = np.flatnonzero(np.r_[True, high[1:] != high[:-1], True]).astype(np.int64)
    earlier = np.array([(s, (1 << w) - 1) for s, w in bounds[:index]], dtype=np.int64)
    return shift, width, block_bits, masks, groups, earlier.reshape(-1, 2)


@intrinsic
def _popcount(typingctx, value):
    """The bits set in a uint64 (LLVM's ctpop: one POPCNT instruction where the CPU has it)."""

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return types.uint64(types.uint64), codegen


@numba.njit(nogil=True, cache=True)
def _build(hashes, shift, width):
    """One chunk's bucket table by counting sort: ``starts`` (bucket ``v`` is
    ``starts[v]:starts[v + 1]``), the row of each sorted position, and the hashes in bucket
    order with one spare zero at the end (read by the loop, never used)."""
    count = hashes.size
    size = 1 << width
    value_mask = np.uint64(size - 1)
    offset = np.uint64(shift)
    starts = np.zeros(size + 1, np.int32)
    for i in range(count):
        starts[np.int64((hashes[i] >> offset) & value_mask) + 1] += 1
    for value in range(size):
        starts[value + 1] += starts[value]
    fill = starts[:-1].copy()
    order = np.empty(count, np.int32)
    sorted_hashes = np.zeros(count + 1, np.uint64)
    for i in range(count):
        value = np.int64((hashes[i] >> offset) & value_mask)
        position = fill[value]
        fill[value] = position + 1
        order[position] = i
        sorted_hashes[position] = hashes[i]
    return starts, order, sorted_hashes


@numba.njit(nogil=True, cache=True)
def _probe(
    starts, order, hashes, shift, width, block_bits, masks, groups, earlier, radius, k,
    first_block, block_step,
):  # fmt: skip
    """The verified pairs (rows, smaller first, unsorted) found through one chunk from the
    key blocks ``first_block, first_block + block_step, ...``, less those an earlier chunk
    finds (one of its values within ``radius`` bits)."""
    limit = np.uint64(k)
    near = np.uint64(radius)
    offset = np.uint64(shift)
    value_mask = np.uint64((1 << width) - 1)
    blocks = 1 << (width - block_bits)
    widest = 1
    for block in range(blocks):
        widest = max(widest, starts[(block + 1) << block_bits] - starts[block << block_bits])
    rare = np.empty(widest, np.int64)  # probes to look at closely, per (block, mask)
    out = np.empty((64, 2), np.int64)
    found = 0
    for block in range(first_block, blocks, block_step):
        a0 = starts[block << block_bits]
        a1 = starts[(block + 1) << block_bits]
        if a0 == a1:
            continue
        for group in range(groups.size - 1):
            high = masks[groups[group]] >> block_bits
            other = block ^ high
            # each pair of buckets once: from the block of smaller values (this one if high is 0)
            if other < block:
                continue
            if starts[other << block_bits] == starts[(other + 1) << block_bits]:
                continue
            for index in range(groups[group], groups[group + 1]):
                mask = masks[index]
                listed = 0
                if mask == 0:  # pairs inside a bucket
                    for a in range(a0, a1):
                        value = np.int64((hashes[a] >> offset) & value_mask)
                        rare[listed] = a
                        listed += a + 1 < starts[value + 1]
                elif high == 0:  # both buckets in this block: only from the smaller value
                    for a in range(a0, a1):
                        h = hashes[a]
                        value = np.int64((h >> offset) & value_mask)
                        probed = value ^ mask
                        lo = starts[probed]
                        hi = starts[probed + 1] if probed > value else lo
                        rare[listed] = a
                        listed += ((lo < hi) & (_popcount(h ^ hashes[lo]) <= limit)) | (hi - lo > 1)
                else:
                    for a in range(a0, a1):
                        h = hashes[a]
                        probed = np.int64((h >> offset) & value_mask) ^ mask
                        lo = starts[probed]
                        hi = starts[probed + 1]
                        rare[listed] = a
                        listed += ((lo < hi) & (_popcount(h ^ hashes[lo]) <= limit)) | (hi - lo > 1)
                for slot in range(listed):
                    a = rare[slot]
                    h = hashes[a]
                    probed = np.int64((h >> offset) & value_mask) ^ mask
                    lo = a + 1 if mask == 0 else starts[probed]
                    for b in range(lo, starts[probed + 1]):
                        bits = h ^ hashes[b]
                        if _popcount(bits) > limit:
                            continue
                        seen = False
                        for row in range(earlier.shape[0]):
                            part = (bits >> np.uint64(earlier[row, 0])) & np.uint64(earlier[row, 1])
                            seen |= _popcount(part) <= near
                        if seen:
                            continue
                        if found == out.shape[0]:
                            grown = np.empty((2 * found, 2), np.int64)
                            grown[:found] = out
                            out = grown
                        i, j = order[a], order[b]
                        out[found, 0] = min(i, j)
                        out[found, 1] = max(i, j)
                        found += 1
    return out[:found].copy()


def brute_force_pairs(hashes: np.ndarray, k: int) -> np.ndarray:
    """The reference: every pair checked (O(N^2); tests and benchmark subsamples only)."""
    unsigned = hashes.astype(np.uint64)  # see near_pairs: never count bits of signed ints
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
