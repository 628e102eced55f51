"""Random task graphs for property tests: DNN-shaped block chains and arbitrary DAGs.

``task_graphs()`` is the hypothesis strategy; ``dnn_like_graph(n, seed)`` builds the same
DNN-shaped graphs from a plain ``random.Random`` (for benchmarks on graphs too big for
hypothesis). Both generators write nodes in topological order, so every edge goes from a lower
to a higher index.

Usage (tests/ has no __init__.py, so pytest puts it on sys.path):
    from strategies import task_graphs
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from hypothesis import strategies as st

from partitioner.graph import TaskGraph, TensorEdge

COST_KINDS = ("zero", "light", "light", "light", "medium", "medium", "heavy")


class Chooser:
    """The few random decisions the generators make, so hypothesis and ``random`` share them."""

    def __init__(self, integer: Callable[[int, int], int]) -> None:
        self.integer = integer  # inclusive bounds

    def pick(self, options: Sequence):
        return options[self.integer(0, len(options) - 1)]

    def chance(self, one_in: int) -> bool:
        return self.integer(1, one_in) == 1

    def cost(self) -> float:
        kind = self.pick(COST_KINDS)
        if kind == "zero":
            return 0.0
        if kind == "light":
            return float(self.integer(1, 10))
        if kind == "medium":
            return self.integer(10, 400) / 4  # not always an integer
        return float(self.integer(200, 2000))

    def nbytes(self) -> int:
        if self.chance(40):
            return 0  # e.g. an empty shape; such tensors never matter
        return self.integer(1, 9) * 10 ** self.integer(0, 7)


@dataclass
class _Builder:
    costs: list[float] = field(default_factory=list)
    producers: list[int | None] = field(default_factory=list)
    consumers: list[list[int]] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    outputs: set[int] = field(default_factory=set)

    def tensor(self, producer: int | None, nbytes: int) -> int:
        self.producers.append(producer)
        self.consumers.append([])
        self.sizes.append(nbytes)
        return len(self.sizes) - 1

    def node(self, cost: float, reads: Sequence[int], out_sizes: Sequence[int]) -> list[int]:
        v = len(self.costs)
        self.costs.append(cost)
        for t in reads:
            self.consumers[t].append(v)
        return [self.tensor(v, size) for size in out_sizes]

    def build(self) -> TaskGraph:
        n = len(self.costs)
        tensors = tuple(
            TensorEdge(
                name=f"t{i}",
                producer=p,
                consumers=tuple(cs),
                nbytes=b,
                is_output=i in self.outputs or (p is not None and not cs),
            )
            for i, (p, cs, b) in enumerate(
                zip(self.producers, self.consumers, self.sizes, strict=True)
            )
        )
        return TaskGraph(
            node_names=tuple(f"n{v}" for v in range(n)), costs=tuple(self.costs), tensors=tensors
        )


def dnn_like(choose: Chooser, num_nodes: int) -> TaskGraph:
    """A chain of DNN blocks: plain layers, residual blocks, Inception fan-outs, multi-output
    splits, and an optional side input (e.g. a mask) read by several later nodes."""
    b = _Builder()
    x = b.tensor(None, choose.nbytes())
    side_input = b.tensor(None, choose.nbytes()) if choose.chance(3) else None
    while len(b.costs) < num_nodes:
        room = num_nodes - len(b.costs)
        block = choose.pick(("layer", "layer", "residual", "inception", "split"))
        reads_side = side_input is not None and choose.chance(4)
        extra = [side_input] if reads_side else []
        if block == "residual" and room >= 3:
            (a,) = b.node(choose.cost(), [x, *extra], [choose.nbytes()])
            (c,) = b.node(choose.cost(), [a], [choose.nbytes()])
            (x,) = b.node(choose.cost(), [x, c], [choose.nbytes()])  # x read twice: fan-out
        elif block == "inception" and room >= 4:
            branches = choose.integer(2, min(4, room - 1))
            ends = []
            for _ in range(branches):
                (end,) = b.node(choose.cost(), [x, *extra], [choose.nbytes()])
                if len(b.costs) < num_nodes - 1 and choose.chance(2):
                    (end,) = b.node(choose.cost(), [end], [choose.nbytes()])
                ends.append(end)
            (x,) = b.node(choose.cost(), ends, [choose.nbytes()])
        elif block == "split" and room >= 4:
            left, right = b.node(choose.cost(), [x], [choose.nbytes(), choose.nbytes()])
            (left,) = b.node(choose.cost(), [left, *extra], [choose.nbytes()])
            (right,) = b.node(choose.cost(), [right], [choose.nbytes()])
            (x,) = b.node(choose.cost(), [left, right], [choose.nbytes()])
        else:
            (x,) = b.node(choose.cost(), [x, *extra], [choose.nbytes()])
        if choose.chance(12):
            b.outputs.add(x)  # an intermediate output that later nodes also read
    b.outputs.add(x)
    return b.build()


def arbitrary_dag(choose: Chooser, num_nodes: int) -> TaskGraph:
    """Any DAG: each tensor is read by any later nodes (or none), some nodes have two outputs,
    one or two graph inputs are read anywhere."""
    b = _Builder()
    n = num_nodes
    inputs = [b.tensor(None, choose.nbytes()) for _ in range(choose.integer(1, 2))]
    reads: list[list[int]] = [[] for _ in range(n)]
    for t in inputs:
        for _ in range(choose.integer(1, 3)):
            reads[choose.integer(0, n - 1)].append(t)
    for v in range(n):
        outs = b.node(choose.cost(), sorted(set(reads[v])), [choose.nbytes()])
        if choose.chance(5):
            outs += [b.tensor(v, choose.nbytes())]
        for t in outs:
            if v == n - 1:
                continue
            for _ in range(choose.integer(0, 3)):
                reads[choose.integer(v + 1, n - 1)].append(t)
            if choose.chance(8):
                b.outputs.add(t)
    return b.build()


@st.composite
def task_graphs(
    draw, min_nodes: int = 2, max_nodes: int = 40, shapes: Sequence[str] = ("dnn", "dag")
) -> TaskGraph:
    choose = Chooser(lambda lo, hi: draw(st.integers(lo, hi)))
    num_nodes = draw(st.integers(min_nodes, max_nodes))
    shape = draw(st.sampled_from(tuple(shapes)))
    return dnn_like(choose, num_nodes) if shape == "dnn" else arbitrary_dag(choose, num_nodes)


def dnn_like_graph(num_nodes: int, seed: int = 0) -> TaskGraph:
    rng = random.Random(seed)
    return dnn_like(Chooser(rng.randint), num_nodes)


def with_shape_branches(choose: Chooser, graph: TaskGraph, branches: int) -> TaskGraph:
    """``graph`` plus ``branches`` shape side-branches, as exporters emit them: a cheap node
    reads some tensor (``Shape(x)``) and makes a small tensor without a batch dim, read by one
    to three later nodes (``Reshape(h, shape)``); a few existing tensors also lose their batch
    dim (``[batch*heads, ...]`` views). Those tensors are ``cuttable=False``. Generators number
    nodes topologically, so readers after the source keep the graph acyclic."""
    n = graph.num_nodes
    tensors = [
        TensorEdge(t.name, t.producer, t.consumers, t.nbytes, t.is_output,
                   cuttable=t.producer is None or t.is_output or not choose.chance(6))
        for t in graph.tensors
    ]
    costs = list(graph.costs)
    names = list(graph.node_names)
    for k in range(branches):
        source = choose.integer(0, n - 1)
        reads = [t for t in tensors if t.producer == source] or [tensors[0]]
        read = choose.pick(reads)
        v = len(costs)
        costs.append(float(choose.integer(0, 2)))
        names.append(f"shape{k}")
        tensors = [
            TensorEdge(t.name, t.producer, (*t.consumers, v), t.nbytes, t.is_output, t.cuttable)
            if t.name == read.name else t
            for t in tensors
        ]
        later = [w for w in range(n) if w > source] or [n - 1]
        readers = tuple(sorted({choose.pick(later) for _ in range(choose.integer(1, 3))}))
        if source in readers:
            readers = tuple(r for r in readers if r != source) or (v,)
        readers = tuple(r for r in readers if r != v)
        if readers:
            tensors.append(TensorEdge(f"shape{k}_out", v, readers, 8 * choose.integer(0, 4),
                                       cuttable=False))
        else:
            tensors.append(TensorEdge(f"shape{k}_out", v, (), 8, is_output=True))
    return TaskGraph(node_names=tuple(names), costs=tuple(costs), tensors=tuple(tensors))


@st.composite
def task_graphs_with_shapes(draw, min_nodes: int = 2, max_nodes: int = 30) -> TaskGraph:
    graph = draw(task_graphs(min_nodes=min_nodes, max_nodes=max_nodes))
    choose = Chooser(lambda lo, hi: draw(st.integers(lo, hi)))
    return with_shape_branches(choose, graph, draw(st.integers(0, 4)))
