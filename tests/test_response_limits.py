"""Responses too large for TorchServe, and two TorchServes side by side (issue 17, items 6 and 9).

One archive (resnet18-tiny: 10 float32 logits, 40 bytes per sample raw), served with
TorchServe's max_response_size lowered to 1 KiB and the handler's limits.max_response_bytes set
to match. Before the fix, any answer over it was "500 Worker died." and a restart.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from handlers.artifact.manifest import TensorSpec
from handlers.protocol.response_size import archive_warnings, min_response_bytes
from hetserve.tsprocess import start_torchserve

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("soak", REPO / "benchmarks" / "soak.py")
soak = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("soak", soak)
_spec.loader.exec_module(soak)

LIMIT = 1024
SERVING = {"minWorkers": 1, "maxWorkers": 1, "batchSize": 4, "maxBatchDelay": 50, "responseTimeout": 60}


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_variant) -> Path:
    store = tmp_path_factory.mktemp("limits-store")
    tiny_variant(store, "small", {**SERVING, "hetserve": {
        "ratio": 0.5, "state_dir": str(store / "state"), "limits": {"max_response_bytes": LIMIT}}})
    return store


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    ts = start_torchserve(tmp_path_factory.mktemp("ts-a"), store, {"small": "small.mar"},
                          overrides={"max_response_size": str(LIMIT)})
    yield ts
    ts.stop()


def _raw(n: int, seed: int = 0) -> tuple[bytes, str, dict]:
    x = np.random.default_rng(seed).standard_normal((n, *soak.SAMPLE)).astype(np.float32)
    return x.tobytes(), "application/octet-stream", {"X-Tensor-Shape": ",".join(map(str, x.shape))}


def _json(n: int, seed: int = 0) -> tuple[bytes, str, dict]:
    x = np.random.default_rng(seed).standard_normal((n, *soak.SAMPLE)).astype(np.float32)
    return json.dumps(x.tolist()).encode(), "application/json", {}


def test_a_response_over_the_limit_is_a_413_its_neighbours_run_and_the_worker_lives(server):
    pid = soak.model_worker_pid(server, "small")
    jobs = [("big-raw", _raw(64, 1)), ("small-raw", _raw(1, 2)), ("big-json", _json(8, 3)),
            ("small-json", _json(1, 4)), ("small-raw-2", _raw(4, 5))]
    results: dict[str, object] = {}

    def send(name, job):
        resp = server.predict("small", *job)
        results[name] = (resp.status, resp.body)

    for _ in range(3):  # concurrent, so they share TorchServe batches
        threads = [threading.Thread(target=send, args=job) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        statuses = {k: v[0] for k, v in results.items()}
        assert statuses == {"big-raw": 413, "small-raw": 200, "big-json": 413, "small-json": 200,
                            "small-raw-2": 200}, results
        big = json.loads(results["big-raw"][1])
        assert "at least 2560 bytes" in big["message"] and "max_response_size" in big["message"]
        assert "max_response_size" in json.loads(results["big-json"][1])["message"]
    assert np.frombuffer(results["small-raw-2"][1], np.float32).shape == (40,)
    assert soak.model_worker_pid(server, "small") == pid, "no worker restart"


def test_two_instances_keep_sockets_and_unpacked_models_to_themselves(server, store, tmp_path_factory):
    other = start_torchserve(tmp_path_factory.mktemp("ts-b"), store, {"small": "small.mar"})
    try:
        seen = []
        for ts in (server, other):
            (pid,) = ts.worker_pids()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            sock = cmd[cmd.index(b"--sock-name") + 1].decode()
            cwd = Path(f"/proc/{pid}/cwd").resolve()
            own = (ts.workdir / "tmp").resolve()
            assert Path(sock).parent == own, (sock, own)
            assert own in cwd.parents, (cwd, own)  # the unpacked model
            seen.append((sock, cwd))
        assert seen[0][0] != seen[1][0] and seen[0][1] != seen[1][1]
        body = _raw(1, 9)
        assert other.predict("small", *body).body == server.predict("small", *body).body
    finally:
        other.stop()


def test_response_lower_bounds_and_archive_warning():
    logits = (TensorSpec("logits", "float32", (None, 50257)),)
    assert min_response_bytes(logits, "raw", 2) == 2 * 50257 * 4
    assert min_response_bytes(logits, "json", 1) == 50257 * 4
    two = (TensorSpec("a", "float32", (None, 10)), TensorSpec("b", "int64", (None, 2, None)))
    assert min_response_bytes(two, "npy", 1) == 16  # the smallest one tensor
    assert min_response_bytes(two, "kservev2", 1, ["a", "b"]) == 10 * 4 + 2 * 2
    gpt2 = (TensorSpec("logits", "float32", (None, 64, 50257)),)  # 12.9 MB per sample
    assert archive_warnings(gpt2, None) == []
    assert "413" in archive_warnings(gpt2, {"max_response_bytes": 8 * 2**20})[0]


def test_shipped_configs_make_the_handlers_limits_reachable():
    from handlers.protocol.validation import RequestLimits

    for path in (REPO / "config/config.properties", REPO / "deploy/kserve/config/config.properties"):
        props = dict(line.split("=", 1) for line in path.read_text().splitlines()
                     if "=" in line and not line.startswith("#"))
        assert int(props["max_request_size"]) > RequestLimits().max_body_bytes, path
        assert int(props["max_response_size"]) == RequestLimits().max_response_bytes, path
