"""The device side of the CUDA executors: whether CUDA can be used here, the device calls
(``DeviceBackend``; ``TorchCudaBackend`` on torch's streams, events and caching allocators, an
in-memory fake in the tests so everything above it is tested without a GPU) and the typed views
of device memory that stages read, write and hand each other (``DeviceView``, ``DeviceTensor``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from handlers.errors import ExecutorLoadError


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
        return typed_view(pinned.numpy(), shape, dtype)

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
        nbytes = nbytes_of(shape, dtype)
        return typed_view(buffer[:nbytes].cpu().numpy(), shape, dtype)

    def keep_alive(self, buffer: Any, stream: Any) -> None:
        buffer.record_stream(stream)

    def release_cached(self) -> None:
        self._torch.cuda.empty_cache()



def open_backend(executor: str, device_id: int) -> TorchCudaBackend:
    """The real backend for ``device_id``; ``ExecutorLoadError`` naming ``executor`` if CUDA or
    that device is not there."""
    reason = cuda_unavailable_reason()
    if reason is not None:
        raise ExecutorLoadError(f"executor {executor}: CUDA is unavailable: {reason}")
    import torch

    if device_id >= torch.cuda.device_count():
        raise ExecutorLoadError(
            f"executor {executor}: no CUDA device {device_id} ({torch.cuda.device_count()} visible)"
        )
    return TorchCudaBackend(device_id)


def nbytes_of(shape: tuple[int, ...], dtype: np.dtype) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize


def typed_view(raw: np.ndarray, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    return raw[: nbytes_of(shape, dtype)].view(dtype).reshape(shape)


@dataclass(frozen=True)
class DeviceView:
    """A typed tensor at the front of a device buffer, as ORT is told to read or write it."""

    buffer: Any
    pointer: int
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.shape, self.dtype)


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
        return nbytes_of(self.host_shape, self.dtype)

    def view(self) -> DeviceView:
        return DeviceView(self.buffer, self.backend.pointer(self.buffer), self.shape, self.dtype)

    def to_host(self) -> np.ndarray:
        self.backend.sync_event(self.ready)
        # The padding rows sit after the real ones: copying the front of the buffer is enough.
        return self.backend.to_numpy(self.buffer, self.host_shape, self.dtype)

