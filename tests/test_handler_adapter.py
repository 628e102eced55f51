"""The TorchServe adapter (handlers/hetserve_handler.py) driven in process with TorchServe's own
``Context`` and metrics cache, as a worker would drive it: no server, the real service behind it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

ts_context = pytest.importorskip("ts.context")
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl  # noqa: E402
from ts.metrics.metric_type_enum import MetricTypes  # noqa: E402

from handlers.hetserve_handler import HetServeHandler  # noqa: E402
from handlers.observability.metrics import MICRO_BATCHES  # noqa: E402

SHAPE = "1,3,64,64"


def make_context(model_dir: Path, state_dir: Path, name: str = "tiny", **hetserve) -> ts_context.Context:
    config = yaml.safe_load((model_dir / "model-config.yaml").read_text()) or {}
    config["hetserve"] = {**(config.get("hetserve") or {}), "calibration_runs": 1,
                          "state_dir": str(state_dir), "core_groups": "size:1", **hetserve}
    metrics_yaml = Path(ts_context.__file__).parent / "configs" / "metrics.yaml"
    metrics = MetricsCacheYamlImpl(config_file_path=str(metrics_yaml))
    metrics.initialize_cache()
    return ts_context.Context(
        name, str(model_dir), {"model": {"modelVersion": "2.0"}}, 4, None, "0.12.0",
        metrics=metrics, model_yaml_config=config,
    )


def bind_batch(context, headers: list[dict]) -> None:
    """What TorchServe's service does before calling handle: one processor per request."""
    context.request_processor = [ts_context.RequestProcessor(h) for h in headers]
    context.request_ids = {i: f"req-{i}" for i in range(len(headers))}


@pytest.fixture(scope="module")
def handler_and_context(tiny_model_dir, tmp_path_factory):
    context = make_context(tiny_model_dir, tmp_path_factory.mktemp("state"), ratio=0.8)
    handler = HetServeHandler()
    handler.initialize(context)
    yield handler, context
    handler.close()


def test_a_batch_gets_one_answer_per_request_with_its_own_status_and_headers(handler_and_context):
    handler, context = handler_and_context
    good = np.ones((1, 3, 64, 64), np.float32).tobytes()
    raw = {"content-type": "application/octet-stream", "X-Tensor-Shape": SHAPE}
    headers = [raw, {"content-type": "application/json"}, raw]
    bind_batch(context, headers)
    data = [{"body": good}, {"body": b'{"x": [1, 2'}, {"body": good}]
    answers = handler.handle(data, context)
    assert len(answers) == 3
    assert [context.get_response_status(i)[0] for i in range(3)] == [200, 400, 200]
    assert context.get_response_content_type(0) == "application/octet-stream"
    assert context.get_response_headers(0)["X-Hetserve-Batch"] == "2"
    assert answers[0] == answers[2] and isinstance(answers[0], bytes)
    error = json.loads(answers[1])  # a compact JSON body, not TorchServe's pretty-printed dict
    assert error["code"] == 400 and "invalid JSON" in error["message"]
    assert " " not in answers[1].split('"message"')[0]
    # The runtime's statistics reach TorchServe's metrics cache after the batch.
    counter = context.metrics.get_metric(MICRO_BATCHES, MetricTypes.COUNTER)
    assert counter is not None


def test_a_batch_rewritten_by_a_request_envelope_is_refused_for_every_request(handler_and_context):
    handler, context = handler_and_context
    bind_batch(context, [{}, {}])
    with pytest.raises(Exception, match="envelope") as info:
        handler.handle([{"body": b"x"}], context)  # one item for two request ids: rewritten
    assert getattr(info.value, "error_code", 500) == 500


def test_a_load_failure_is_one_runtime_error_naming_the_model(tiny_model_dir, tmp_path):
    # A state_dir inside the model directory would be taken for a tampered file at the next start.
    context = make_context(tiny_model_dir, tiny_model_dir / "state")
    with pytest.raises(RuntimeError, match=r"could not load model tiny: .*inside the model directory"):
        HetServeHandler().initialize(context)


def test_with_a_recorder_attached_the_adapter_records_its_own_span_around_handle(handler_and_context):
    from handlers.observability.tracing import Timeline

    handler, context = handler_and_context
    timeline = Timeline()
    handler.service.trace_into(timeline)
    try:
        raw = {"content-type": "application/octet-stream", "X-Tensor-Shape": SHAPE}
        bind_batch(context, [raw, raw])
        body = np.ones((1, 3, 64, 64), np.float32).tobytes()
        handler.handle([{"body": body}, {"body": body}], context)
    finally:
        handler.service.trace_into(None)
    spans = timeline.spans()
    (adapter,) = [s for s in spans if s.lane == "adapter"]
    (handle,) = [s for s in spans if s.lane == "worker"]
    assert adapter.batch == handle.batch == 2
    assert adapter.start <= handle.start and handle.end <= adapter.end


def test_v2_answers_carry_the_name_the_model_is_served_under(tiny_model_dir, tmp_path):
    # The archive says "tiny"; an operator registered it as "renamed" (the v2 protocol's
    # model_name is the served model's).
    context = make_context(tiny_model_dir, tmp_path, name="renamed", ratio=1.0)
    handler = HetServeHandler()
    handler.initialize(context)
    try:
        assert handler.service.manifest.model_name == "tiny"
        spec = handler.service.manifest.inputs[0]
        body = json.dumps({"inputs": [{"name": spec.name, "shape": [1, 3, 64, 64], "datatype": "FP32",
                                       "data": [0.5] * (3 * 64 * 64)}]}).encode()
        bind_batch(context, [{"content-type": "application/json"}])
        answers = handler.handle([{"body": body}], context)
        assert context.get_response_status(0)[0] == 200
        answer = json.loads(answers[0])
        assert answer["model_name"] == "renamed" and answer["model_version"] == "2.0"
    finally:
        handler.close()


def test_close_stops_the_connection_guard_and_the_service(tiny_model_dir, tmp_path):
    handler = HetServeHandler()
    handler.initialize(make_context(tiny_model_dir, tmp_path, ratio=1.0))
    guard = handler.guard
    handler.close()
    assert handler.service is None and handler.guard is None and not handler.initialized
    assert guard is not None and guard.process.poll() is not None  # no guard left behind
