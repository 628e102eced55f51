"""The executor timeline: interval arithmetic, the overlap report, and spans from real executors."""

from __future__ import annotations

import json
import threading

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from handlers.executors.cpu import CpuExecutor
from handlers.hardware.topology import CoreGroup
from handlers.observability.tracing import (
    COMPUTE,
    HOST,
    TRANSFER,
    LanePrefix,
    Span,
    Timeline,
)
from handlers.runtime.flow import Runtime, StagePlan
from handlers.runtime.perf_model import PerfHistory
from hetserve.benchmarking.timeline_report import (
    chrome_trace,
    clip,
    intersection,
    length,
    merge,
    overlap_report,
)


def test_merge_joins_touching_and_nested_intervals_and_drops_empty_ones():
    assert merge([(3, 4), (0, 1), (1, 2), (0.5, 0.7), (5, 5)]) == [(0, 2), (3, 4)]
    assert length([(0, 2), (1, 3), (10, 11)]) == 4


def test_intersection_of_two_unions():
    a = [(0, 2), (5, 9)]
    b = [(1, 6), (8, 10)]
    assert intersection(a, b) == [(1, 2), (5, 6), (8, 9)]
    assert intersection(a, []) == []


def test_clip_cuts_spans_at_the_window():
    spans = [Span("l", COMPUTE, "head", 0.0, 2.0), Span("l", COMPUTE, "head", 3.0, 4.0)]
    assert [(s.start, s.end) for s in clip(spans, 1.0, 3.5)] == [(1.0, 2.0), (3.0, 3.5)]


def test_overlap_report_counts_hidden_transfer_and_concurrent_stages():
    spans = [
        Span("gpu/compute", COMPUTE, "head", 0.0, 4.0),
        Span("gpu/d2h", TRANSFER, "cuda:0->cpu", 3.0, 5.0, nbytes=100),  # 1 s of 2 under compute
        Span("cpu-g1", COMPUTE, "tail", 5.0, 8.0),
        Span("gpu/compute", COMPUTE, "head", 6.0, 10.0),  # head of the next batch beside the tail
        Span("gpu/host", HOST, "head", 0.0, 10.0),  # host spans are neither compute nor transfer
    ]
    report = overlap_report(spans)
    assert report["window_s"] == 10.0
    assert report["transfer_s"] == 2.0
    assert report["transfer_bytes"] == 100
    assert report["transfer_hidden_s"] == 1.0
    assert report["transfer_hidden_share"] == 0.5
    assert report["compute_s"] == 9.0  # union of [0,4], [5,8], [6,10]
    assert report["stages"] == {"head": 8.0, "tail": 3.0}
    assert report["stages_concurrent_s"] == 2.0
    assert report["lanes"]["gpu/compute"]["busy_share"] == 0.8
    assert report["lanes"]["gpu/host"]["kind"] == HOST
    assert report["runs"]["head@cpu"]["count"] == 2  # lane "gpu/compute" is not a CUDA executor's
    assert report["runs"]["tail@cpu"] == {"count": 1, "seconds": 3.0, "rows": 0, "bytes": 0}
    assert report["runs"]["cuda:0->cpu"]["bytes"] == 100


def test_runs_are_told_apart_by_device():
    spans = [
        Span("w1/cuda0s0/compute", COMPUTE, "head", 0.0, 0.002, batch=8),
        Span("w1/cuda0s0/compute", COMPUTE, "head", 1.0, 1.004, batch=8),
        Span("w1/cpu4-7", COMPUTE, "tail", 0.0, 0.010, batch=6),
    ]
    runs = overlap_report(spans)["runs"]
    assert runs["head@cuda"]["count"] == 2
    assert runs["head@cuda"]["seconds"] == pytest.approx(0.006)
    assert runs["tail@cpu"]["rows"] == 6


def test_overlap_report_over_a_window_and_when_empty():
    spans = [Span("a", COMPUTE, "head", 0.0, 10.0), Span("b", TRANSFER, "x", 8.0, 12.0)]
    report = overlap_report(spans, window=(5.0, 10.0))
    assert report["window_s"] == 5.0
    assert report["transfer_s"] == 2.0
    assert report["transfer_hidden_share"] == 1.0
    assert overlap_report([])["transfer_hidden_share"] is None


def test_chrome_trace_has_one_named_row_per_lane_in_microseconds():
    spans = [Span("b", COMPUTE, "tail", 1.5, 1.75, batch=4), Span("a", TRANSFER, "h2d", 1.0, 1.5)]
    trace = json.loads(json.dumps(chrome_trace(spans)))
    names = {e["tid"]: e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M"}
    assert sorted(names.values()) == ["a", "b"]
    events = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert [(names[e["tid"]], e["ts"], e["dur"]) for e in events] == [
        ("a", 0.0, 500000.0),
        ("b", 500000.0, 250000.0),
    ]
    assert events[1]["args"]["batch"] == 4


def test_timeline_keeps_the_newest_spans_and_counts_the_dropped():
    timeline = Timeline(capacity=3)
    threads = [
        threading.Thread(target=lambda i=i: timeline.record(Span(f"l{i}", COMPUTE, "s", i, i + 1)))
        for i in range(5)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(timeline.spans()) == 3
    assert timeline.dropped == 2
    timeline.clear()
    assert timeline.spans() == [] and timeline.dropped == 0
    with pytest.raises(ValueError, match="capacity"):
        Timeline(capacity=0)


def test_lane_prefix_keeps_workers_apart_in_one_timeline():
    timeline = Timeline()
    for worker in range(2):
        LanePrefix(timeline, f"w{worker}/").record(Span("cuda0s0/compute", COMPUTE, "head", 0, 1))
    assert sorted(s.lane for s in timeline.spans()) == ["w0/cuda0s0/compute", "w1/cuda0s0/compute"]
    assert overlap_report(timeline.spans())["stages"] == {"head": 1}


# ---- spans from real ONNX Runtime executors --------------------------------------------------


def _scale_model(path, factor: float, inp: str = "x", out: str = "y") -> None:
    graph = helper.make_graph(
        [helper.make_node("Mul", [inp, "k"], [out])], "scale",
        [helper.make_tensor_value_info(inp, TensorProto.FLOAT, ["b", 4])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["b", 4])],
        initializer=[numpy_helper.from_array(np.array(factor, np.float32), "k")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.save(model, path)


class PulledTensor:
    """A stage output held elsewhere (as a GPU's would be): the consumer must copy it in."""

    device = "cuda:0"

    def __init__(self, array: np.ndarray) -> None:
        self._array = array
        self.nbytes = array.nbytes

    def to_host(self) -> np.ndarray:
        return self._array.copy()


def test_cpu_executor_records_the_pull_and_the_run(tmp_path):
    _scale_model(tmp_path / "m.onnx", 2.0)
    executor = CpuExecutor(CoreGroup("cpu0", (0,), 0, 0), {"tail": tmp_path / "m.onnx"}, pin=False)
    executor.start(timeout=30)
    try:
        executor.submit("tail", {"x": np.ones((2, 4), np.float32)}, 2).result(10)  # not traced
        executor.timeline = timeline = Timeline()
        out = executor.submit("tail", {"x": PulledTensor(np.ones((3, 4), np.float32))}, 3).result(10)
        np.testing.assert_array_equal(out["y"], np.full((3, 4), 2.0, np.float32))
        pull, run = timeline.spans()
        assert (pull.kind, pull.name, pull.nbytes, pull.batch) == (TRANSFER, "cuda:0->cpu", 48, 3)
        assert (run.kind, run.name, run.lane, run.batch) == (COMPUTE, "tail", "cpu0", 3)
        assert pull.start <= pull.end <= run.start < run.end
    finally:
        executor.close()


def test_a_two_group_pipeline_runs_heads_beside_tails(tmp_path):
    _scale_model(tmp_path / "head.onnx", 2.0, "x", "h")
    _scale_model(tmp_path / "tail.onnx", 3.0, "h", "y")
    models = {"head": tmp_path / "head.onnx", "tail": tmp_path / "tail.onnx"}
    executors = [
        CpuExecutor(CoreGroup("cpu0", (0,), 0, 0), {"head": models["head"]}, pin=False),
        CpuExecutor(CoreGroup("cpu1", (0,), 0, 0), {"tail": models["tail"]}, pin=False),
    ]
    timeline = Timeline()
    for executor in executors:
        executor.timeline = timeline
        executor.start(timeout=30)
    plans = [StagePlan("head", ("x",), ("h",), ("cpu0",)), StagePlan("tail", ("h",), ("y",), ("cpu1",))]
    runtime = Runtime(plans, executors, PerfHistory(), ["y"], micro_batch=1).start()
    try:
        x = np.arange(24, dtype=np.float32).reshape(6, 4)
        np.testing.assert_array_equal(runtime.infer({"x": x})["y"], x * 6)
        spans = timeline.spans()
        assert sorted((s.lane, s.name) for s in spans) == [("cpu0", "head")] * 6 + [("cpu1", "tail")] * 6
        heads = sorted((s for s in spans if s.name == "head"), key=lambda s: s.start)
        tails = sorted((s for s in spans if s.name == "tail"), key=lambda s: s.start)
        # Micro-batch i's tail starts after its head ended; the report sees both stages.
        assert all(h.end <= t.start for h, t in zip(heads, tails, strict=True))
        report = overlap_report(spans)
        assert set(report["stages"]) == {"head", "tail"}
        assert report["transfer_s"] == 0.0
    finally:
        runtime.close()


# ---- the handler's phases around the executors' work -----------------------------------------


def test_the_service_records_decode_assemble_run_encode_around_the_stages(tiny_model_dir, tmp_path):
    from handlers.service import InferenceService, RawRequest

    yaml = {"hetserve": {"calibration_runs": 1, "state_dir": str(tmp_path), "ratio": 0.8,
                         "core_groups": "size:1"}}
    service = InferenceService.load(tiny_model_dir, yaml)
    timeline = Timeline()
    service.timeline = timeline
    for executor in service.runtime.executors.values():
        executor.timeline = timeline
    try:
        body = np.zeros((1, 3, 64, 64), np.float32).tobytes()
        good = RawRequest(body, "application/octet-stream", {"X-Tensor-Shape": "1,3,64,64"})
        bad = RawRequest(b"\x00" * 7, "application/octet-stream", {"X-Tensor-Shape": "1,3,64,64"})
        replies = service.handle([good, bad, good, good])
        assert [r.status for r in replies] == [200, 400, 200, 200]
        spans = timeline.spans()
        phases = [s for s in spans if s.lane == "handler"]
        assert [(s.name, s.batch) for s in phases] == [
            ("decode", 4), ("assemble", 3), ("run", 3), ("encode", 3)]
        assert all(a.end <= b.start for a, b in zip(phases, phases[1:], strict=False))
        run = phases[2]
        stages = [s for s in spans if s.kind == COMPUTE]
        assert {s.name for s in stages} == {"head", "tail"}
        assert all(run.start <= s.start and s.end <= run.end for s in stages)
        report = overlap_report(spans)
        assert report["host_phases"]["handler/run"]["count"] == 1
        assert report["host_phases"]["handler/decode"]["seconds"] > 0
    finally:
        service.close()
