"""Keep uncuttable tensors inside one stage by merging the nodes they join.

A tensor marked ``cuttable=False`` must not cross, so its producer and every reader sit on the
same side; with pipeline validity (producer <= reader) that is equality. Add a reverse edge for
each such tensor: every strongly connected component of the result must then go whole to one
side (a node on a path between two nodes of the same component is forced along). The components
form a DAG whose valid splits are exactly the valid splits of the original graph that carry no
uncuttable tensor, so every cut method runs unchanged on the condensed graph and ``expand``
maps its tail back.
"""

from __future__ import annotations

from dataclasses import dataclass

from partitioner.graph import TaskGraph, TensorEdge


@dataclass(frozen=True)
class Condensed:
    graph: TaskGraph
    members: tuple[tuple[int, ...], ...]  # condensed node -> original nodes

    def expand(self, tail: frozenset[int]) -> frozenset[int]:
        return frozenset(v for group in tail for v in self.members[group])


def needs_condensing(graph: TaskGraph) -> bool:
    return any(
        not t.cuttable and t.producer is not None and any(c != t.producer for c in t.consumers)
        for t in graph.tensors
    )


def condense(graph: TaskGraph) -> Condensed:
    n = graph.num_nodes
    adjacency: list[set[int]] = [set(s) for s in graph.successors]
    for t in graph.tensors:
        if not t.cuttable and t.producer is not None:
            for c in t.consumers:
                if c != t.producer:
                    adjacency[c].add(t.producer)
    component = _components(adjacency)
    count = max(component, default=-1) + 1
    # Number the components in the order of their first node: deterministic and stable.
    order: dict[int, int] = {}
    for v in range(n):
        order.setdefault(component[v], len(order))
    group = [order[component[v]] for v in range(n)]
    members: list[list[int]] = [[] for _ in range(count)]
    for v in range(n):
        members[group[v]].append(v)
    costs = [0.0] * count
    for v, cost in enumerate(graph.costs):
        costs[group[v]] += cost
    tensors = []
    for t in graph.tensors:
        producer = None if t.producer is None else group[t.producer]
        readers = tuple(dict.fromkeys(group[c] for c in t.consumers if group[c] != producer))
        if readers or t.is_output:
            tensors.append(
                TensorEdge(t.name, producer, readers, t.nbytes, t.is_output, t.cuttable)
            )
    condensed = TaskGraph(
        node_names=tuple("+".join(graph.node_names[v] for v in m[:3]) for m in members),
        costs=tuple(costs),
        tensors=tuple(tensors),
    )
    return Condensed(condensed, tuple(tuple(m) for m in members))


def _components(adjacency: list[set[int]]) -> list[int]:
    """Tarjan's strongly connected components, iterative (graphs have thousands of nodes)."""
    n = len(adjacency)
    index = [-1] * n
    low = [0] * n
    on_stack = [False] * n
    stack: list[int] = []
    component = [-1] * n
    counter = 0
    found = 0
    succ = [sorted(a) for a in adjacency]
    for root in range(n):
        if index[root] != -1:
            continue
        work = [(root, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                index[v] = low[v] = counter
                counter += 1
                stack.append(v)
                on_stack[v] = True
            if i < len(succ[v]):
                work.append((v, i + 1))
                w = succ[v][i]
                if index[w] == -1:
                    work.append((w, 0))
                elif on_stack[w]:
                    low[v] = min(low[v], index[w])
                continue
            if low[v] == index[v]:
                while True:
                    w = stack.pop()
                    on_stack[w] = False
                    component[w] = found
                    if w == v:
                        break
                found += 1
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[v])
    return component
