"""Make any 2-way split pipeline-valid, bring it near the target ratio, then lower its bytes.

Every cut method ends here. ``SplitState`` keeps costs, crossing bytes and movability
incremental, so one move costs O(degree) instead of a full ``evaluate``; a move is always a
single node changing stage while the split stays pipeline-valid:

* a tail node may join the head iff all its predecessors are in the head;
* a head node may join the tail iff all its successors are in the tail.

Splits are compared by ``(excess, cut_bytes)``: first how far the head ratio lies outside the
tolerance window (0 inside), then bytes. So "closest achievable ratio" and "fewest bytes within
tolerance" are one ordering.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from partitioner.graph import TaskGraph

# Float slack for the window test: 53/100 - 0.5 is 0.030000000000000027, and a split that lies
# on the boundary by construction must count as inside it.
RATIO_EPSILON = 1e-9


def excess(ratio: float, target: float, tolerance: float) -> float:
    """How far ``ratio`` lies outside ``target +- tolerance``; 0.0 inside."""
    outside = abs(ratio - target) - tolerance
    return outside if outside > RATIO_EPSILON else 0.0


def within_window(ratio: float, target: float, tolerance: float) -> bool:
    return excess(ratio, target, tolerance) == 0.0


@dataclass(frozen=True)
class MethodOutcome:
    """What a cut method hands the dispatcher; the figures come from ``evaluate`` there."""

    tail: frozenset[int]
    optimal: bool | None = None
    note: str = ""
    explains_miss: bool = False  # the note already says why the window was missed


@dataclass(frozen=True)
class GraphIndex:
    """Flat per-node and per-tensor tables built once per graph for the incremental moves."""

    graph: TaskGraph
    preds: tuple[tuple[int, ...], ...]
    succs: tuple[tuple[int, ...], ...]
    # Per node: (tensor, node reads it, node makes it). Zero-byte tensors are left out: they
    # never change the bytes.
    touches: tuple[tuple[tuple[int, bool, bool], ...], ...]
    producer: tuple[int, ...]  # -1 for a graph input
    nbytes: tuple[int, ...]
    readers: tuple[tuple[int, ...], ...]  # distinct consumers of each tensor

    @classmethod
    def of(cls, graph: TaskGraph) -> GraphIndex:
        n = graph.num_nodes
        touches: list[dict[int, list[bool]]] = [{} for _ in range(n)]
        readers: list[tuple[int, ...]] = []
        for i, t in enumerate(graph.tensors):
            distinct = tuple(sorted(set(t.consumers)))
            readers.append(distinct)
            if t.nbytes == 0:
                continue
            for c in distinct:
                touches[c].setdefault(i, [False, False])[0] = True
            if t.producer is not None and distinct:
                touches[t.producer].setdefault(i, [False, False])[1] = True
        return cls(
            graph=graph,
            preds=tuple(tuple(sorted(p)) for p in graph.predecessors),
            succs=tuple(tuple(sorted(s)) for s in graph.successors),
            touches=tuple(
                tuple((t, reads, makes) for t, (reads, makes) in sorted(d.items())) for d in touches
            ),
            producer=tuple(-1 if t.producer is None else t.producer for t in graph.tensors),
            nbytes=tuple(t.nbytes for t in graph.tensors),
            readers=tuple(readers),
        )


class SplitState:
    """A pipeline-valid split with its cost, bytes and movability kept up to date per move."""

    def __init__(self, index: GraphIndex, tail: Iterable[int]) -> None:
        graph = index.graph
        self.index = index
        self.total = graph.total_cost
        self.in_tail = [False] * graph.num_nodes
        for v in tail:
            self.in_tail[v] = True
        in_tail = self.in_tail
        self.tail_size = sum(in_tail)
        self.tail_cost = float(sum(c for c, t in zip(graph.costs, in_tail, strict=True) if t))
        # Tail readers per tensor, kept up to date only for tensors with bytes (see touches).
        self.tail_readers = [
            sum(in_tail[c] for c in r) if b else 0
            for r, b in zip(index.readers, index.nbytes, strict=True)
        ]
        self.tail_preds = [sum(in_tail[p] for p in ps) for ps in index.preds]
        self.head_succs = [sum(not in_tail[s] for s in ss) for ss in index.succs]
        self.cut_bytes = sum(
            b
            for t, b in enumerate(index.nbytes)
            if self.tail_readers[t] > 0 and not self._producer_in_tail(t)
        )

    # --- read-only views -------------------------------------------------------------------

    @property
    def num_nodes(self) -> int:
        return len(self.in_tail)

    @property
    def tail(self) -> frozenset[int]:
        return frozenset(v for v, t in enumerate(self.in_tail) if t)

    @property
    def head_ratio(self) -> float:
        return self.ratio_after_cost(self.tail_cost)

    def ratio_after_cost(self, tail_cost: float) -> float:
        # Same formula as ``evaluate`` so both agree to the last bit that matters.
        return (self.total - tail_cost) / self.total if self.total > 0 else 0.0

    def key(self, target: float, tolerance: float) -> tuple[float, int]:
        return excess(self.head_ratio, target, tolerance), self.cut_bytes

    def is_movable(self, v: int) -> bool:
        """Can ``v`` change stage keeping the split valid (ignoring non-emptiness)?"""
        return self.tail_preds[v] == 0 if self.in_tail[v] else self.head_succs[v] == 0

    def keeps_both_nonempty(self, v: int) -> bool:
        if self.in_tail[v]:
            return self.tail_size > 1
        return self.num_nodes - self.tail_size > 1

    def frontier(self) -> set[int]:
        return {v for v in range(self.num_nodes) if self.is_movable(v)}

    # --- moves -----------------------------------------------------------------------------

    def _producer_in_tail(self, t: int) -> bool:
        p = self.index.producer[t]
        return p >= 0 and self.in_tail[p]

    def flip_delta(self, v: int) -> tuple[float, int]:
        """(tail cost after, bytes change) if ``v`` changed stage; the split is not touched."""
        to_tail = not self.in_tail[v]
        step = 1 if to_tail else -1
        delta = 0
        for t, reads, makes in self.index.touches[v]:
            producer_tail = self._producer_in_tail(t)
            readers = self.tail_readers[t]
            before = readers > 0 and not producer_tail
            if makes:
                producer_tail = to_tail
            if reads:
                readers += step
            after = readers > 0 and not producer_tail
            if after != before:
                delta += self.index.nbytes[t] if after else -self.index.nbytes[t]
        cost = self.index.graph.costs[v]
        return self.tail_cost + (cost if to_tail else -cost), delta

    def flip(self, v: int, frontier: set[int] | None = None) -> None:
        """Move ``v`` to the other stage; the caller checks ``is_movable`` first."""
        tail_cost, delta = self.flip_delta(v)
        to_tail = not self.in_tail[v]
        step = 1 if to_tail else -1
        for t, reads, _ in self.index.touches[v]:
            if reads:
                self.tail_readers[t] += step
        self.in_tail[v] = to_tail
        self.tail_cost = tail_cost
        self.tail_size += step
        self.cut_bytes += delta
        for s in self.index.succs[v]:
            self.tail_preds[s] += step
        for p in self.index.preds[v]:
            self.head_succs[p] -= step
        if frontier is not None:
            for w in (v, *self.index.preds[v], *self.index.succs[v]):
                if self.is_movable(w):
                    frontier.add(w)
                else:
                    frontier.discard(w)


# --- repairs: make any split valid -----------------------------------------------------------


def shrink_head(graph: TaskGraph, head: Iterable[int]) -> frozenset[int]:
    """The largest predecessor-closed subset of ``head``: drop every head node fed by the tail."""
    wanted = set(head)
    kept: set[int] = set()
    for v in graph.topological_order:
        if v in wanted and all(p in kept for p in graph.predecessors[v]):
            kept.add(v)
    return frozenset(kept)


def grow_head(graph: TaskGraph, head: Iterable[int]) -> frozenset[int]:
    """The predecessor closure of ``head``: pull every ancestor of a head node into the head."""
    closure = set(head)
    for v in reversed(graph.topological_order):
        if v in closure:
            closure.update(graph.predecessors[v])
    return frozenset(closure)


def tail_of(graph: TaskGraph, head: Iterable[int]) -> frozenset[int]:
    return frozenset(range(graph.num_nodes)) - frozenset(head)


def ensure_nonempty(state: SplitState, target: float, tolerance: float) -> None:
    """Give an empty stage one node: the movable node whose move scores best."""
    if 0 < state.tail_size < state.num_nodes:
        return
    emptying_tail = state.tail_size == 0
    candidates = [
        v
        for v in range(state.num_nodes)
        if state.in_tail[v] != emptying_tail and state.is_movable(v)
    ]
    state.flip(min(candidates, key=lambda v: (*_key_after(state, v, target, tolerance), v)))


def _key_after(state: SplitState, v: int, target: float, tolerance: float) -> tuple[float, int]:
    tail_cost, delta = state.flip_delta(v)
    return excess(state.ratio_after_cost(tail_cost), target, tolerance), state.cut_bytes + delta


# --- rebalance and window sweeps: one-way walks ------------------------------------------------


def rebalance(state: SplitState, target: float, tolerance: float) -> None:
    """Outside the window: walk toward it, then on through it (see ``sweep``)."""
    if not within_window(state.head_ratio, target, tolerance):
        sweep(state, target, tolerance, to_tail=state.head_ratio > target)


def sweep(state: SplitState, target: float, tolerance: float, to_tail: bool) -> None:
    """Move nodes one way only (``to_tail``: head -> tail, which lowers the head ratio) until the
    far edge of the window stops it; keep the best state seen, the start included.

    Each step takes the movable node that adds the fewest bytes among those that do not jump past
    the far edge. From outside the window this is the rebalance; from inside it walks the whole
    window one way, which FM's one-move-at-a-time gains cannot see across (a chain whose cheap
    tensor lies several uphill moves away). One-way moves visit each node at most once, so this
    ends within n steps even through runs of zero-cost nodes.
    """
    far_edge = target - tolerance if to_tail else target + tolerance
    frontier = state.frontier()
    history: list[int] = []
    best_key, best_len = state.key(target, tolerance), 0

    def beyond_far_edge(ratio: float) -> bool:
        gap = far_edge - ratio if to_tail else ratio - far_edge
        return gap > RATIO_EPSILON

    while True:
        # (bytes-cut change, -node cost, node): the smallest cut first, the heaviest node on ties.
        options: list[tuple[int, float, int]] = []
        overshoots: list[tuple[int, float, int]] = []
        for v in frontier:
            if state.in_tail[v] == to_tail or not state.keeps_both_nonempty(v):
                continue
            tail_cost, delta = state.flip_delta(v)
            entry = (delta, -state.index.graph.costs[v], v)
            (overshoots if beyond_far_edge(state.ratio_after_cost(tail_cost)) else options).append(
                entry
            )
        if not options:
            break
        v = min(options)[2]
        state.flip(v, frontier)
        history.append(v)
        key = state.key(target, tolerance)
        if key < best_key:
            best_key, best_len = key, len(history)

    # A node too heavy to stay inside may still land closer than anything before it.
    if best_key[0] > 0 and overshoots:
        jump = min(overshoots, key=lambda e: (*_key_after(state, e[2], target, tolerance), e[2]))[2]
        if _key_after(state, jump, target, tolerance) < best_key:
            state.flip(jump)
            return
    for v in reversed(history[best_len:]):
        state.flip(v)


# --- refine: FM-style local search -----------------------------------------------------------


def refine(
    state: SplitState,
    target: float,
    tolerance: float,
    max_passes: int = 8,
    patience: int = 48,
) -> None:
    """Fiduccia-Mattheyses passes over valid single-node moves.

    Each pass moves the best-scoring movable node (uphill moves allowed, each node once per
    pass) and rolls back to the best state seen. Inside the window a move must stay inside;
    outside it any move is allowed, so the same search also hunts for a ratio inside the
    window. A pass stops ``patience`` moves after its last improvement, as in FM's early exit.
    """
    for _ in range(max_passes):
        start_key = state.key(target, tolerance)
        best_key, best_len = start_key, 0
        history: list[int] = []
        locked: set[int] = set()
        frontier = state.frontier()
        while len(history) - best_len < patience:
            inside = within_window(state.head_ratio, target, tolerance)
            choice = None
            for v in frontier:
                if v in locked or not state.keeps_both_nonempty(v):
                    continue
                key = _key_after(state, v, target, tolerance)
                if inside and key[0] > 0:
                    continue
                if choice is None or (key, v) < choice:
                    choice = (key, v)
            if choice is None:
                break
            key, v = choice
            state.flip(v, frontier)
            locked.add(v)
            history.append(v)
            if key < best_key:
                best_key, best_len = key, len(history)
        for v in reversed(history[best_len:]):
            state.flip(v)
        if not best_key < start_key:
            return


def polish(index: GraphIndex, head: Iterable[int], target: float, tolerance: float) -> SplitState:
    """Valid head in, best split found near it out: non-empty, rebalanced, refined, then swept
    both ways through the window and refined again if that found anything."""
    state = SplitState(index, tail_of(index.graph, head))
    ensure_nonempty(state, target, tolerance)
    rebalance(state, target, tolerance)
    refine(state, target, tolerance)
    before = state.key(target, tolerance)
    for to_tail in (True, False):
        sweep(state, target, tolerance, to_tail)
    if state.key(target, tolerance) < before:
        refine(state, target, tolerance)
    return state
