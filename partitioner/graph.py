"""The model as plain data: a DAG of operator nodes with costs, joined by tensors with sizes.

Everything the cut algorithms need lives here and nothing imports ONNX, so cuts can be tested on
random graphs (see ``partitioner.onnx_graph`` for the builder from an ONNX model).

Vocabulary used across the partitioner:

* A *split* is the set of node indices that go to the **tail**; every other node is in the head.
* A split is *pipeline-valid* when no tensor flows tail -> head: the head is closed under
  predecessors, so the head can run to completion and hand its outputs to the tail.
* A tensor *crosses* when the head (or a graph input) produces it and at least one tail node reads
  it. It is transferred once however many tail nodes read it, so it is counted once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property


@dataclass(frozen=True)
class TensorEdge:
    """One tensor: who makes it, who reads it, and how many bytes one sample of it takes."""

    name: str
    producer: int | None  # node index; None for a graph input (always available to the head)
    consumers: tuple[int, ...]
    nbytes: int  # bytes for one sample (batch dimension = 1)
    is_output: bool = False
    # False for a tensor without the batch as dim 0 (a shape, a batch-folded [batch*heads, ...]
    # view): the runtime splits and joins cut tensors along dim 0, so it must never cross.
    cuttable: bool = True


@dataclass(frozen=True)
class TaskGraph:
    node_names: tuple[str, ...]
    costs: tuple[float, ...]
    tensors: tuple[TensorEdge, ...]
    op_types: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        n = len(self.node_names)
        if len(self.costs) != n:
            raise ValueError(f"{len(self.costs)} costs for {n} nodes")
        if self.op_types and len(self.op_types) != n:
            raise ValueError(f"{len(self.op_types)} op types for {n} nodes")
        if any(c < 0 for c in self.costs):
            raise ValueError("node costs must be non-negative")
        for t in self.tensors:
            for v in (t.producer, *t.consumers):
                if v is not None and not 0 <= v < n:
                    raise ValueError(f"tensor {t.name!r} names node {v}, graph has {n}")
        order = self.topological_order  # raises on a cycle
        del order

    @property
    def num_nodes(self) -> int:
        return len(self.node_names)

    @cached_property
    def total_cost(self) -> float:
        return float(sum(self.costs))

    @cached_property
    def successors(self) -> tuple[frozenset[int], ...]:
        succ: list[set[int]] = [set() for _ in range(self.num_nodes)]
        for t in self.tensors:
            if t.producer is not None:
                succ[t.producer].update(c for c in t.consumers if c != t.producer)
        return tuple(frozenset(s) for s in succ)

    @cached_property
    def predecessors(self) -> tuple[frozenset[int], ...]:
        pred: list[set[int]] = [set() for _ in range(self.num_nodes)]
        for v, succ in enumerate(self.successors):
            for w in succ:
                pred[w].add(v)
        return tuple(frozenset(p) for p in pred)

    @cached_property
    def topological_order(self) -> tuple[int, ...]:
        """Kahn's order, smallest index first among ready nodes (deterministic)."""
        import heapq

        indegree = [len(p) for p in self.predecessors]
        ready = [v for v, d in enumerate(indegree) if d == 0]
        heapq.heapify(ready)
        order: list[int] = []
        while ready:
            v = heapq.heappop(ready)
            order.append(v)
            for w in self.successors[v]:
                indegree[w] -= 1
                if indegree[w] == 0:
                    heapq.heappush(ready, w)
        if len(order) != self.num_nodes:
            raise ValueError("the graph has a cycle")
        return tuple(order)

    @cached_property
    def tensors_read_by(self) -> tuple[tuple[int, ...], ...]:
        """For each node, the indices (into ``tensors``) of the tensors it reads."""
        reads: list[list[int]] = [[] for _ in range(self.num_nodes)]
        for i, t in enumerate(self.tensors):
            for c in set(t.consumers):
                reads[c].append(i)
        return tuple(tuple(r) for r in reads)

    @cached_property
    def tensors_made_by(self) -> tuple[tuple[int, ...], ...]:
        made: list[list[int]] = [[] for _ in range(self.num_nodes)]
        for i, t in enumerate(self.tensors):
            if t.producer is not None:
                made[t.producer].append(i)
        return tuple(tuple(m) for m in made)


@dataclass(frozen=True)
class SplitStats:
    """What a split costs: the figures every cut method reports."""

    head_cost: float
    tail_cost: float
    head_ratio: float  # head_cost / total cost
    cut_bytes: int  # bytes per sample of the crossing tensors, each counted once
    valid: bool
    crossing: tuple[str, ...]  # names of the crossing tensors, in graph order
    violations: int  # tensors flowing tail -> head (0 when valid)
    uncuttable_crossing: tuple[str, ...] = ()  # crossing tensors marked cuttable=False


def crossing_tensors(graph: TaskGraph, tail: Iterable[int]) -> list[int]:
    """Indices of tensors that cross head -> tail (graph inputs read by the tail included)."""
    in_tail = _membership(graph, tail)
    return [
        i
        for i, t in enumerate(graph.tensors)
        if (t.producer is None or not in_tail[t.producer]) and any(in_tail[c] for c in t.consumers)
    ]


def is_valid(graph: TaskGraph, tail: Iterable[int]) -> bool:
    return _count_violations(graph, _membership(graph, tail)) == 0


def evaluate(graph: TaskGraph, tail: Iterable[int]) -> SplitStats:
    in_tail = _membership(graph, tail)
    tail_cost = float(sum(c for c, t in zip(graph.costs, in_tail, strict=True) if t))
    head_cost = graph.total_cost - tail_cost
    crossing = crossing_tensors(graph, [v for v, t in enumerate(in_tail) if t])
    violations = _count_violations(graph, in_tail)
    total = graph.total_cost
    return SplitStats(
        head_cost=head_cost,
        tail_cost=tail_cost,
        head_ratio=head_cost / total if total > 0 else 0.0,
        cut_bytes=sum(graph.tensors[i].nbytes for i in crossing),
        valid=violations == 0,
        crossing=tuple(graph.tensors[i].name for i in crossing),
        violations=violations,
        uncuttable_crossing=tuple(
            graph.tensors[i].name for i in crossing if not graph.tensors[i].cuttable
        ),
    )


def _membership(graph: TaskGraph, tail: Iterable[int]) -> list[bool]:
    in_tail = [False] * graph.num_nodes
    for v in tail:
        in_tail[v] = True
    return in_tail


def _count_violations(graph: TaskGraph, in_tail: list[bool]) -> int:
    return sum(
        1
        for t in graph.tensors
        if t.producer is not None
        and in_tail[t.producer]
        and any(not in_tail[c] for c in t.consumers)
    )
