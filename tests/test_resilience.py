"""Runtime resilience on a real TorchServe over real HTTP (issue 5, items 3-6 and 9).

One server, three models built from one archive (``with_config`` variants), faults injected by
the handler's test-only hook (HETSERVE_ENABLE_FAULTS=1 in the workers' environment):

* ``faulty``: the second core group's tail fails 5% of its runs, runs out of memory every
  400th run and hangs once past the 2 s stage deadline; the first group covers every one of
  them, so each good request must still get a 200.
* ``oom``: the tail runs out of memory three times in a row, whichever group runs it.
* ``slow``: every head run takes 0.5 s (an injected hang that nobody cancels ends as a slow
  run), so a kill always lands mid-batch; its own performance-history directory.

The soak is the CI-sized run of ``benchmarks/soak.py`` (1,000 requests; the full 20,000 is the
benchmark, see benchmarks/README.md).
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from hetserve.tsprocess import start_torchserve

pytestmark = pytest.mark.server

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("soak", REPO / "benchmarks" / "soak.py")
soak = importlib.util.module_from_spec(_spec)
sys.modules["soak"] = soak  # dataclasses look their module up there
_spec.loader.exec_module(soak)

ACCEPTED_FAILURES = {500, 502, 503, 504, 507}


@pytest.fixture(scope="module")
def state(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("state")


@pytest.fixture(scope="module")
def executors() -> list[str]:
    names = soak.executor_names()
    assert len(names) >= 2, names
    return names


@pytest.fixture(scope="module")
def server(tmp_path_factory, state, executors, tiny_variant):
    # Variants of the session's shared archive (conftest.tiny_mar, cut at 0.5 and 0.8): only
    # model-config.yaml differs, so no export here.
    store = tmp_path_factory.mktemp("store")
    tiny_variant(store, "faulty", soak.faulty_config(state / "faulty", executors[-1]))
    tiny_variant(store, "oom", {**soak.SERVING, "hetserve": {
        "ratio": 0.5, "state_dir": str(state / "oom"),
        "faults": {"kind": "oom", "stage": "tail", "count": 3},
    }})
    tiny_variant(store, "slow", {**soak.SERVING, "hetserve": {
        "ratio": 0.5, "state_dir": str(state / "slow"),
        "faults": {"kind": "hang", "stage": "head", "hang_s": 0.5},
    }})
    ts = start_torchserve(tmp_path_factory.mktemp("ts"), store,
                          {"faulty": "faulty.mar", "oom": "oom.mar", "slow": "slow.mar"},
                          overrides={"job_queue_size": "32"}, env=soak.FAULTS_ENV)
    yield ts
    ts.stop()


def raw(x: np.ndarray) -> tuple[bytes, str, dict]:
    return x.tobytes(), "application/octet-stream", {"X-Tensor-Shape": ",".join(map(str, x.shape))}


def sample(seed: int, n: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *soak.SAMPLE)).astype(np.float32)


def wait_for(predicate, timeout: float, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return None


def model_lines(server, model: str, text: str) -> list[str]:
    # TorchServe names the worker's log thread after the model: W-9001-faulty_1.0-stdout.
    return [line for line in server.log_text().splitlines() if f"-{model}_" in line and text in line]


def test_a_hung_tail_is_cancelled_retried_quarantined_and_reprobed(server, executors):
    """The first tail on the faulty group hangs: its micro-batch misses the 2 s deadline, is
    retried on the other group (a 200, not a timeout), and the group comes back after a probe."""
    pid = soak.model_worker_pid(server, "faulty")
    statuses = []
    for i in range(40):
        resp = server.predict("faulty", *raw(sample(i, 2)))
        statuses.append(resp.status)
        assert resp.status == 200, resp.body
        if model_lines(server, "faulty", "stage deadline"):
            break
    # The quarantine is logged right after the deadline line; the frontend relays worker logs
    # line by line, so give it a moment on a busy machine.
    quarantined = wait_for(lambda: [
        line for line in model_lines(server, "faulty", f"executor {executors[-1]} quarantined")
        if "missed the 2 s stage deadline" in line
    ], 10) or model_lines(server, "faulty", f"executor {executors[-1]} quarantined")
    assert any("missed the 2 s stage deadline" in line for line in quarantined), quarantined
    assert wait_for(lambda: model_lines(server, "faulty", f"executor {executors[-1]} back in service"), 30)
    assert soak.model_worker_pid(server, "faulty") == pid, "the worker survived the hang"
    # The events reach Prometheus as counters (sent with the next batch's metrics).
    assert server.predict("faulty", *raw(sample(99, 2))).status == 200
    text = server.request("GET", "/metrics", api="metrics").body.decode()
    for name in ("HetserveStageTimeouts", "HetserveQuarantines", "HetserveRetries", "HetserveProbes"):
        values = re.findall(name + r'\{[^}]*ModelName="faulty"[^}]*\} ([\d.]+)', text)
        assert values and sum(float(v) for v in values) >= 1, f"{name} not exported"


@pytest.mark.parametrize("n", [1000, pytest.param(20_000, marks=pytest.mark.slow)])
def test_soak_mixed_requests_answered_once_with_flat_threads_fds_and_memory(server, n):
    """After the fault above: n mixed good and bad requests, faults on. CI runs 1,000; the
    20,000 of the issue is ``-m slow`` here, or benchmarks/soak.py for the committed table."""
    requests = soak.mixed_requests()
    soak.send_all(server, "faulty", requests, 150, id_prefix="warm")
    pid = soak.model_worker_pid(server, "faulty")
    before = soak.worker_stats(pid)
    with soak.PidWatch(server, "faulty") as watch:
        counts = soak.send_all(server, "faulty", requests, n)
    after = soak.worker_stats(pid)
    print(f"\nsoak {n}: {counts.seconds:.1f} s, worker {before} -> {after}")
    assert counts.lost == 0 and counts.answered == n
    assert counts.unexpected_total == 0, counts.unexpected
    assert watch.restarts == 0 and watch.pids == [pid]
    assert after["threads"] == before["threads"], (before, after)
    assert after["fds"] <= before["fds"] + 2, (before, after)
    assert after["rss_mb"] - before["rss_mb"] < 50, (before, after)
    kinds = {key.split(":")[0] for key in counts.statuses}
    assert {"good-npy", "good-json", "bad-nan", "bad-type"} <= kinds


def test_overload_every_request_gets_one_answer_and_service_recovers(server):
    """An open-loop burst at twice the measured capacity into a 32-deep job queue."""
    result = soak.overload(server, "faulty", burst_s=5.0, measure_s=3.0)
    print(f"\noverload: {json.dumps(result)}")
    assert result["burst_lost"] == 0, result
    assert set(result["burst_statuses"]) <= {"503", "504", "507"}, result
    assert result["burst_ok"] > 0
    assert result["after_completed"] == result["after_offered"] == result["after_ok"], result


def test_out_of_memory_is_a_507_with_a_reason_then_the_tail_falls_back(server):
    pid = soak.model_worker_pid(server, "oom")
    # Three injected OOMs: both groups fail the first request's tail, so it gets a 507 ...
    resp = server.predict("oom", *raw(sample(1)))
    assert resp.status == 507, resp.body
    assert "out of memory" in resp.json()["message"]
    # ... the next one's first try fails and its retry on the other group succeeds.
    for seed in (2, 3):
        resp = server.predict("oom", *raw(sample(seed)))
        assert resp.status == 200, resp.body
        assert np.frombuffer(resp.body, np.float32).shape == (10,)
    assert soak.model_worker_pid(server, "oom") == pid, "an OOM never takes the worker down"


def test_killed_worker_fails_in_flight_requests_restarts_and_keeps_its_history(server, state):
    old = soak.model_worker_pid(server, "slow")
    assert list((state / "slow").glob("*-perf.json")), "the first worker saved its history"
    results: list[int | str] = []
    stop = threading.Event()

    def client(seed: int) -> None:
        body, ctype, headers = raw(sample(seed))
        while not stop.is_set():
            try:
                results.append(server.predict("slow", body, ctype, headers).status)
            except OSError as exc:  # no answer at all: what must never happen
                results.append(repr(exc))

    threads = [threading.Thread(target=client, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    answered_before_kill = len(results)
    server.kill_worker(old)  # checks pid > 1 and that it is this server's worker
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join(timeout=90)
    assert not any(t.is_alive() for t in threads), "a request hung after the kill"
    print(f"\nkill -9: before {Counter(results[:answered_before_kill])}, "
          f"after {Counter(results[answered_before_kill:])}")
    assert all(isinstance(s, int) for s in results), results
    assert set(results) <= {200} | ACCEPTED_FAILURES, Counter(results)
    assert any(s != 200 for s in results[answered_before_kill:]), "in-flight requests got a 5xx"

    new = wait_for(lambda: (p := soak.model_worker_pid(server, "slow")) not in (None, old) and p, 120)
    assert new, "TorchServe restarted the worker"
    assert server.request("GET", "/ping").json()["status"] == "Healthy"
    assert server.predict("slow", *raw(sample(9))).status == 200
    loads = model_lines(server, "slow", "performance history has")
    print("\n".join(loads))
    assert len(loads) >= 2, loads
    first, last = (re.search(r"has (\d+) of (\d+)", line).groups() for line in (loads[0], loads[-1]))
    assert first[0] == "0", "the first worker started from an empty history"
    assert last[0] == last[1] != "0", "the restarted worker loaded every calibrated pair"
