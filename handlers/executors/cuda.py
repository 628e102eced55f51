"""CUDA executors: one per CUDA stream, running ONNX Runtime's CUDA provider on that stream.

Each executor owns a compute stream that its sessions (one per stage, as in StarONNX) are bound
to through ``user_compute_stream``, plus a host->device and a device->host copy stream. Inputs
are staged through pinned host buffers and bound to ORT by device pointer (IO binding), so ORT
itself copies nothing.

Double buffering: a micro-batch takes a staging slot at ``submit`` when one is free and its
host->device copy is issued at once, while the executor may still be computing the one before;
the compute stream waits for the copy's event on the GPU, not on the host. Jobs that find no
free slot wait in FIFO order and are staged the moment a finished job hands its slot back.

Every device call goes through a ``DeviceBackend``: ``TorchCudaBackend`` here, an in-memory
fake in the tests, so the staging logic is tested on machines without a GPU.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from handlers.errors import ExecutorLoadError, ExecutorOutOfMemory, is_out_of_memory
from handlers.executors.base import (
    Executor,
    ExecutorError,
    Job,
    RunObserver,
    StageOutputs,
    TransferObserver,
)
from handlers.executors.cuda_graph import (
    CAPTURE_LOCK,
    CAPTURE_RUNS,
    GRAPH_ID_KEY,
    SKIP_GRAPH_ID,
    graph_buffer_plan,
    graph_provider_options,
    graph_refusal,
    is_graph_refusal,
    replays,
    require_fixed_batch,
)
from handlers.observability.tracing import COMPUTE, HOST, TRANSFER

log = logging.getLogger(__name__)


_ALIGN = 512  # buffer sizes are rounded up to this, so a few bytes more do not reallocate
_ONNX_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def cuda_unavailable_reason() -> str | None:
    """Why CUDA executors cannot be built here, or None if they probably can.

    The CUDA provider's libraries are only loaded when a session is created, so a None here can
    still end in ``ExecutorLoadError`` at load time; the plan must handle both.
    """
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - any import failure means "no"
        return f"torch cannot be imported ({type(exc).__name__})"
    try:
        if not torch.cuda.is_available() or torch.cuda.device_count() < 1:
            return f"torch {torch.__version__} sees no CUDA device"
    except Exception as exc:  # noqa: BLE001
        return f"torch cannot query CUDA ({type(exc).__name__})"
    try:
        import onnxruntime as ort

        providers = ort.get_available_providers()
    except Exception as exc:  # noqa: BLE001
        return f"onnxruntime cannot be imported ({type(exc).__name__})"
    if "CUDAExecutionProvider" not in providers:
        return "onnxruntime has no CUDAExecutionProvider (the CPU build; install onnxruntime-gpu)"
    return None


def cuda_available() -> bool:
    """Cheap and exception-free: may the plan try CUDA executors?"""
    return cuda_unavailable_reason() is None


class DeviceBackend(Protocol):
    """The device calls the executor makes. Buffers are untyped byte buffers."""

    device: str  # "cuda:0"

    def new_stream(self) -> Any: ...
    def stream_pointer(self, stream: Any) -> int: ...
    def alloc_pinned(self, nbytes: int) -> Any: ...
    def alloc_device(self, nbytes: int) -> Any: ...
    def pointer(self, buffer: Any) -> int: ...
    def host_array(self, pinned: Any, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A numpy view on the front of a pinned buffer."""
        ...
    def copy_async(self, dst: Any, src: Any, nbytes: int, stream: Any) -> None: ...
    def record_event(self, stream: Any) -> Any: ...
    def wait_event(self, stream: Any, event: Any) -> None:
        """Make ``stream`` wait for ``event`` on the GPU; the host does not block."""
        ...
    def sync_event(self, event: Any) -> None: ...
    def elapsed_s(self, start: Any, end: Any) -> float: ...
    def to_numpy(self, buffer: Any, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A synchronous copy of a device buffer's front into a new host array."""
        ...
    def keep_alive(self, buffer: Any, stream: Any) -> None:
        """``buffer`` is used on ``stream``: do not recycle its memory before the stream is done."""
        ...
    def release_cached(self) -> None: ...


class TorchCudaBackend:
    """DeviceBackend on torch's CUDA streams, events and caching allocators."""

    def __init__(self, device_id: int) -> None:
        import torch

        self._torch = torch
        self._device = torch.device("cuda", device_id)
        self.device = f"cuda:{device_id}"

    def new_stream(self) -> Any:
        return self._torch.cuda.Stream(device=self._device)  # type: ignore[no-untyped-call]  # torch.cuda is unannotated

    def stream_pointer(self, stream: Any) -> int:
        return int(stream.cuda_stream)

    def alloc_pinned(self, nbytes: int) -> Any:
        return self._torch.empty(nbytes, dtype=self._torch.uint8, pin_memory=True)

    def alloc_device(self, nbytes: int) -> Any:
        return self._torch.empty(nbytes, dtype=self._torch.uint8, device=self._device)

    def pointer(self, buffer: Any) -> int:
        return int(buffer.data_ptr())

    def host_array(self, pinned: Any, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        return _typed_view(pinned.numpy(), shape, dtype)

    def copy_async(self, dst: Any, src: Any, nbytes: int, stream: Any) -> None:
        with self._torch.cuda.stream(stream):
            dst[:nbytes].copy_(src[:nbytes], non_blocking=True)

    def record_event(self, stream: Any) -> Any:
        event = self._torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]  # as above
        event.record(stream)
        return event

    def wait_event(self, stream: Any, event: Any) -> None:
        stream.wait_event(event)

    def sync_event(self, event: Any) -> None:
        event.synchronize()

    def elapsed_s(self, start: Any, end: Any) -> float:
        return float(start.elapsed_time(end)) / 1e3

    def to_numpy(self, buffer: Any, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        nbytes = _nbytes(shape, dtype)
        return _typed_view(buffer[:nbytes].cpu().numpy(), shape, dtype)

    def keep_alive(self, buffer: Any, stream: Any) -> None:
        buffer.record_stream(stream)

    def release_cached(self) -> None:
        self._torch.cuda.empty_cache()


def _nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize


def _typed_view(raw: np.ndarray, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    return raw[: _nbytes(shape, dtype)].view(dtype).reshape(shape)


@dataclass(frozen=True)
class DeviceView:
    """A typed tensor at the front of a device buffer, as ORT is told to read or write it."""

    buffer: Any
    pointer: int
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return _nbytes(self.shape, self.dtype)


@dataclass(eq=False)
class DeviceTensor:
    """A stage output left in GPU memory for a consumer on the same device; owns its buffer.

    A CUDA executor on the same device binds it without any copy; anything else calls
    ``to_host()`` (or ``host_feeds``) first.
    """

    backend: DeviceBackend
    buffer: Any
    shape: tuple[int, ...]
    dtype: np.dtype
    ready: Any  # event recorded after the producing run
    rows: int | None = None  # real samples when the run was padded (the rest are padding)

    @property
    def device(self) -> str:
        return self.backend.device

    @property
    def host_shape(self) -> tuple[int, ...]:
        """The real rows only: what leaves the GPU for a consumer elsewhere."""
        return self.shape if self.rows is None else (self.rows, *self.shape[1:])

    @property
    def nbytes(self) -> int:  # the bytes a copy to the host moves
        return _nbytes(self.host_shape, self.dtype)

    def view(self) -> DeviceView:
        return DeviceView(self.buffer, self.backend.pointer(self.buffer), self.shape, self.dtype)

    def to_host(self) -> np.ndarray:
        self.backend.sync_event(self.ready)
        # The padding rows sit after the real ones: copying the front of the buffer is enough.
        return self.backend.to_numpy(self.buffer, self.host_shape, self.dtype)


class StageSession(Protocol):
    """One stage's model, run on device buffers."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    def output_spec(self, name: str, batch: int) -> tuple[tuple[int, ...], np.dtype] | None:
        """Shape and dtype of an output at this batch; None if only a run can tell."""
        ...

    def run(
        self, inputs: Mapping[str, DeviceView], outputs: Mapping[str, DeviceView | None]
    ) -> dict[str, np.ndarray]:
        """Run; outputs bound to a view are written there, the others come back as host arrays.
        Returns when the device work is done."""
        ...


# name -> (ORT dims, numpy scalar type or None), as ORT describes a session's tensors.
SpecMap = dict[str, tuple[list[int | str | None], Any]]


@runtime_checkable
class GraphableSession(StageSession, Protocol):
    """A StageSession that can also run as a captured CUDA graph (CudaGraphSession)."""

    @property
    def batch_symbol(self) -> str | None: ...

    def tensor_specs(self) -> tuple[SpecMap, SpecMap]:
        """(inputs, outputs)."""
        ...

    def bind_fixed(self, inputs: Mapping[str, DeviceView], outputs: Mapping[str, DeviceView]) -> None:
        ...

    def run_fixed(self) -> None: ...


# (stage, model path, device id, compute stream pointer) -> StageSession
SessionFactory = Callable[[str, Path, int, int], StageSession]


class OrtCudaSession:
    """An ORT session on the CUDA provider, bound to one compute stream, run by IO binding."""

    def __init__(
        self,
        path: Path,
        device_id: int,
        stream_pointer: int,
        cpu_threads: int = 1,
        provider_options: Mapping[str, str] | None = None,
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        # Only nodes the CUDA provider lacks run on the CPU: a thread or two is plenty, and more
        # would take cores from the CPU executors.
        options.intra_op_num_threads = cpu_threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        cuda_options = {
            "device_id": str(device_id),
            "user_compute_stream": str(stream_pointer),
            # Our transfers bypass ORT (device pointers are bound), so ORT copies only around
            # CPU-fallback nodes; "0" would put those on other streams, which ORT warns can race.
            "do_copy_in_default_stream": "1",
            # Several sessions share the GPU: grow each arena by what is asked, not to the next
            # power of two.
            "arena_extend_strategy": "kSameAsRequested",
            # EXHAUSTIVE (ORT's default) benchmarks every conv again for each new input shape:
            # seconds per new batch size on GoogLeNet (H100), far more than it ever saves.
            "cudnn_conv_algo_search": "HEURISTIC",
            **dict(provider_options or {}),
        }
        self.session = ort.InferenceSession(
            str(path), options, providers=[("CUDAExecutionProvider", cuda_options)]
        )
        active = self.session.get_providers()
        if not active or active[0] != "CUDAExecutionProvider":
            # ORT falls back to the CPU with only a log line when the provider's libraries
            # (CUDA 13, cuDNN 9) do not load; serving the head on the CPU by accident is worse
            # than saying so.
            raise ExecutorLoadError(
                f"{Path(path).name}: ONNX Runtime did not enable CUDAExecutionProvider "
                f"(active: {active}); check that onnxruntime-gpu's CUDA and cuDNN libraries load"
            )
        self.device_id = device_id
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        self.input_names = tuple(i.name for i in inputs)
        self.output_names = tuple(o.name for o in outputs)
        batch_dim = inputs[0].shape[0] if inputs and inputs[0].shape else None
        self._batch_symbol = batch_dim if isinstance(batch_dim, str) else None
        self._outputs = {o.name: (list(o.shape), _ONNX_TYPES.get(o.type)) for o in outputs}
        self._inputs = {i.name: (list(i.shape), _ONNX_TYPES.get(i.type)) for i in inputs}
        self._binding = self.session.io_binding()
        self.graph_enabled = cuda_options.get("enable_cuda_graph") == "1"
        # With capture on, ORT would capture (and later replay) any run: runs at other shapes
        # than the graph's must say they are not part of it.
        self._plain_options = None
        if self.graph_enabled:
            self._plain_options = ort.RunOptions()
            self._plain_options.add_run_config_entry(GRAPH_ID_KEY, SKIP_GRAPH_ID)
        self._fixed_binding: Any = None

    def output_spec(self, name: str, batch: int) -> tuple[tuple[int, ...], np.dtype] | None:
        dims, dtype = self._outputs[name]
        if dtype is None:
            return None
        shape = []
        for dim in dims:
            if isinstance(dim, int):
                shape.append(dim)
            elif dim is not None and dim == self._batch_symbol:
                shape.append(batch)
            else:
                return None  # a data-dependent dim: let ORT allocate it
        return tuple(shape), np.dtype(dtype)

    def run(
        self, inputs: Mapping[str, DeviceView], outputs: Mapping[str, DeviceView | None]
    ) -> dict[str, np.ndarray]:
        binding = self._binding
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        for name in self.input_names:
            view = inputs[name]
            binding.bind_input(
                name, "cuda", self.device_id, view.dtype.type, list(view.shape), view.pointer
            )
        for name in self.output_names:
            out = outputs.get(name)
            if out is None:
                binding.bind_output(name, "cuda", self.device_id)
            else:
                binding.bind_output(
                    name, "cuda", self.device_id, out.dtype.type, list(out.shape), out.pointer
                )
        # Returns after ORT synchronised the compute stream (ORT's default run option).
        self.session.run_with_iobinding(binding, self._plain_options)
        unbound = [n for n in self.output_names if outputs.get(n) is None]
        if not unbound:
            return {}
        # The documented read-back; it copies every output, but only this rare path uses it.
        values = dict(zip(self.output_names, binding.copy_outputs_to_cpu(), strict=True))
        return {name: values[name] for name in unbound}

    def provider_options(self) -> dict[str, dict[str, str]]:
        options: dict[str, dict[str, str]] = self.session.get_provider_options()
        return options

    # -- as a CUDA graph (CudaGraphSession) --
    @property
    def batch_symbol(self) -> str | None:
        return self._batch_symbol

    def tensor_specs(self) -> tuple[SpecMap, SpecMap]:
        """(inputs, outputs): name -> (ORT dims, numpy dtype or None)."""
        return dict(self._inputs), dict(self._outputs)

    def bind_fixed(self, inputs: Mapping[str, DeviceView], outputs: Mapping[str, DeviceView]) -> None:
        """Bind the graph's buffers once, on a binding of their own: every capture and replay
        uses these addresses."""
        binding = self._fixed_binding = self.session.io_binding()
        for names, views, bind in ((self.input_names, inputs, binding.bind_input),
                                   (self.output_names, outputs, binding.bind_output)):
            for name in names:
                view = views[name]
                bind(name, "cuda", self.device_id, view.dtype.type, list(view.shape), view.pointer)

    def run_fixed(self) -> None:
        """Run (capture, replay) on the fixed binding; returns when the stream is done."""
        self.session.run_with_iobinding(self._fixed_binding)


class CudaGraphSession:
    """A stage run as a captured CUDA graph on device buffers of its own (handlers.executors.cuda_graph).

    Each run copies its inputs into the graph's buffers on the compute stream, replays, and
    copies the outputs to where the executor wants them, all ordered on that stream before the
    executor's ``done`` event. Runs at any other shape go to the inner session's plain path.
    """

    def __init__(
        self, inner: GraphableSession, backend: DeviceBackend, stream: Any, pad_batch: int
    ) -> None:
        self.inner = inner
        self.input_names: tuple[str, ...] = inner.input_names
        self.output_names: tuple[str, ...] = inner.output_names
        self._backend, self._stream = backend, stream
        self.plan = graph_buffer_plan(pad_batch, *inner.tensor_specs(), inner.batch_symbol)
        self.fixed: dict[tuple[str, str], DeviceView] = {}
        for spec in self.plan:
            buffer = backend.alloc_device(max(spec.nbytes, 1))
            self.fixed[(spec.role, spec.name)] = DeviceView(
                buffer, backend.pointer(buffer), spec.shape, spec.dtype
            )
        fixed_in, fixed_out = ({n: v for (r, n), v in self.fixed.items() if r == role}
                               for role in ("in", "out"))
        inner.bind_fixed(fixed_in, fixed_out)
        self.replays = 0
        self.plain_runs = 0

    def capture(self) -> None:
        with CAPTURE_LOCK:
            for _ in range(CAPTURE_RUNS):
                self.inner.run_fixed()

    def output_spec(self, name: str, batch: int) -> tuple[tuple[int, ...], np.dtype] | None:
        return self.inner.output_spec(name, batch)

    def run(
        self, inputs: Mapping[str, DeviceView], outputs: Mapping[str, DeviceView | None]
    ) -> dict[str, np.ndarray]:
        shapes = {name: inputs[name].shape for name in self.input_names}
        if not replays(self.plan, shapes) or any(outputs.get(n) is None for n in self.output_names):
            self.plain_runs += 1
            return self.inner.run(inputs, outputs)
        copy = self._backend.copy_async
        for name in self.input_names:
            source, fixed = inputs[name], self.fixed[("in", name)]
            if source.pointer != fixed.pointer:
                copy(fixed.buffer, source.buffer, fixed.nbytes, self._stream)
        self.inner.run_fixed()
        for name in self.output_names:
            fixed, target = self.fixed[("out", name)], outputs[name]
            assert target is not None
            # The next replay overwrites the graph's output: the job keeps its own copy.
            copy(target.buffer, fixed.buffer, fixed.nbytes, self._stream)
        self.replays += 1
        return {}


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
        capacity = max(_ALIGN, -(-nbytes // _ALIGN) * _ALIGN)
        buffers.pop(key, None)  # free the small one before allocating the big one
        buffer = alloc(capacity)
        buffers[key] = (buffer, capacity)
        return buffer


@dataclass(eq=False)
class _Ticket:
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
        stage: Callable[[_Ticket], None],
        fence_wait: Callable[[Any], None],
    ) -> None:
        self._free: deque[StagingSlot] = deque(slots)
        self._waiting: deque[_Ticket] = deque()
        self._stage = stage  # fills the slot's buffers and issues the copies
        self._fence_wait = fence_wait
        self._lock = threading.Lock()

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def admit(self, ticket: _Ticket) -> None:
        with self._lock:
            if self._waiting or not self._free:
                self._waiting.append(ticket)
            else:
                self._start(ticket)

    def claim(self, ticket: _Ticket) -> None:
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

    def release(self, ticket: _Ticket, fence: Any) -> None:
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

    def _start(self, ticket: _Ticket) -> None:
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
        self.graph_refusals: dict[str, str] = {}  # stage -> why it runs without a graph
        if backend is None:
            reason = cuda_unavailable_reason()
            if reason is not None:
                raise ExecutorLoadError(f"executor {self.name}: CUDA is unavailable: {reason}")
            import torch

            if device_id >= torch.cuda.device_count():
                raise ExecutorLoadError(
                    f"executor {self.name}: no CUDA device {device_id} "
                    f"({torch.cuda.device_count()} visible)"
                )
            backend = TorchCudaBackend(device_id)
        self.backend = backend
        self.device = backend.device
        self.device_id = device_id
        self.h2d_link = f"cpu->{self.device}"
        self.d2h_link = f"{self.device}->cpu"
        self._models = dict(models)
        self._device_outputs = frozenset(device_outputs)
        self._cpu_threads = cpu_threads
        self._provider_options = dict(provider_options or {})
        self._session_factory = session_factory
        # Smaller batches are zero-padded to this many rows, so each CUDA session sees one input
        # shape: ORT's CUDA provider re-plans every time the shape changes (about 110 ms for
        # GoogLeNet on an H200 when batch sizes 1-8 alternated, against 3-5 ms for a warm run).
        self.pad_batch = pad_batch
        self.sessions: dict[str, StageSession] = {}
        self.slots = [StagingSlot(i, backend) for i in range(slots)]
        self.staging = StagingQueue(self.slots, self._stage_inputs, backend.sync_event)
        self.compute_stream: Any = None
        self._h2d_stream: Any = None
        self._d2h_stream: Any = None
        self._epoch: tuple[Any, float] | None = None  # (event, host time) for GPU timelines

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
        ticket = _Ticket(stage, batch, observe, host, device, future, self._run_batch(batch, device))
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

    def _stage_inputs(self, ticket: _Ticket) -> None:
        """Fill the slot's pinned buffers and issue the host->device copies (under the lock)."""
        slot = ticket.slot
        assert slot is not None
        started = ticket.staging_started = time.perf_counter()
        copies = []
        for name, array in ticket.host_inputs.items():
            array = np.asarray(array)
            shape = array.shape
            if ticket.run_batch > array.shape[0]:
                shape = (ticket.run_batch, *array.shape[1:])
            nbytes = _nbytes(shape, array.dtype)
            key = ("in", ticket.stage, name)
            pinned = slot.host(key, nbytes)
            staged = self.backend.host_array(pinned, shape, array.dtype)
            np.copyto(staged[: array.shape[0]], array)
            staged[array.shape[0] :] = 0
            target = slot.device(key, nbytes)
            copies.append((target, pinned, nbytes))
            ticket.views[name] = DeviceView(target, self.backend.pointer(target), shape, array.dtype)
        ticket.staging_s = time.perf_counter() - started
        if not copies:
            return
        stream = self._h2d_stream
        ticket.copy_started = self.backend.record_event(stream)
        try:
            for target, pinned, nbytes in copies:
                self.backend.copy_async(target, pinned, nbytes, stream)
        except Exception:
            # The slot may be dropped and its memory reused: no issued copy may still touch it.
            self.backend.sync_event(self.backend.record_event(stream))
            raise
        ticket.copy_done = self.backend.record_event(stream)

    # -- the executor thread --
    def _on_thread_start(self) -> None:
        if isinstance(self.backend, TorchCudaBackend):
            import torch

            torch.cuda.set_device(self.device_id)

    def _load(self) -> list[str]:
        self.compute_stream = self.backend.new_stream()
        self._h2d_stream = self.backend.new_stream()
        self._d2h_stream = self.backend.new_stream()
        pointer = self.backend.stream_pointer(self.compute_stream)
        epoch = self.backend.record_event(self.compute_stream)
        self.backend.sync_event(epoch)
        self._epoch = (epoch, time.perf_counter())
        factory = self._session_factory or self._ort_session
        for stage, path in self._models.items():
            def build(
                stage: str = stage, path: Path = Path(path), graph: bool = self.cuda_graph
            ) -> StageSession:
                if factory == self._ort_session and not graph:
                    return OrtCudaSession(path, self.device_id, pointer, self._cpu_threads,
                                          self._provider_options)
                return factory(stage, path, self.device_id, pointer)

            session = build()
            self.sessions[stage] = self._as_graph(stage, session, build) if self.cuda_graph else session
        return list(self.sessions)

    def _ort_session(self, stage: str, path: Path, device_id: int, pointer: int) -> StageSession:
        options = {**graph_provider_options(self.cuda_graph), **self._provider_options}
        try:
            return OrtCudaSession(path, device_id, pointer, self._cpu_threads, options)
        except Exception as exc:
            if not (self.cuda_graph and is_graph_refusal(exc)):
                raise
            # ORT refuses graphs when a node runs on the CPU: serve the stage without one.
            self.graph_refusals[stage] = f"ONNX Runtime refused: {exc}"
            return OrtCudaSession(path, device_id, pointer, self._cpu_threads, self._provider_options)

    def _as_graph(
        self, stage: str, session: StageSession, build: Callable[..., StageSession]
    ) -> StageSession:
        """The stage as a captured graph, or as it is when a graph cannot run it (logged)."""
        if stage not in self.graph_refusals:
            if not getattr(session, "graph_enabled", True) or not isinstance(session, GraphableSession):
                self.graph_refusals[stage] = "the session was built without CUDA graphs"
            else:
                inputs, outputs = session.tensor_specs()
                reason = graph_refusal(self.pad_batch, inputs, outputs, session.batch_symbol)
                if reason is not None:
                    self.graph_refusals[stage] = reason
        if stage in self.graph_refusals:
            log.warning("executor %s: stage %r runs without a CUDA graph: %s",
                        self.name, stage, self.graph_refusals[stage])
            return session
        assert isinstance(session, GraphableSession)  # refused above otherwise
        graph = CudaGraphSession(session, self.backend, self.compute_stream, self.pad_batch)
        try:
            graph.capture()
        except Exception as exc:  # noqa: BLE001 - a graph is an optimisation: serve without it
            self.graph_refusals[stage] = f"capture failed ({type(exc).__name__}: {exc})"
            log.warning("executor %s: stage %r runs without a CUDA graph: %s",
                        self.name, stage, self.graph_refusals[stage])
            return build(graph=False)  # a fresh session: the failed one may hold a broken capture
        return graph

    def input_names(self, stage: str) -> list[str]:
        return list(self.sessions[stage].input_names)

    def _run(self, stage: str, feeds: Mapping[str, Any]) -> dict[str, Any]:
        ticket = feeds
        if not isinstance(ticket, _Ticket):
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
        if isinstance(ticket, _Ticket):
            self.staging.release(ticket, ticket.copy_done)

    def _compute(self, ticket: _Ticket) -> dict[str, Any]:
        backend, stream = self.backend, self.compute_stream
        session = self.sessions[ticket.stage]
        if ticket.copy_done is not None:
            backend.wait_event(stream, ticket.copy_done)
        views = dict(ticket.views)
        for name, tensor in ticket.device_inputs.items():
            backend.wait_event(stream, tensor.ready)
            backend.keep_alive(tensor.buffer, stream)
            views[name] = tensor.view()
        slot = ticket.slot
        assert slot is not None
        compute_started = backend.record_event(stream) if self.timeline is not None else None
        outputs: dict[str, DeviceView | None] = {}
        for name in session.output_names:
            spec = session.output_spec(name, ticket.run_batch)
            if spec is None:
                outputs[name] = None
                continue
            shape, dtype = spec
            nbytes = _nbytes(shape, dtype)
            if name in self._device_outputs:
                buffer = backend.alloc_device(max(nbytes, 1))  # owned by the DeviceTensor
            else:
                buffer = slot.device(("out", ticket.stage, name), nbytes)
            outputs[name] = DeviceView(buffer, backend.pointer(buffer), shape, dtype)
        results: dict[str, Any] = session.run(views, outputs)
        results = {name: self._real_rows(value, ticket) for name, value in results.items()}
        done = backend.record_event(stream)
        if compute_started is not None:
            self._trace_gpu("compute", COMPUTE, ticket.stage, compute_started, done)
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
        if to_host:
            copied = self._copy_out(ticket, to_host, done)
            results.update({n: self._real_rows(v, ticket) for n, v in copied.items()})
        self._observe_copy_in(ticket)
        return {name: results[name] for name in session.output_names}

    @staticmethod
    def _real_rows(value: np.ndarray, ticket: _Ticket) -> np.ndarray:
        padded = ticket.run_batch != ticket.batch and value.ndim and value.shape[0] == ticket.run_batch
        return value[: ticket.batch] if padded else value

    def _copy_out(
        self, ticket: _Ticket, views: list[tuple[str, DeviceView]], done: Any
    ) -> dict[str, np.ndarray]:
        backend, stream, slot = self.backend, self._d2h_stream, ticket.slot
        assert slot is not None
        backend.wait_event(stream, done)
        started = backend.record_event(stream)
        pinned = {}
        for name, view in views:
            pinned[name] = slot.host(("out", ticket.stage, name), view.nbytes)
            backend.copy_async(pinned[name], view.buffer, view.nbytes, stream)
        finished = backend.record_event(stream)
        backend.sync_event(finished)
        self._trace_gpu("d2h", TRANSFER, self.d2h_link, started, finished,
                        sum(v.nbytes for _, v in views))
        copy_started = time.perf_counter()
        # Copied out of the pinned buffer: the slot's next job overwrites it.
        out = {
            name: backend.host_array(pinned[name], view.shape, view.dtype).copy()
            for name, view in views
        }
        observer = self.transfer_observer if ticket.observe else None
        if observer is not None:
            seconds = backend.elapsed_s(started, finished) + time.perf_counter() - copy_started
            observer(self.d2h_link, sum(v.nbytes for _, v in views), seconds)
        return out

    def _observe_copy_in(self, ticket: _Ticket) -> None:
        if ticket.copy_done is None:
            return
        tracing = self.timeline is not None
        observer = self.transfer_observer if ticket.observe else None
        if not (tracing or observer is not None):
            return
        self.backend.sync_event(ticket.copy_done)  # already passed: the run waited for it
        nbytes = sum(v.nbytes for v in ticket.views.values())
        if tracing:
            self.trace(f"{self.name}/pin", TRANSFER, "host->pinned", ticket.staging_started,
                       ticket.staging_started + ticket.staging_s, nbytes)
            self._trace_gpu("h2d", TRANSFER, self.h2d_link, ticket.copy_started, ticket.copy_done,
                            nbytes)
        if observer is not None:
            seconds = ticket.staging_s + self.backend.elapsed_s(ticket.copy_started, ticket.copy_done)
            observer(self.h2d_link, nbytes, seconds)

    def _trace_gpu(self, lane: str, kind: str, name: str, start: Any, end: Any,
                   nbytes: int = 0) -> None:
        """A span between two completed CUDA events, placed on the host clock by the epoch
        event recorded at load (event timers and perf_counter drift apart by microseconds over
        a benchmark, far below a kernel's length)."""
        if self.timeline is None or self._epoch is None:
            return
        self.backend.sync_event(end)
        event, host = self._epoch
        elapsed = self.backend.elapsed_s
        self.trace(f"{self.name}/{lane}", kind, name, host + elapsed(event, start),
                   host + elapsed(event, end), nbytes)

    def _failure(self, ticket: _Ticket, exc: BaseException) -> ExecutorError:
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
