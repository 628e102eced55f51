"""Topological-prefix sweep: every prefix of a topological order is a pipeline-valid head.

Different orders give different families of prefixes, so a few are swept:

* Kahn, smallest index first (the graph's own order: roughly export order);
* depth-first Kahn (last readied node first), which finishes a branch before starting the next,
  so residual and Inception blocks stay together and cuts land between blocks;
* the same two built from the outputs backwards (as late as possible), which keep side branches
  that feed only late nodes out of early heads.

One sweep moves the nodes into the head one at a time with ``SplitState``'s incremental
bookkeeping: O(nodes + edges + tensor reads) per order.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Sequence

from partitioner.cuts.repair import RATIO_EPSILON, GraphIndex, MethodOutcome, SplitState
from partitioner.graph import TaskGraph


def kahn_order(
    preds: Sequence[Sequence[int]], succs: Sequence[Sequence[int]], depth_first: bool
) -> list[int]:
    indegree = [len(p) for p in preds]
    if depth_first:
        # A stack: the node readied last runs next, so one branch runs to its join first.
        stack = [v for v in reversed(range(len(preds))) if indegree[v] == 0]
        order = []
        while stack:
            v = stack.pop()
            order.append(v)
            for w in reversed(succs[v]):
                indegree[w] -= 1
                if indegree[w] == 0:
                    stack.append(w)
        return order
    ready = [v for v in range(len(preds)) if indegree[v] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        v = heapq.heappop(ready)
        order.append(v)
        for w in succs[v]:
            indegree[w] -= 1
            if indegree[w] == 0:
                heapq.heappush(ready, w)
    return order


def sweep_orders(index: GraphIndex) -> list[list[int]]:
    orders = []
    for depth_first in (False, True):
        orders.append(kahn_order(index.preds, index.succs, depth_first))
        orders.append(kahn_order(index.succs, index.preds, depth_first)[::-1])
    return orders


def best_prefix(
    index: GraphIndex, order: Sequence[int], target: float, tolerance: float
) -> tuple[tuple[float, int], int]:
    """(score, prefix length) of the best head among ``order``'s proper, non-empty prefixes."""
    state = SplitState(index, order)
    best: tuple[tuple[float, int], int] | None = None
    for length, v in enumerate(order[:-1], start=1):
        state.flip(v)
        key = state.key(target, tolerance)
        if best is None or key < best[0]:
            best = key, length
    assert best is not None, "a sweep needs at least two nodes"
    return best


def best_prefix_heads(
    index: GraphIndex, target: float, tolerance: float
) -> list[tuple[tuple[float, int], frozenset[int]]]:
    """The best prefix of each sweep order as (score, head), best first."""
    found = []
    for order in sweep_orders(index):
        key, length = best_prefix(index, order, target, tolerance)
        found.append((key, frozenset(order[:length])))
    return sorted(found, key=lambda e: (e[0], sorted(e[1])))


def prefix_cut(graph: TaskGraph, ratio: float, tolerance: float) -> MethodOutcome:
    index = GraphIndex.of(graph)
    _, head = best_prefix_heads(index, ratio, tolerance)[0]
    return MethodOutcome(tail=frozenset(range(graph.num_nodes)) - head)


# --- heavy-node patterns: a complete search for the window when few nodes are heavy ------------

MAX_PATTERNS = 4096


def heavy_pattern_heads(
    index: GraphIndex,
    target: float,
    tolerance: float,
    max_patterns: int = MAX_PATTERNS,
    deadline: float | None = None,
) -> tuple[list[tuple[tuple[float, int], frozenset[int]]], bool]:
    """Best swept head for each way of placing the *heavy* nodes; (score, head) best first, and
    whether every placement was tried.

    A node is heavy when its cost share exceeds the window's width (2 * tolerance): only such
    nodes can make a sweep jump over the window. Fix which heavy nodes are in the head (a set
    closed under heavy ancestors); then the head must contain their predecessor closure and
    avoid every descendant of the other heavy nodes. Sweeping the light nodes in between in
    topological order moves the ratio by less than the window's width per step, so it enters
    the window whenever the two extremes straddle it. Trying every placement is therefore a
    complete test of whether the window holds a valid split (up to the two-non-empty-stages
    corner cases of zero-cost nodes); the cap and the deadline keep it cheap when many nodes are
    heavy.
    """
    graph = index.graph
    n = graph.num_nodes
    total = graph.total_cost
    share = [c / total if total > 0 else 0.0 for c in graph.costs]
    order = kahn_order(index.preds, index.succs, depth_first=True)
    ancestors = [0] * n  # bitsets, node itself included
    for v in order:
        mask = 1 << v
        for p in index.preds[v]:
            mask |= ancestors[p]
        ancestors[v] = mask
    descendants = [0] * n
    for v in reversed(order):
        mask = 1 << v
        for s in index.succs[v]:
            mask |= descendants[s]
        descendants[v] = mask
    heavy = [v for v in order if share[v] > 2 * tolerance]

    def share_of(mask: int) -> float:
        return sum(share[v] for v in range(n) if mask >> v & 1)

    found: list[tuple[tuple[float, int], frozenset[int]]] = []
    tried = 0
    exhaustive = True
    # Depth-first over heavy nodes in topological order: a heavy node may join the head only if
    # its heavy ancestors did, and may stay out only if no chosen heavy node descends from it.
    stack: list[tuple[int, int, int]] = [(0, 0, 0)]  # (next heavy, head mask, excluded mask)
    while stack:
        i, head_mask, out_mask = stack.pop()
        if head_mask & out_mask:
            continue
        if i < len(heavy):
            c = heavy[i]
            stack.append((i + 1, head_mask, out_mask | descendants[c]))
            stack.append((i + 1, head_mask | ancestors[c], out_mask))
            continue
        tried += 1
        if tried > max_patterns or (deadline is not None and time.perf_counter() > deadline):
            exhaustive = False
            break
        low, high = share_of(head_mask), 1.0 - share_of(out_mask)
        if low > target + tolerance + RATIO_EPSILON or high < target - tolerance - RATIO_EPSILON:
            continue
        light = [v for v in order if not (head_mask | out_mask) >> v & 1]
        cut = _sweep_from(index, head_mask, light, target, tolerance)
        if cut is not None:
            found.append(cut)
    return sorted(found, key=lambda e: (e[0], sorted(e[1]))), exhaustive


def _sweep_from(
    index: GraphIndex, head_mask: int, light: list[int], target: float, tolerance: float
) -> tuple[tuple[float, int], frozenset[int]] | None:
    n = index.graph.num_nodes
    head = [v for v in range(n) if head_mask >> v & 1]
    state = SplitState(index, (v for v in range(n) if not head_mask >> v & 1))
    best = None
    for length in range(len(light) + 1):
        if length:
            state.flip(light[length - 1])
        if 0 < state.num_nodes - state.tail_size < n:
            key = state.key(target, tolerance)
            if best is None or key < best[0]:
                best = key, length
    if best is None:
        return None
    return best[0], frozenset(head + light[: best[1]])
