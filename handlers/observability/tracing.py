"""A timeline of what the executors did: compute runs and transfers, as spans on lanes.

Executors record into a ``Timeline`` when one is attached (``executor.timeline``); nothing is
recorded otherwise. A lane is one thing that can be busy: a CPU executor's thread, a CUDA
executor's host thread, or one of its streams ("cuda0s0/compute", "cuda0s0/h2d",
"cuda0s0/d2h"). GPU spans come from CUDA events mapped onto the host clock, so host and GPU lanes
share one time axis.

This module only records; the analysis of a recording (``hetserve.benchmarking.timeline_report``) is an
offline tool and does not ship in a ``.mar``.

Inside a TorchServe worker nobody can hand the service a ``Timeline``: with
``HETSERVE_TRACE_DIR`` set in the worker's environment, ``span_file_from_env`` gives a
``SpanFile`` that appends every span to ``<dir>/spans-<pid>.jsonl`` (a worker is killed, not
closed, so the spans go to disk as they come). Times are ``time.perf_counter``, which on Linux is
CLOCK_MONOTONIC, one clock for every process on the host: a load generator's send and receive
times (asyncio's loop clock, also CLOCK_MONOTONIC) line up with a worker's spans.
"""

from __future__ import annotations

import json
import os
import threading
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Protocol

TRACE_DIR_ENV = "HETSERVE_TRACE_DIR"

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


class Recorder(Protocol):
    """Anything spans can be recorded into: a ``Timeline``, a ``LanePrefix``, a ``SpanFile``."""

    def record(self, span: Span) -> None: ...

    def flush(self) -> None:
        """Make the spans so far visible to their reader (a no-op for in-memory recorders)."""


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

    def flush(self) -> None:
        """In memory: always readable."""

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

    def flush(self) -> None:
        self.timeline.flush()


class SpanFile:
    """Appends each span as one JSON line; thread-safe. ``flush`` after each batch makes the
    spans so far readable by another process."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - lives with the worker

    def record(self, span: Span) -> None:
        line = json.dumps(asdict(span), separators=(",", ":")) + "\n"
        with self._lock:
            if not self._file.closed:
                self._file.write(line)

    def flush(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()


def span_file_from_env(environ: Mapping[str, str] | None = None) -> SpanFile | None:
    """A ``SpanFile`` in ``$HETSERVE_TRACE_DIR`` for this process, or None when it is unset.

    Off unless an operator sets it: recording costs a JSON line per span on the request path."""
    folder = (os.environ if environ is None else environ).get(TRACE_DIR_ENV, "").strip()
    if not folder:
        return None
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"{TRACE_DIR_ENV}={folder!r} is not an existing directory")
    return SpanFile(path / f"spans-{os.getpid()}.jsonl")


def read_span_file(path: str | Path) -> Iterator[Span]:
    """The spans of a ``SpanFile``; a last line cut short by a killed writer is skipped."""
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            try:
                yield Span(**json.loads(line))
            except (json.JSONDecodeError, TypeError):
                continue
