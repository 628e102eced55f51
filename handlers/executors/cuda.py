"""CUDA executors: one per CUDA stream, running ONNX Runtime's CUDA provider on that stream.

Each executor owns a compute stream that its sessions (one per stage, as in StarONNX) are bound
to through ``user_compute_stream``, plus a host->device and a device->host copy stream. Inputs
are staged through pinned host buffers and bound to ORT by device pointer (IO binding), so ORT
itself copies nothing. The parts, by concern:

* ``cuda_device``: may CUDA be used here, the device calls (``DeviceBackend``: torch's, or an
  in-memory fake in the tests, so everything here is tested without a GPU), device tensors;
* ``cuda_session``: a stage's ORT session on the stream, or its captured CUDA graph;
* ``cuda_staging``: double buffering through staging slots, handed out strictly FIFO;
* this module: the executor that ties them to one stream and one thread.

The names callers know from before the split are importable from here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from handlers.errors import ExecutorOutOfMemory, is_out_of_memory
from handlers.executors.base import (
    Executor,
    ExecutorError,
    Job,
    RunObserver,
    StageOutputs,
    TransferObserver,
)
from handlers.executors.cuda_device import (
    DeviceBackend,
    DeviceTensor,
    DeviceView,
    TorchCudaBackend,
    cuda_available,
    cuda_unavailable_reason,
    open_backend,
)
from handlers.executors.cuda_graph import require_fixed_batch
from handlers.executors.cuda_session import (
    CudaGraphSession,
    GraphableSession,
    OrtCudaSession,
    SessionFactory,
    StageSession,
    StageSessions,
)
from handlers.executors.cuda_staging import (
    StagingQueue,
    StagingSlot,
    StagingTicket,
    copy_to_host,
    output_views,
    real_rows,
    stage_host_inputs,
)
from handlers.executors.cuda_timing import GpuTiming, Trace
from handlers.observability.tracing import COMPUTE, HOST

__all__ = [
    "CudaExecutor", "CudaGraphSession", "DeviceBackend", "DeviceTensor", "DeviceView",
    "GraphableSession", "OrtCudaSession", "SessionFactory", "StageSession", "StagingQueue",
    "StagingSlot", "StagingTicket", "TorchCudaBackend", "cuda_available", "cuda_unavailable_reason",
]

log = logging.getLogger(__name__)


class CudaExecutor(Executor):
    """Runs its stages on one CUDA stream of one GPU; K streams are K executors."""

    def __init__(
        self,
        models: Mapping[str, Path],
        device_id: int = 0,
        stream_index: int = 0,
        *,
        observer: RunObserver | None = None,
        transfer_observer: TransferObserver | None = None,
        slots: int = 2,
        device_outputs: Collection[str] = (),
        cpu_threads: int = 1,
        provider_options: Mapping[str, str] | None = None,
        backend: DeviceBackend | None = None,
        session_factory: SessionFactory | None = None,
        pad_batch: int = 0,
        cuda_graph: bool = False,
    ) -> None:
        # No colon in the name: TorchServe metric lines use it as a separator.
        super().__init__(f"cuda{device_id}s{stream_index}", observer, transfer_observer)
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        require_fixed_batch(cuda_graph, pad_batch)
        self.cuda_graph = cuda_graph
        self.backend = backend if backend is not None else open_backend(self.name, device_id)
        self.device = self.backend.device
        self.device_id = device_id
        self.timing = GpuTiming(self.name, self.backend)
        self.h2d_link, self.d2h_link = self.timing.h2d_link, self.timing.d2h_link
        self._models = dict(models)
        self._device_outputs = frozenset(device_outputs)
        # Smaller batches are zero-padded to this many rows, so each CUDA session sees one input
        # shape: ORT's CUDA provider re-plans every time the shape changes (about 110 ms for
        # GoogLeNet on an H200 when batch sizes 1-8 alternated, against 3-5 ms for a warm run).
        self.pad_batch = pad_batch
        self._builder = StageSessions(
            self.name, self.backend, device_id, cpu_threads=cpu_threads,
            provider_options=provider_options, factory=session_factory, cuda_graph=cuda_graph,
            pad_batch=pad_batch,
        )
        self.graph_refusals = self._builder.refusals  # stage -> why it runs without a graph
        self.sessions: dict[str, StageSession] = {}
        self.slots = [StagingSlot(i, self.backend) for i in range(slots)]
        self.staging = StagingQueue(
            self.slots, lambda t: stage_host_inputs(t, self.backend, self._h2d_stream),
            self.backend.sync_event,
        )
        self.compute_stream: Any = None
        self._h2d_stream: Any = None
        self._d2h_stream: Any = None

    # -- the submitting thread --
    def submit(
        self, stage: str, feeds: Mapping[str, Any], batch: int, observe: bool = True
    ) -> Future[StageOutputs]:
        if stage not in self.stages:
            raise ExecutorError(f"executor {self.name} has no stage {stage!r}")
        host, device = {}, {}
        for name in self.sessions[stage].input_names:
            if name not in feeds:
                raise ExecutorError(f"stage {stage!r} on {self.name}: missing input {name!r}")
            value = feeds[name]
            if isinstance(value, DeviceTensor) and value.device == self.device:
                device[name] = value
            elif isinstance(value, DeviceTensor):
                host[name] = value.to_host()  # another GPU: through the host
            else:
                host[name] = value
        future: Future[StageOutputs] = Future()
        ticket = StagingTicket(stage, batch, observe, host, device, future, self._run_batch(batch, device))
        self.staging.admit(ticket)  # issues the copy now if a slot is free
        # A cancelled job never reaches _run: free its slot once its copy has left the buffer.
        def release_if_cancelled(done: Future[StageOutputs]) -> None:
            if done.cancelled():
                self.staging.release(ticket, ticket.copy_done)

        future.add_done_callback(release_if_cancelled)
        self._jobs.put(Job(stage, ticket, batch, observe, future))  # type: ignore[arg-type]
        return future

    def _run_batch(self, batch: int, device: Mapping[str, DeviceTensor]) -> int:
        if batch >= self.pad_batch:
            return batch
        # Tensors already on the GPU cannot be padded here; they were padded by their producer
        # when it ran padded too.
        if any(tensor.shape[0] != self.pad_batch for tensor in device.values()):
            return batch
        return self.pad_batch

    # -- the executor thread --
    def _on_thread_start(self) -> None:
        if isinstance(self.backend, TorchCudaBackend):
            import torch

            torch.cuda.set_device(self.device_id)

    def _load(self) -> list[str]:
        self.compute_stream = self.backend.new_stream()
        self._h2d_stream = self.backend.new_stream()
        self._d2h_stream = self.backend.new_stream()
        self.timing.start(self.compute_stream)
        self.sessions.update(self._builder.build(self._models, self.compute_stream))
        return list(self.sessions)

    def input_names(self, stage: str) -> list[str]:
        return list(self.sessions[stage].input_names)

    def _run(self, stage: str, feeds: Mapping[str, Any]) -> dict[str, Any]:
        ticket = feeds
        if not isinstance(ticket, StagingTicket):
            raise ExecutorError(f"executor {self.name}: jobs must come through submit()")
        try:
            self.staging.claim(ticket)
            if ticket.error is not None:
                raise ticket.error
            return self._compute(ticket)
        except Exception as exc:
            raise self._failure(ticket, exc) from exc
        finally:
            fence = self.backend.record_event(self.compute_stream)
            self.staging.release(ticket, fence)
            current = self._running
            if current is not None:  # the host thread's launches and waits for this job
                self.trace(f"{self.name}/host", HOST, ticket.stage, current[1], time.perf_counter())

    def _discard(self, job: Job) -> None:
        """A job failed before its run (an injected fault): free its slot once its copy is done."""
        ticket = job.feeds
        if isinstance(ticket, StagingTicket):
            self.staging.release(ticket, ticket.copy_done)

    def _compute(self, ticket: StagingTicket) -> dict[str, Any]:
        backend, stream = self.backend, self.compute_stream
        session = self.sessions[ticket.stage]
        if ticket.copy_done is not None:
            backend.wait_event(stream, ticket.copy_done)
        views = dict(ticket.views)
        for name, tensor in ticket.device_inputs.items():
            backend.wait_event(stream, tensor.ready)
            backend.keep_alive(tensor.buffer, stream)
            views[name] = tensor.view()
        trace = self._tracer()
        compute_started = backend.record_event(stream) if trace is not None else None
        specs = {name: session.output_spec(name, ticket.run_batch) for name in session.output_names}
        outputs = output_views(backend, ticket, specs, self._device_outputs)
        results: dict[str, Any] = session.run(views, outputs)
        results = {name: real_rows(value, ticket) for name, value in results.items()}
        done = backend.record_event(stream)
        if compute_started is not None:
            self.timing.span(trace, "compute", COMPUTE, ticket.stage, compute_started, done)
        to_host = []
        for name, view in outputs.items():
            if view is None:
                continue
            if name in self._device_outputs:
                rows = ticket.batch if ticket.run_batch != ticket.batch else None
                results[name] = DeviceTensor(
                    backend, view.buffer, view.shape, view.dtype, done, rows
                )
            else:
                to_host.append((name, view))
        observer = self.transfer_observer if ticket.observe else None
        if to_host:
            copied = copy_to_host(backend, self._d2h_stream, ticket, to_host, done)
            self.timing.copy_out(copied, sum(v.nbytes for _, v in to_host), trace, observer)
            results.update({n: real_rows(v, ticket) for n, v in copied.arrays.items()})
        self.timing.copy_in(ticket, trace, observer)
        return {name: results[name] for name in session.output_names}

    def _tracer(self) -> Trace | None:
        return self.trace if self.timeline is not None else None

    def _failure(self, ticket: StagingTicket, exc: BaseException) -> ExecutorError:
        stage = ticket.stage
        if is_out_of_memory(exc):
            try:
                # Give the memory back so that the CPU retry and the next jobs can run: drop the
                # slot's buffers (they regrow at the size next needed) once the GPU is done.
                self.backend.sync_event(self.backend.record_event(self.compute_stream))
                if ticket.slot is not None:
                    ticket.slot.drop()
                self.backend.release_cached()
            except Exception:  # noqa: BLE001 - best effort after an OOM
                log.debug("executor %s: could not release memory after an OOM", self.name)
            return ExecutorOutOfMemory(f"stage {stage!r} on {self.name}: CUDA out of memory")
        if isinstance(exc, ExecutorError):
            return exc
        return ExecutorError(f"stage {stage!r} failed on {self.name} ({type(exc).__name__})")

    def _unload(self) -> None:
        self.sessions.clear()
        for slot in self.slots:
            slot.drop()
