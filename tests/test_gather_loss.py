"""A worker killed while TorchServe gathers a batch: every request still gets one answer (issue 17, 1).

TorchServe 0.12 drops the requests its frontend is gathering when the worker's connection
closes (handlers/connection_guard.py explains). Each trial sends a request to an idle worker,
which opens a gather window, sends two more inside it and kills the worker 30 ms in. The model
here batches 8 requests for up to 1 s: the same bug as at the issue's 50-100 ms, with a window
wide enough that the kill lands inside it even on a loaded machine (at 100 ms, two runs on the
2-core build machine lost 3 of 9 and 0 of 9 without the guard: the kill sometimes came after the
gather). With the shipped connection guard all three get an answer (TorchServe's "500 Worker
died." after the hold); without it (HETSERVE_CONNECTION_GUARD=0, ``-m slow``) they are lost.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from hetserve.tsprocess import NotAWorkerError, checked_worker_pid, start_torchserve

pytestmark = pytest.mark.server

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("soak", REPO / "benchmarks" / "soak.py")
soak = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("soak", soak)
_spec.loader.exec_module(soak)

CLIENT_TIMEOUT_S = 25.0  # past responseTimeout (20 s): a request without an answer by then is lost
TRIALS = 3


@pytest.fixture(scope="module")
def archive(tmp_path_factory, tiny_variant) -> Path:
    store = tmp_path_factory.mktemp("gather-store")
    tiny_variant(store, "gather", {**soak.GATHERING, "maxBatchDelay": 1000, "hetserve": {
        "ratio": 0.5, "stage_timeout_s": 5, "state_dir": str(store / "state")}})
    return store


def _body(seed: int) -> tuple[bytes, dict[str, str]]:
    x = np.random.default_rng(seed).standard_normal((1, *soak.SAMPLE)).astype(np.float32)
    return x.tobytes(), {"X-Tensor-Shape": ",".join(map(str, x.shape))}


def kill_during_gather(server, trials: int) -> dict:
    return soak.kill_during_gather(server, "gather", trials, CLIENT_TIMEOUT_S)


def test_kill_during_gather_every_request_answered_with_the_guard(archive, tmp_path):
    server = start_torchserve(tmp_path / "ts", archive, {"gather": "gather.mar"})
    try:
        counts = kill_during_gather(server, TRIALS)
        print(f"\nkill during a 1 s gather, guard on: {counts}")
        assert counts["lost"] == 0 and counts["answered"] == counts["sent"] == 3 * TRIALS, counts
        # The guard delays the restart by one hold, no more: the model serves again.
        pid = soak._next_worker(server, "gather", None)
        body, headers = _body(7)
        assert server.predict("gather", body, "application/octet-stream", headers).status == 200
        assert pid > 1
    finally:
        server.stop()


@pytest.mark.slow
def test_kill_during_gather_without_the_guard_loses_requests(archive, tmp_path):
    """The frontend bug itself, measured: the guard off, the same trials lose requests."""
    server = start_torchserve(tmp_path / "ts", archive, {"gather": "gather.mar"},
                              env={"HETSERVE_CONNECTION_GUARD": "0"})
    try:
        counts = kill_during_gather(server, TRIALS)
        print(f"\nkill during a 1 s gather, guard off: {counts}")
        assert counts["lost"] == counts["sent"] == 3 * TRIALS, counts  # every gathered request
    finally:
        server.stop()


@pytest.mark.parametrize("pid", [-1, 0, 1, True, "123", None])
def test_a_pid_that_names_no_worker_is_never_signalled(pid):
    with pytest.raises(NotAWorkerError):
        checked_worker_pid(pid, [1234])


def test_a_live_process_that_is_not_the_servers_worker_is_refused():
    import os

    with pytest.raises(NotAWorkerError, match="not a model worker"):
        checked_worker_pid(os.getpid(), [os.getpid() + 1])
    assert checked_worker_pid(4321, [4321]) == 4321
