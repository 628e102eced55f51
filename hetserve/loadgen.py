"""Light HTTP/1.1 load generator for TorchServe's REST API: open loop (fixed rate) and closed loop.

It runs on the same 2-core machine as the server it measures, so its own CPU time is part of the
result: raw asyncio streams, request bytes built once per body, one small record per request.
Open-loop latency counts from each request's *intended* send time, so a generator or connection
pool that falls behind shows up in the latency instead of hiding it (no coordinated omission).

    python -m hetserve.loadgen --url http://127.0.0.1:8080/predictions/resnet18 \\
        --body-file x.bin --header "X-Tensor-Shape: 1,3,224,224" --key-file key_file.json \\
        --rate 50 --duration 20
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import math
import random
import signal
import statistics
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit

ARRIVALS = ("constant", "poisson")


class ProtocolError(Exception):
    """The server's reply is not HTTP/1.x we can follow."""


class ConnectFailed(Exception):
    """No TCP connection could be opened."""


# ---------------------------------------------------------------------------- what to send


@dataclass(frozen=True)
class Target:
    """Where to POST and what: several bodies are sent round-robin (mixed good/bad requests)."""

    url: str
    bodies: tuple[bytes, ...]
    content_type: str = "application/octet-stream"
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def create(cls, url: str, body: bytes | Sequence[bytes], headers: Mapping[str, str] | None = None,
               content_type: str = "application/octet-stream") -> Target:
        bodies = (bytes(body),) if isinstance(body, (bytes, bytearray, memoryview)) else tuple(map(bytes, body))
        return cls(url, bodies, content_type, tuple((headers or {}).items()))

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"only http://host:port/... URLs are supported, got {self.url!r}")
        if not self.bodies:
            raise ValueError("give at least one body")
        for text in (self.content_type, *(x for pair in self.headers for x in pair)):
            if "\r" in text or "\n" in text:  # a header value must not smuggle a second request
                raise ValueError(f"header text contains a line break: {text!r}")

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or 80

    def request_bytes(self) -> tuple[bytes, ...]:
        """One complete request per body, built once so each send is a single write."""
        parts = urlsplit(self.url)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        extra = "".join(f"{k}: {v}\r\n" for k, v in self.headers)
        return tuple(
            (f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: {self.content_type}\r\n"
             f"Content-Length: {len(body)}\r\n{extra}\r\n").encode("latin-1") + body
            for body in self.bodies
        )


# ---------------------------------------------------------------------------- pure timing logic


class Record(NamedTuple):
    intended: float  # loop clock, seconds
    sent: float | None  # None: never written (no connection in time, connect failed)
    done: float
    outcome: int | str  # HTTP status, or "connect" / "timeout" / "protocol"


@dataclass(frozen=True)
class LatencyStats:
    """Milliseconds; None when there was nothing to measure."""

    count: int
    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None
    max: float | None


@dataclass(frozen=True)
class LoadResult:
    mode: str  # "open" or "closed"
    target_rate: float | None  # offered requests/s (open loop)
    concurrency: int | None  # clients (closed loop)
    arrival: str | None
    duration_s: float  # measured window, warm-up excluded
    warmup_s: float
    offered: int  # requests whose intended send time fell in the window
    sent: int
    completed: int  # got an HTTP response, any status
    ok: int  # 2xx
    throughput_rps: float  # responses received inside the window, per second
    goodput_rps: float  # 2xx responses received inside the window, per second
    error_rate: float  # non-2xx and transport errors / offered
    latency_ms: LatencyStats  # 2xx only, from the intended send time
    latency_all_ms: LatencyStats  # every offered request: errors and timeouts included
    errors: dict[str, int]  # "503": n, "timeout": n, ...
    send_lag_p99_ms: float | None  # actual minus intended send time
    send_lag_max_ms: float | None
    cpu_s: float  # this whole process's CPU time in the window: run the CLI alone for a clean figure
    cpu_pct: float  # of one core
    peak_connections: int

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> LoadResult:
        data = json.loads(text)
        data["latency_ms"] = LatencyStats(**data["latency_ms"])
        data["latency_all_ms"] = LatencyStats(**data["latency_all_ms"])
        return cls(**data)


def arrival_offsets(rate: float, duration: float, arrival: str = "constant", seed: int = 0) -> list[float]:
    """Intended send times in [0, duration), seconds from the start."""
    if rate <= 0 or duration <= 0:
        raise ValueError("rate and duration must be positive")
    if arrival == "constant":
        # i / rate rather than a running sum: no drift over long runs
        return [i / rate for i in range(math.ceil(rate * duration - 1e-9))]
    if arrival == "poisson":
        rng, t, out = random.Random(seed), 0.0, []
        while (t := t + rng.expovariate(rate)) < duration:
            out.append(t)
        return out
    raise ValueError(f"arrival must be one of {ARRIVALS}, got {arrival!r}")


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not sorted_values:
        return None
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def latency_stats(seconds: Sequence[float]) -> LatencyStats:
    ms = sorted(s * 1000.0 for s in seconds)
    if not ms:
        return LatencyStats(0, None, None, None, None, None)
    return LatencyStats(len(ms), sum(ms) / len(ms), percentile(ms, 50), percentile(ms, 90),
                        percentile(ms, 99), ms[-1])


def _is_ok(outcome: int | str) -> bool:
    return isinstance(outcome, int) and 200 <= outcome < 300


def summarize(records: Sequence[Record], window_start: float, window_end: float, *, mode: str,
              target_rate: float | None = None, concurrency: int | None = None,
              arrival: str | None = None, warmup_s: float = 0.0, cpu_s: float = 0.0,
              cpu_wall_s: float = 0.0, peak_connections: int = 0) -> LoadResult:
    """Stats over requests intended inside [window_start, window_end); throughput over responses
    that *arrived* inside it, so a backlog finishing after the window does not inflate it."""
    window = max(0.0, window_end - window_start)
    measured = [r for r in records if window_start <= r.intended < window_end]
    arrived = [r for r in records if isinstance(r.outcome, int) and window_start <= r.done < window_end]
    errors = Counter(str(r.outcome) for r in measured if not _is_ok(r.outcome))
    lags = sorted((r.sent - r.intended) * 1000.0 for r in measured if r.sent is not None)
    return LoadResult(
        mode=mode, target_rate=target_rate, concurrency=concurrency, arrival=arrival,
        duration_s=window, warmup_s=warmup_s,
        offered=len(measured),
        sent=sum(r.sent is not None for r in measured),
        completed=sum(isinstance(r.outcome, int) for r in measured),
        ok=sum(_is_ok(r.outcome) for r in measured),
        throughput_rps=len(arrived) / window if window else 0.0,
        goodput_rps=sum(_is_ok(r.outcome) for r in arrived) / window if window else 0.0,
        error_rate=sum(errors.values()) / len(measured) if measured else 0.0,
        latency_ms=latency_stats([r.done - r.intended for r in measured if _is_ok(r.outcome)]),
        latency_all_ms=latency_stats([r.done - r.intended for r in measured]),
        errors=dict(sorted(errors.items())),
        send_lag_p99_ms=percentile(lags, 99), send_lag_max_ms=lags[-1] if lags else None,
        cpu_s=cpu_s, cpu_pct=100.0 * cpu_s / cpu_wall_s if cpu_wall_s > 0 else 0.0,
        peak_connections=peak_connections,
    )


def parse_response_head(head: bytes) -> tuple[int, int | None, bool, bool]:
    """-> (status, content length or None, chunked, keep-alive) from the bytes up to CRLFCRLF."""
    lines = head.split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    if not version.startswith(b"HTTP/1.") or not rest[:3].isdigit():
        raise ProtocolError(f"bad status line {lines[0][:80]!r}")
    status = int(rest[:3])
    length, chunked, keep_alive = None, False, version != b"HTTP/1.0"
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            if not value.strip().isdigit():
                raise ProtocolError(f"bad Content-Length {value[:40]!r}")
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"connection":
            token = value.strip().lower()
            keep_alive = token != b"close" and (keep_alive or token == b"keep-alive")
    if status < 200 or status in (204, 304):
        length, chunked = 0, False
    return status, length, chunked, keep_alive


# ---------------------------------------------------------------------------- I/O


class _Connection:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> _Connection:
        try:
            return cls(*await asyncio.open_connection(host, port))
        except OSError as exc:
            raise ConnectFailed(str(exc)) from exc

    async def exchange(self, request: bytes) -> tuple[int, bool]:
        """-> (status, connection reusable). The response body is read and dropped."""
        self.writer.write(request)
        status, length, chunked, keep_alive = parse_response_head(await self.reader.readuntil(b"\r\n\r\n"))
        if chunked:
            while size := int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16):
                await self.reader.readexactly(size + 2)
            while await self.reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                pass
        elif length is None:  # body runs to EOF
            await self.reader.read()
            keep_alive = False
        elif length:
            await self.reader.readexactly(length)
        return status, keep_alive

    def close(self) -> None:
        self.writer.close()


class _Pool:
    """Keep-alive connections, opened on demand up to `limit`; beyond it requests queue FIFO."""

    def __init__(self, host: str, port: int, limit: int) -> None:
        self.host, self.port, self.limit = host, port, limit
        self.idle: list[_Connection] = []  # LIFO: the hottest connection goes first
        self.open_count = 0  # connected, connecting, or reserved for a waiter
        self.peak = 0
        self.waiters: deque[asyncio.Future] = deque()

    async def fill(self, n: int) -> None:
        # one at a time: a burst of connects overflows a small listen backlog and a dropped SYN
        # costs a 1 s retransmit; this runs before the clock starts, so a few ms do not matter
        for _ in range(n):
            try:
                self.idle.append(await self._open())
            except ConnectFailed:
                return  # the run will count "connect" errors

    async def acquire(self) -> _Connection:
        if self.idle:
            return self.idle.pop()
        if self.open_count < self.limit:
            return await self._open()
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        try:
            handed = await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # handed over as we timed out: pass it on
                self._pass_on(waiter.result())
            raise
        return handed if handed is not None else await self._connect_reserved()

    def release(self, conn: _Connection) -> None:
        waiter = self._next_waiter()
        if waiter is not None:
            waiter.set_result(conn)
        else:
            self.idle.append(conn)

    def discard(self, conn: _Connection) -> None:
        conn.close()
        self._free_slot()

    def close_all(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()

    async def _open(self) -> _Connection:
        self.open_count += 1
        self.peak = max(self.peak, self.open_count)
        return await self._connect_reserved()

    async def _connect_reserved(self) -> _Connection:
        try:
            return await _Connection.open(self.host, self.port)
        except BaseException:
            self._free_slot()
            raise

    def _free_slot(self) -> None:
        waiter = self._next_waiter()
        if waiter is not None:
            waiter.set_result(None)  # the slot stays counted: the waiter opens it
        else:
            self.open_count -= 1

    def _pass_on(self, handed: _Connection | None) -> None:
        if handed is None:
            self._free_slot()
        else:
            self.release(handed)

    def _next_waiter(self) -> asyncio.Future | None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                return waiter
        return None


class _Run:
    def __init__(self, target: Target, timeout: float, max_connections: int) -> None:
        if timeout <= 0 or max_connections < 1:
            raise ValueError("timeout and max_connections must be positive")
        self.loop = asyncio.get_running_loop()
        self.requests = target.request_bytes()
        self.pool = _Pool(target.host, target.port, max_connections)
        self.timeout = timeout
        self.records: list[Record] = []
        self.issued = 0
        self.inflight: set[asyncio.Task] = set()
        self.end = math.inf
        self.stopped = asyncio.Event()

    async def request(self, intended: float) -> int | str:
        """One request; its deadline is `timeout` after the intended send time."""
        loop, index = self.loop, self.issued
        self.issued += 1
        task = asyncio.current_task()
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            task.cancel()

        # one timer handle instead of wait_for's extra task per request: this runs at every send
        timer = loop.call_at(intended + self.timeout, expire)
        conn, sent = None, None
        try:
            conn = await self.pool.acquire()
            sent = loop.time()
            status, reusable = await conn.exchange(self.requests[index % len(self.requests)])
            if reusable:
                self.pool.release(conn)
            else:
                self.pool.discard(conn)
            conn, outcome = None, status
        except asyncio.CancelledError:
            if not expired:
                raise
            if hasattr(task, "uncancel"):
                task.uncancel()
            outcome = "timeout"
        except ConnectFailed:
            outcome = "connect"
        except (ProtocolError, OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            outcome = "protocol"
        finally:
            timer.cancel()
            if conn is not None:  # state unknown after an error: never reuse it
                self.pool.discard(conn)
        self.records.append(Record(intended, sent, loop.time(), outcome))
        return outcome

    async def issue_open_loop(self, start: float, offsets: Sequence[float]) -> None:
        loop = self.loop
        for i, offset in enumerate(offsets):
            intended = start + offset
            if intended >= self.end:  # stopped early
                break
            delay = intended - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif i % 32 == 0:  # running late: still let sends and replies progress
                await asyncio.sleep(0)
            task = loop.create_task(self.request(intended))
            self.inflight.add(task)
            task.add_done_callback(self.inflight.discard)

    async def closed_client(self) -> None:
        while self.loop.time() < self.end:
            if await self.request(self.loop.time()) == "connect":
                await asyncio.sleep(0.05)  # a down server must not turn us into a busy loop

    def stop(self) -> None:
        self.end = min(self.end, self.loop.time())
        self.stopped.set()

    async def pause_until(self, when: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.stopped.wait(), max(0.0, when - self.loop.time()))

    async def measure(self, start: float, warmup: float, duration: float, workers: list[asyncio.Task],
                      handle_signals: bool) -> tuple[float, float, float, float]:
        """Wait out the run; -> (window start, window end, CPU seconds, wall seconds of the window)."""
        self.end = start + warmup + duration
        signals = (signal.SIGINT, signal.SIGTERM) if handle_signals else ()
        for sig in signals:
            self.loop.add_signal_handler(sig, self.stop)
        try:
            await self.pause_until(start + warmup)
            cpu0, wall0 = time.process_time(), self.loop.time()
            await self.pause_until(self.end)
            cpu1, wall1 = time.process_time(), self.loop.time()
            self.end = min(self.end, wall1)
            await asyncio.gather(*workers, return_exceptions=True)
            await asyncio.gather(*list(self.inflight), return_exceptions=True)
        finally:
            for sig in signals:
                self.loop.remove_signal_handler(sig)
            self.pool.close_all()
        return start + warmup, self.end, cpu1 - cpu0, wall1 - wall0


# ---------------------------------------------------------------------------- public API


async def drive_open_loop(target: Target, rate: float, duration: float, *, arrival: str = "constant",
                          seed: int = 0, warmup: float = 1.0, timeout: float = 10.0,
                          connections: int | None = None, max_connections: int = 256,
                          handle_signals: bool = False) -> LoadResult:
    """Send at `rate` req/s for warmup + duration seconds; stats cover the last `duration`."""
    offsets = arrival_offsets(rate, warmup + duration, arrival, seed)
    run = _Run(target, timeout, max_connections)
    # pre-open what ~100 ms of latency needs; the pool grows past it when all are busy
    await run.pool.fill(min(max_connections, connections or max(2, math.ceil(rate / 10))))
    start = run.loop.time()
    issuer = run.loop.create_task(run.issue_open_loop(start, offsets))
    window = await run.measure(start, warmup, duration, [issuer], handle_signals)
    return _result(run, window, mode="open", target_rate=rate, arrival=arrival, warmup_s=warmup)


async def drive_closed_loop(target: Target, concurrency: int, duration: float, *, warmup: float = 1.0,
                            timeout: float = 10.0, handle_signals: bool = False) -> LoadResult:
    """`concurrency` clients, each sending its next request when the previous one returns."""
    recorded = await drive_closed_loop_recorded(target, concurrency, duration, warmup=warmup,
                                                timeout=timeout, handle_signals=handle_signals)
    return recorded.result


@dataclass(frozen=True)
class RecordedRun:
    """A run's stats with what they were computed from: every request's record and the measured
    window, on the loop's clock (``time.monotonic``, CLOCK_MONOTONIC on Linux), so a caller can
    line requests up with timestamps taken elsewhere on the same host."""

    result: LoadResult
    records: tuple[Record, ...]
    window: tuple[float, float]


async def drive_closed_loop_recorded(target: Target, concurrency: int, duration: float, *,
                                     warmup: float = 1.0, timeout: float = 10.0,
                                     handle_signals: bool = False,
                                     on_start: Callable[[float], None] | None = None) -> RecordedRun:
    """``drive_closed_loop``, keeping the records. ``on_start(start)`` is called once, with the
    loop-clock time the clients start at (the window is [start + warmup, start + warmup +
    duration)), before any request is sent: it must return at once (start a thread to act later)."""
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    run = _Run(target, timeout, concurrency)
    await run.pool.fill(concurrency)
    start = run.loop.time()
    if on_start is not None:
        on_start(start)
    clients = [run.loop.create_task(run.closed_client()) for _ in range(concurrency)]
    window = await run.measure(start, warmup, duration, clients, handle_signals)
    result = _result(run, window, mode="closed", concurrency=concurrency, warmup_s=warmup)
    return RecordedRun(result, tuple(run.records), (window[0], window[1]))


def _result(run: _Run, window: tuple[float, float, float, float], **meta) -> LoadResult:
    window_start, window_end, cpu_s, wall_s = window
    return summarize(run.records, window_start, window_end, cpu_s=cpu_s, cpu_wall_s=wall_s,
                     peak_connections=run.pool.peak, **meta)


def run_open_loop(target: Target, rate: float, duration: float, arrival: str = "constant",
                  **options) -> LoadResult:
    return asyncio.run(drive_open_loop(target, rate, duration, arrival=arrival, **options))


def run_closed_loop(target: Target, concurrency: int, duration: float, **options) -> LoadResult:
    return asyncio.run(drive_closed_loop(target, concurrency, duration, **options))


def run_closed_loop_recorded(target: Target, concurrency: int, duration: float, **options) -> RecordedRun:
    return asyncio.run(drive_closed_loop_recorded(target, concurrency, duration, **options))


def probe(target: Target, timeout: float = 30.0) -> tuple[int | str, float]:
    """One blocking request with the target's first body: (status or "timeout"/"connect", seconds)."""
    parts = urlsplit(target.url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    headers = {"Content-Type": target.content_type, **dict(target.headers)}
    started = time.perf_counter()
    conn = http.client.HTTPConnection(target.host, target.port, timeout=timeout)
    try:
        conn.request("POST", path, body=target.bodies[0], headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status, time.perf_counter() - started
    except TimeoutError:
        return "timeout", time.perf_counter() - started
    except OSError:
        return "connect", time.perf_counter() - started
    finally:
        conn.close()


def read_inference_key(path: str | Path) -> str:
    """The inference token of TorchServe's key_file.json; one-line ValueError when it has none."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"--key-file {path} does not exist") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"--key-file {path} is not TorchServe's key_file.json ({str(exc).splitlines()[0]})") from None
    key = data.get("inference", {}).get("key") if isinstance(data, dict) and isinstance(data.get("inference"), dict) else None
    if not isinstance(key, str) or not key:
        raise ValueError(f"--key-file {path} has no inference key (expected {{\"inference\": {{\"key\": ...}}}})")
    return key


def check_reachable(target: Target, timeout: float = 10.0) -> float:
    """One request before any measuring: a dead server or a refused token fails now, in one line.

    Returns the request's seconds. A load generator that only counts errors would otherwise run
    a whole sweep against nothing.
    """
    status, seconds = probe(target, timeout=timeout)
    if status == "connect":
        raise ValueError(f"cannot connect to {target.url}: is TorchServe running and is the port right?")
    if status == "timeout":
        raise ValueError(f"{target.url} did not answer one request within {timeout:g} s")
    if status in (401, 403):
        raise ValueError(f"{target.url} refused the request (HTTP {status}): give TorchServe's key_file.json as --key-file")
    if status == 404:
        raise ValueError(f"{target.url} answered 404: no such model (check the model name in the URL)")
    if not 200 <= int(status) < 300:
        raise ValueError(f"{target.url} answered HTTP {status} to the first request: check the body, --content-type and --header")
    return seconds


def idle_latency(target: Target, probes: int = 5) -> float:
    """Median latency of lone sequential requests: the server's unloaded service time."""
    return statistics.median(probe(target)[1] for _ in range(probes))


def wait_until_idle(target: Target, baseline_s: float, deadline_s: float = 120.0) -> float:
    """Probe one request at a time until one is served about as fast as when idle.

    A sweep point past capacity leaves the server's queue full; measuring the next point before
    it drains would charge that backlog to the next rate. Returns the seconds spent waiting.
    """
    started = time.monotonic()
    threshold = max(3 * baseline_s, baseline_s + 0.1)
    while time.monotonic() - started < deadline_s:
        status, seconds = probe(target, timeout=deadline_s)
        if status == 200 and seconds <= threshold:
            break
        time.sleep(0.5)
    return time.monotonic() - started


# ---------------------------------------------------------------------------- command line


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"header must look like 'Name: value', got {text!r}")
    return name.strip(), value.strip()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hetserve.loadgen", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--url", required=True, help="e.g. http://127.0.0.1:8080/predictions/MODEL")
    p.add_argument("--body-file", action="append", required=True, type=Path,
                   help="request body; repeat to send several bodies round-robin")
    p.add_argument("--content-type", default="application/octet-stream", help="Content-Type of every request")
    p.add_argument("--header", action="append", type=_header, default=[], help="'Name: value', repeatable")
    p.add_argument("--key-file", type=Path, help="TorchServe key_file.json: sends its inference key as a Bearer token")
    load = p.add_mutually_exclusive_group(required=True)
    load.add_argument("--rate", type=float, help="open loop: requests per second")
    load.add_argument("--concurrency", type=int, help="closed loop: clients")
    p.add_argument("--arrival", choices=ARRIVALS, default="constant", help="open-loop arrival process")
    p.add_argument("--seed", type=int, default=0, help="seed of the Poisson arrivals")
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds (after warm-up)")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    p.add_argument("--timeout", type=float, default=10.0, help="per request, from its intended send time")
    p.add_argument("--connections", type=int, help="open loop: connections opened up front")
    p.add_argument("--max-connections", type=int, default=256, help="cap on open connections")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    headers = dict(args.header)
    if args.key_file:
        headers["Authorization"] = f"Bearer {read_inference_key(args.key_file)}"
    target = Target.create(args.url, [f.read_bytes() for f in args.body_file], headers, args.content_type)
    common = {"warmup": args.warmup, "timeout": args.timeout, "handle_signals": True}
    if args.rate is not None:
        result = run_open_loop(target, args.rate, args.duration, args.arrival, seed=args.seed,
                               connections=args.connections, max_connections=args.max_connections, **common)
    else:
        result = run_closed_loop(target, args.concurrency, args.duration, **common)
    print(result.to_json())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
