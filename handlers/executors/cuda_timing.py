"""How long a CUDA executor's work took, on the host's clock: GPU spans for a timeline and copy
seconds for the transfer observer, both read from CUDA events once they have passed.

Event timers and ``perf_counter`` are different clocks: an epoch event recorded (and waited for)
at load places every later event on the host clock; they drift apart by microseconds over a
benchmark, far below a kernel's length.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from handlers.executors.base import TransferObserver
from handlers.executors.cuda_device import DeviceBackend
from handlers.executors.cuda_staging import CopiedOut, StagingTicket
from handlers.observability.tracing import TRANSFER

# Executor.trace: (lane, kind, name, start, end, nbytes)
Trace = Callable[[str, str, str, float, float, int], None]


class GpuTiming:
    """One executor's GPU clock and its two copy links (``cpu->cuda:N``, ``cuda:N->cpu``)."""

    def __init__(self, executor: str, backend: DeviceBackend) -> None:
        self.executor, self.backend = executor, backend
        self.h2d_link = f"cpu->{backend.device}"
        self.d2h_link = f"{backend.device}->cpu"
        self._epoch: tuple[Any, float] | None = None  # (event, host time)

    def start(self, stream: Any) -> None:
        epoch = self.backend.record_event(stream)
        self.backend.sync_event(epoch)
        self._epoch = (epoch, time.perf_counter())

    def span(self, trace: Trace | None, lane: str, kind: str, name: str, start: Any, end: Any,
             nbytes: int = 0) -> None:
        """A span between two CUDA events (waits for ``end``); nothing without a trace."""
        if trace is None or self._epoch is None:
            return
        self.backend.sync_event(end)
        event, host = self._epoch
        elapsed = self.backend.elapsed_s
        trace(f"{self.executor}/{lane}", kind, name, host + elapsed(event, start),
              host + elapsed(event, end), nbytes)

    def copy_in(self, ticket: StagingTicket, trace: Trace | None, observer: TransferObserver | None) -> None:
        """The job's host->pinned fill and host->device copy (the run already waited for it)."""
        if ticket.copy_done is None or (trace is None and observer is None):
            return
        self.backend.sync_event(ticket.copy_done)
        nbytes = sum(v.nbytes for v in ticket.views.values())
        if trace is not None:
            trace(f"{self.executor}/pin", TRANSFER, "host->pinned", ticket.staging_started,
                  ticket.staging_started + ticket.staging_s, nbytes)
            self.span(trace, "h2d", TRANSFER, self.h2d_link, ticket.copy_started, ticket.copy_done, nbytes)
        if observer is not None:
            observer(self.h2d_link, nbytes,
                     ticket.staging_s + self.backend.elapsed_s(ticket.copy_started, ticket.copy_done))

    def copy_out(self, copied: CopiedOut, nbytes: int, trace: Trace | None,
                 observer: TransferObserver | None) -> None:
        """A device->host copy and the copy out of the pinned buffers after it."""
        self.span(trace, "d2h", TRANSFER, self.d2h_link, copied.started, copied.finished, nbytes)
        if observer is not None:
            observer(self.d2h_link, nbytes, self.backend.elapsed_s(copied.started, copied.finished) + copied.host_s)
