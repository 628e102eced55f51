"""CUDA graphs (hetserve.cuda_graph): the pure decisions, the executor's use of them against the
fake GPU of test_cuda_executor, and the real thing under ``gpu``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_cuda_executor import (
    EXACT,
    RNG,
    FakeBackend,
    NumpySession,
    cpu_reference,
    gpu_models,  # noqa: F401 - a fixture
    make_executor,
    reference,
    tagged,
    typed,
)

from handlers.executors.cuda import CudaExecutor, CudaGraphSession, DeviceTensor
from handlers.executors.cuda_graph import (
    CAPTURE_RUNS,
    CudaGraphError,
    FixedBuffer,
    fixed_shape,
    graph_buffer_plan,
    graph_provider_options,
    graph_refusal,
    is_graph_refusal,
    replays,
    require_fixed_batch,
)
from handlers.runtime.config import ConfigError, RuntimeConfig

F32 = np.dtype(np.float32)

# ---- pure decisions ----------------------------------------------------------------------------


def test_provider_options_turn_capture_on_only_when_asked():
    assert graph_provider_options(True) == {"enable_cuda_graph": "1"}
    assert graph_provider_options(False) == {}


def test_graphs_are_refused_without_the_fixed_batch_with_a_clear_message():
    with pytest.raises(CudaGraphError, match="cuda_fixed_batch: true"):
        require_fixed_batch(True, 0)
    require_fixed_batch(True, 8)
    require_fixed_batch(False, 0)  # no graphs, nothing to refuse
    with pytest.raises(CudaGraphError, match="cuda_fixed_batch"):
        CudaExecutor({"head": Path("h.onnx")}, 0, 0, backend=FakeBackend(), cuda_graph=True)


def test_fixed_shape_sets_the_batch_and_refuses_other_free_dims():
    assert fixed_shape(["batch", 3, 224, 224], "batch", 8) == (8, 3, 224, 224)
    assert fixed_shape([8, 1000], None, 8) == (8, 1000)
    assert fixed_shape(["batch", "tokens"], "batch", 8) is None
    assert fixed_shape(["batch", None], "batch", 8) is None
    assert fixed_shape([None, 4], None, 8) is None


def test_graph_refusal_says_which_tensor_and_why():
    inputs = {"x": (["batch", 4], F32)}
    outputs = {"y": (["batch", 3], F32)}
    assert graph_refusal(8, inputs, outputs, "batch") is None
    assert "cuda_fixed_batch" in graph_refusal(0, inputs, outputs, "batch")
    seq = graph_refusal(8, {"ids": (["batch", "tokens"], F32)}, outputs, "batch")
    assert "input 'ids'" in seq and "tokens" in seq
    odd = graph_refusal(8, inputs, {"y": (["batch", 3], None)}, "batch")
    assert "output 'y'" in odd and "element type" in odd


def test_buffer_plan_allocates_each_tensor_once_at_the_padded_shape():
    plan = graph_buffer_plan(
        8, {"x": (["batch", 4], F32), "m": (["batch"], np.dtype(np.int64))},
        {"y": (["batch", 3], F32)}, "batch",
    )
    assert plan == (
        FixedBuffer("in", "x", (8, 4), F32),
        FixedBuffer("in", "m", (8,), np.dtype(np.int64)),
        FixedBuffer("out", "y", (8, 3), F32),
    )
    assert [b.nbytes for b in plan] == [8 * 4 * 4, 8 * 8, 8 * 3 * 4]
    with pytest.raises(CudaGraphError, match="only the batch dimension"):
        graph_buffer_plan(8, {"x": (["batch", "w"], F32)}, {}, "batch")


def test_only_the_captured_shapes_replay():
    plan = graph_buffer_plan(8, {"x": (["batch", 4], F32)}, {"y": (["batch", 3], F32)}, "batch")
    assert replays(plan, {"x": (8, 4)})
    assert not replays(plan, {"x": (12, 4)})  # a batch above the pad runs unpadded
    assert not replays(plan, {"x": (8, 4), "extra": (8,)})
    assert not replays(plan, {})


def test_ort_refusals_are_told_from_other_failures():
    # ORT's message (onnxruntime/core/session/inference_session.cc) when a node is on the CPU.
    refused = RuntimeError(
        "[ONNXRuntimeError] : 1 : FAIL : This session cannot use the CUDA Graph feature as "
        "requested by the user  as all compute graph nodes have not been partitioned to the CUDA EP."
    )
    assert is_graph_refusal(refused)
    assert is_graph_refusal(RuntimeError(
        "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : enable_cuda_graph cannot be combined with "
        "user_compute_stream"))  # the wording is illustrative: any mention of the option counts
    assert not is_graph_refusal(RuntimeError("CUDA failure 2: out of memory"))


def test_config_knob_is_off_by_default_validated_and_needs_the_fixed_batch():
    assert RuntimeConfig().cuda_graph is False
    assert RuntimeConfig.from_model_yaml({"hetserve": {"cuda_graph": True}}).cuda_graph is True
    with pytest.raises(ConfigError, match="cuda_graph must be true or false"):
        RuntimeConfig(cuda_graph="yes")
    with pytest.raises(ConfigError, match="cuda_fixed_batch: true"):
        RuntimeConfig.from_model_yaml({"hetserve": {"cuda_graph": True, "cuda_fixed_batch": False}})


# ---- the executor against the fake GPU ----------------------------------------------------------


class GraphNumpySession(NumpySession):
    """NumpySession that can also be bound once and "replayed": a replay reads and writes only
    the addresses bound at bind time, as a captured CUDA graph does."""

    def __init__(self, backend, dims=("batch", 4), **kwargs) -> None:
        super().__init__(backend, **kwargs)
        self.dims = list(dims)
        self.bound = None
        self.replayed: list[tuple[int, int]] = []  # (input pointer, output pointer) per replay

    batch_symbol = "batch"

    def tensor_specs(self):
        return ({self.input_names[0]: (self.dims, F32)},
                {self.output_names[0]: (["batch", self.width], F32)})

    def bind_fixed(self, inputs, outputs):
        assert self.bound is None, "bound twice"
        self.bound = (inputs[self.input_names[0]], outputs[self.output_names[0]])

    def run_fixed(self):
        view_in, view_out = self.bound
        self.replayed.append((view_in.pointer, view_out.pointer))
        x = typed(view_in.buffer, view_in.shape, view_in.dtype)
        typed(view_out.buffer, view_out.shape, view_out.dtype)[...] = self.fn(x)


def graph_executor(backend=None, pad_batch=4, **kwargs):
    backend = backend or FakeBackend()
    session = GraphNumpySession(backend, fn=kwargs.pop("fn", reference))
    return make_executor(backend, session=session, pad_batch=pad_batch, cuda_graph=True, **kwargs)


def test_stages_capture_at_load_and_replay_on_one_set_of_buffers():
    executor, backend, session = graph_executor()
    try:
        graph = executor.sessions["head"]
        assert isinstance(graph, CudaGraphSession) and executor.graph_refusals == {}
        assert len(session.replayed) == CAPTURE_RUNS  # captured before any job came
        allocated = len(backend.allocations)
        compute = executor.compute_stream.name
        for batch in (1, 3, 4, 2, 4, 1):  # two staging slots alternate under the graph
            x = tagged(float(batch), batch)
            out = executor.submit("head", {"x": x}, batch).result(5)["y"]
            np.testing.assert_allclose(out, reference(x), rtol=1e-6)
        assert len(set(session.replayed)) == 1  # every replay on the bound addresses
        assert graph.replays == 6 and graph.plain_runs == 0
        fixed_in = graph.fixed[("in", "x")].pointer
        # Each job's input went device to device into the graph's buffer, on the compute stream.
        into_graph = [e for e in backend.copies(compute) if e[2] == fixed_in]
        assert len(into_graph) == 6
        # The graph's buffers came once; the slots' buffers were the only ones added.
        assert len(backend.allocations) - allocated == 2 * 4  # 2 slots x (pinned, device) x (in, out)
    finally:
        executor.close()


def test_other_shapes_go_around_the_graph():
    executor, _, session = graph_executor(pad_batch=4)
    try:
        x = tagged(5.0, batch=6)  # above the pad: runs at 6 rows, not as the graph
        out = executor.submit("head", {"x": x}, 6).result(5)["y"]
        np.testing.assert_allclose(out, reference(x), rtol=1e-6)
        graph = executor.sessions["head"]
        assert (graph.replays, graph.plain_runs) == (0, 1)
        assert len(session.replayed) == CAPTURE_RUNS
    finally:
        executor.close()


def test_device_outputs_do_not_share_the_graphs_output_buffer():
    backend = FakeBackend()
    head, _, _ = graph_executor(backend, device_outputs={"y"})
    try:
        xa, xb = tagged(1.0, batch=3), tagged(2.0, batch=4)
        a = head.submit("head", {"x": xa}, 3).result(5)["y"]
        b = head.submit("head", {"x": xb}, 4).result(5)["y"]
        assert isinstance(a, DeviceTensor) and a.rows == 3 and a.shape == (4, 3)
        fixed_out = head.sessions["head"].fixed[("out", "y")].pointer
        assert a.view().pointer != fixed_out and b.view().pointer != fixed_out
        np.testing.assert_allclose(a.to_host(), reference(xa), rtol=1e-6)  # not overwritten by b
        np.testing.assert_allclose(b.to_host(), reference(xb), rtol=1e-6)
    finally:
        head.close()


def test_a_stage_with_free_dims_is_served_without_a_graph():
    backend = FakeBackend()
    session = GraphNumpySession(backend, dims=("batch", "width"))
    executor, _, _ = make_executor(backend, session=session, pad_batch=4, cuda_graph=True)
    try:
        assert executor.sessions["head"] is session
        assert "only the batch dimension" in executor.graph_refusals["head"]
        x = tagged(0.0, batch=2)
        np.testing.assert_allclose(executor.submit("head", {"x": x}, 2).result(5)["y"],
                                   reference(x), rtol=1e-6)
        assert session.replayed == []
    finally:
        executor.close()


def test_a_failed_capture_serves_the_stage_from_a_fresh_plain_session():
    backend = FakeBackend()
    broken, fresh = GraphNumpySession(backend), GraphNumpySession(backend)

    def run_fixed():
        raise RuntimeError("CUDA failure 900: operation not permitted when stream is capturing")

    broken.run_fixed = run_fixed
    sessions = iter([broken, fresh])
    executor = CudaExecutor({"head": Path("head.onnx")}, 0, 0, backend=backend, pad_batch=4,
                            cuda_graph=True,
                            session_factory=lambda stage, path, device, pointer: next(sessions))
    executor.start(timeout=5)
    try:
        assert executor.sessions["head"] is fresh
        assert "capture failed" in executor.graph_refusals["head"]
        x = tagged(0.0, batch=3)
        np.testing.assert_allclose(executor.submit("head", {"x": x}, 3).result(5)["y"],
                                   reference(x), rtol=1e-6)
    finally:
        executor.close()


def test_without_the_switch_nothing_is_captured():
    backend = FakeBackend()
    session = GraphNumpySession(backend)
    executor, _, _ = make_executor(backend, session=session, pad_batch=4)
    try:
        assert executor.sessions["head"] is session and session.bound is None
        executor.submit("head", {"x": tagged(0.0, 3)}, 3).result(5)
        assert session.replayed == []
    finally:
        executor.close()


# ---- on a GPU (scripts/gpu_check.sh) -----------------------------------------------------------


@pytest.mark.gpu
def test_gpu_cuda_graph_replays_and_matches_the_cpu_provider(gpu_models):  # noqa: F811
    executor = CudaExecutor({"whole": gpu_models["whole"]}, 0, 0, provider_options=EXACT,
                            pad_batch=8, cuda_graph=True)
    executor.start(timeout=120)
    try:
        graph = executor.sessions["whole"]
        assert isinstance(graph, CudaGraphSession), executor.graph_refusals
        options = graph.inner.provider_options()["CUDAExecutionProvider"]
        assert options["enable_cuda_graph"] == "1"
        for batch in (1, 3, 8, 5, 12, 8):  # 12: above the pad, around the graph
            x = RNG.standard_normal((batch, 16)).astype(np.float32)
            out = executor.submit("whole", {"x": x}, batch).result(60)["y"]
            np.testing.assert_allclose(out, cpu_reference(gpu_models["whole"], {"x": x})["y"],
                                       atol=1e-3, rtol=1e-3)
        assert (graph.replays, graph.plain_runs) == (5, 1)
    finally:
        executor.close()


@pytest.mark.gpu
def test_gpu_graph_head_feeds_a_graph_tail_on_the_device(gpu_models):  # noqa: F811
    def start(stage, stream, **kwargs):
        executor = CudaExecutor({stage: gpu_models[stage]}, 0, stream, provider_options=EXACT,
                                pad_batch=8, cuda_graph=True, **kwargs)
        executor.start(timeout=120)
        return executor

    head, tail = start("head", 0, device_outputs={"h"}), start("tail", 1)
    try:
        want = {}
        hidden = {}
        for batch in (8, 3):
            x = RNG.standard_normal((batch, 16)).astype(np.float32)
            want[batch] = cpu_reference(gpu_models["whole"], {"x": x})["y"]
            hidden[batch] = head.submit("head", {"x": x}, batch).result(60)["h"]
        for batch, tensor in hidden.items():  # the later replay did not overwrite the earlier
            y = tail.submit("tail", {"h": tensor}, batch).result(60)["y"]
            np.testing.assert_allclose(y, want[batch], atol=1e-3, rtol=1e-3)
        assert head.sessions["head"].replays == 2 and tail.sessions["tail"].replays == 2
    finally:
        head.close()
        tail.close()
