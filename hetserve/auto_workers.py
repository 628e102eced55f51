"""``minWorkers: auto`` / ``maxWorkers: auto``: lives in ``partitioner.auto_workers`` (packing an
archive resolves it); re-exported for the CLI side and its tools."""

from partitioner.auto_workers import (
    AUTO,
    PRODUCER_KEY,
    WORKER_KEYS,
    WorkerChoice,
    asks_auto,
    box,
    resolve,
    resolve_here,
    visible_gpus,
    workers_here,
)

__all__ = ["AUTO", "PRODUCER_KEY", "WORKER_KEYS", "WorkerChoice", "asks_auto", "box", "resolve",
           "resolve_here", "visible_gpus", "workers_here"]
