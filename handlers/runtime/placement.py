"""The placement step every caller shares: history + predicted free times + one clock -> executor.

``Placer.place`` is what the runtime does for each stage of each micro-batch (and what the
simulator and the decision-cost benchmark run, so they measure the live path): read the allowed
executors' predicted free times, build candidates from the performance history
(``handlers.runtime.scheduler.build_candidates``), choose with dmda and book the choice.
``complete`` tells it an executor finished its oldest booked run. Not locked itself beyond the
free-time book: the runtime calls it under its own lock.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from handlers.runtime.scheduler import (
    ExecutorClock,
    ExecutorSpec,
    Placement,
    Predictor,
    build_candidates,
    choose_executor,
)


class Placer:
    def __init__(
        self, history: Predictor, devices: Mapping[str, str], clock: Callable[[], float]
    ) -> None:
        self.history = history
        self.devices = dict(devices)  # executor name -> its device ("cpu", "cuda:0")
        self.clock = clock
        self.free_times = ExecutorClock(clock=clock)

    def place(
        self, stage: str, batch: int, feeds: Mapping[str, Any], allowed: Sequence[str]
    ) -> Placement:
        """The executor among ``allowed`` where this run is predicted to end first, booked.

        ``feeds`` are numpy arrays, or device tensors (anything with ``device`` and ``nbytes``)
        left on a GPU by the previous stage: they decide the transfer each candidate needs.
        """
        specs = [ExecutorSpec(name, self.devices[name]) for name in allowed]
        data_device = next(
            (v.device for v in feeds.values() if not isinstance(v, np.ndarray)), "cpu"
        )
        nbytes = sum(int(v.nbytes) for v in feeds.values())
        free_at = {spec.name: self.free_times.free_at(spec.name) for spec in specs}
        candidates = build_candidates(
            self.history, stage, batch, nbytes, data_device, specs, free_at
        )
        placement = choose_executor(self.clock(), candidates)
        self.free_times.reserve(placement.executor, placement.start, placement.end)
        return placement

    def complete(self, executor: str, actual_end: float | None = None) -> None:
        """``executor`` finished (or gave up) its oldest booked run at ``actual_end`` (default now)."""
        self.free_times.complete(executor, actual_end)
