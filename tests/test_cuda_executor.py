"""CUDA executor: staging logic against an in-memory fake GPU here, the real thing under ``gpu``.

The fake backend performs every copy at once and logs it; the fake session computes with numpy
from the fake device buffers, optionally holding until a gate opens, so the tests can look at
what was issued while a job was still computing.
"""

from __future__ import annotations

import itertools
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest

from handlers.executors.base import ExecutorError, ExecutorLoadError, host_feeds
from handlers.executors.cuda import (
    CudaExecutor,
    DeviceTensor,
    OrtCudaSession,
    StagingQueue,
    StagingSlot,
    StagingTicket,
    cuda_available,
    cuda_unavailable_reason,
    is_out_of_memory,
)

RNG = np.random.default_rng(7)
W = RNG.standard_normal((4, 3)).astype(np.float32)
B = RNG.standard_normal(3).astype(np.float32)


def reference(x: np.ndarray) -> np.ndarray:
    return np.maximum(x @ W, 0) + B


def typed(buffer: np.ndarray, shape, dtype) -> np.ndarray:
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return buffer[:nbytes].view(dtype).reshape(shape)


class FakeStream:
    def __init__(self, name: str) -> None:
        self.name = name


class FakeEvent:
    def __init__(self, stream: FakeStream) -> None:
        self.stream = stream
        self.at = time.perf_counter()  # the fake GPU does everything when it is issued


class FakeBackend:
    """Device memory is numpy; copies happen when issued; every call is logged in order."""

    device = "cuda:0"

    def __init__(self) -> None:
        self.log: list[tuple] = []
        self.allocations: list[tuple[str, int]] = []
        self.fail_copies = 0  # fault injection: the next N copies raise a CUDA OOM
        self._streams = itertools.count()

    def new_stream(self) -> FakeStream:
        return FakeStream(f"stream{next(self._streams)}")

    def stream_pointer(self, stream: FakeStream) -> int:
        return id(stream)

    def alloc_pinned(self, nbytes: int) -> np.ndarray:
        self.allocations.append(("pinned", nbytes))
        return np.zeros(nbytes, np.uint8)

    def alloc_device(self, nbytes: int) -> np.ndarray:
        self.allocations.append(("device", nbytes))
        return np.zeros(nbytes, np.uint8)

    def pointer(self, buffer: np.ndarray) -> int:
        return buffer.ctypes.data

    def host_array(self, pinned, shape, dtype) -> np.ndarray:
        return typed(pinned, shape, dtype)

    def copy_async(self, dst, src, nbytes, stream) -> None:
        if self.fail_copies:
            self.fail_copies -= 1
            raise RuntimeError("CUDA error: out of memory")
        dst[:nbytes] = src[:nbytes]
        self.log.append(("copy", stream.name, dst.ctypes.data, bytes(src[:nbytes])))

    def record_event(self, stream) -> FakeEvent:
        return FakeEvent(stream)

    def wait_event(self, stream, event) -> None:
        self.log.append(("wait", stream.name, event.stream.name))

    def sync_event(self, event) -> None:
        pass

    def elapsed_s(self, start, end) -> float:
        return end.at - start.at

    def to_numpy(self, buffer, shape, dtype) -> np.ndarray:
        return typed(buffer, shape, dtype).copy()

    def keep_alive(self, buffer, stream) -> None:
        self.log.append(("keep_alive", stream.name))

    def release_cached(self) -> None:
        self.log.append(("release_cached",))

    def copies(self, stream: str) -> list[tuple]:
        return [e for e in self.log if e[0] == "copy" and e[1] == stream]


class NumpySession:
    """A stage ``y = fn(x)`` run on fake device buffers; the first element of x tags the job."""

    def __init__(self, backend: FakeBackend, fn=reference, width=3, inp="x", out="y") -> None:
        self.backend = backend
        self.fn = fn
        self.width = width
        self.input_names = (inp,)
        self.output_names = (out,)
        self.gate: threading.Event | None = None
        self.fail_runs: list[Exception] = []

    def output_spec(self, name, batch):
        return (batch, self.width), np.dtype(np.float32)

    def run(self, inputs, outputs):
        view = inputs[self.input_names[0]]
        x = typed(view.buffer, view.shape, view.dtype).copy()
        tag = float(x.flat[0])
        self.backend.log.append(("compute_start", tag))
        if self.gate is not None:
            assert self.gate.wait(5), "test gate never opened"
        if self.fail_runs:
            raise self.fail_runs.pop(0)
        y = self.fn(x)
        out = outputs[self.output_names[0]]
        typed(out.buffer, out.shape, out.dtype)[...] = y
        self.backend.log.append(("compute_end", tag))
        return {}


def make_executor(backend=None, stream_index=0, session=None, **kwargs):
    backend = backend or FakeBackend()
    session = session or NumpySession(backend)
    executor = CudaExecutor(
        {"head": Path("head.onnx")},
        0,
        stream_index,
        backend=backend,
        session_factory=lambda stage, path, device_id, pointer: session,
        **kwargs,
    )
    executor.start(timeout=5)
    return executor, backend, session


def tagged(tag: float, batch: int = 2) -> np.ndarray:
    x = RNG.standard_normal((batch, 4)).astype(np.float32)
    x.flat[0] = tag
    return x


def wait_for(predicate, timeout=5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.001)


def h2d_tags(backend: FakeBackend, stream: str) -> list[float]:
    return [float(np.frombuffer(e[3][:4], np.float32)[0]) for e in backend.copies(stream)]


# ---- without CUDA ----------------------------------------------------------------------------


def test_cuda_available_is_safe_and_false_without_a_gpu():
    assert isinstance(cuda_available(), bool)
    import torch

    if not torch.cuda.is_available():
        assert cuda_available() is False
        assert "CUDA" in cuda_unavailable_reason()


def test_cuda_available_without_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    assert cuda_available() is False
    assert "torch" in cuda_unavailable_reason()


@pytest.mark.skipif(cuda_available(), reason="CUDA is available here")
def test_constructor_says_why_without_cuda():
    with pytest.raises(ExecutorLoadError, match="CUDA is unavailable"):
        CudaExecutor({"head": Path("head.onnx")}, 0, 0)


@pytest.mark.skipif(cuda_available(), reason="CUDA is available here")
def test_ort_session_refuses_a_silent_cpu_fallback(tmp_path):
    path = tmp_path / "mlp.onnx"
    path.write_bytes(mlp_model(4, 8, 3).SerializeToString())
    # onnxruntime-gpu builds the session on the CPU when the CUDA libraries do not load.
    with pytest.raises(ExecutorLoadError, match="did not enable CUDAExecutionProvider"):
        OrtCudaSession(path, 0, 1)


def test_name_has_no_colon_and_device_is_cuda():
    executor, _, _ = make_executor(stream_index=1)
    try:
        assert executor.name == "cuda0s1"
        assert executor.device == "cuda:0"
        assert (executor.h2d_link, executor.d2h_link) == ("cpu->cuda:0", "cuda:0->cpu")
    finally:
        executor.close()


@pytest.mark.parametrize(
    "message, oom",
    [
        ("CUDA out of memory. Tried to allocate 2.00 GiB", True),
        ("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : CUDA failure 2: out of memory", True),
        ("Failed to allocate memory for requested buffer of size 67108864", True),
        ("CUBLAS failure 3: CUBLAS_STATUS_ALLOC_FAILED", True),
        # ORT 1.31's BFC arena at gpu_mem_limit, as raised on an H100
        ("bfc_arena.cc:360 Available memory of 7995136 is smaller than requested bytes of 67108864",
         True),
        ("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions", False),
    ],
)
def test_out_of_memory_is_recognised(message, oom):
    assert is_out_of_memory(RuntimeError(message)) is oom


def test_output_spec_fills_the_batch_dim_only():
    session = object.__new__(OrtCudaSession)
    session._batch_symbol = "batch"
    session._outputs = {
        "y": (["batch", 8], np.float32),
        "seq": (["batch", "tokens"], np.float32),
        "odd": (["batch", 8], None),
    }
    assert session.output_spec("y", 3) == ((3, 8), np.dtype(np.float32))
    assert session.output_spec("seq", 3) is None  # ORT allocates data-dependent shapes
    assert session.output_spec("odd", 3) is None


# ---- staging logic -----------------------------------------------------------------------------


def test_staging_queue_is_fifo_and_fences_reuse():
    staged, fences = [], []
    slots = [StagingSlot(i, FakeBackend()) for i in range(2)]
    queue = StagingQueue(slots, lambda t: staged.append((t.stage, t.slot.index)), fences.append)

    def ticket(name):
        return StagingTicket(name, 1, True, {}, {}, Future())

    t1, t2, t3, t4 = (ticket(n) for n in ("t1", "t2", "t3", "t4"))
    for t in (t1, t2, t3, t4):
        queue.admit(t)
    assert staged == [("t1", 0), ("t2", 1)] and queue.free_slots == 0
    queue.claim(t1)  # already staged: nothing to do
    queue.release(t1, "fence-1")
    assert staged[-1] == ("t3", 0) and fences == ["fence-1"]  # reuse waited for t1's fence
    assert t4.slot is None
    queue.release(t2, "fence-2")
    queue.release(t3, "fence-3")
    assert staged[-1] == ("t4", 1)
    queue.release(t4, "fence-4")
    assert queue.free_slots == 2


def test_outputs_are_correct_for_several_batches():
    executor, _, _ = make_executor()
    try:
        for batch in (1, 3, 8, 2, 8):
            x = RNG.standard_normal((batch, 4)).astype(np.float32)
            out = executor.submit("head", {"x": x}, batch).result(5)
            np.testing.assert_allclose(out["y"], reference(x), rtol=1e-6)
    finally:
        executor.close()


def test_buffers_grow_for_bigger_batches_and_are_reused_for_smaller():
    executor, backend, _ = make_executor(slots=1)
    try:

        def run(batch):
            executor.submit("head", {"x": tagged(0.0, batch)}, batch).result(5)
            return list(backend.allocations)

        after_64 = run(64)
        assert len(after_64) == 4  # pinned + device, for the input and for the output
        assert run(64) == after_64
        assert run(3) == after_64
        after_512 = run(512)
        assert len(after_512) == 8 and min(n for _, n in after_512[4:]) >= 512 * 3 * 4
        assert run(200) == after_512
    finally:
        executor.close()


def test_next_copy_is_issued_while_the_current_job_computes():
    executor, backend, session = make_executor()
    h2d = executor._h2d_stream.name
    session.gate = threading.Event()
    try:
        first = executor.submit("head", {"x": tagged(0.0)}, 2)
        wait_for(lambda: ("compute_start", 0.0) in backend.log)
        second = executor.submit("head", {"x": tagged(1.0)}, 2)
        # Job 1's copy went out at submit, while job 0 is still inside its run.
        assert h2d_tags(backend, h2d) == [0.0, 1.0]
        assert ("compute_end", 0.0) not in backend.log
        session.gate.set()
        first.result(5), second.result(5)
        # The compute stream waited for each copy on the GPU side.
        waits = [e for e in backend.log if e[0] == "wait" and e[2] == h2d]
        assert len(waits) == 2 and all(e[1] == executor.compute_stream.name for e in waits)
    finally:
        session.gate.set()
        executor.close()


def test_a_slot_is_never_restaged_before_its_compute_finished():
    executor, backend, session = make_executor(slots=2)
    h2d = executor._h2d_stream.name
    session.gate = threading.Event()
    try:
        inputs = [tagged(float(i), batch=2) for i in range(8)]
        futures = [executor.submit("head", {"x": x}, 2) for x in inputs]
        wait_for(lambda: ("compute_start", 0.0) in backend.log)
        assert h2d_tags(backend, h2d) == [0.0, 1.0]  # two slots, the others wait
        session.gate.set()
        for x, future in zip(inputs, futures, strict=True):
            np.testing.assert_allclose(future.result(5)["y"], reference(x), rtol=1e-6)
        assert h2d_tags(backend, h2d) == [float(i) for i in range(8)]  # FIFO
        # Each device buffer is written again only after the job that read it finished.
        last_reader: dict[int, float] = {}
        for entry in backend.log:
            if entry[0] == "copy" and entry[1] == h2d:
                tag = float(np.frombuffer(entry[3][:4], np.float32)[0])
                previous = last_reader.get(entry[2])
                if previous is not None:
                    assert ("compute_end", previous) in backend.log[: backend.log.index(entry)]
                last_reader[entry[2]] = tag
        assert executor.staging.free_slots == 2
    finally:
        session.gate.set()
        executor.close()


def test_cancelled_jobs_give_their_slots_back():
    executor, backend, session = make_executor(slots=2)
    session.gate = threading.Event()
    try:
        first = executor.submit("head", {"x": tagged(0.0)}, 2)
        wait_for(lambda: ("compute_start", 0.0) in backend.log)
        staged = executor.submit("head", {"x": tagged(1.0)}, 2)
        waiting = executor.submit("head", {"x": tagged(2.0)}, 2)
        assert staged.cancel() and waiting.cancel()
        session.gate.set()
        first.result(5)
        x = tagged(3.0)
        np.testing.assert_allclose(
            executor.submit("head", {"x": x}, 2).result(5)["y"], reference(x), rtol=1e-6
        )
        wait_for(lambda: executor.staging.free_slots == 2)
    finally:
        session.gate.set()
        executor.close()


# ---- failures ----------------------------------------------------------------------------------


def test_oom_on_copy_fails_only_that_job():
    executor, backend, _ = make_executor()
    try:
        backend.fail_copies = 1
        failed = executor.submit("head", {"x": tagged(0.0)}, 2)
        with pytest.raises(ExecutorError, match="out of memory") as info:
            failed.result(5)
        assert "cuda0s0" in str(info.value)
        assert ("release_cached",) in backend.log
        x = tagged(1.0)
        np.testing.assert_allclose(
            executor.submit("head", {"x": x}, 2).result(5)["y"], reference(x), rtol=1e-6
        )
        assert executor._thread.is_alive()
    finally:
        executor.close()


def test_oom_during_the_run_fails_only_that_job():
    executor, _, session = make_executor()
    try:
        session.fail_runs.append(
            RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : CUDA failure 2: out of memory")
        )
        with pytest.raises(ExecutorError, match="out of memory"):
            executor.submit("head", {"x": tagged(0.0)}, 2).result(5)
        session.fail_runs.append(ValueError("bad shape [1.5, 2.5]"))
        with pytest.raises(ExecutorError) as info:
            executor.submit("head", {"x": tagged(1.0)}, 2).result(5)
        assert "out of memory" not in str(info.value) and "1.5" not in str(info.value)
        x = tagged(2.0)
        np.testing.assert_allclose(
            executor.submit("head", {"x": x}, 2).result(5)["y"], reference(x), rtol=1e-6
        )
        assert executor.staging.free_slots == 2
    finally:
        executor.close()


def test_missing_input_is_refused_at_submit():
    executor, _, _ = make_executor()
    try:
        with pytest.raises(ExecutorError, match="missing input 'x'"):
            executor.submit("head", {"z": tagged(0.0)}, 2)
    finally:
        executor.close()


# ---- observations and device-resident outputs ------------------------------------------------


def test_transfers_and_runs_are_observed():
    transfers, runs = [], []
    executor, _, _ = make_executor(
        observer=lambda *a: runs.append(a), transfer_observer=lambda *a: transfers.append(a)
    )
    try:
        x = tagged(0.0, batch=5)
        executor.submit("head", {"x": x}, 5).result(5)
        executor.submit("head", {"x": x}, 5, observe=False).result(5)  # warm-up: not recorded
        assert [(link, n) for link, n, _ in transfers] == [
            ("cuda:0->cpu", 5 * 3 * 4),
            ("cpu->cuda:0", x.nbytes),
        ]
        assert all(s > 0 for _, _, s in transfers)
        assert [(stage, name, batch) for stage, name, batch, _ in runs] == [("head", "cuda0s0", 5)]
    finally:
        executor.close()


def test_device_outputs_feed_the_next_stream_without_copies():
    backend = FakeBackend()
    head, _, _ = make_executor(backend, 0, device_outputs={"y"})
    tail_session = NumpySession(backend, fn=lambda h: h * 2.0, width=3, inp="y", out="z")
    tail, _, _ = make_executor(backend, 1, session=tail_session)
    transfers = []
    try:
        x = tagged(0.0, batch=4)
        hidden = head.submit("head", {"x": x}, 4).result(5)["y"]
        assert isinstance(hidden, DeviceTensor) and hidden.device == "cuda:0"
        out = tail.submit("head", {"y": hidden}, 4).result(5)["z"]
        np.testing.assert_allclose(out, reference(x) * 2.0, rtol=1e-6)
        assert backend.copies(tail._h2d_stream.name) == []  # bound in place
        assert ("wait", tail.compute_stream.name, head.compute_stream.name) in backend.log
        # A CPU executor takes it through host_feeds, and the copy is observed.
        host = host_feeds({"y": hidden, "other": x}, lambda *a: transfers.append(a))
        np.testing.assert_allclose(host["y"], reference(x), rtol=1e-6)
        assert host["other"] is x
        assert [(link, n) for link, n, _ in transfers] == [("cuda:0->cpu", hidden.nbytes)]
    finally:
        head.close()
        tail.close()


def test_padded_runs_see_one_shape_and_return_only_the_real_rows():
    shapes = []

    class Recording(NumpySession):
        def run(self, inputs, outputs):
            view = inputs["x"]
            shapes.append(view.shape)
            # Padding rows are zeros, never another job's leftovers.
            assert not typed(view.buffer, view.shape, view.dtype)[rows:].any()
            return super().run(inputs, outputs)

    backend = FakeBackend()
    executor, _, _ = make_executor(backend, session=Recording(backend), pad_batch=8)
    try:
        for rows in (8, 3, 1, 8, 5):
            x = tagged(1.0 + rows, batch=rows)
            out = executor.submit("head", {"x": x}, rows).result(5)["y"]
            assert out.shape == (rows, 3)
            np.testing.assert_allclose(out, reference(x), rtol=1e-6)
        rows = 12  # more than the pad: runs as it is
        x = tagged(2.0, batch=rows)
        assert executor.submit("head", {"x": x}, rows).result(5)["y"].shape == (rows, 3)
        assert shapes == [(8, 4)] * 5 + [(12, 4)]
    finally:
        executor.close()


def test_padded_device_outputs_keep_their_real_row_count():
    backend = FakeBackend()
    head, _, _ = make_executor(backend, 0, device_outputs={"y"}, pad_batch=4)
    tail_session = NumpySession(backend, fn=lambda h: h * 2.0, width=3, inp="y", out="z")
    tail, _, _ = make_executor(backend, 1, session=tail_session, pad_batch=4)
    try:
        x = tagged(0.0, batch=3)
        hidden = head.submit("head", {"x": x}, 3).result(5)["y"]
        assert hidden.shape == (4, 3) and hidden.rows == 3
        assert hidden.nbytes == 3 * 3 * 4  # a copy to the host moves the real rows only
        np.testing.assert_allclose(hidden.to_host(), reference(x), rtol=1e-6)  # CPU tails: 3 rows
        out = tail.submit("head", {"y": hidden}, 3).result(5)["z"]  # a GPU tail binds all 4
        np.testing.assert_allclose(out, reference(x) * 2.0, rtol=1e-6)
    finally:
        head.close()
        tail.close()


def _lanes(timeline) -> dict[str, list]:
    lanes: dict[str, list] = {}
    for span in timeline.spans():
        lanes.setdefault(span.lane.split("/")[-1], []).append(span)
    return lanes


def test_a_timeline_gets_the_copies_the_run_and_the_host_thread():
    from handlers.observability.tracing import COMPUTE, HOST, TRANSFER, Timeline

    executor, _, _ = make_executor()
    executor.timeline = timeline = Timeline()
    try:
        x = tagged(0.0, batch=5)
        executor.submit("head", {"x": x}, 5, observe=False).result(5)  # warm-ups are traced too
        lanes = _lanes(timeline)
        assert sorted(lanes) == ["compute", "d2h", "h2d", "host", "pin"]
        (pin,), (h2d,), (run,), (d2h,), (host,) = (lanes[k] for k in ("pin", "h2d", "compute", "d2h", "host"))
        assert (h2d.kind, h2d.name, h2d.nbytes) == (TRANSFER, "cpu->cuda:0", x.nbytes)
        assert (d2h.kind, d2h.name, d2h.nbytes) == (TRANSFER, "cuda:0->cpu", 5 * 3 * 4)
        assert (run.kind, run.name, run.batch, host.kind) == (COMPUTE, "head", 5, HOST)
        assert all(s.lane.startswith("cuda0s0/") for s in timeline.spans())
        # Staged, copied in, computed, copied out: in that order on one clock.
        assert pin.end <= h2d.end <= run.start < run.end <= d2h.start <= d2h.end <= host.end
        assert host.start <= run.start
    finally:
        executor.close()


def test_tracing_costs_one_event_per_run():
    from handlers.observability.tracing import Timeline

    backend = FakeBackend()
    executor, _, _ = make_executor(backend)
    try:
        recorded = []
        original = backend.record_event
        backend.record_event = lambda stream: recorded.append(stream) or original(stream)
        executor.submit("head", {"x": tagged(0.0)}, 2).result(5)
        untraced = len(recorded)
        executor.timeline = Timeline()
        executor.submit("head", {"x": tagged(0.0)}, 2).result(5)
        assert len(recorded) - untraced == untraced + 1  # the compute span's start
    finally:
        executor.close()


# ---- on a GPU (scripts/gpu_check.sh) -----------------------------------------------------------


def mlp_model(d_in: int, d_hidden: int, d_out: int, seed: int = 0, split: str | None = None):
    """x[batch, d_in] -> MatMul -> Relu -> MatMul -> Add -> y; ``split`` = "head" or "tail"."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((d_in, d_hidden)) / np.sqrt(d_in)).astype(np.float32)
    w2 = (rng.standard_normal((d_hidden, d_out)) / np.sqrt(d_hidden)).astype(np.float32)
    b = rng.standard_normal(d_out).astype(np.float32)
    head = [
        helper.make_node("MatMul", ["x", "w1"], ["a"], name="mm1"),
        helper.make_node("Relu", ["a"], ["h"], name="relu"),
    ]
    tail = [
        helper.make_node("MatMul", ["h", "w2"], ["m"], name="mm2"),
        helper.make_node("Add", ["m", "b"], ["y"], name="add"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", d_in])
    h = helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", d_hidden])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", d_out])
    if split == "head":
        nodes, inputs, outputs, inits = head, [x], [h], [numpy_helper.from_array(w1, "w1")]
    elif split == "tail":
        nodes, inputs, outputs = tail, [h], [y]
        inits = [numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(b, "b")]
    else:
        nodes, inputs, outputs = head + tail, [x], [y]
        inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (w2, "w2"), (b, "b"))]
    graph = helper.make_graph(nodes, f"mlp_{split or 'whole'}", inputs, outputs, inits)
    # IR 8 / opset 17: loadable by every onnxruntime this project meets.
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture
def gpu_models(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    reason = cuda_unavailable_reason()
    if reason is not None:
        pytest.fail(f"a GPU is here but CUDA executors cannot run: {reason}")
    paths = {}
    for split in ("whole", "head", "tail"):
        paths[split] = tmp_path / f"{split}.onnx"
        model = mlp_model(16, 64, 8, split=None if split == "whole" else split)
        paths[split].write_bytes(model.SerializeToString())
    return paths


# TF32 matmuls would differ from the CPU by more than the 1e-3 these tests allow.
EXACT = {"use_tf32": "0"}


def cpu_reference(path: Path, feeds: dict) -> dict:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def gpu_executor(models, stream_index=0, **kwargs) -> CudaExecutor:
    executor = CudaExecutor(models, 0, stream_index, provider_options=EXACT, **kwargs)
    executor.start(timeout=120)
    return executor


@pytest.mark.gpu
def test_gpu_each_stream_has_its_own_cuda_sessions(gpu_models):
    models = {"head": gpu_models["head"], "tail": gpu_models["tail"]}
    executors = [gpu_executor(models, s) for s in range(2)]
    try:
        pointers = []
        for executor in executors:
            expected = executor.backend.stream_pointer(executor.compute_stream)
            pointers.append(expected)
            for session in executor.sessions.values():
                assert session.session.get_providers()[0] == "CUDAExecutionProvider"
                options = session.provider_options()["CUDAExecutionProvider"]
                assert int(options["user_compute_stream"], 0) == expected
                assert options.get("has_user_compute_stream", "1") == "1"
        assert len(set(pointers)) == 2 and 0 not in pointers
    finally:
        for executor in executors:
            executor.close()


@pytest.mark.gpu
def test_gpu_outputs_match_the_cpu_provider(gpu_models):
    transfers = []
    executor = gpu_executor(
        {"whole": gpu_models["whole"]}, transfer_observer=lambda *a: transfers.append(a)
    )
    try:
        for batch in (1, 3, 8):
            x = RNG.standard_normal((batch, 16)).astype(np.float32)
            out = executor.submit("whole", {"x": x}, batch).result(60)
            want = cpu_reference(gpu_models["whole"], {"x": x})
            np.testing.assert_allclose(out["y"], want["y"], atol=1e-3, rtol=1e-3)
        # Staged through pinned host buffers into device buffers (IO binding by pointer).
        pinned = [b for s in executor.slots for b, _ in s._host.values()]
        device = [b for s in executor.slots for b, _ in s._device.values()]
        assert pinned and all(b.is_pinned() for b in pinned)
        assert device and all(b.is_cuda for b in device)
        links = {link for link, _, _ in transfers}
        assert links == {"cpu->cuda:0", "cuda:0->cpu"}
    finally:
        executor.close()


@pytest.mark.gpu
def test_gpu_two_streams_run_interleaved_jobs_without_mixing_them(gpu_models):
    models = {"whole": gpu_models["whole"]}
    executors = [gpu_executor(models, s) for s in range(2)]
    try:
        jobs = []
        for i in range(40):
            batch = (1, 3, 8, 5)[i % 4]
            x = RNG.standard_normal((batch, 16)).astype(np.float32)
            jobs.append((x, executors[i % 2].submit("whole", {"x": x}, batch)))
        want = cpu_reference(gpu_models["whole"], {"x": np.concatenate([x for x, _ in jobs])})
        got = np.concatenate([f.result(60)["y"] for _, f in jobs])
        np.testing.assert_allclose(got, want["y"], atol=1e-3, rtol=1e-3)
    finally:
        for executor in executors:
            executor.close()


@pytest.mark.gpu
def test_gpu_head_output_stays_on_device_for_the_tail(gpu_models):
    head = gpu_executor({"head": gpu_models["head"]}, 0, device_outputs={"h"})
    tail = gpu_executor({"tail": gpu_models["tail"]}, 1)
    try:
        x = RNG.standard_normal((8, 16)).astype(np.float32)
        hidden = head.submit("head", {"x": x}, 8).result(60)["h"]
        assert isinstance(hidden, DeviceTensor)
        y = tail.submit("tail", {"h": hidden}, 8).result(60)["y"]
        want = cpu_reference(gpu_models["whole"], {"x": x})["y"]
        np.testing.assert_allclose(y, want, atol=1e-3, rtol=1e-3)
        on_cpu = cpu_reference(gpu_models["tail"], host_feeds({"h": hidden}))["y"]
        np.testing.assert_allclose(on_cpu, want, atol=1e-3, rtol=1e-3)
    finally:
        head.close()
        tail.close()


@pytest.mark.gpu
def test_gpu_out_of_memory_fails_the_job_and_the_executor_goes_on(tmp_path, gpu_models):
    path = tmp_path / "wide.onnx"
    path.write_bytes(mlp_model(16, 4096, 8).SerializeToString())
    # The arena may hold 8 MiB: batch 8 needs 128 KiB of activations, batch 4096 needs 64 MiB.
    executor = CudaExecutor(
        {"whole": path}, 0, 0, provider_options={**EXACT, "gpu_mem_limit": str(8 << 20)}
    )
    executor.start(timeout=120)
    try:
        big = np.ones((4096, 16), np.float32)
        with pytest.raises(ExecutorError, match="out of memory"):
            executor.submit("whole", {"x": big}, 4096).result(60)
        x = RNG.standard_normal((8, 16)).astype(np.float32)
        out = executor.submit("whole", {"x": x}, 8).result(60)
        np.testing.assert_allclose(out["y"], cpu_reference(path, {"x": x})["y"], atol=1e-3)
    finally:
        executor.close()


@pytest.mark.gpu
def test_gpu_padded_runs_match_the_cpu_provider(gpu_models):
    executor = gpu_executor({"whole": gpu_models["whole"]}, pad_batch=8)
    try:
        for batch in (1, 3, 8, 5):
            x = RNG.standard_normal((batch, 16)).astype(np.float32)
            out = executor.submit("whole", {"x": x}, batch).result(60)["y"]
            assert out.shape == (batch, 8)
            np.testing.assert_allclose(out, cpu_reference(gpu_models["whole"], {"x": x})["y"],
                                       atol=1e-3, rtol=1e-3)
    finally:
        executor.close()


@pytest.mark.gpu
def test_gpu_timeline_orders_copy_compute_copy_on_one_clock(gpu_models):
    from handlers.observability.tracing import Timeline
    from hetserve.benchmarking.timeline_report import overlap_report

    executor = gpu_executor({"whole": gpu_models["whole"]})
    executor.timeline = timeline = Timeline()
    try:
        x = RNG.standard_normal((64, 16)).astype(np.float32)
        futures = [executor.submit("whole", {"x": x}, 64) for _ in range(6)]
        for future in futures:
            future.result(60)
        lanes = _lanes(timeline)
        assert {k: len(v) for k, v in lanes.items() if k != "pin"} == {
            "h2d": 6, "compute": 6, "d2h": 6, "host": 6}
        for h2d, run, d2h in zip(lanes["h2d"], lanes["compute"], lanes["d2h"], strict=True):
            # Event timers tick every ~0.5 us: a tiny copy may read as 0 long, never negative.
            assert h2d.start <= h2d.end <= run.start + 1e-4
            assert run.start <= run.end <= d2h.start + 1e-4 and d2h.start <= d2h.end
        host = lanes["host"]
        # GPU spans lie inside the host's view of the same jobs (1 ms for clock mapping).
        assert lanes["compute"][0].start >= host[0].start - 1e-3
        assert lanes["d2h"][-1].end <= host[-1].end + 1e-3
        assert overlap_report(timeline.spans())["transfer_s"] > 0
    finally:
        executor.close()
