"""Fault injection, for tests only: deliberate errors, out-of-memory and hangs in stage runs.

Injection (the optional ``hetserve.faults`` section of model-config.yaml) is honoured only when
the worker's environment has ``HETSERVE_ENABLE_FAULTS=1``; a config that asks for it without
that variable is refused at load, so a production archive can never fail on purpose. The
executor base class consults the injector (its one ``fault_hook``) just before each run, after
calibration (``arm``), so a faulty config still loads. Nothing in the product path imports this
module unless a config has a faults section; the quarantine that contains real faults is
production code in ``handlers.runtime.quarantine``.
"""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from handlers.errors import ExecutorFailed, ExecutorOutOfMemory
from handlers.executors.base import CancelToken

ENABLE_ENV = "HETSERVE_ENABLE_FAULTS"
KINDS = ("error", "hang", "oom")
STAGES = ("head", "tail", "whole", "any")


@dataclass(frozen=True)
class FaultSpec:
    kind: str  # error: the run raises; oom: raises "out of memory"; hang: blocks until cancelled
    stage: str = "tail"
    executor: str = "any"  # an executor name (cpu1, cuda0s0) or any
    probability: float = 0.0  # fire on this share of matching runs ...
    every_nth: int = 0  # ... or on every n-th matching run; neither: on every matching run
    count: int = 0  # at most this many injections in all; 0 = no limit
    hang_s: float = 3600.0  # a hang that nobody cancels ends (as a slow run) after this long
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"hetserve.faults.kind must be one of {KINDS}, got {self.kind!r}")
        if self.stage not in STAGES:
            raise ValueError(f"hetserve.faults.stage must be one of {STAGES}, got {self.stage!r}")
        if not isinstance(self.executor, str) or not self.executor:
            raise ValueError("hetserve.faults.executor must be an executor name or 'any'")
        if not 0.0 <= float(self.probability) <= 1.0:
            raise ValueError(f"hetserve.faults.probability must be in [0, 1], got {self.probability!r}")
        for name in ("every_nth", "count", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"hetserve.faults.{name} must be an integer >= 0, got {value!r}")
        if self.probability and self.every_nth:
            raise ValueError("hetserve.faults: give probability or every_nth, not both")
        if not float(self.hang_s) > 0:
            raise ValueError(f"hetserve.faults.hang_s must be > 0, got {self.hang_s!r}")

    def matches(self, stage: str, executor: str) -> bool:
        return self.stage in ("any", stage) and self.executor in ("any", executor)


def parse_faults(
    section: Any, environ: Mapping[str, str] | None = None
) -> tuple[FaultSpec, ...]:
    """One mapping or a list of them; ValueError (with the reason) on anything else."""
    if not section:
        return ()
    environ = os.environ if environ is None else environ
    if environ.get(ENABLE_ENV) != "1":
        raise ValueError(
            f"hetserve.faults injects failures and is for tests only: set {ENABLE_ENV}=1 in the "
            "worker's environment to allow it, or remove the faults section"
        )
    items = [section] if isinstance(section, Mapping) else section
    if not isinstance(items, Sequence) or isinstance(items, str):
        raise ValueError("hetserve.faults must be a mapping or a list of mappings")
    known = {f.name for f in fields(FaultSpec)}
    specs = []
    for item in items:
        if not isinstance(item, Mapping):
            raise ValueError(f"hetserve.faults entries must be mappings, got {item!r}")
        unknown = sorted(set(item) - known)
        if unknown:
            raise ValueError(f"unknown hetserve.faults key(s): {', '.join(unknown)}")
        if "kind" not in item:
            raise ValueError("hetserve.faults entries need a kind (error, hang or oom)")
        specs.append(FaultSpec(**item))
    return tuple(specs)


class FaultInjector:
    """Shared by all executors of a runtime; thread-safe."""

    def __init__(self, specs: Sequence[FaultSpec]) -> None:
        self.specs = tuple(specs)
        self._lock = threading.Lock()
        self._seen = [0] * len(self.specs)
        self.fired = [0] * len(self.specs)
        self._rngs = [random.Random(s.seed) for s in self.specs]
        self.armed = False

    def arm(self) -> None:
        self.armed = True

    def check(self, stage: str, executor: str, cancel: CancelToken) -> None:
        """Called by an executor just before it runs ``stage``: raises, hangs or returns."""
        if not self.armed:
            return
        for i, spec in enumerate(self.specs):
            if spec.matches(stage, executor) and self._fires(i, spec):
                _inject(spec, stage, executor, cancel)

    def _fires(self, i: int, spec: FaultSpec) -> bool:
        with self._lock:
            if spec.count and self.fired[i] >= spec.count:
                return False
            self._seen[i] += 1
            if spec.every_nth:
                fire = self._seen[i] % spec.every_nth == 0
            elif spec.probability:
                fire = self._rngs[i].random() < spec.probability
            else:
                fire = True
            self.fired[i] += fire
            return fire


def _inject(spec: FaultSpec, stage: str, executor: str, cancel: CancelToken) -> None:
    if spec.kind == "error":
        raise ExecutorFailed(f"stage {stage!r} failed on {executor} (injected fault)")
    if spec.kind == "oom":
        raise ExecutorOutOfMemory(f"stage {stage!r} on {executor}: out of memory (injected fault)")
    # A hang that the runtime can end: it waits on the job's cancel token, like ORT's terminate.
    if cancel.wait(float(spec.hang_s)):
        raise ExecutorFailed(
            f"stage {stage!r} on {executor} was cancelled after missing its deadline (injected hang)"
        )
