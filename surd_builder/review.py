"""What the screen stage leaves for human review, read by the annotation push: the reviewer name
of its automatic rejections and the order doubtful samples are reviewed in.

Both sides need them, and ``annotation`` must not import ``pipelines`` (ARCHITECTURE.md), so
they live here in the core.
"""

from __future__ import annotations

import pyarrow as pa

SCREEN_REVIEWER = "surd-screen"
"""The ``reviewer`` of a sample the screen's thresholds rejected (not a human's decision)."""

SCREEN_SCORES = ("clip_score", "text_similarity", "judge_score")
"""The screen's scores, each higher-is-better: what review order and annotation tasks read."""


def review_priority(data: pa.Table) -> pa.Array:
    """Row order for human review, most doubtful first.

    Each available score is turned into its percentile rank among the rows (0 = lowest); a
    row's doubt is its worst (lowest) rank, so a sample that is bad on either score comes early.
    Rows with no score at all come last, in ``sample_id`` order (stable between pushes).
    """
    count = data.num_rows
    worst = [None] * count
    for column in SCREEN_SCORES:
        if column not in data.column_names:
            continue
        values = data[column].to_pylist()
        present = sorted(v for v in values if v is not None)
        first_rank: dict[float, int] = {}
        for rank, value in enumerate(present):
            first_rank.setdefault(value, rank)  # equal scores share a rank: ties go to sample_id
        for index, value in enumerate(values):
            if value is None:
                continue
            percentile = first_rank[value] / max(len(present) - 1, 1)
            if worst[index] is None or percentile < worst[index]:
                worst[index] = percentile
    ids = data["sample_id"].to_pylist()
    order = sorted(range(count), key=lambda i: (worst[i] is None, worst[i] or 0.0, ids[i]))
    return pa.array(order, pa.int64())
