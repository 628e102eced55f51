"""The load generator against a real HTTP server on 127.0.0.1 (no mocks), plus its pure parts."""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import pairwise
from pathlib import Path

import pytest

from hetserve.loadgen import (
    LoadResult,
    ProtocolError,
    Record,
    Target,
    arrival_offsets,
    parse_response_head,
    run_closed_loop,
    run_closed_loop_recorded,
    run_open_loop,
    summarize,
)

REPO = Path(__file__).resolve().parent.parent


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like TorchServe
    disable_nagle_algorithm = True  # else head and body writes meet delayed ACKs: +40 ms

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        srv: _Server = self.server
        body = self.rfile.read(int(self.headers["Content-Length"]))
        srv.last_headers = dict(self.headers)
        srv.enter()
        try:
            srv.maybe_stall()
            with srv.workers:
                if srv.delay:
                    time.sleep(srv.delay)
            if self.path == "/garbage":
                self.wfile.write(b"NOT HTTP AT ALL\r\n\r\n")
                self.close_connection = True
                return
            if self.path == "/chunked":
                self.wfile.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                 b"3\r\nabc\r\n10;ext=1\r\n" + b"y" * 16 + b"\r\n0\r\nX-Trailer: 1\r\n\r\n")
                return
            if self.path == "/until-close":  # no length: the body ends when the server hangs up
                self.wfile.write(b"HTTP/1.1 200 OK\r\n\r\n" + b"z" * 5000)
                self.close_connection = True
                return
            # a three-digit body asks for that status: lets one run mix good and bad requests
            status = int(body) if len(body) == 3 and body.isdigit() else 200
            self.send_response(status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")
        finally:
            srv.leave()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default 5 drops SYNs when the pool opens at once: +1 s

    def __init__(self, delay: float = 0.0, stall_at: float | None = None, stall_s: float = 1.0,
                 workers: int = 1000) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.delay, self.stall_at, self.stall_s = delay, stall_at, stall_s
        self.workers = threading.BoundedSemaphore(workers)  # service slots: a finite capacity
        self.lock = threading.Lock()
        self.active = self.max_active = self.requests = 0
        self.stalled = False
        self.last_headers: dict[str, str] = {}

    def handle_error(self, request, client_address) -> None:
        # a client that timed out and hung up is expected here; anything else is a real failure
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def enter(self) -> None:
        with self.lock:
            self.active += 1
            self.requests += 1
            self.max_active = max(self.max_active, self.active)

    def leave(self) -> None:
        with self.lock:
            self.active -= 1

    def maybe_stall(self) -> None:
        with self.lock:
            stall = self.stall_at is not None and not self.stalled and time.monotonic() >= self.stall_at
            self.stalled |= stall
        if stall:
            time.sleep(self.stall_s)


@contextlib.contextmanager
def serving(**options):
    server = _Server(**options)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------------------- pure parts


def test_constant_schedule_is_evenly_spaced():
    offsets = arrival_offsets(50, 2.0)
    assert len(offsets) == 100
    assert offsets[0] == 0.0 and offsets[-1] == pytest.approx(1.98)
    assert max(b - a for a, b in pairwise(offsets)) == pytest.approx(0.02)


def test_poisson_schedule_has_exponential_gaps():
    offsets = arrival_offsets(100, 500.0, "poisson", seed=7)
    gaps = [b - a for a, b in pairwise(offsets)]
    mean = statistics.fmean(gaps)
    assert len(offsets) == pytest.approx(50_000, rel=0.02)
    assert mean == pytest.approx(0.01, rel=0.02)
    assert statistics.pstdev(gaps) / mean == pytest.approx(1.0, abs=0.03)  # CV of an exponential
    assert sum(g > mean for g in gaps) / len(gaps) == pytest.approx(math.exp(-1), abs=0.01)
    assert offsets == arrival_offsets(100, 500.0, "poisson", seed=7)
    assert offsets != arrival_offsets(100, 500.0, "poisson", seed=8)
    assert all(0 < t < 500.0 for t in offsets)


def test_schedule_rejects_nonsense():
    for bad in ((0, 1.0, "constant"), (10, -1.0, "constant"), (10, 1.0, "bursty")):
        with pytest.raises(ValueError):
            arrival_offsets(*bad)


def test_parse_response_head():
    assert parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n") == (200, 12, False, True)
    assert parse_response_head(b"HTTP/1.1 503 X\r\ntransfer-encoding: chunked\r\nConnection: close\r\n\r\n") == (503, None, True, False)
    assert parse_response_head(b"HTTP/1.0 200 OK\r\n\r\n") == (200, None, False, False)
    assert parse_response_head(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n")[3]
    assert parse_response_head(b"HTTP/1.1 204 No Content\r\n\r\n") == (204, 0, False, True)
    for bad in (b"NOT HTTP\r\n\r\n", b"HTTP/1.1 abc\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n"):
        with pytest.raises(ProtocolError):
            parse_response_head(bad)


def test_summarize_windows_latency_by_intent_and_throughput_by_arrival():
    records = [
        Record(0.5, 0.5, 0.6, 200),  # warm-up: not in latency stats, arrives before the window
        Record(0.9, 0.9, 1.2, 200),  # warm-up request arriving inside the window: counts as throughput
        Record(1.0, 1.0, 1.1, 200),
        Record(1.5, 1.9, 2.0, 200),  # sent 400 ms late: latency 500 ms from intent
        Record(2.0, 2.0, 2.2, 503),
        Record(2.5, None, 3.5, "timeout"),  # intended inside, resolved after the window
    ]
    r = summarize(records, 1.0, 3.0, mode="open", target_rate=2.0, cpu_s=0.1, cpu_wall_s=2.0)
    assert (r.offered, r.sent, r.completed, r.ok) == (4, 3, 3, 2)
    assert r.throughput_rps == pytest.approx(4 / 2.0) and r.goodput_rps == pytest.approx(3 / 2.0)
    assert r.errors == {"503": 1, "timeout": 1} and r.error_rate == pytest.approx(0.5)
    assert r.latency_ms.count == 2 and r.latency_ms.max == pytest.approx(500)
    assert r.latency_all_ms.max == pytest.approx(1000)
    assert r.send_lag_max_ms == pytest.approx(400)
    assert r.cpu_pct == pytest.approx(5.0)
    assert LoadResult.from_json(r.to_json()) == r


def test_target_refuses_header_injection_and_builds_requests():
    with pytest.raises(ValueError):
        Target.create("http://127.0.0.1:1/p", b"x", {"X-A": "1\r\nX-B: 2"})
    with pytest.raises(ValueError):
        Target.create("https://127.0.0.1:1/p", b"x")
    t = Target.create("http://127.0.0.1:9/predictions/m", [b"ab", b"cde"], {"Authorization": "Bearer k"})
    first, second = t.request_bytes()
    assert first.startswith(b"POST /predictions/m HTTP/1.1\r\n") and first.endswith(b"\r\n\r\nab")
    assert b"Content-Length: 3\r\n" in second and b"Authorization: Bearer k\r\n" in second


# ---------------------------------------------------------------------------- against a server


def test_open_loop_hits_the_rate_and_grows_the_pool():
    with serving(delay=0.02) as srv:
        r = run_open_loop(Target.create(srv.base + "/predictions/m", b"x" * 1000), 100, 2.0,
                          warmup=0.3, connections=1)
    assert r.offered == 200 and r.errors == {}
    assert r.throughput_rps == pytest.approx(100, rel=0.05)
    assert 20 <= r.latency_ms.p50 < 40 and r.latency_ms.p99 < 100
    assert 2 <= r.peak_connections <= 8  # ~100/s x 20 ms in flight, started from one
    assert r.send_lag_p99_ms < 20


def test_closed_loop_keeps_exactly_n_in_flight():
    with serving(delay=0.05) as srv:
        r = run_closed_loop(Target.create(srv.base + "/predictions/m", b"x"), 4, 2.0, warmup=0.3)
        assert srv.max_active == 4
    assert r.errors == {} and r.peak_connections == 4
    assert r.throughput_rps == pytest.approx(4 / 0.05, rel=0.15)
    assert 50 <= r.latency_ms.p50 < 70


def test_errors_are_counted_by_status_with_round_robin_bodies():
    with serving() as srv:
        r = run_open_loop(Target.create(srv.base + "/predictions/m", [b"200", b"200", b"503"]), 150, 1.0,
                          arrival="poisson", warmup=0.2)
    assert set(r.errors) == {"503"}
    assert abs(r.errors["503"] - r.offered / 3) <= 1
    assert r.ok + r.errors["503"] == r.offered
    assert r.error_rate == pytest.approx(1 / 3, abs=0.02)
    assert r.latency_ms.count == r.ok and r.latency_all_ms.count == r.offered


def test_transport_errors_are_named():
    with serving(delay=1.0) as srv:
        slow = run_closed_loop(Target.create(srv.base + "/p", b"x"), 2, 0.6, warmup=0.0, timeout=0.2)
    assert set(slow.errors) == {"timeout"} and slow.ok == 0
    assert slow.latency_all_ms.p50 == pytest.approx(200, abs=30)
    with serving() as srv:
        garbage = run_closed_loop(Target.create(srv.base + "/garbage", b"x"), 1, 0.3, warmup=0.0)
        port = srv.server_address[1]
    assert set(garbage.errors) == {"protocol"} and garbage.offered > 0
    # the server is gone now: nothing listens on its port
    refused = run_open_loop(Target.create(f"http://127.0.0.1:{port}/p", b"x"), 50, 0.3, warmup=0.0)
    assert set(refused.errors) == {"connect"} and refused.offered == 15


def test_chunked_and_close_delimited_bodies_are_read_whole():
    with serving() as srv:
        chunked = run_closed_loop(Target.create(srv.base + "/chunked", b"x"), 2, 0.3, warmup=0.0)
        until_close = run_closed_loop(Target.create(srv.base + "/until-close", b"x"), 2, 0.3, warmup=0.0)
    # a misread body would leave bytes behind and break the next response on that connection
    assert chunked.errors == {} and chunked.ok > 20 and chunked.peak_connections == 2
    assert until_close.errors == {} and until_close.ok > 20


def test_open_loop_latency_counts_from_intended_time_through_a_stall():
    """One connection, a server that stalls for 1 s once: requests scheduled during the stall wait
    for the connection. Their latency must include that wait (no coordinated omission)."""
    warmup, rate = 0.5, 50
    with serving(stall_at=time.monotonic() + warmup + 1.0, stall_s=1.0) as srv:
        r = run_open_loop(Target.create(srv.base + "/p", b"x"), rate, 3.0, warmup=warmup,
                          connections=1, max_connections=1)
    assert r.errors == {} and r.peak_connections == 1
    # ~50 of 150 requests fell inside the stall, waiting 1000 ms down to 0 ms: from the intended
    # time p99 ~ 1 s and p90 ~ 0.7 s, while the median request saw a free connection
    assert r.latency_ms.max >= 990
    assert r.latency_ms.p99 >= 900
    assert 500 <= r.latency_ms.p90 <= 900
    assert r.latency_ms.p50 < 50
    assert r.send_lag_p99_ms >= 800  # sends really were late: the lag is inside the latency
    assert r.latency_ms.mean == pytest.approx(1000 / 2 * 50 / 150, rel=0.3)


def test_cli_sends_the_key_file_token_and_tensor_headers(tmp_path):
    """The CLI in its own process, 100 req/s of a 1x3x224x224 float32 body for 3 s.
    (Its CPU cost is measured by benchmarks/loadgen_cost.py, not asserted here.)"""
    body = tmp_path / "x.bin"
    body.write_bytes(os.urandom(3 * 224 * 224 * 4))
    keys = tmp_path / "key_file.json"  # TorchServe's layout
    keys.write_text(json.dumps({"inference": {"key": "k1"}, "management": {"key": "k2"}}))
    with serving() as srv:
        out = subprocess.run(
            [sys.executable, "-m", "hetserve.loadgen", "--url", srv.base + "/predictions/m",
             "--body-file", str(body), "--header", "X-Tensor-Shape: 1,3,224,224", "--key-file", str(keys),
             "--rate", "100", "--duration", "3", "--warmup", "0.5"],
            cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
        seen = srv.last_headers
    assert seen["Authorization"] == "Bearer k1" and seen["X-Tensor-Shape"] == "1,3,224,224"
    assert seen["Content-Type"] == "application/octet-stream"
    r = LoadResult.from_json(out.stdout)
    assert r.errors == {} and r.offered == 300
    assert r.ok == r.completed > 0


def test_wait_until_idle_returns_once_a_lone_request_is_fast_again():
    """A server that stalls for 1 s: the probe waits the stall out instead of measuring it."""
    from hetserve.loadgen import idle_latency, probe, wait_until_idle

    with serving(delay=0.01) as srv:
        target = Target.create(srv.base + "/predictions/m", b"x")
        baseline = idle_latency(target, probes=3)
        assert probe(target)[0] == 200 and baseline < 0.5
        srv.stall_s, srv.stall_at = 1.0, time.monotonic()  # the next request stalls for 1 s
        waited = wait_until_idle(target, baseline, deadline_s=10)
        assert 0.9 <= waited < 5.0
        assert wait_until_idle(target, baseline, deadline_s=10) < 0.5  # idle: returns at once


def test_a_recorded_closed_loop_hands_back_its_records_window_and_start():
    starts: list[float] = []
    with serving(delay=0.02) as srv:
        target = Target.create(srv.base + "/predictions/m", b"x")
        run = run_closed_loop_recorded(target, 2, 0.6, warmup=0.2, on_start=starts.append)
        plain_requests = srv.requests
    (start,) = starts  # called once, before any request left
    assert all(r.sent is None or r.sent >= start for r in run.records)
    assert run.window[0] == pytest.approx(start + 0.2)
    assert run.window[0] < run.window[1] <= start + 0.2 + 0.6 + 1e-6
    # The stats are those of the records handed back, warm-up requests included in the records.
    in_window = [r for r in run.records if run.window[0] <= r.intended < run.window[1]]
    assert run.result.ok == sum(r.outcome == 200 for r in in_window) > 0
    assert len(run.records) == plain_requests > len(in_window)
    assert run.result.mode == "closed" and run.result.concurrency == 2
