"""When and how a CUDA stage runs as a captured CUDA graph: pure decisions, no device calls.

ORT's CUDA provider can capture a session's kernels once (``enable_cuda_graph``) and replay them
with one launch, which takes the per-kernel launch cost off the host: the H200 runs of
2026-11-25 were bound by that host cost (5-9 ms a GoogLeNet batch of 8), not by the GPU.
A replay reads and writes the device addresses seen at capture and assumes the shapes seen
there, so a graph session needs

* one input shape: the padded fixed batch (``hetserve.cuda_fixed_batch``) gives it;
* no dimension but the batch that varies, and every output's shape known ahead;
* fixed input and output buffers, bound once: each job's staged input is copied into them on
  the compute stream (device to device, so the staging slots keep double buffering), and the
  outputs are copied out of them before the next replay overwrites them;
* runs of any other shape (a batch above the pad, an unpadded tensor from another executor)
  going around the graph, tagged with ORT's skip annotation;
* capture with no other CUDA work in the process: ORT captures in the global mode, where another
  thread's allocation breaks the capture, so executors capture at load, one at a time.

The executor (``handlers.executors.cuda``) and its graph session (``cuda_session.CudaGraphSession``)
do the device calls; these functions decide.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

# ORT's run-config key for the graph a run belongs to, and the id that keeps a run out of any
# graph (onnxruntime's kOrtRunOptionsConfigCudaGraphAnnotation / kCudaGraphAnnotationSkip).
GRAPH_ID_KEY = "gpu_graph_id"
SKIP_GRAPH_ID = "-1"
# ORT runs a session normally once (to allocate) before it captures; a third run replays.
CAPTURE_RUNS = 3
# ORT's words when it refuses a graph session: a node fell back to the CPU, or (some builds of
# the CUDA provider) the option beside user_compute_stream.
_REFUSAL_MARKERS = ("cuda graph", "graph capture", "cuda_graph")
# One capture at a time in this process (see the module docstring).
CAPTURE_LOCK = threading.Lock()

Dims = Sequence[int | str | None]


class CudaGraphError(ValueError):
    """CUDA graphs were asked for where they cannot work; the message says why."""


def graph_provider_options(enabled: bool) -> dict[str, str]:
    """The CUDA provider options that turn capture on (none when off)."""
    return {"enable_cuda_graph": "1"} if enabled else {}


FIXED_BATCH_NEEDED = (
    "hetserve.cuda_graph needs hetserve.cuda_fixed_batch: true: a CUDA graph replays one input "
    "shape, and only the padded fixed batch gives each session one shape"
)


def require_fixed_batch(cuda_graph: bool, pad_batch: int) -> None:
    """Refuse graphs without the fixed batch: every new batch size would need its own capture."""
    if cuda_graph and pad_batch <= 0:
        raise CudaGraphError(FIXED_BATCH_NEEDED)


def fixed_shape(dims: Dims, batch_symbol: str | None, pad_batch: int) -> tuple[int, ...] | None:
    """``dims`` with the batch dimension set to ``pad_batch``; None if another dim is free."""
    shape = []
    for dim in dims:
        if isinstance(dim, int) and dim > 0:
            shape.append(dim)
        elif dim is not None and dim == batch_symbol:
            shape.append(pad_batch)
        else:
            return None
    return tuple(shape)


def graph_refusal(
    pad_batch: int,
    inputs: Mapping[str, tuple[Dims, np.dtype | None]],
    outputs: Mapping[str, tuple[Dims, np.dtype | None]],
    batch_symbol: str | None,
) -> str | None:
    """Why this session cannot run as a graph at ``pad_batch`` rows, or None when it can."""
    if pad_batch <= 0:
        return "no fixed batch (hetserve.cuda_fixed_batch is off)"
    for kind, tensors in (("input", inputs), ("output", outputs)):
        for name, (dims, dtype) in tensors.items():
            if dtype is None:
                return f"{kind} {name!r} has an element type the executor does not bind"
            if fixed_shape(dims, batch_symbol, pad_batch) is None:
                return (f"{kind} {name!r} has dims {list(dims)}: only the batch dimension "
                        f"({batch_symbol or 'none'}) may vary")
    return None


@dataclass(frozen=True)
class FixedBuffer:
    """One device buffer a graph session is bound to for its whole life."""

    role: str  # "in" or "out"
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


def graph_buffer_plan(
    pad_batch: int,
    inputs: Mapping[str, tuple[Dims, np.dtype | None]],
    outputs: Mapping[str, tuple[Dims, np.dtype | None]],
    batch_symbol: str | None,
) -> tuple[FixedBuffer, ...]:
    """The buffers to allocate once, inputs first; raises CudaGraphError if graphs cannot work."""
    reason = graph_refusal(pad_batch, inputs, outputs, batch_symbol)
    if reason is not None:
        raise CudaGraphError(reason)
    plan = []
    for role, tensors in (("in", inputs), ("out", outputs)):
        for name, (dims, dtype) in tensors.items():
            shape = fixed_shape(dims, batch_symbol, pad_batch)
            assert shape is not None and dtype is not None  # graph_refusal checked both
            plan.append(FixedBuffer(role, name, shape, np.dtype(dtype)))
    return tuple(plan)


def replays(plan: Sequence[FixedBuffer], input_shapes: Mapping[str, tuple[int, ...]]) -> bool:
    """May a run with these input shapes replay the graph? Only at exactly the captured shapes."""
    fixed = {b.name: b.shape for b in plan if b.role == "in"}
    return set(fixed) == set(input_shapes) and all(
        tuple(input_shapes[name]) == shape for name, shape in fixed.items()
    )


def is_graph_refusal(exc: BaseException) -> bool:
    """Did ORT refuse to build a graph session (as opposed to failing for another reason)?"""
    text = str(exc).lower()
    return any(marker in text for marker in _REFUSAL_MARKERS)
