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

import numpy as np

from handlers.executors import Executor, ExecutorError
from handlers.perf_model import PerfHistory
from handlers.scheduler import Candidate, ExecutorClock, choose_executor


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

    batch: int
    tensors: dict[str, np.ndarray]
    done: Future = field(default_factory=Future)
    stage_index: int = 0


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

    # -- the request path --
    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        total = next(iter(feeds.values())).shape[0]
        flows = [
            _Flow(batch=stop - start, tensors={k: v[start:stop] for k, v in feeds.items()})
            for start, stop in self.micro_batches(total)
        ]
        with self._lock:
            self.stats.micro_batches += len(flows)
        for flow in flows:
            self._advance(flow)
        deadline = self._clock() + self.stage_timeout_s * len(self.stages)
        results = []
        for flow in flows:
            try:
                results.append(flow.done.result(timeout=max(deadline - self._clock(), 0.0)))
            except FutureTimeout:
                raise StageTimeout(
                    f"a micro-batch missed its {self.stage_timeout_s:g} s stage deadline"
                ) from None
        return {
            name: results[0][name]
            if len(results) == 1
            else np.concatenate([r[name] for r in results])
            for name in self.model_outputs
        }

    def micro_batches(self, total: int) -> list[tuple[int, int]]:
        size = self.micro_batch
        if size <= 0:
            # Enough micro-batches to keep every head executor busy, no more.
            lanes = len(self.stages[0].candidates)
            size = -(-total // lanes)
        return [(start, min(start + size, total)) for start in range(0, total, size)]

    def _advance(self, flow: _Flow) -> None:
        if flow.stage_index == len(self.stages):
            flow.done.set_result({name: flow.tensors[name] for name in self.model_outputs})
            return
        stage = self.stages[flow.stage_index]
        with self._lock:
            placement = self._place(stage, flow.batch)
            self.stats.placements[(stage.name, placement.executor)] += 1
            self.stats.queue_ms.append(
                (stage.name, max(placement.start - self._clock(), 0.0) * 1e3)
            )
        executor = self.executors[placement.executor]
        feeds = {name: flow.tensors[name] for name in stage.inputs}
        try:
            future = executor.submit(stage.name, feeds, flow.batch)
        except ExecutorError as exc:
            flow.done.set_exception(exc)
            return
        future.add_done_callback(lambda f: self._stage_done(flow, placement.executor, f))

    def _stage_done(self, flow: _Flow, executor: str, future: Future) -> None:
        with self._lock:
            self._free.complete(executor)
        exc = future.exception()
        if exc is not None:
            flow.done.set_exception(exc)
            return
        flow.tensors.update(future.result())
        flow.stage_index += 1
        self._advance(flow)

    def _place(self, stage: StagePlan, batch: int):
        now = self._clock()
        candidates = [
            Candidate(
                executor=name,
                free_at=self._free.free_at(name),
                run_s=self.history.predict_run(stage.name, name, batch),
                transfer_s=0.0,
            )
            for name in stage.candidates
        ]
        placement = choose_executor(now, candidates)
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
