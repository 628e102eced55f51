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

from handlers.runtime.exploration import REPROBE_AFTER_S, Reprobe, RunKey, mark_reprobes
from handlers.runtime.perf_model import batch_bucket
from handlers.runtime.scheduler import (
    Candidate,
    ExecutorClock,
    ExecutorSpec,
    Placement,
    Predictor,
    build_candidates,
    choose_executor,
)


class Placer:
    def __init__(
        self,
        history: Predictor,
        devices: Mapping[str, str],
        clock: Callable[[], float],
        reprobe_after_s: float | None = REPROBE_AFTER_S,
    ) -> None:
        self.history = history
        self.devices = dict(devices)  # executor name -> its device ("cpu", "cuda:0")
        self.clock = clock
        self.free_times = ExecutorClock(clock=clock)
        # None: never re-probe (a history without observation stamps, e.g. the simulator's noise)
        self.reprobe_after_s = reprobe_after_s
        self.reprobed: dict[RunKey, Reprobe] = {}
        # A PerfHistory stamps its observations on its own clock; a bare predictor (the
        # simulator's noisy one) has no stamps, and then nothing is re-probed.
        self._confirmed_at: Callable[[RunKey], float | None] | None = getattr(
            history, "confirmed_at", None
        )
        self._history_clock: Callable[[], float] | None = getattr(history, "clock", None)

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
        candidates: Sequence[Candidate] = build_candidates(
            self.history, stage, batch, nbytes, data_device, specs, free_at
        )
        if self.reprobe_after_s is not None and self._confirmed_at and self._history_clock:
            # An estimate for this batch size not measured here for a while gets one run as if
            # uncalibrated: re-measured, not starved by one inflated estimate.
            candidates = mark_reprobes(
                stage, batch_bucket(batch), candidates, self._confirmed_at, self.reprobed,
                self._history_clock(), self.reprobe_after_s,
            )
        placement = choose_executor(self.clock(), candidates)
        self.free_times.reserve(placement.executor, placement.start, placement.end)
        return placement

    def complete(self, executor: str, actual_end: float | None = None) -> None:
        """``executor`` finished (or gave up) its oldest booked run at ``actual_end`` (default now)."""
        self.free_times.complete(executor, actual_end)
