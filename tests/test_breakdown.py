"""Issue 19's breakdown: spans written by a worker to a file, matched to a client's requests, and
the batch assembled once into the buffer the executors read."""

from __future__ import annotations

import json

import numpy as np
import pytest

from handlers.artifact.manifest import TensorSpec
from handlers.observability.tracing import (
    COMPUTE,
    HOST,
    TRACE_DIR_ENV,
    Span,
    SpanFile,
    read_span_file,
    span_file_from_env,
)
from handlers.protocol.codecs import decode_request
from handlers.protocol.validation import RequestLimits
from handlers.service import assemble_feeds
from hetserve.benchmarking.timeline_report import served_breakdown

# ---- served_breakdown on plain data ------------------------------------------------------------


def _batch(start: float, size: int) -> list[Span]:
    """One batch on one worker: handle [start, start+10]; decode 1, assemble 1, run 7, encode 1;
    head on g0 for 3, hand-over 1, tail on g1 for 2 (all in ms, stored as seconds)."""
    ms = 1e-3
    s = start
    return [
        Span("worker", HOST, "handle", s * ms, (s + 10) * ms, size),
        Span("handler", HOST, "decode", s * ms, (s + 1) * ms, size),
        Span("handler", HOST, "assemble", (s + 1) * ms, (s + 2) * ms, size),
        Span("handler", HOST, "run", (s + 2) * ms, (s + 9) * ms, size),
        Span("g0", COMPUTE, "head", (s + 2) * ms, (s + 5) * ms, size),
        Span("g1", COMPUTE, "tail", (s + 6) * ms, (s + 8) * ms, size),
        Span("handler", HOST, "encode", (s + 9) * ms, (s + 10) * ms, size),
    ]


def test_served_breakdown_averages_phases_per_batch_and_finds_the_hand_over_and_idle_time():
    spans = _batch(0, 2) + _batch(20, 2)  # two batches 20 ms apart in a 40 ms window
    report = served_breakdown(spans, [], (0.0, 0.040))
    assert report["batches"] == 2
    per_batch = report["per_batch"]
    assert per_batch["handle_ms"] == pytest.approx(10)
    assert per_batch["handler_decode_ms"] == pytest.approx(1)
    assert per_batch["handler_run_ms"] == pytest.approx(7)
    assert per_batch["requests_per_batch"] == 2
    # 7 ms of run, 5 of them computing: 2 ms of hand-over and waiting per batch.
    assert per_batch["run_not_compute_ms"] == pytest.approx(2)
    assert report["stages"]["head@g0"]["mean_run_ms"] == pytest.approx(3)
    assert report["stages"]["tail@g1"]["runs_per_batch"] == 1
    # g0 computes 3 of every 20 ms: 17 ms idle per batch; the worker waits 10 between batches.
    assert report["idle"]["g0"]["idle_ms_per_batch"] == pytest.approx(17)
    assert report["idle"]["g1"]["idle_share"] == pytest.approx(1 - 4 / 40)
    assert report["idle"]["worker"]["idle_ms_per_batch"] == pytest.approx(10)


def test_the_adapters_time_outside_handle_is_reported_per_batch():
    ms = 1e-3
    spans = _batch(0, 2) + [Span("adapter", HOST, "adapter", -0.5 * ms, 11 * ms, 2)]
    report = served_breakdown(spans, [], (-1 * ms, 0.020))
    assert report["per_batch"]["adapter_outside_handle_ms"] == pytest.approx(1.5)
    assert "adapter_outside_handle_ms" not in served_breakdown(_batch(0, 2), [], (0.0, 0.02))["per_batch"]


def test_requests_are_matched_to_the_batch_that_started_after_their_send_and_ended_before_the_answer():
    spans = _batch(0, 2) + _batch(20, 2)
    ms = 1e-3
    requests = [
        (-3 * ms, 12 * ms),  # sent before batch 1, answered after it: 3 ms in, 2 ms out
        (-1 * ms, 11 * ms),  # 1 ms in, 1 ms out
        (5 * ms, 33 * ms),  # sent while batch 1 ran: batch 2 answered it, 15 in, 3 out
        (15 * ms, 31 * ms),  # 5 in, 1 out
        (25 * ms, 38 * ms),  # sent during batch 2, answered before any later batch: unmatched
    ]
    report = served_breakdown(spans, requests, (-5 * ms, 40 * ms))["per_request"]
    assert report["requests"] == 5
    assert report["matched"] == 4
    assert report["unmatched"] == 1
    assert report["send_to_handle_start_ms"] == pytest.approx((3 + 1 + 15 + 5) / 4)
    assert report["handle_end_to_receive_ms"] == pytest.approx((2 + 1 + 3 + 1) / 4)
    assert report["client_latency_ms"] == pytest.approx((15 + 12 + 28 + 16 + 13) / 5)


def test_several_workers_lanes_are_kept_apart_for_the_hand_over():
    ms = 1e-3
    spans = [Span("w0/" + s.lane, s.kind, s.name, s.start, s.end, s.batch) for s in _batch(0, 1)]
    # Another worker computing during w0's hand-over gap must not hide it.
    spans.append(Span("w1/g0", COMPUTE, "head", 5 * ms, 6 * ms, 1))
    report = served_breakdown(spans, [], (0.0, 0.020))
    assert report["per_batch"]["run_not_compute_ms"] == pytest.approx(2)
    assert report["batches"] == 1


def test_an_empty_window_reports_nothing_rather_than_dividing_by_zero():
    report = served_breakdown([], [(0.0, 1.0)], (5.0, 6.0))
    assert report["batches"] == 0
    assert report["per_request"]["requests"] == 0
    assert report["per_batch"]["run_not_compute_ms"] is None


# ---- the span file a worker writes ---------------------------------------------------------------


def test_span_file_is_off_unless_the_variable_names_an_existing_directory(tmp_path):
    assert span_file_from_env({}) is None
    assert span_file_from_env({TRACE_DIR_ENV: "  "}) is None
    with pytest.raises(ValueError, match=TRACE_DIR_ENV):
        span_file_from_env({TRACE_DIR_ENV: str(tmp_path / "missing")})
    spans = span_file_from_env({TRACE_DIR_ENV: str(tmp_path)})
    assert spans is not None and spans.path.parent == tmp_path
    spans.close()


def test_span_file_round_trips_spans_and_skips_a_line_cut_short(tmp_path):
    path = tmp_path / "spans.jsonl"
    recorder = SpanFile(path)
    written = [Span("g0", COMPUTE, "head", 1.0, 1.5, 4, 0), Span("handler", HOST, "decode", 0.5, 0.6, 4)]
    for span in written:
        recorder.record(span)
    recorder.flush()
    assert list(read_span_file(path)) == written  # readable before close: flushed
    recorder.close()
    recorder.record(written[0])  # after close: dropped, not an error
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"lane": "g0", "kind": COMPUTE})[:20])  # a killed writer's last line
    assert list(read_span_file(path)) == written


def test_a_service_loaded_with_the_variable_writes_each_batch_and_its_stages(tiny_model_dir, tmp_path, monkeypatch):
    from handlers.service import InferenceService, RawRequest

    monkeypatch.setenv(TRACE_DIR_ENV, str(tmp_path))
    yaml = {"hetserve": {"calibration_runs": 1, "state_dir": str(tmp_path), "ratio": 0.8,
                         "core_groups": "size:1"}}
    service = InferenceService.load(tiny_model_dir, yaml)
    try:
        body = np.zeros((1, 3, 64, 64), np.float32).tobytes()
        request = RawRequest(body, "application/octet-stream", {"X-Tensor-Shape": "1,3,64,64"})
        assert [r.status for r in service.handle([request, request])] == [200, 200]
        (path,) = tmp_path.glob("spans-*.jsonl")
        spans = list(read_span_file(path))  # flushed at the end of the batch, not at close
    finally:
        service.close()
    handles = [s for s in spans if s.lane == "worker"]
    assert [(s.name, s.batch) for s in handles] == [("handle", 2)]
    phases = [s.name for s in spans if s.lane == "handler"]
    assert phases == ["decode", "assemble", "run", "encode"]
    stages = [s for s in spans if s.kind == COMPUTE]
    assert {s.name for s in stages} == {"head", "tail"}
    assert all(handles[0].start <= s.start and s.end <= handles[0].end for s in spans if s is not handles[0])


# ---- the batch assembled once ------------------------------------------------------------------------

SPEC = TensorSpec("x", "float32", (None, 3, 4, 4))


def _decoded(rows: int, seed: int):
    body = bytearray(np.random.default_rng(seed).standard_normal((rows, 3, 4, 4), dtype=np.float32).tobytes())
    decoded = decode_request(body, "application/octet-stream", {"X-Tensor-Shape": f"{rows},3,4,4"}, [SPEC],
                             RequestLimits())
    return body, decoded


def test_a_lone_request_is_fed_as_a_view_of_its_body():
    body, decoded = _decoded(2, 0)
    feeds = assemble_feeds([(0, decoded)], [SPEC])
    assert np.shares_memory(feeds["x"], np.frombuffer(body, np.float32))  # decode copied nothing either


def test_several_requests_are_written_into_one_buffer_in_request_order():
    parts = [_decoded(rows, seed) for rows, seed in ((1, 1), (3, 2), (2, 3))]
    feeds = assemble_feeds([(i, d) for i, (_, d) in enumerate(parts)], [SPEC])
    expected = np.concatenate([d.arrays["x"] for _, d in parts])
    assert feeds["x"].shape == (6, 3, 4, 4) and feeds["x"].flags.c_contiguous
    np.testing.assert_array_equal(feeds["x"], expected)
    assert not any(np.shares_memory(feeds["x"], np.frombuffer(b, np.float32)) for b, _ in parts)


def test_with_several_workers_each_lanes_idle_time_is_per_batch_of_its_own_worker():
    def on(worker: str, spans: list[Span]) -> list[Span]:
        return [Span(f"{worker}/{s.lane}", s.kind, s.name, s.start, s.end, s.batch) for s in spans]

    # w0 serves two batches in the 40 ms window, w1 one: w1's lanes are idle 30 ms for its one batch.
    spans = on("w0", _batch(0, 4) + _batch(20, 4)) + on("w1", _batch(5, 2))
    report = served_breakdown(spans, [], (0.0, 0.040))
    assert report["batches"] == 3
    assert report["workers"]["w0"] == {"batches": 2, "handle_ms": pytest.approx(10), "requests_per_batch": 4}
    assert report["workers"]["w1"]["batches"] == 1 and report["workers"]["w1"]["requests_per_batch"] == 2
    assert report["idle"]["w0/worker"]["idle_ms_per_batch"] == pytest.approx(10)
    assert report["idle"]["w1/worker"]["idle_ms_per_batch"] == pytest.approx(30)
    assert report["idle"]["w1/g0"]["idle_ms_per_batch"] == pytest.approx(37)
    assert report["idle"]["w0/g1"]["idle_share"] == pytest.approx(1 - 4 / 40)


def test_a_single_workers_unprefixed_lanes_are_reported_as_one_worker():
    report = served_breakdown(_batch(0, 2) + _batch(20, 2), [], (0.0, 0.040))
    assert list(report["workers"]) == ["worker"]
    assert report["workers"]["worker"]["batches"] == 2


# ---- served against the in-process ceiling ---------------------------------------------------------


def _breakdown_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "breakdown.py"
    spec = importlib.util.spec_from_file_location("breakdown", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_served_is_compared_with_the_best_layout_each_layout_and_the_cores_the_client_left():
    versus_ceiling = _breakdown_module().versus_ceiling
    ceiling = {"threads": 2, "batch": 4, "samples_per_s": 50.0, "layout": "session_per_core",
               "layouts": {"one_session_all_cores": {"samples_per_s": 40.0},
                           "session_per_core": {"samples_per_s": 50.0}}}
    # The load generator used 10% of one core of two: 95% of the ceiling was left to the server.
    out = versus_ceiling(45.0, ceiling, load_generator_pct=10.0)
    assert out["served_vs_ceiling"] == pytest.approx(0.9)
    assert out["ceiling_layout"] == "session_per_core"
    assert out["served_vs_layout"] == {"one_session_all_cores": pytest.approx(1.125),
                                       "session_per_core": pytest.approx(0.9)}
    assert out["ceiling_less_load_generator"] == pytest.approx(47.5)
    assert out["served_vs_ceiling_less_load_generator"] == pytest.approx(45 / 47.5, abs=1e-3)
