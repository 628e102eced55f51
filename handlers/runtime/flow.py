"""The serving runtime: a batch becomes micro-batches that flow head -> tail over the executors.

Each stage of each micro-batch is placed when it becomes ready (the head at submission, the
tail the moment its head finishes) on the candidate executor with the earliest predicted
completion (``handlers.runtime.scheduler``), so the head of micro-batch i+1 runs while the tail of
micro-batch i runs elsewhere. Outputs are reassembled in request order. ``submit`` returns at
once (a ``PendingRun``): the service starts a micro-batch whose requests are decoded while their
neighbours still decode, and waits for all of them at the end.

Faults stay local: a stage that fails is retried once on another executor; a stage that runs past
``stage_timeout_s`` is cancelled by the supervisor (``handlers.runtime.supervisor``) and retried
the same way, and its executor is quarantined (``handlers.runtime.quarantine``) until a
background re-probe succeeds; a request that outlives ``request_timeout_s`` (kept below
TorchServe's responseTimeout, which would otherwise kill the worker) is answered with a timeout
and its work abandoned.

This module keeps only the micro-batch flow; placement is ``handlers.runtime.placement.Placer``.
What the flow and the supervisor both work on (stage runs and probes in flight, the quarantine,
the counters, one lock) is ``handlers.runtime.in_flight.InFlight``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

import numpy as np

from handlers.errors import ExecutorFailed, ExecutorOutOfMemory, StageTimeout
from handlers.executors.base import Executor, StageOutputs
from handlers.observability.stats import RuntimeStats
from handlers.runtime.in_flight import Attempt, Flow, InFlight, ProbeFeeds, StagePlan
from handlers.runtime.perf_model import PerfHistory
from handlers.runtime.placement import Placer
from handlers.runtime.quarantine import Quarantine
from handlers.runtime.scheduler import Placement
from handlers.runtime.supervisor import Supervisor

__all__ = ["MicroBatchOutcome", "PendingRun", "ProbeFeeds", "Runtime", "RuntimeStats", "StagePlan"]


@dataclass(frozen=True)
class MicroBatchOutcome:
    start: int  # rows [start, stop) of the batch
    stop: int
    outputs: Mapping[str, np.ndarray] | None
    error: BaseException | None


def micro_batch_spans(total: int, size: int, lanes: int) -> list[tuple[int, int]]:
    """Rows [start, stop) of each micro-batch: ``size`` rows each, or (size <= 0) enough
    micro-batches to keep each of ``lanes`` head executors busy, no more."""
    if size <= 0:
        size = -(-total // lanes)
    return [(start, min(start + size, total)) for start in range(0, total, size)]


def _host(value: Any) -> np.ndarray:
    return value if isinstance(value, np.ndarray) else value.to_host()


class PendingRun:
    """A batch submitted by ``Runtime.submit``: ``outcomes`` waits for it, up to the request budget
    counted from its submission; a micro-batch past it is abandoned and answered with a timeout."""

    def __init__(self, runtime: Runtime, flows: list[Flow], deadline: float) -> None:
        self._runtime = runtime
        self._flows = flows
        self._deadline = deadline

    def outcomes(self) -> list[MicroBatchOutcome]:
        rt, outcomes = self._runtime, []
        for flow in self._flows:
            try:
                result = flow.done.result(timeout=max(self._deadline - rt.clock(), 0.0))
                outcomes.append(MicroBatchOutcome(flow.start, flow.stop, result, None))
            except FutureTimeout:
                rt.abandon(flow)
                error = StageTimeout(
                    f"not finished within the request budget of {rt.request_timeout_s:g} s"
                )
                outcomes.append(MicroBatchOutcome(flow.start, flow.stop, None, error))
            except Exception as exc:  # noqa: BLE001 - reported per micro-batch
                outcomes.append(MicroBatchOutcome(flow.start, flow.stop, None, exc))
        return outcomes


class Runtime:
    def __init__(
        self,
        stages: Sequence[StagePlan],
        executors: Sequence[Executor],
        history: PerfHistory,
        model_outputs: Sequence[str],
        micro_batch: int = 0,
        stage_timeout_s: float = 30.0,
        clock: Callable[[], float] = time.perf_counter,
        *,
        request_timeout_s: float | None = None,
        quarantine: Quarantine | None = None,
        probe_feeds: ProbeFeeds | None = None,
        supervise_interval_s: float = 0.05,
    ) -> None:
        self.stages = tuple(stages)
        self.executors = {e.name: e for e in executors}
        for stage in self.stages:
            missing = [c for c in stage.candidates if c not in self.executors]
            if not stage.candidates or missing:
                raise ValueError(f"stage {stage.name}: no usable executor ({missing or 'none'})")
        self.history = history
        self.model_outputs = tuple(model_outputs)
        self.micro_batch = micro_batch
        self.stage_timeout_s = stage_timeout_s
        # A micro-batch may run each stage and one retry, each up to the stage deadline.
        self.request_timeout_s = request_timeout_s or stage_timeout_s * (len(self.stages) + 1)
        self.clock = clock
        for executor in executors:  # job start stamps, which the deadlines compare with
            executor.clock = clock
        quarantine = quarantine or Quarantine(list(self.executors))
        self.state = InFlight(self.executors, quarantine, clock, stage_timeout_s, probe_feeds)
        # The shared state's parts, under the names the flow uses
        self.quarantine, self.lock, self.stats = quarantine, self.state.lock, self.state.stats
        self.attempts = self.state.attempts
        self.placer = Placer(history, {e.name: e.device for e in executors}, clock)
        self.supervisor = Supervisor(self.state, self.retry_or_fail, supervise_interval_s)

    def start(self) -> Runtime:
        """Start the supervisor (deadlines, re-probes, periodic saves); returns self."""
        self.supervisor.start()
        return self

    # -- observations from executor threads --
    def observe_run(self, stage: str, executor: str, batch: int, seconds: float) -> None:
        with self.lock:
            self.history.observe_run(stage, executor, batch, seconds)
            self.stats.run_ms.append((stage, executor, seconds * 1e3))

    def observe_transfer(self, link: str, nbytes: int, seconds: float) -> None:
        with self.lock:
            self.history.observe_transfer(link, nbytes, seconds)

    # -- the request path --
    def run(self, feeds: Mapping[str, np.ndarray]) -> list[MicroBatchOutcome]:
        """Every micro-batch's rows and its outputs or error: failures stay local to their rows."""
        return self.submit(feeds).outcomes()

    def submit(self, feeds: Mapping[str, np.ndarray], micro_batch: int = 0) -> PendingRun:
        """Submit ``feeds`` without waiting: the caller may decode or start more while it runs.

        ``micro_batch`` > 0 cuts it into micro-batches of that many rows instead of the runtime's
        own rule (a caller that starts one batch in parts keeps the parts' sizes its own).
        """
        total = next(iter(feeds.values())).shape[0]
        flows = [
            Flow(start, stop, {k: v[start:stop] for k, v in feeds.items()})
            for start, stop in self.micro_batches(total, micro_batch)
        ]
        with self.lock:
            self.stats.micro_batches += len(flows)
        for flow in flows:
            self._advance(flow)
        return PendingRun(self, flows, self.clock() + self.request_timeout_s)

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """All outputs in row order; raises the first micro-batch error."""
        outcomes = self.run(feeds)
        for outcome in outcomes:
            if outcome.error is not None:
                raise outcome.error
        outputs = [o.outputs for o in outcomes if o.outputs is not None]  # all: no error above
        if len(outputs) == 1:
            return dict(outputs[0])
        return {name: np.concatenate([o[name] for o in outputs]) for name in self.model_outputs}

    def micro_batches(self, total: int, size: int = 0) -> list[tuple[int, int]]:
        return micro_batch_spans(total, size or self.micro_batch, len(self.stages[0].candidates))

    def _advance(self, flow: Flow, exclude: frozenset[str] = frozenset()) -> None:
        if flow.abandoned:
            return
        if flow.stage_index == len(self.stages):
            self._finish(flow, {name: _host(flow.tensors[name]) for name in self.model_outputs})
            return
        stage = self.stages[flow.stage_index]
        feeds = {name: flow.tensors[name] for name in stage.inputs}
        placement = self.place(stage, flow.batch, feeds, exclude)
        if placement is None:
            self._finish(flow, self.state.no_executor_error(stage, exclude))
            return
        executor = self.executors[placement.executor]
        try:
            future = executor.submit(stage.name, feeds, flow.batch)
        except ExecutorFailed as exc:
            with self.lock:
                self.placer.complete(placement.executor)
            self._finish(flow, exc)
            return
        attempt = Attempt(flow, stage, placement.executor, exclude)
        with self.lock:
            # Registered before the callback: a future already done runs it at once and unregisters.
            self.attempts[future] = attempt
            flow.attempt = (attempt, future)
        future.add_done_callback(lambda f: self._stage_done(attempt, f))
        self.supervisor.wake()  # its deadline is watched from now on

    def place(
        self, stage: StagePlan, batch: int, feeds: Mapping[str, Any], exclude: frozenset[str]
    ) -> Placement | None:
        """The live placement decision (lock, quarantine, Placer, statistics); None when every
        candidate is quarantined or excluded. benchmarks/scheduler_decision_cost.py times this."""
        with self.lock:
            out = exclude | self.quarantine.excluded()
            if all(c in out for c in stage.candidates):
                return None
            allowed = [c for c in stage.candidates if c not in out]
            placement = self.placer.place(stage.name, batch, feeds, allowed)
            self.stats.placements[(stage.name, placement.executor)] += 1
            self.stats.queue_ms.append(
                (stage.name, max(placement.start - self.clock(), 0.0) * 1e3)
            )
            return placement

    def _stage_done(self, attempt: Attempt, future: Future[StageOutputs]) -> None:
        name, flow = attempt.executor, attempt.flow
        with self.lock:
            self.placer.complete(name)
            self.attempts.pop(future, None)
            if attempt.settled:  # timed out or abandoned: that path answered already
                return
            attempt.settled = True
            if future.cancelled():  # still queued when its executor was quarantined: move it
                rerouted = True
            else:
                rerouted = False
                exc = future.exception()
                if exc is None:
                    self.quarantine.record_success(name)
                elif isinstance(exc, ExecutorOutOfMemory):
                    pass  # a sign of load, not of a broken executor: the retry handles it
                elif self.quarantine.record_failure(name, attempt.stage.name, str(exc)):
                    self.state.on_quarantined(name)
        if rerouted:
            self._advance(flow, attempt.exclude)
        elif exc is not None:
            self.retry_or_fail(attempt, exc)
        else:
            flow.tensors.update(future.result())
            flow.stage_index += 1
            self._advance(flow)

    def retry_or_fail(self, attempt: Attempt, exc: BaseException) -> None:
        with self.lock:
            retry = self.state.retry_set(attempt.stage, attempt.executor, exc, attempt.exclude)
            if retry is not None:
                key = (attempt.stage.name, attempt.executor)
                self.stats.retries[key] += 1
                if isinstance(exc, ExecutorOutOfMemory) and self.executors[attempt.executor].device != "cpu":
                    # _retry_set kept only CPU executors: a GPU out of memory falls back to a CPU
                    self.stats.cpu_fallbacks[key] += 1
        if retry is None:
            self._finish(attempt.flow, exc)
        else:
            self._advance(attempt.flow, retry)

    def _finish(self, flow: Flow, result: Mapping[str, np.ndarray] | BaseException) -> None:
        if flow.abandoned or flow.done.done():
            return
        if isinstance(result, BaseException):
            flow.done.set_exception(result)
        else:
            flow.done.set_result(result)

    def abandon(self, flow: Flow) -> None:
        self.state.abandon(flow)

    def drain_stats(self) -> RuntimeStats:
        with self.lock:
            return self.stats.drain()

    def in_flight(self) -> int:
        """Stage runs and probes not yet settled: 0 when the runtime is idle (tests check leaks)."""
        return self.state.count()

    def close(self) -> None:
        self.supervisor.close()
        for executor in self.executors.values():
            executor.close()
