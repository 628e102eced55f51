"""Double buffering for a CUDA executor: pinned host and device buffers per job (``StagingSlot``),
one job's staging state (``StagingTicket``) and the strictly FIFO hand-out of slots
(``StagingQueue``), plus the two copies through a slot (``stage_host_inputs``, ``copy_to_host``).

A micro-batch takes a staging slot at ``submit`` when one is free and its host->device copy is
issued at once, while the executor may still be computing the one before; the compute stream
waits for the copy's event on the GPU, not on the host. Jobs that find no free slot wait in FIFO
order and are staged the moment a finished job hands its slot back.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from handlers.errors import is_out_of_memory
from handlers.executors.base import ExecutorError, StageOutputs
from handlers.executors.cuda_device import DeviceBackend, DeviceTensor, DeviceView, nbytes_of

ALIGN = 512  # buffer sizes are rounded up to this, so a few bytes more do not reallocate


class StagingSlot:
    """One set of pinned host and device buffers per (direction, stage, tensor), grown on demand."""

    def __init__(self, index: int, backend: DeviceBackend) -> None:
        self.index = index
        self._backend = backend
        self._host: dict[tuple[str, ...], tuple[Any, int]] = {}  # key -> (buffer, capacity)
        self._device: dict[tuple[str, ...], tuple[Any, int]] = {}
        self.fence: Any = None  # the event after the slot's last use; reuse waits for it

    def host(self, key: tuple[str, ...], nbytes: int) -> Any:
        return self._get(self._host, self._backend.alloc_pinned, key, nbytes)

    def device(self, key: tuple[str, ...], nbytes: int) -> Any:
        return self._get(self._device, self._backend.alloc_device, key, nbytes)

    def drop(self) -> None:
        """Forget every buffer (after an out-of-memory error, to give the memory back)."""
        self._host.clear()
        self._device.clear()

    @staticmethod
    def _get(
        buffers: dict[tuple[str, ...], tuple[Any, int]],
        alloc: Callable[[int], Any],
        key: tuple[str, ...],
        nbytes: int,
    ) -> Any:
        held = buffers.get(key)
        if held is not None and held[1] >= nbytes:
            return held[0]
        capacity = max(ALIGN, -(-nbytes // ALIGN) * ALIGN)
        buffers.pop(key, None)  # free the small one before allocating the big one
        buffer = alloc(capacity)
        buffers[key] = (buffer, capacity)
        return buffer


@dataclass(eq=False)
class StagingTicket:
    """One job's staging state; passed to the base class as the job's feeds."""

    stage: str
    batch: int
    observe: bool
    host_inputs: dict[str, np.ndarray]
    device_inputs: dict[str, DeviceTensor]
    future: Future[StageOutputs]
    run_batch: int = 0  # rows the session runs: batch, or more when padded to a fixed shape
    slot: StagingSlot | None = None
    views: dict[str, DeviceView] = field(default_factory=dict)
    copy_started: Any = None  # events on the copy stream around this job's host->device copy
    copy_done: Any = None
    staging_s: float = 0.0  # host time spent filling pinned buffers
    staging_started: float = 0.0
    error: BaseException | None = None  # a staging failure, raised when the job runs


class StagingQueue:
    """Which job uses which slot and when its copy is issued: strictly FIFO.

    A job takes a slot at admission only if no earlier job is waiting for one, so slots are
    handed out in submission order and the executor (which runs jobs in that order) always
    finds its job staged or first in line. All methods are thread safe.
    """

    def __init__(
        self,
        slots: Iterable[StagingSlot],
        stage: Callable[[StagingTicket], None],
        fence_wait: Callable[[Any], None],
    ) -> None:
        self._free: deque[StagingSlot] = deque(slots)
        self._waiting: deque[StagingTicket] = deque()
        self._stage = stage  # fills the slot's buffers and issues the copies
        self._fence_wait = fence_wait
        self._lock = threading.Lock()

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def admit(self, ticket: StagingTicket) -> None:
        with self._lock:
            if self._waiting or not self._free:
                self._waiting.append(ticket)
            else:
                self._start(ticket)

    def claim(self, ticket: StagingTicket) -> None:
        """Called by the executor just before it runs ``ticket``: stage it now if it waited."""
        with self._lock:
            if ticket.slot is not None or ticket.error is not None:
                return
            if self._waiting and self._waiting[0] is ticket:
                self._waiting.popleft()
            elif ticket in self._waiting:
                self._waiting.remove(ticket)
            if not self._free:
                raise ExecutorError("no free staging slot (a slot was not released)")
            self._start(ticket)

    def release(self, ticket: StagingTicket, fence: Any) -> None:
        """The job is done with its slot: hand it to the next waiting job at once."""
        with self._lock:
            if ticket in self._waiting:  # cancelled before it was staged
                self._waiting.remove(ticket)
            slot, ticket.slot = ticket.slot, None
            if slot is None:
                return
            slot.fence = fence
            self._free.append(slot)
            while self._waiting and self._free:
                self._start(self._waiting.popleft())

    def _start(self, ticket: StagingTicket) -> None:
        slot = self._free.popleft()
        if slot.fence is not None:
            self._fence_wait(slot.fence)  # normally already passed: the job's run synced it
            slot.fence = None
        ticket.slot = slot
        try:
            self._stage(ticket)
        except Exception as exc:  # noqa: BLE001 - the job fails when it runs, not the submitter
            ticket.error = exc
            ticket.slot = None
            if is_out_of_memory(exc):
                slot.drop()
            self._free.append(slot)



def stage_host_inputs(ticket: StagingTicket, backend: DeviceBackend, stream: Any) -> None:
    """Fill the ticket's slot's pinned buffers (rows up to ``run_batch`` zero-padded) and issue
    the host->device copies on ``stream``; StagingQueue calls it under its lock."""
    slot = ticket.slot
    assert slot is not None
    started = ticket.staging_started = time.perf_counter()
    copies = []
    for name, array in ticket.host_inputs.items():
        array = np.asarray(array)
        shape = array.shape
        if ticket.run_batch > array.shape[0]:
            shape = (ticket.run_batch, *array.shape[1:])
        nbytes = nbytes_of(shape, array.dtype)
        key = ("in", ticket.stage, name)
        pinned = slot.host(key, nbytes)
        staged = backend.host_array(pinned, shape, array.dtype)
        np.copyto(staged[: array.shape[0]], array)
        staged[array.shape[0] :] = 0
        target = slot.device(key, nbytes)
        copies.append((target, pinned, nbytes))
        ticket.views[name] = DeviceView(target, backend.pointer(target), shape, array.dtype)
    ticket.staging_s = time.perf_counter() - started
    if not copies:
        return
    ticket.copy_started = backend.record_event(stream)
    try:
        for target, pinned, nbytes in copies:
            backend.copy_async(target, pinned, nbytes, stream)
    except Exception:
        # The slot may be dropped and its memory reused: no issued copy may still touch it.
        backend.sync_event(backend.record_event(stream))
        raise
    ticket.copy_done = backend.record_event(stream)


@dataclass(frozen=True)
class CopiedOut:
    """Outputs brought to the host, and what the copy cost: GPU events around the device->host
    copy and the host seconds spent copying out of the pinned buffers."""

    arrays: dict[str, np.ndarray]
    started: Any
    finished: Any
    host_s: float


def copy_to_host(
    backend: DeviceBackend, stream: Any, ticket: StagingTicket, views: list[tuple[str, DeviceView]], done: Any
) -> CopiedOut:
    """Copy ``views`` (once the run's ``done`` event passed) through the ticket's slot's pinned
    buffers into new host arrays; returns when they are on the host."""
    slot = ticket.slot
    assert slot is not None
    backend.wait_event(stream, done)
    started = backend.record_event(stream)
    pinned = {}
    for name, view in views:
        pinned[name] = slot.host(("out", ticket.stage, name), view.nbytes)
        backend.copy_async(pinned[name], view.buffer, view.nbytes, stream)
    finished = backend.record_event(stream)
    backend.sync_event(finished)
    copy_started = time.perf_counter()
    # Copied out of the pinned buffer: the slot's next job overwrites it.
    arrays = {
        name: backend.host_array(pinned[name], view.shape, view.dtype).copy() for name, view in views
    }
    return CopiedOut(arrays, started, finished, time.perf_counter() - copy_started)


def output_views(
    backend: DeviceBackend,
    ticket: StagingTicket,
    specs: Mapping[str, tuple[tuple[int, ...], np.dtype] | None],
    device_outputs: Collection[str],
) -> dict[str, DeviceView | None]:
    """Where a run writes each output (``specs``: its shape and dtype, None where only the run
    can tell): a buffer of its own for an output that stays on the GPU (the DeviceTensor made
    of it owns it), the ticket's slot's otherwise; None lets ORT allocate."""
    slot = ticket.slot
    assert slot is not None
    outputs: dict[str, DeviceView | None] = {}
    for name, spec in specs.items():
        if spec is None:
            outputs[name] = None
            continue
        shape, dtype = spec
        nbytes = nbytes_of(shape, dtype)
        if name in device_outputs:
            buffer = backend.alloc_device(max(nbytes, 1))
        else:
            buffer = slot.device(("out", ticket.stage, name), nbytes)
        outputs[name] = DeviceView(buffer, backend.pointer(buffer), shape, dtype)
    return outputs


def real_rows(value: np.ndarray, ticket: StagingTicket) -> np.ndarray:
    """An output without the rows the run was padded with."""
    padded = ticket.run_batch != ticket.batch and value.ndim and value.shape[0] == ticket.run_batch
    return value[: ticket.batch] if padded else value
