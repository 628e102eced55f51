"""Length-aware batching of text requests: similar token lengths share a run, padded to their own
longest, so a short text does not pay for a long one.

An encoder's run costs about (rows x padded length) token steps plus a fixed cost per run (the
graph's many small ops, thread hand-offs). Padding a 12-token sentence to a 120-token neighbour
makes it cost ten times what it needs; running every length alone pays the fixed cost once per
request. ``padded_lengths`` picks the grouping that minimises the sum: the requests sorted by
length, cut into contiguous groups (an optimal grouping of this cost is always contiguous in
length order), by dynamic programming over the cut points. A pure function of the lengths.
"""

from __future__ import annotations

from collections.abc import Sequence

# The fixed cost of one run, in token steps of one row. For a MiniLM-sized encoder (hidden 384,
# 6 layers, ONNX Runtime, 2 threads) a least-squares fit of run time against rows x length gave
# 11 and 20 token steps in two runs on the 2-core build machine while it was shared (2026-12-07,
# load average 5-15); 16 sits between. Past it, a long neighbour's padding costs more than a run.
RUN_OVERHEAD_TOKENS = 16


def padded_lengths(
    requests: Sequence[tuple[int, int]], overhead_tokens: float = RUN_OVERHEAD_TOKENS
) -> list[int]:
    """For requests given as (rows, token length), the length each is padded to.

    Requests of one length always share a group, so each group's padded length is its own:
    grouping the padded requests by shape gives back exactly these groups.
    """
    if overhead_tokens < 0:
        raise ValueError(f"overhead_tokens must be >= 0, got {overhead_tokens!r}")
    if any(rows < 1 or length < 0 for rows, length in requests):
        raise ValueError("every request needs rows >= 1 and a length >= 0")
    order = sorted(range(len(requests)), key=lambda i: requests[i][1])
    lengths = [requests[i][1] for i in order]
    rows = [requests[i][0] for i in order]
    # best[k]: the least cost of the first k requests (in length order); cut[k]: where the last
    # of those groups starts. A group may only start where the length changes.
    best = [0.0] + [float("inf")] * len(order)
    cut = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        if end < len(order) and lengths[end] == lengths[end - 1]:
            continue  # a group cannot end inside a run of equal lengths
        group_rows = 0
        for start in range(end - 1, -1, -1):
            group_rows += rows[start]
            if start > 0 and lengths[start] == lengths[start - 1]:
                continue  # nor start inside one
            cost = best[start] + group_rows * lengths[end - 1] + overhead_tokens
            if cost < best[end]:
                best[end], cut[end] = cost, start
    out = [0] * len(requests)
    end = len(order)
    while end > 0:
        start = cut[end]
        for k in range(start, end):
            out[order[k]] = lengths[end - 1]
        end = start
    return out
