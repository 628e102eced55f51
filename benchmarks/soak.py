"""Reliability soak (issue 5): every request answered exactly once under faults and overload,
while the worker's memory, threads and file descriptors stay flat.

One real TorchServe on 127.0.0.1 serves resnet18-tiny split head/tail over two core groups,
with faults injected all along (HETSERVE_ENABLE_FAULTS=1) on the second group's tail: 5% of its
runs fail, every 400th runs out of memory, and one run hangs past the 2 s stage deadline; each
is retried on the first group, so every good request must still get a 200.

1. warm-up, then the worker's RSS, thread and file-descriptor counts;
2. soak: N mixed requests (good npy / raw / JSON bodies; malformed ones: wrong shape, NaN,
   broken JSON, short raw bytes, an unsupported content type) from 4 client threads, each
   request counted by its id: answered once, with the status its body calls for;
3. RSS, threads and fds again;
4. overload: capacity (closed loop, 8 clients), then an open-loop burst at 2x that capacity
   against a short job queue: every request gets one answer (200, or a fast 503 from the queue);
5. recovery: a closed-loop run right after the burst, every request a 200.
Restarts are counted from the worker's pid, sampled every 0.5 s throughout.

    .venv/bin/python benchmarks/soak.py                      # full: 20,000 requests
    .venv/bin/python benchmarks/soak.py --requests 1000 --out /tmp/soak   # a quick look

tests/test_resilience.py drives its CI-sized soak with the functions below.
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import io
import itertools
import json
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hetserve.loadgen import (  # noqa: E402
    Target,
    idle_latency,
    run_closed_loop,
    run_open_loop,
    wait_until_idle,
)
from hetserve.tsprocess import TorchServe  # noqa: E402

SAMPLE = (3, 64, 64)  # resnet18-tiny
FAULTS_ENV = {"HETSERVE_ENABLE_FAULTS": "1"}
SERVING = {"minWorkers": 1, "maxWorkers": 1, "batchSize": 4, "maxBatchDelay": 5, "responseTimeout": 60}
MAX_RESPONSE_BYTES = 1024  # the faulty model's answer limit: 25 samples of 10 float32 logits
# Issue 17: the risky end of frontend batching, where a worker death mid-gather lost requests.
GATHERING = {"minWorkers": 1, "maxWorkers": 1, "batchSize": 8, "maxBatchDelay": 100,
             "responseTimeout": 20}


def executor_names() -> list[str]:
    """The CPU core groups a worker on this machine serves from (as the handler plans them)."""
    from handlers.hardware.topology import plan_groups, probe

    return [g.name for g in plan_groups(probe(), "numa", min_groups=2)]


def faulty_config(state_dir: Path, executor: str) -> dict:
    """model-config overrides: faults on one tail executor, which the other can always cover."""
    return {
        **SERVING,
        "hetserve": {
            "ratio": 0.5,
            "stage_timeout_s": 2,
            "probe_backoff_s": 0.5,
            "probe_backoff_max_s": 5,
            "state_dir": str(state_dir),
            "limits": {"max_response_bytes": MAX_RESPONSE_BYTES},
            "faults": [
                {"kind": "error", "stage": "tail", "executor": executor, "probability": 0.05, "seed": 1},
                {"kind": "oom", "stage": "tail", "executor": executor, "every_nth": 400},
                {"kind": "hang", "stage": "tail", "executor": executor, "count": 1, "hang_s": 600},
            ],
        },
    }


def build_archive(store: Path, name: str = "soak") -> Path:
    from hetserve.cli import main

    code = main(["archive", "--model", "zoo:resnet18-tiny", "--model-name", name, "--export-path",
                 str(store), "--cost", "flops", "--quiet", "--ratios", "0.5"])
    if code != 0:
        raise RuntimeError(f"hetserve archive failed with exit status {code}")
    return store / f"{name}.mar"


# ---------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class Request:
    kind: str
    body: bytes
    content_type: str
    headers: tuple[tuple[str, str], ...]
    expect: int  # the status this body calls for


def _npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    return buf.getvalue()


def mixed_requests(seed: int = 0) -> list[Request]:
    """Good and bad bodies, about two good for each bad, in a fixed interleaved order."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, *SAMPLE)).astype(np.float32)
    x2 = rng.standard_normal((2, *SAMPLE)).astype(np.float32)
    nan = x.copy()
    nan[0, 0, 0, 0] = np.nan
    # 26 samples answer 1,040 bytes raw: over faulty_config's max_response_bytes, refused unrun.
    big = rng.standard_normal((26, *SAMPLE)).astype(np.float32)
    raw_shape = (("X-Tensor-Shape", ",".join(map(str, x.shape))),)
    good = [
        Request("good-npy", _npy(x), "application/x-npy", (), 200),
        Request("good-raw", x.tobytes(), "application/octet-stream", raw_shape, 200),
        Request("good-npy-batch2", _npy(x2), "application/x-npy", (), 200),
        Request("good-json", json.dumps(x.tolist()).encode(), "application/json", (), 200),
    ]
    bad = [
        Request("bad-shape", _npy(np.zeros((1, 3, 32, 64), np.float32)), "application/x-npy", (), 400),
        Request("bad-nan", _npy(nan), "application/x-npy", (), 400),
        Request("bad-json", b"[[1, 2", "application/json", (), 400),
        Request("bad-raw-bytes", b"\x00" * 12, "application/octet-stream", raw_shape, 400),
        Request("bad-type", b"GIF89a", "image/gif", (), 415),
        # Issue 17: compressed bodies, a v2 body gone wrong, a multipart body whose boundary is
        # not the declared one, and an answer too large for TorchServe (limits in faulty_config).
        Request("bad-gzip", gzip.compress(json.dumps(x.tolist()).encode()), "application/json",
                (("Content-Encoding", "gzip"),), 415),
        Request("bad-v2-inputs", json.dumps({"inputs": {"name": "x"}}).encode(), "application/json", (), 400),
        Request("bad-multipart", b"--real\r\nContent-Disposition: form-data; name=\"data\"\r\n\r\n"
                + x.tobytes() + b"\r\n--real--\r\n", "multipart/form-data; boundary=wrong", (), 400),
        Request("bad-response-size", big.tobytes(), "application/octet-stream",
                (("X-Tensor-Shape", ",".join(map(str, big.shape))),), 413),
    ]
    mixed = []
    for i in range(10):
        mixed += [good[i % len(good)], good[(i + 1) % len(good)], bad[i % len(bad)]]
    return mixed


@dataclass
class Counts:
    sent: int = 0
    answered: int = 0  # requests with exactly one HTTP response
    lost: int = 0  # no response: connection error or client timeout
    statuses: Counter = field(default_factory=Counter)  # "kind:status" -> n
    unexpected: list = field(default_factory=list)  # first few (kind, status, body) off expectation
    unexpected_total: int = 0
    seconds: float = 0.0


def send_all(server: TorchServe, model: str, requests: Sequence[Request], n: int,
             concurrency: int = 4, timeout: float = 60.0, id_prefix: str = "soak") -> Counts:
    """``n`` requests (round-robin over ``requests``) from ``concurrency`` keep-alive clients.

    Each request has its own id; ``answers[id]`` counts the responses it got, so a request
    answered twice or never shows up instead of averaging away.
    """
    answers = [0] * n
    counts = Counts(sent=n)
    lock = threading.Lock()
    ids = itertools.count()
    path = f"/predictions/{model}"
    auth = {"Authorization": f"Bearer {server.keys['inference']}"}

    def client() -> None:
        conn = None
        while (i := next(ids)) < n:
            req = requests[i % len(requests)]
            headers = {"Content-Type": req.content_type, "X-Request-Id": f"{id_prefix}-{i}",
                       **dict(req.headers), **auth}
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", server.ports["inference"], timeout=timeout)
                conn.request("POST", path, body=req.body, headers=headers)
                resp = conn.getresponse()
                body = resp.read()
                if resp.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as exc:
                if conn is not None:
                    conn.close()
                    conn = None
                with lock:
                    counts.unexpected_total += 1
                    if len(counts.unexpected) < 10:
                        counts.unexpected.append((req.kind, "no answer", repr(exc)))
                continue
            with lock:
                answers[i] += 1
                counts.statuses[f"{req.kind}:{resp.status}"] += 1
                if resp.status != req.expect:
                    counts.unexpected_total += 1
                    if len(counts.unexpected) < 10:
                        counts.unexpected.append((req.kind, resp.status, body[:300].decode(errors="replace")))
        if conn is not None:
            conn.close()

    started = time.monotonic()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counts.seconds = time.monotonic() - started
    counts.answered = sum(1 for a in answers if a == 1)
    counts.lost = sum(1 for a in answers if a == 0)
    return counts


# ---------------------------------------------------------------------------- the worker


def model_worker_pid(server: TorchServe, model: str) -> int | None:
    resp = server.request("GET", f"/models/{model}", api="management", timeout=10)
    if resp.status != 200:
        return None
    workers = resp.json()[0].get("workers", [])
    # A starting worker reports pid -1: only a pid > 1 names a process.
    ready = [w for w in workers if w.get("status") == "READY" and isinstance(w.get("pid"), int)
             and w["pid"] > 1]
    return int(ready[0]["pid"]) if ready else None


def worker_stats(pid: int) -> dict[str, float]:
    """RSS (MB), threads and open file descriptors of one process, from /proc."""
    rss_kb = next(
        int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith("VmRSS:")
    )
    return {
        "rss_mb": round(rss_kb / 1024, 1),
        "threads": len(list(Path(f"/proc/{pid}/task").iterdir())),
        "fds": len(list(Path(f"/proc/{pid}/fd").iterdir())),
    }


class PidWatch:
    """Samples the model's worker pid in the background: each new pid is a restart."""

    def __init__(self, server: TorchServe, model: str, interval: float = 0.5) -> None:
        self.pids: list[int] = []
        self._server, self._model, self._interval = server, model, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PidWatch:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def restarts(self) -> int:
        return max(len(self.pids) - 1, 0)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def _sample(self) -> None:
        try:
            pid = model_worker_pid(self._server, self._model)
        except OSError:
            return
        if pid is not None and (not self.pids or self.pids[-1] != pid):
            self.pids.append(pid)


# ---------------------------------------------------------------------------- kill mid-gather


def _one(seed: int) -> tuple[bytes, dict[str, str]]:
    x = np.random.default_rng(seed).standard_normal((1, *SAMPLE)).astype(np.float32)
    return x.tobytes(), {"Content-Type": "application/octet-stream",
                         "X-Tensor-Shape": ",".join(map(str, x.shape))}


def _next_worker(server: TorchServe, model: str, old: int | None, timeout: float = 120.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = model_worker_pid(server, model)
        if pid is not None and pid != old:
            return pid
        time.sleep(0.2)
    raise TimeoutError(f"no new worker for {model}")


def kill_during_gather(server: TorchServe, model: str, trials: int, client_timeout: float = 30.0) -> dict:
    """Per trial: a request to an idle worker opens a gather window (GATHERING: up to 100 ms),
    two more follow 15 ms later, and the worker is killed 30 ms in. Counts every request's fate;
    lost = no answer within ``client_timeout`` (past responseTimeout)."""
    sent = answered = 0
    statuses: Counter = Counter()
    pid = None
    for trial in range(trials):
        pid = _next_worker(server, model, pid)
        body, headers = _one(trial)
        server.request("POST", f"/predictions/{model}", body, headers)  # warm, then idle
        time.sleep(0.3)
        results: list = []

        def client(seed: int, results: list = results) -> None:
            b, h = _one(seed)
            try:
                results.append(server.request("POST", f"/predictions/{model}", b, h,
                                              timeout=client_timeout).status)
            except OSError as exc:
                results.append(type(exc).__name__)

        threads = [threading.Thread(target=client, args=(1000 * trial + i,)) for i in range(3)]
        threads[0].start()
        time.sleep(0.015)
        threads[1].start()
        threads[2].start()
        time.sleep(0.015)
        server.kill_worker(pid)  # checks pid > 1 and that it is this server's worker
        for t in threads:
            t.join(client_timeout + 10)
        sent += len(threads)
        answered += sum(isinstance(r, int) for r in results)
        statuses.update(str(r) for r in results)
    return {"trials": trials, "sent": sent, "answered": answered, "lost": sent - answered,
            "statuses": dict(statuses)}


# ---------------------------------------------------------------------------- overload


def raw_target(server: TorchServe, model: str) -> Target:
    x = np.random.default_rng(7).standard_normal((1, *SAMPLE)).astype(np.float32)
    headers = {"X-Tensor-Shape": ",".join(map(str, x.shape)),
               "Authorization": f"Bearer {server.keys['inference']}"}
    return Target.create(f"http://127.0.0.1:{server.ports['inference']}/predictions/{model}",
                         x.tobytes(), headers)


def overload(server: TorchServe, model: str, burst_s: float = 8.0, measure_s: float = 4.0) -> dict:
    """Capacity, a burst at twice it, and the service right after; every request accounted for."""
    target = raw_target(server, model)
    baseline = idle_latency(target)
    before = run_closed_loop(target, 8, measure_s, warmup=1.0, timeout=30.0)
    # Goodput: a closed loop answered by fast 503s would otherwise look like capacity.
    capacity = before.goodput_rps
    rate = 2 * capacity
    burst = run_open_loop(target, rate, burst_s, warmup=0.0, timeout=30.0)
    drained_s = wait_until_idle(target, baseline, deadline_s=60.0)
    after = run_closed_loop(target, 8, measure_s, warmup=0.5, timeout=30.0)
    return {
        "capacity_rps": round(capacity, 1),
        "burst_rate_rps": round(rate, 1),
        "burst_offered": burst.offered,
        "burst_answered": burst.completed,
        "burst_lost": burst.offered - burst.completed,
        "burst_ok": burst.ok,
        "burst_statuses": burst.errors,  # non-2xx outcomes by status; no "timeout"/"connect" allowed
        "burst_latency_all_ms": asdict(burst.latency_all_ms),
        "drain_s": round(drained_s, 2),
        "after_rps": round(after.goodput_rps, 1),
        "after_offered": after.offered,
        "after_completed": after.completed,
        "after_ok": after.ok,
        "after_statuses": after.errors,
        "recovered_share": round(after.goodput_rps / capacity, 2) if capacity else None,
    }


# ---------------------------------------------------------------------------- the run


def soak(server: TorchServe, model: str, n: int, warmup: int = 200) -> dict:
    requests = mixed_requests()
    with PidWatch(server, model) as watch:
        warm = send_all(server, model, requests, warmup, id_prefix="warmup")
        pid = model_worker_pid(server, model)
        before = worker_stats(pid)
        counts = send_all(server, model, requests, n)
        after = worker_stats(pid)
        burst = overload(server, model)
    return {
        "requests_sent": counts.sent,
        "answered": counts.answered,
        "lost": counts.lost,
        "unexpected_status": counts.unexpected_total,
        "unexpected_samples": counts.unexpected,
        "statuses": dict(sorted(counts.statuses.items())),
        "soak_seconds": round(counts.seconds, 1),
        "soak_rps": round(n / counts.seconds, 1) if counts.seconds else None,
        "warmup_lost": warm.lost,
        "worker_before": before,
        "worker_after": after,
        "rss_growth_mb": round(after["rss_mb"] - before["rss_mb"], 1),
        "restarts": watch.restarts,
        "overload": burst,
    }


def markdown(result: dict) -> str:
    s, o = result["soak"], result["soak"]["overload"]
    lines = [
        "# Reliability soak",
        "",
        f"`{result['run']['command']}` on {result['machine']['cpu_model']} "
        f"({result['machine']['physical_cores_usable']} physical cores), {result['run']['date']}.",
        "",
        "| requests sent | answered | lost | unexpected status | restarts | RSS before -> after (MB) | RSS growth (MB) | threads | fds |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {s['requests_sent']} | {s['answered']} | {s['lost']} | {s['unexpected_status']} | {s['restarts']} "
        f"| {s['worker_before']['rss_mb']} -> {s['worker_after']['rss_mb']} | {s['rss_growth_mb']} "
        f"| {s['worker_before']['threads']} -> {s['worker_after']['threads']} "
        f"| {s['worker_before']['fds']} -> {s['worker_after']['fds']} |",
        "",
        "| overload: capacity (req/s) | burst rate | burst sent | answered | lost | 200 | statuses | after burst (req/s) |",
        "|---|---|---|---|---|---|---|---|",
        f"| {o['capacity_rps']} | {o['burst_rate_rps']} | {o['burst_offered']} | {o['burst_answered']} "
        f"| {o['burst_lost']} | {o['burst_ok']} | {o['burst_statuses']} | {o['after_rps']} |",
        "",
        "Faults injected throughout on one tail executor (5% errors, out of memory every 400th run, "
        "one hang past the 2 s stage deadline), each retried on the other core group. Bad bodies "
        "include gzip (415), a v2 body whose inputs is not a list, multipart with a wrong boundary "
        "(400) and a request whose answer passes limits.max_response_bytes (413, not run).",
    ]
    if "gather_kills" in s:
        g = s["gather_kills"]
        lines += [
            "",
            "| kill -9 mid-gather (batchSize 8, maxBatchDelay 100): kills | requests sent | answered | lost | statuses |",
            "|---|---|---|---|---|",
            f"| {g['trials']} | {g['sent']} | {g['answered']} | {g['lost']} | {g['statuses']} |",
        ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    from hetserve.machine import machine_info, run_record
    from hetserve.tsprocess import start_torchserve
    from partitioner.archive import with_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--gather-kills", type=int, default=5, help="worker kills mid-gather")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="hetserve-soak-") as scratch:
        scratch = Path(scratch)
        store = scratch / "store"
        executor = executor_names()[-1]
        base = build_archive(store, "base")
        with_config(base, store / "soak.mar", faulty_config(scratch / "state", executor))
        with_config(base, store / "gather.mar", {**GATHERING, "hetserve": {
            "ratio": 0.5, "stage_timeout_s": 5, "state_dir": str(scratch / "gather-state")}})
        server = start_torchserve(scratch / "ts", store, {"soak": "soak.mar", "gather": "gather.mar"},
                                  overrides={"job_queue_size": "32"},
                                  env={**FAULTS_ENV, "HETSERVE_STATE_ROOTS": str(scratch)})
        try:
            result = soak(server, "soak", args.requests)
            result["gather_kills"] = kill_during_gather(server, "gather", args.gather_kills)
        finally:
            server.stop()
    record = {"run": run_record(), "machine": machine_info(), "faulty_executor": executor,
              "soak": result}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reliability.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.out / "reliability.md").write_text(markdown(record))
    print(markdown(record))
    o = result["overload"]
    ok = (result["lost"] == 0 and result["unexpected_status"] == 0 and result["restarts"] == 0
          and o["burst_lost"] == 0 and o["after_ok"] == o["after_completed"]
          and result["gather_kills"]["lost"] == 0
          and result["rss_growth_mb"] < 50)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
