"""One stage's model on a CUDA stream: the session protocols the executor runs
(``StageSession``, ``GraphableSession``), ONNX Runtime's CUDA provider bound to the stream and run
by IO binding (``OrtCudaSession``), the same as a captured CUDA graph (``CudaGraphSession``), and
how an executor gets one per stage, a graph where one can run (``StageSessions``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from handlers.errors import ExecutorLoadError
from handlers.executors.cuda_device import DeviceBackend, DeviceView
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
)

log = logging.getLogger(__name__)

ONNX_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


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
        self._outputs = {o.name: (list(o.shape), ONNX_TYPES.get(o.type)) for o in outputs}
        self._inputs = {i.name: (list(i.shape), ONNX_TYPES.get(i.type)) for i in inputs}
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



class StageSessions:
    """An executor's session per stage on its compute stream: ONNX Runtime's CUDA provider (or
    ``factory``), as a captured CUDA graph when ``cuda_graph`` asks and a graph can run the stage;
    otherwise the plain session, with the reason in ``refusals`` (stage -> why) and the log."""

    def __init__(
        self,
        executor: str,
        backend: DeviceBackend,
        device_id: int,
        *,
        cpu_threads: int = 1,
        provider_options: Mapping[str, str] | None = None,
        factory: SessionFactory | None = None,
        cuda_graph: bool = False,
        pad_batch: int = 0,
    ) -> None:
        self.executor, self.backend, self.device_id = executor, backend, device_id
        self.cpu_threads = cpu_threads
        self.provider_options = dict(provider_options or {})
        self.factory = factory
        self.cuda_graph = cuda_graph
        self.pad_batch = pad_batch
        self.refusals: dict[str, str] = {}

    def build(self, models: Mapping[str, Path], stream: Any) -> dict[str, StageSession]:
        pointer = self.backend.stream_pointer(stream)
        sessions: dict[str, StageSession] = {}
        for stage, path in models.items():
            def build(
                stage: str = stage, path: Path = Path(path), graph: bool = self.cuda_graph
            ) -> StageSession:
                if self.factory is None and not graph:
                    return OrtCudaSession(path, self.device_id, pointer, self.cpu_threads,
                                          self.provider_options)
                return (self.factory or self._ort_session)(stage, path, self.device_id, pointer)

            session = build()
            sessions[stage] = self._as_graph(stage, session, build, stream) if self.cuda_graph else session
        return sessions

    def _ort_session(self, stage: str, path: Path, device_id: int, pointer: int) -> StageSession:
        options = {**graph_provider_options(self.cuda_graph), **self.provider_options}
        try:
            return OrtCudaSession(path, device_id, pointer, self.cpu_threads, options)
        except Exception as exc:
            if not (self.cuda_graph and is_graph_refusal(exc)):
                raise
            # ORT refuses graphs when a node runs on the CPU: serve the stage without one.
            self.refusals[stage] = f"ONNX Runtime refused: {exc}"
            return OrtCudaSession(path, device_id, pointer, self.cpu_threads, self.provider_options)

    def _as_graph(
        self, stage: str, session: StageSession, build: Callable[..., StageSession], stream: Any
    ) -> StageSession:
        """The stage as a captured graph, or as it is when a graph cannot run it (logged)."""
        if stage not in self.refusals:
            if not getattr(session, "graph_enabled", True) or not isinstance(session, GraphableSession):
                self.refusals[stage] = "the session was built without CUDA graphs"
            else:
                inputs, outputs = session.tensor_specs()
                reason = graph_refusal(self.pad_batch, inputs, outputs, session.batch_symbol)
                if reason is not None:
                    self.refusals[stage] = reason
        if stage in self.refusals:
            log.warning("executor %s: stage %r runs without a CUDA graph: %s",
                        self.executor, stage, self.refusals[stage])
            return session
        assert isinstance(session, GraphableSession)  # refused above otherwise
        graph = CudaGraphSession(session, self.backend, stream, self.pad_batch)
        try:
            graph.capture()
        except Exception as exc:  # noqa: BLE001 - a graph is an optimisation: serve without it
            self.refusals[stage] = f"capture failed ({type(exc).__name__}: {exc})"
            log.warning("executor %s: stage %r runs without a CUDA graph: %s",
                        self.executor, stage, self.refusals[stage])
            return build(graph=False)  # a fresh session: the failed one may hold a broken capture
        return graph
