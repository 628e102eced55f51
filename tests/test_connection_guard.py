"""The connection guard and the batching checks around it (issue 17, item 1). No TorchServe here:
tests/test_gather_loss.py kills a real worker mid-gather."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from handlers.connection_guard import (
    HOLD_MARGIN_S,
    ConnectionGuard,
    batching_problems,
    hold_seconds,
    socket_fds,
)
from partitioner.archive import model_config

REPO = Path(__file__).resolve().parent.parent


def _eof_after_kill(guarded: bool, hold_s: float) -> float:
    """Seconds between kill -9 of a 'worker' holding one end of a socket pair and EOF at ours."""
    ours, theirs = socket.socketpair()
    script = textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {str(REPO)!r})
        from handlers.connection_guard import ConnectionGuard
        if {guarded!r}:
            guard = ConnectionGuard.start({hold_s!r}, [{theirs.fileno()}])
            assert guard is not None
        print("ready", flush=True)
        time.sleep(60)
    """)
    worker = subprocess.Popen([sys.executable, "-c", script], pass_fds=[theirs.fileno()],
                              stdout=subprocess.PIPE, env={**os.environ, "HETSERVE_CONNECTION_GUARD": "1"})
    theirs.close()
    try:
        assert worker.stdout.readline().strip() == b"ready"
        assert worker.pid > 1
        os.kill(worker.pid, signal.SIGKILL)  # the child we started, by its own pid
        killed = time.monotonic()
        worker.wait(10)
        ours.settimeout(30)
        assert ours.recv(1) == b""  # EOF: every holder of the other end is gone
        return time.monotonic() - killed
    finally:
        ours.close()
        if worker.poll() is None:
            worker.kill()


def test_without_a_guard_the_connection_closes_with_the_worker():
    assert _eof_after_kill(False, 0.0) < 0.5


def test_the_guard_holds_the_connection_past_the_worker_death_then_lets_go():
    waited = _eof_after_kill(True, 1.5)
    assert 1.4 <= waited < 10, waited


def test_hold_covers_one_gather_and_a_margin():
    assert hold_seconds({"maxBatchDelay": 100}) == pytest.approx(0.1 + HOLD_MARGIN_S)
    assert hold_seconds({}) == pytest.approx(0.1 + HOLD_MARGIN_S)  # TorchServe's default 100 ms
    assert hold_seconds(None) == pytest.approx(0.1 + HOLD_MARGIN_S)
    assert hold_seconds({"maxBatchDelay": True}) == pytest.approx(0.1 + HOLD_MARGIN_S)


def test_socket_fds_lists_this_process_sockets():
    a, b = socket.socketpair()
    try:
        found = socket_fds()
        assert a.fileno() in found and b.fileno() in found
    finally:
        a.close()
        b.close()


def test_the_guard_can_be_disabled_for_measurements(monkeypatch):
    monkeypatch.setenv("HETSERVE_CONNECTION_GUARD", "0")
    assert ConnectionGuard.start(0.1, []) is None


def test_shipped_batching_is_quiet_risky_is_a_warning_and_an_answer_past_the_timeout_refused(capsys):
    assert batching_problems(model_config(None)) == ([], [])
    model_config(None, {"batchSize": 8, "maxBatchDelay": 100})
    assert "maxBatchDelay 100 ms" in capsys.readouterr().err
    warnings, errors = batching_problems({"batchSize": 8})  # TorchServe's default delay
    assert warnings and not errors
    assert batching_problems({"batchSize": 1, "maxBatchDelay": 500}) == ([], [])
    with pytest.raises(ValueError, match="past responseTimeout"):
        model_config(None, {"batchSize": 8, "maxBatchDelay": 60_000, "responseTimeout": 60})


def test_kserve_storage_defaults_max_batch_delay_to_the_shipped_5_ms():
    spec = importlib.util.spec_from_file_location("build_storage", REPO / "deploy/kserve/build_storage.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    entry = module.snapshot("m", {}, {"batchSize": 4})["models"]["m"]["1.0"]
    assert entry["maxBatchDelay"] == 5
