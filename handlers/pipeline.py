"""The serving runtime: a batch becomes micro-batches that flow head -> tail over the executors.

Each stage of each micro-batch is placed when it becomes ready (the head at submission, the
tail the moment its head finishes) on the candidate executor with the earliest predicted
completion (``handlers.scheduler``), so the head of micro-batch i+1 runs while the tail of
micro-batch i runs elsewhere. Outputs are reassembled in request order.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from handlers.executors import Executor, ExecutorError
from handlers.perf_model import PerfHistory
from handlers.scheduler import (
    ExecutorClock,
    ExecutorSpec,
    Placement,
    build_candidates,
    choose_executor,
)


@dataclass(frozen=True)
class StagePlan:
    name: str  # "head", "tail" or "whole"
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    candidates: tuple[str, ...]  # executor names allowed to run it


class StageTimeout(RuntimeError):
    """A micro-batch did not finish within the per-stage deadline."""


@dataclass
class RuntimeStats:
    """Counters the handler turns into TorchServe metrics after each batch."""

    placements: Counter = field(default_factory=Counter)  # (stage, executor) -> count
    run_ms: list[tuple[str, str, float]] = field(default_factory=list)  # (stage, executor, ms)
    queue_ms: list[tuple[str, float]] = field(default_factory=list)  # (stage, ms)
    micro_batches: int = 0

    def drain(self) -> RuntimeStats:
        snapshot = RuntimeStats(
            Counter(self.placements), list(self.run_ms), list(self.queue_ms), self.micro_batches
        )
        self.placements.clear()
        self.run_ms.clear()
        self.queue_ms.clear()
        self.micro_batches = 0
        return snapshot


@dataclass
class _Flow:
    """One micro-batch on its way through the stages."""

    start: int
    stop: int
    tensors: dict[str, Any]  # numpy arrays, or tensors left on a GPU by the previous stage
    done: Future = field(default_factory=Future)
    stage_index: int = 0

    @property
    def batch(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class MicroBatchOutcome:
    start: int  # rows [start, stop) of the batch
    stop: int
    outputs: Mapping[str, np.ndarray] | None
    error: BaseException | None


def _host(value: Any) -> np.ndarray:
    return value if isinstance(value, np.ndarray) else value.to_host()


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
        self._clock = clock
        self._lock = threading.Lock()
        self._free = ExecutorClock(clock=clock)
        self.stats = RuntimeStats()

    # -- observations from executor threads --
    def observe_run(self, stage: str, executor: str, batch: int, seconds: float) -> None:
        with self._lock:
            self.history.observe_run(stage, executor, batch, seconds)
            self.stats.run_ms.append((stage, executor, seconds * 1e3))

    def observe_transfer(self, link: str, nbytes: int, seconds: float) -> None:
        with self._lock:
            self.history.observe_transfer(link, nbytes, seconds)

    # -- the request path --
    def run(self, feeds: Mapping[str, np.ndarray]) -> list[MicroBatchOutcome]:
        """Every micro-batch's rows and its outputs or error: failures stay local to their rows."""
        total = next(iter(feeds.values())).shape[0]
        flows = [
            _Flow(start, stop, {k: v[start:stop] for k, v in feeds.items()})
            for start, stop in self.micro_batches(total)
        ]
        with self._lock:
            self.stats.micro_batches += len(flows)
        for flow in flows:
            self._advance(flow)
        deadline = self._clock() + self.stage_timeout_s * len(self.stages)
        outcomes = []
        for flow in flows:
            try:
                result = flow.done.result(timeout=max(deadline - self._clock(), 0.0))
                outcomes.append(MicroBatchOutcome(flow.start, flow.stop, result, None))
            except FutureTimeout:
                error = StageTimeout(f"missed the {self.stage_timeout_s:g} s stage deadline")
                outcomes.append(MicroBatchOutcome(flow.start, flow.stop, None, error))
            except Exception as exc:  # noqa: BLE001 - reported per micro-batch
                outcomes.append(MicroBatchOutcome(flow.start, flow.stop, None, exc))
        return outcomes

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """All outputs in row order; raises the first micro-batch error."""
        outcomes = self.run(feeds)
        for outcome in outcomes:
            if outcome.error is not None:
                raise outcome.error
        if len(outcomes) == 1:
            return dict(outcomes[0].outputs)
        return {
            name: np.concatenate([o.outputs[name] for o in outcomes]) for name in self.model_outputs
        }

    def micro_batches(self, total: int) -> list[tuple[int, int]]:
        size = self.micro_batch
        if size <= 0:
            # Enough micro-batches to keep every head executor busy, no more.
            lanes = len(self.stages[0].candidates)
            size = -(-total // lanes)
        return [(start, min(start + size, total)) for start in range(0, total, size)]

    def _advance(self, flow: _Flow, exclude: frozenset[str] = frozenset()) -> None:
        if flow.stage_index == len(self.stages):
            flow.done.set_result({name: _host(flow.tensors[name]) for name in self.model_outputs})
            return
        stage = self.stages[flow.stage_index]
        feeds = {name: flow.tensors[name] for name in stage.inputs}
        with self._lock:
            placement = self._place(stage, flow.batch, feeds, exclude)
            self.stats.placements[(stage.name, placement.executor)] += 1
            self.stats.queue_ms.append(
                (stage.name, max(placement.start - self._clock(), 0.0) * 1e3)
            )
        executor = self.executors[placement.executor]
        try:
            future = executor.submit(stage.name, feeds, flow.batch)
        except ExecutorError as exc:
            with self._lock:
                self._free.complete(placement.executor)
            flow.done.set_exception(exc)
            return
        future.add_done_callback(
            lambda f: self._stage_done(flow, placement.executor, f, exclude)
        )

    def _stage_done(
        self, flow: _Flow, executor: str, future: Future, exclude: frozenset[str]
    ) -> None:
        with self._lock:
            self._free.complete(executor)
        exc = future.exception()
        if exc is not None:
            retry = self._retry_set(self.stages[flow.stage_index], executor, exc, exclude)
            if retry is None:
                flow.done.set_exception(exc)
            else:
                self._advance(flow, retry)
            return
        flow.tensors.update(future.result())
        flow.stage_index += 1
        self._advance(flow)

    def _retry_set(
        self, stage: StagePlan, failed: str, exc: BaseException, exclude: frozenset[str]
    ) -> frozenset[str] | None:
        """Executors to keep away from on a second try, or None when there is no other one.

        One retry per stage: after a GPU runs out of memory the retry goes to a CPU group.
        """
        if exclude or not isinstance(exc, ExecutorError):
            return None
        others = [c for c in stage.candidates if c != failed]
        if "out of memory" in str(exc).lower():
            others = [c for c in others if self.executors[c].device == "cpu"]
        if not others:
            return None
        return frozenset(c for c in stage.candidates if c not in others)

    def _place(
        self,
        stage: StagePlan,
        batch: int,
        feeds: Mapping[str, Any],
        exclude: frozenset[str] = frozenset(),
    ) -> Placement:
        allowed = [
            ExecutorSpec(name, self.executors[name].device)
            for name in stage.candidates
            if name not in exclude
        ]
        data_device = next((v.device for v in feeds.values() if not isinstance(v, np.ndarray)), "cpu")
        nbytes = sum(int(v.nbytes) for v in feeds.values())
        free_at = {spec.name: self._free.free_at(spec.name) for spec in allowed}
        candidates = build_candidates(
            self.history, stage.name, batch, nbytes, data_device, allowed, free_at
        )
        placement = choose_executor(self._clock(), candidates)
        self._free.reserve(placement.executor, placement.start, placement.end)
        return placement

    def history_lock(self) -> threading.Lock:
        """Hold this while reading or saving the history: executor threads update it."""
        return self._lock

    def drain_stats(self) -> RuntimeStats:
        with self._lock:
            return self.stats.drain()

    def close(self) -> None:
        for executor in self.executors.values():
            executor.close()
