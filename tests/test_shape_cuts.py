"""No cut ever carries a tensor without the batch as dim 0 (shapes, batch-folded views), in any
cut method, on random DAGs with shape side-branches; and the condensation behind it is exact."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import task_graphs_with_shapes

from partitioner.cuts import METHODS, find_cut
from partitioner.cuts.condense import condense
from partitioner.graph import TaskGraph, TensorEdge, evaluate, is_valid


def _carries_uncuttable(graph: TaskGraph, tail) -> bool:
    return bool(evaluate(graph, tail).uncuttable_crossing)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    graph=task_graphs_with_shapes(),
    ratio=st.sampled_from((0.3, 0.5, 0.75, 0.85, 0.95)),
    method=st.sampled_from(METHODS),
)
def test_no_method_ever_cuts_a_non_batch_tensor(graph, ratio, method):
    condensed = condense(graph)
    if condensed.graph.num_nodes < 2:
        with pytest.raises(ValueError, match="tie every node"):
            find_cut(graph, ratio, method, 0.03, time_limit=5)
        return
    result = find_cut(graph, ratio, method, 0.03, time_limit=5)
    assert is_valid(graph, result.tail)
    assert 0 < len(result.tail) < graph.num_nodes
    assert not _carries_uncuttable(graph, result.tail), evaluate(graph, result.tail).crossing


@settings(max_examples=80, deadline=None)
@given(graph=task_graphs_with_shapes(max_nodes=9))
def test_condensed_splits_are_exactly_the_splits_without_uncuttable_crossings(graph):
    """Brute force on small graphs: every valid split of the original graph that carries no
    uncuttable tensor is the expansion of a valid split of the condensed graph, and back."""
    condensed = condense(graph)
    m = condensed.graph.num_nodes
    from_condensed = set()
    for bits in itertools.product((False, True), repeat=m):
        tail = frozenset(g for g in range(m) if bits[g])
        if is_valid(condensed.graph, tail):
            from_condensed.add(condensed.expand(tail))
    n = graph.num_nodes
    from_original = set()
    for bits in itertools.product((False, True), repeat=n):
        tail = frozenset(v for v in range(n) if bits[v])
        if is_valid(graph, tail) and not _carries_uncuttable(graph, tail):
            from_original.add(tail)
    assert from_condensed == from_original


def test_a_shape_branch_from_the_first_node_to_the_last_does_not_block_the_cut():
    # x -> a -> b -> c, and Shape(x) feeds c: a naive cut between a and b would carry the shape.
    tensors = (
        TensorEdge("x", None, (0,), 100),
        TensorEdge("a", 0, (1, 3), 100),
        TensorEdge("b", 1, (2,), 100),
        TensorEdge("c", 2, (), 100, is_output=True),
        TensorEdge("shape", 3, (2,), 8, cuttable=False),
    )
    graph = TaskGraph(("n0", "n1", "n2", "shape"), (1.0, 1.0, 1.0, 0.0), tensors)
    for method in METHODS:
        result = find_cut(graph, 0.5, method, 0.2)
        assert not _carries_uncuttable(graph, result.tail)
        assert 3 in result.tail and 2 in result.tail  # the shape node goes with its reader
