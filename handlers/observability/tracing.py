"""A timeline of what the executors did: compute runs and transfers, as spans on lanes.

Executors record into a ``Timeline`` when one is attached (``executor.timeline``); nothing is
recorded otherwise. A lane is one thing that can be busy: a CPU executor's thread, a CUDA
executor's host thread, or one of its streams ("cuda0s0/compute", "cuda0s0/h2d",
"cuda0s0/d2h"). GPU spans come from CUDA events mapped onto the host clock, so host and GPU lanes
share one time axis.

This module only records; the analysis of a recording (``hetserve.timeline_report``) is an
offline tool and does not ship in a ``.mar``.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field, replace

TRANSFER = "transfer"
COMPUTE = "compute"
HOST = "host"  # a host thread's view of a run: its compute, or its launches and waits on a GPU


@dataclass(frozen=True)
class Span:
    lane: str  # e.g. "cpu-g1", "cuda0s0/h2d"
    kind: str  # TRANSFER, COMPUTE or HOST
    name: str  # the stage, or the link for a transfer ("cpu->cuda:0")
    start: float  # seconds on the host's perf_counter clock
    end: float
    batch: int = 0
    nbytes: int = 0

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass
class Timeline:
    """A thread-safe, bounded recorder: the newest ``capacity`` spans are kept."""

    capacity: int = 200_000
    _spans: deque[Span] = field(init=False)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)
    dropped: int = 0

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {self.capacity}")
        self._spans = deque(maxlen=self.capacity)

    def record(self, span: Span) -> None:
        with self._lock:
            if len(self._spans) == self.capacity:
                self.dropped += 1
            self._spans.append(span)

    def spans(self) -> list[Span]:
        with self._lock:
            return list(self._spans)

    def clear(self) -> None:
        with self._lock:
            self._spans.clear()
            self.dropped = 0


@dataclass(frozen=True)
class LanePrefix:
    """Records into ``timeline`` with every lane prefixed: several workers' executors (each
    with its own "cuda0s0") can share one timeline."""

    timeline: Timeline
    prefix: str

    def record(self, span: Span) -> None:
        self.timeline.record(replace(span, lane=f"{self.prefix}{span.lane}"))
