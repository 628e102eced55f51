"""A real TorchServe on 127.0.0.1 (token auth on) serving hetserve archives over REST.

Every response is compared with the unsplit model run by ONNX Runtime in this process.
"""

from __future__ import annotations

import io
import json
import re
import threading
import zipfile

import numpy as np
import onnxruntime as ort
import pytest

pytestmark = pytest.mark.server

SAMPLE = (3, 64, 64)  # resnet18-tiny


@pytest.fixture(scope="module")
def server(shipped_server):
    """The session's TorchServe with the shipped config (conftest.shipped_server): "split" is the
    archive cut at 0.5 and 0.8 served at 0.8 with batching on (up to 4 requests per batch,
    waiting up to 200 ms for them to gather), "whole" the same archive serving the unsplit model."""
    return shipped_server


@pytest.fixture(scope="module")
def reference(tiny_mar, tmp_path_factory):
    """The unsplit model, straight from the archive, run by ORT."""
    out = tmp_path_factory.mktemp("unzipped")
    with zipfile.ZipFile(tiny_mar) as z:
        z.extractall(out)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"image": x})[0]


def batch(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *SAMPLE)).astype(np.float32)


def v2_body(x: np.ndarray, flat: bool = True) -> bytes:
    data = x.ravel().tolist() if flat else x.tolist()
    return json.dumps({"id": "req-7", "inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32", "data": data}]}).encode()


def npy_bytes(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    return buf.getvalue()


@pytest.mark.parametrize("model", ["split", "whole"])
def test_json_request_matches_the_unsplit_model(server, reference, model):
    x = batch(2, 1)
    resp = server.predict(model, json.dumps(x.tolist()).encode())
    assert resp.status == 200, resp.body
    got = np.asarray(resp.json()["outputs"]["logits"], dtype=np.float32)
    np.testing.assert_allclose(got, reference(x), atol=1e-4)


def test_json_sample_without_batch_dim_answers_without_one(server, reference):
    x = batch(1, 2)
    resp = server.predict("split", json.dumps({"image": x[0].tolist()}).encode())
    assert resp.status == 200, resp.body
    got = np.asarray(resp.json()["outputs"]["logits"], dtype=np.float32)
    assert got.shape == (10,)
    np.testing.assert_allclose(got, reference(x)[0], atol=1e-4)


def test_raw_tensor_bytes_round_trip(server, reference):
    x = batch(3, 3)
    resp = server.predict("split", x.tobytes(), "application/octet-stream", {"X-Tensor-Shape": "3,3,64,64"})
    assert resp.status == 200, resp.body
    assert resp.headers["content-type"] == "application/octet-stream"
    assert resp.headers["x-tensor-shape"] == "3,10"
    got = np.frombuffer(resp.body, dtype=np.float32).reshape(3, 10)
    np.testing.assert_allclose(got, reference(x), atol=1e-4)


def test_npy_round_trip(server, reference):
    x = batch(2, 4)
    resp = server.predict("split", npy_bytes(x), "application/x-npy")
    assert resp.status == 200, resp.body
    got = np.load(io.BytesIO(resp.body), allow_pickle=False)
    np.testing.assert_allclose(got, reference(x), atol=1e-4)


@pytest.mark.parametrize("flat", [True, False])
def test_kserve_v2_body_round_trip(server, reference, flat):
    x = batch(2, 5)
    resp = server.predict("split", v2_body(x, flat))
    assert resp.status == 200, resp.body
    body = resp.json()
    assert body["id"] == "req-7" and body["model_name"] == "split"
    (out,) = body["outputs"]
    assert out["name"] == "logits" and out["datatype"] == "FP32" and out["shape"] == [2, 10]
    np.testing.assert_allclose(np.asarray(out["data"], np.float32).reshape(2, 10), reference(x), atol=1e-4)


@pytest.mark.parametrize(("body", "content_type", "headers", "status", "message"), [
    (b"", "application/json", {}, 400, "empty"),
    (b"[[1, 2", "application/json", {}, 400, "invalid JSON"),
    (json.dumps(np.zeros((1, 3, 32, 64)).tolist()).encode(), "application/json", {}, 400, "expected shape"),
    (json.dumps({"pixels": np.zeros(SAMPLE).tolist()}).encode(), "application/json", {}, 400, "pixels"),
    (json.dumps([[[[float("nan")] * 64] * 64] * 3]).encode(), "application/json", {}, 400, "NaN"),
    (b"\x00" * 12, "application/octet-stream", {"X-Tensor-Shape": "1000,3,64,64"}, 400, "bytes"),
    (b"hello", "image/gif", {}, 415, "image/gif"),
])
def test_bad_requests_get_a_4xx_that_names_the_problem(server, body, content_type, headers, status, message):
    pids = server.worker_pids()
    resp = server.predict("split", body, content_type, headers)
    assert resp.status == status, resp.body
    assert message.lower() in resp.json()["message"].lower()
    assert "Traceback" not in resp.body.decode()
    assert server.worker_pids() == pids, "a bad request must not restart the worker"


def test_concurrent_clients_are_batched_and_bad_requests_fail_alone(server, reference):
    """8 clients at once, every fourth request malformed: only those fail, and batches form."""
    results: dict[int, tuple[int, bytes, dict]] = {}
    inputs = {i: batch(1, 100 + i) for i in range(32)}

    def client(worker: int) -> None:
        for k in range(4):
            i = worker * 4 + k
            if i % 4 == 3:
                body = json.dumps(np.zeros((1, 3, 8, 8)).tolist()).encode()
            else:
                body = inputs[i].tobytes()
            resp = server.predict("split", body, "application/json" if i % 4 == 3 else "application/octet-stream",
                                  {"X-Tensor-Shape": "1,3,64,64"})
            results[i] = (resp.status, resp.body, resp.headers)

    threads = [threading.Thread(target=client, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 32, "every request gets exactly one answer"
    batch_sizes = []
    for i, (status, body, headers) in results.items():
        if i % 4 == 3:
            assert status == 400 and b"expected shape" in body
        else:
            assert status == 200, body
            got = np.frombuffer(body, dtype=np.float32).reshape(1, 10)
            np.testing.assert_allclose(got, reference(inputs[i]), atol=1e-4)
            batch_sizes.append(int(headers["x-hetserve-batch"]))
    assert max(batch_sizes) > 1, "with 8 concurrent clients and batchSize 4, requests should share batches"


def test_requests_without_a_valid_token_are_refused(server):
    x = batch(1, 9).tobytes()
    for headers in ({}, {"Authorization": "Bearer not-the-key"}):
        resp = server.request("POST", "/predictions/split", x, {"Content-Type": "application/octet-stream", **headers}, token=False)
        assert resp.status in (400, 401, 403)
        assert b"Token" in resp.body


def test_model_registration_api_is_off(server):
    resp = server.request("POST", "/models?url=https://example.com/evil.mar", api="management")
    assert resp.status in (400, 403, 405)
    resp = server.request("DELETE", "/models/split", api="management")
    assert resp.status in (400, 403, 405)
    assert server.predict("split", batch(1, 1).tobytes(), "application/octet-stream").status == 200


def test_runtime_metrics_reach_prometheus(server):
    for model in ("split", "whole"):
        assert server.predict(model, batch(4, 11).tobytes(), "application/octet-stream").status == 200
    text = server.request("GET", "/metrics", api="metrics").body.decode()
    # Histograms: one observation per stage run, in seconds, with buckets to take quantiles over.
    # This module's models only: the shared server serves test_security's too.
    text = "\n".join(line for line in text.splitlines() if re.search(r'ModelName="(split|whole)"', line))
    stages = set(re.findall(r'HetserveStageRunSeconds_bucket\{[^}]*Stage="(\w+)"', text))
    assert {"head", "tail", "whole"} <= stages
    counts = re.findall(r'HetserveStageRunSeconds_count\{[^}]*\} ([\d.]+)', text)
    assert counts and all(float(v) >= 1 for v in counts)
    assert re.search(r'HetserveQueueWaitSeconds_bucket\{[^}]*le="\+Inf"', text)
    placements = re.findall(r'HetservePlacements\{[^}]*Executor="([\w-]+)"[^}]*\} ([\d.]+)', text)
    assert placements and all(float(v) > 0 for _, v in placements)
    assert "HetserveMicroBatches" in text
