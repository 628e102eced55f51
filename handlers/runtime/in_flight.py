"""The work a runtime has in flight, shared by the micro-batch flow and its supervisor.

``Runtime`` (``runtime/flow.py``) submits stage runs and settles them when they finish; the
``Supervisor`` (``runtime/supervisor.py``) cancels those past their deadline and re-probes
quarantined executors. Both work on one ``InFlight`` under its one lock: the stage runs
(``attempts``), the re-probes (``probes``), the quarantine and the counters. Neither module
imports the other's internals: the supervisor is handed this state and a way to retry.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from handlers.errors import ExecutorFailed, ExecutorOutOfMemory, StageTimeout
from handlers.executors.base import Executor, StageOutputs
from handlers.observability.stats import RuntimeStats
from handlers.runtime.quarantine import Quarantine

log = logging.getLogger(__name__)

# (stage) -> calibration-size feeds for that stage: what a re-probe runs.
ProbeFeeds = Callable[[str], Mapping[str, np.ndarray]]


@dataclass(frozen=True)
class StagePlan:
    name: str  # "head", "tail" or "whole"
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    candidates: tuple[str, ...]  # executor names allowed to run it


@dataclass
class Flow:
    """One micro-batch on its way through the stages."""

    start: int
    stop: int
    tensors: dict[str, Any]  # numpy arrays, or tensors left on a GPU by the previous stage
    done: Future[Any] = field(default_factory=Future)
    stage_index: int = 0
    abandoned: bool = False  # its request ran out of time: nothing more is done for it
    attempt: tuple[Attempt, Future[StageOutputs]] | None = None  # the stage run in flight

    @property
    def batch(self) -> int:
        return self.stop - self.start


@dataclass(eq=False)
class Attempt:
    """One stage of one micro-batch submitted to one executor."""

    flow: Flow
    stage: StagePlan
    executor: str
    exclude: frozenset[str]  # executors this stage already failed on
    settled: bool = False  # its outcome was handled (done, timed out, rerouted or abandoned)


class InFlight:
    """Stage runs and re-probes in flight, the quarantine and the counters, under one lock."""

    def __init__(
        self,
        executors: Mapping[str, Executor],
        quarantine: Quarantine,
        clock: Callable[[], float],
        stage_timeout_s: float,
        probe_feeds: ProbeFeeds | None,
    ) -> None:
        self.executors = executors
        self.quarantine = quarantine
        self.clock = clock
        self.stage_timeout_s = stage_timeout_s
        self.probe_feeds = probe_feeds
        self.lock = threading.Lock()
        self.stats = RuntimeStats()
        self.attempts: dict[Future[StageOutputs], Attempt] = {}  # stage runs in flight
        self.probes: dict[Future[StageOutputs], str] = {}  # re-probes in flight -> executor

    def on_quarantined(self, name: str) -> None:
        """Under the lock."""
        self.stats.quarantines[name] += 1
        log.warning("hetserve: executor %s quarantined (%s)", name, self.quarantine.reason(name))

    def idle(self) -> bool:
        """Nothing to watch: no stage run or probe in flight, no executor quarantined."""
        with self.lock:
            return not self.attempts and not self.probes and not self.quarantine.excluded()

    def count(self) -> int:
        with self.lock:
            return len(self.attempts) + len(self.probes)

    def abandon(self, flow: Flow) -> None:
        """The request gave up on this micro-batch: stop its work, answer nothing more."""
        with self.lock:
            flow.abandoned = True
            current = flow.attempt
            if current is None or current[0].settled:
                return
            attempt, future = current
            attempt.settled = True
            self.attempts.pop(future, None)
        self.executors[attempt.executor].interrupt(future)

    def retry_set(
        self, stage: StagePlan, failed: str, exc: BaseException, exclude: frozenset[str]
    ) -> frozenset[str] | None:
        """Executors to keep away from on a second try, or None when there is no other one.

        One retry per stage: after a GPU runs out of memory the retry goes to a CPU group.
        Under the lock.
        """
        if exclude or not isinstance(exc, ExecutorFailed | StageTimeout):
            return None
        out = self.quarantine.excluded()
        others = [c for c in stage.candidates if c != failed and c not in out]
        if isinstance(exc, ExecutorOutOfMemory):
            others = [c for c in others if self.executors[c].device == "cpu"]
        if not others:
            return None
        return frozenset(c for c in stage.candidates if c not in others)

    def no_executor_error(self, stage: StagePlan, exclude: frozenset[str]) -> ExecutorFailed:
        with self.lock:
            held = [f"{c}: {self.quarantine.reason(c)}" for c in stage.candidates
                    if self.quarantine.is_quarantined(c)]
        failed = sorted(exclude)
        parts = [f"quarantined {'; '.join(held)}"] if held else []
        parts += [f"kept off {', '.join(failed)} on retry"] if failed else []
        return ExecutorFailed(
            f"no executor in service for stage {stage.name!r} ({'; '.join(parts) or 'none'})"
        )
