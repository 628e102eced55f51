"""Cut a task graph into a GPU head and a CPU tail: the public API.

``find_cut(graph, ratio)`` returns the pipeline-valid split whose head takes ``ratio`` of the
total cost (within ``tolerance``) with the fewest bytes crossing the cut. Methods:

* ``metis`` (default, as in the StarONNX paper): METIS bisection + repair + rebalance + FM refine;
* ``exact``: MILP with HiGHS, time-limited, reports whether optimality was proven;
* ``prefix``: best prefix of a few topological orders (a baseline).

Every returned split is valid with both stages non-empty; the figures are recomputed with
``partitioner.graph.evaluate``. When no split inside the window was found, the closest ratio
found is returned with ``within_tolerance=False`` and a note saying so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from partitioner.cuts.condense import condense, needs_condensing
from partitioner.cuts.exact import exact_cut
from partitioner.cuts.metis import metis_cut
from partitioner.cuts.prefix import prefix_cut
from partitioner.cuts.repair import MethodOutcome, within_window
from partitioner.graph import TaskGraph, evaluate

DEFAULT_TOLERANCE = 0.03  # +-3 points of head ratio
METHODS = ("metis", "exact", "prefix")

__all__ = ["DEFAULT_TOLERANCE", "METHODS", "CutResult", "find_cut"]


@dataclass(frozen=True)
class CutResult:
    method: str
    target_ratio: float  # requested head share of total cost
    tail: frozenset[int]  # node indices in the tail
    achieved_ratio: float
    cut_bytes: int  # bytes per sample, crossing tensors counted once
    valid: bool  # always True for a returned result; kept for reports
    within_tolerance: bool
    optimal: bool | None  # exact solver: proven optimal; None for heuristics
    seconds: float
    note: str = ""


def find_cut(
    graph: TaskGraph,
    ratio: float,
    method: str = "metis",
    tolerance: float = DEFAULT_TOLERANCE,
    time_limit: float = 10.0,
    seed: int = 0,
) -> CutResult:
    if method not in METHODS:
        raise ValueError(f"unknown cut method {method!r}; expected one of {METHODS}")
    if graph.num_nodes < 2:
        raise ValueError(f"a cut needs at least 2 nodes, the graph has {graph.num_nodes}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")

    start = time.perf_counter()
    if needs_condensing(graph):
        condensed = condense(graph)
        if condensed.graph.num_nodes < 2:
            raise ValueError(
                "no cut exists: tensors without the batch as dim 0 (shapes, batch-folded views) "
                "tie every node of the model together, and such tensors cannot cross"
            )
        inner = _run(condensed.graph, ratio, method, tolerance, time_limit, seed)
        outcome = MethodOutcome(
            tail=condensed.expand(frozenset(inner.tail)), optimal=inner.optimal,
            note=inner.note, explains_miss=inner.explains_miss,
        )
    else:
        outcome = _run(graph, ratio, method, tolerance, time_limit, seed)
    seconds = time.perf_counter() - start

    stats = evaluate(graph, outcome.tail)
    if not stats.valid or not 0 < len(outcome.tail) < graph.num_nodes:
        raise RuntimeError(f"{method} cut produced an invalid split (bug): {sorted(outcome.tail)}")
    if stats.uncuttable_crossing:
        raise RuntimeError(f"{method} cut carries {stats.uncuttable_crossing} (bug)")
    within = within_window(stats.head_ratio, ratio, tolerance)
    note = outcome.note
    if not within and not outcome.explains_miss:
        miss = f"no split found within +-{tolerance:g}; closest found ratio {stats.head_ratio:.4g}"
        note = "; ".join(filter(None, [miss, note]))
    return CutResult(
        method=method,
        target_ratio=ratio,
        tail=frozenset(outcome.tail),
        achieved_ratio=stats.head_ratio,
        cut_bytes=stats.cut_bytes,
        valid=stats.valid,
        within_tolerance=within,
        optimal=outcome.optimal,
        seconds=seconds,
        note=note,
    )


def _run(
    graph: TaskGraph, ratio: float, method: str, tolerance: float, time_limit: float, seed: int
) -> MethodOutcome:
    if method == "metis":
        return metis_cut(graph, ratio, tolerance, time_limit, seed)
    if method == "exact":
        return exact_cut(graph, ratio, tolerance, time_limit)
    return prefix_cut(graph, ratio, tolerance)
