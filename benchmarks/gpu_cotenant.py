"""A co-tenant on the GPU (issue 16): another model's work in a tight loop at a set duty cycle.

Each period, the co-tenant keeps the device busy for ``duty x period`` (chunks of matrix
products, each chunk waited for, so the busy time is the device's) and then sleeps for the rest.
That is how a shared GPU looks to hetserve: slower, not gone. It runs until ``--duration`` is
over or it gets SIGTERM/SIGINT, then writes what it achieved (busy share, chunks, periods) as
JSON; ``--ready`` names a file written once it is warm, so a run script can start measuring.

    python3 benchmarks/gpu_cotenant.py --duty 0.6 --ready /tmp/co.ready --out $OUT/cotenant.json &
    python3 benchmarks/gpu_cotenant.py --device cpu --duty 0.5 --duration 1 --out /tmp/co.json

``--device cpu`` does the same with numpy on the CPU: a smoke test of the loop, not a co-tenant
anyone should run beside a CPU benchmark.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


@dataclass(frozen=True)
class DutyCycle:
    duty: float  # busy share of each period, (0, 1]
    period_s: float

    def __post_init__(self) -> None:
        if not 0.0 < self.duty <= 1.0:
            raise ValueError(f"duty must be in (0, 1], got {self.duty!r}")
        if not self.period_s > 0.0:
            raise ValueError(f"period must be > 0 s, got {self.period_s!r}")

    @property
    def busy_s(self) -> float:
        return self.duty * self.period_s

    @property
    def idle_s(self) -> float:
        return self.period_s - self.busy_s


@dataclass
class Report:
    device: str
    duty_target: float
    period_ms: float
    size: int
    chunk: int
    periods: int = 0
    chunks: int = 0
    busy_s: float = 0.0
    elapsed_s: float = 0.0

    @property
    def duty_achieved(self) -> float | None:
        return self.busy_s / self.elapsed_s if self.elapsed_s > 0 else None

    def to_dict(self) -> dict:
        return {**asdict(self), "duty_achieved": self.duty_achieved}


def run_cycles(
    cycle: DutyCycle,
    work: Callable[[], None],
    stop: threading.Event,
    report: Report,
    clock: Callable[[], float] = time.perf_counter,
    duration_s: float = 0.0,
    idle: Callable[[float], object] | None = None,
) -> Report:
    """Busy for ``cycle.busy_s`` (whole chunks of ``work``), idle for the rest, period after
    period, until ``stop`` is set or ``duration_s`` (> 0) has passed. Fills ``report``."""
    idle = idle or stop.wait
    started = clock()
    while not stop.is_set() and not (duration_s > 0 and clock() - started >= duration_s):
        period_start = clock()
        busy_until = period_start + cycle.busy_s
        while clock() < busy_until:
            chunk_start = clock()
            work()  # returns when the device finished it
            report.busy_s += clock() - chunk_start
            report.chunks += 1
        report.periods += 1
        left = period_start + cycle.period_s - clock()
        if left > 0:
            idle(left)
    report.elapsed_s = clock() - started
    return report


def torch_work(size: int, chunk: int, device: str) -> Callable[[], None]:
    """``chunk`` products of two size x size matrices on ``device``, waited for."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 math: heavier per launch, fewer launches
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    out = torch.empty(size, size, device=device)

    def work() -> None:
        for _ in range(chunk):
            torch.matmul(a, b, out=out)
        torch.cuda.synchronize(device)

    return work


def numpy_work(size: int, chunk: int) -> Callable[[], None]:
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    out = np.empty((size, size), np.float32)

    def work() -> None:
        for _ in range(chunk):
            np.matmul(a, b, out=out)

    return work


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (smoke test)")
    parser.add_argument("--duty", type=float, default=0.5, help="busy share of each period")
    parser.add_argument("--period-ms", type=float, default=20.0)
    parser.add_argument("--size", type=int, default=0,
                        help="matrix side (default 2048 on a GPU, 128 on the CPU)")
    parser.add_argument("--chunk", type=int, default=1, help="products per wait")
    parser.add_argument("--duration", type=float, default=0.0, help="seconds; 0: until SIGTERM")
    parser.add_argument("--ready", type=Path, default=None, help="file written once warm")
    parser.add_argument("--out", type=Path, default=None, help="JSON report (default: stdout)")
    args = parser.parse_args(argv)
    cycle = DutyCycle(args.duty, args.period_ms / 1e3)
    on_cpu = args.device == "cpu"
    size = args.size or (128 if on_cpu else 2048)
    work = numpy_work(size, args.chunk) if on_cpu else torch_work(size, args.chunk, args.device)
    for _ in range(3):  # warm: kernels loaded, allocations made
        work()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if args.ready is not None:
        args.ready.write_text("ready\n")
    # Idle with time.sleep, not stop.wait: the handler above runs on this same thread and
    # stop.set() takes the Event's lock, which stop.wait() may hold when the signal lands
    # (a self-deadlock that left the script running after SIGTERM).
    report = run_cycles(cycle, work, stop,
                        Report(args.device, args.duty, args.period_ms, size, args.chunk),
                        duration_s=args.duration, idle=time.sleep)
    text = json.dumps({"benchmark": "gpu_cotenant", **report.to_dict()}, indent=1)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(f"co-tenant on {args.device}: duty {report.duty_achieved or 0:.3f} achieved of "
          f"{args.duty:.3f} over {report.elapsed_s:.1f} s ({report.chunks} chunks, "
          f"{report.periods} periods)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
