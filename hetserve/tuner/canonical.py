"""Small budgets: one name per configuration (``canonical``), the brute-force grid of a space,
and the coordinate search's next proposal (``propose_local``)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from handlers.artifact.contract import serves_split
from handlers.hardware.topology import Core, Topology, plan_groups, worker_core_count

# the local search's knob order: processes first, then how long a worker waits to fill a batch,
# then what runs (whole model or split) and the executors, then the rest; a knob the space fixes is
# skipped. maxBatchDelay comes right after workers because the worker count sets each worker's
# share of the arrivals (8 clients over 2 workers: about batchSize 4 each, so a 5 ms gather
# dispatches partial batches), while on one-core workers a split model runs head and tail on the
# same core and ratio moves little. Recorded grid (benchmarks/results/tuner_vs_grid.json,
# ResNet-18, 2 cores): at 2 workers maxBatchDelay 20 vs 5 averaged +11% over both ratios, ratio
# 0.8 vs 1.0 -1% at 5 ms and +7% at 20 ms; with the old order (ratio first) 4 trials never reached
# 2 workers with a 20 ms delay, the grid's best class.
LOCAL_ORDER = ("workers", "maxBatchDelay", "ratio", "core_groups", "batchSize", "micro_batch",
               "cpu_head_groups", "spinning", "allocator", "openmp")


def even_topology(cores: int, nodes: int = 1) -> Topology:
    """A box of `cores` cores spread evenly over `nodes` NUMA nodes, one socket each."""
    node_of = [i for i in range(min(nodes, cores)) for _ in range(cores // nodes + (i < cores % nodes))]
    return Topology(tuple(Core(cpu, (cpu,), cpu, node, node) for cpu, node in enumerate(node_of)))


def group_sizes(policy: str, worker_cores: int, nodes: int = 1, min_groups: int = 1) -> tuple[int, ...]:
    """Cores per core group one worker gets: the runtime's `plan_groups` on a worker of
    `worker_cores` cores spread evenly over `nodes` NUMA nodes (sockets = nodes here)."""
    # More groups than cores cannot be had; asking for them would only log plan_groups' warning.
    groups = plan_groups(even_topology(worker_cores, nodes), policy, min_groups=min(min_groups, worker_cores))
    return tuple(sorted((len(g.cpus) for g in groups), reverse=True))


def executor_layout(params: Mapping[str, Any], cores: int, nodes: int = 1) -> tuple[int, ...]:
    """The core groups each worker runs (CPU only): the launcher's share of the cores per worker,
    and a split model (ratio < 1) needs two groups, so the runtime splits one if it can."""
    worker_cores = worker_core_count(cores, int(params["workers"]))
    split = serves_split(float(params["ratio"]), None)
    return group_sizes(str(params["core_groups"]), worker_cores, nodes, min_groups=2 if split else 1)


def _first(choices: Sequence, preferred: Any) -> Any:
    return preferred if preferred in choices else choices[0]


def canonical(params: Mapping[str, Any], space: Mapping[str, tuple], cores: int, nodes: int = 1) -> dict[str, Any]:
    """`params` with every knob that cannot change what runs (or, for micro_batch on one executor,
    can only slow it) set to one representative value, so two names for one configuration measure
    once (a grid of them has no duplicates):

    - core_groups: policies giving a worker the same groups (on 2 cores a one-core worker has one
      group whatever the policy; a split model on one 2-core group is split into two 1-core
      groups, as size:1 gives) take the first such policy in the space;
    - batchSize 1: maxBatchDelay (a batch of one never waits) and micro_batch (nothing to split);
    - one core group: micro_batch (micro-batches of one executor run one after another: they can
      only lose batching) and cpu_head_groups (nothing to reserve); a whole model (ratio 1):
      cpu_head_groups (no head/tail pipeline).

    CPU-only rules: on a GPU box the layout differs and only the batchSize rule holds.
    """
    p = dict(params)
    if "core_groups" in space and {"workers", "ratio"} <= p.keys():
        layout = executor_layout(p, cores, nodes)
        p["core_groups"] = next(c for c in space["core_groups"]
                                if executor_layout({**p, "core_groups": c}, cores, nodes) == layout)
        if len(layout) == 1:
            p["micro_batch"] = _first(space.get("micro_batch", (0,)), 0)
        if len(layout) == 1 or not serves_split(float(p["ratio"]), None):
            p["cpu_head_groups"] = _first(space.get("cpu_head_groups", (0,)), 0)
    if int(p.get("batchSize", 0)) == 1:
        p["maxBatchDelay"] = _first(space.get("maxBatchDelay", (0,)), 0)
        p["micro_batch"] = _first(space.get("micro_batch", (0,)), 0)
    return {k: p[k] for k in params}


def config_key(params: Mapping[str, Any]) -> str:
    return json.dumps(dict(params), sort_keys=True)


def grid_points(space: Mapping[str, tuple], cores: int, nodes: int = 1) -> list[dict[str, Any]]:
    """Every distinct configuration of `space` (the product, canonicalised, duplicates dropped),
    in product order: what a brute-force search must measure."""
    import itertools

    names, seen, points = list(space), set(), []
    for combo in itertools.product(*(space[k] for k in names)):
        point = canonical(dict(zip(names, combo, strict=True)), space, cores, nodes)
        if config_key(point) not in seen:
            seen.add(config_key(point))
            points.append(point)
    return points


def propose_local(space: Mapping[str, tuple], measured: Sequence[tuple[Mapping[str, Any], float]],
                  canon: Callable[[Mapping[str, Any]], dict[str, Any]], maximize: bool = True,
                  order: Sequence[str] = LOCAL_ORDER) -> dict[str, Any] | None:
    """The next configuration of a coordinate search: the best measured one with a single knob
    changed (knobs in `order`, then the rest; values in the space's order), skipping what is
    already measured once canonicalised. None when every neighbour of the best is measured."""
    if not measured:
        return None
    best = (max if maximize else min)(measured, key=lambda row: row[1])[0]
    done = {config_key(canon(p)) for p, _ in measured}
    knobs = [k for k in order if k in space] + [k for k in space if k not in order]
    for knob in knobs:
        for value in space[knob]:
            candidate = canon({**best, knob: value})
            if config_key(candidate) not in done:
                return candidate
    return None
