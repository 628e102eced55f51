"""Cost of one placement decision on the request path, for 2, 5 and 17 executors.

One decision is what the runtime does per micro-batch and stage, timed on the live code
(``Runtime.place``): take the runtime's lock, drop quarantined executors, and let the ``Placer``
read the executors' predicted free times, build candidates from the PerfHistory (run and
transfer predictions), choose with dmda and book the choice; then count it in the statistics.
The budget is 100 us per decision.

    .venv/bin/python benchmarks/scheduler_decision_cost.py [--decisions N] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from handlers.runtime.flow import Runtime, StagePlan
from handlers.runtime.perf_model import PerfHistory
from hetserve.machine import machine_info

RESULTS = Path(__file__).resolve().parent / "results"

BUDGET_US = 100.0
SIZES = (2, 5, 17)  # GPU + 1 group; GPU + 4; GPU + 16 one-core groups (a 16-core box)


@dataclass
class _Idle:
    """An executor as placement sees it (name and device); never started, never run."""

    name: str
    device: str
    clock: object = None


@dataclass(frozen=True)
class _OnDevice:
    """The tail's input as the head left it on the GPU: placement reads device and size."""

    device: str
    nbytes: int


def make_runtime(n_executors: int) -> tuple[Runtime, StagePlan]:
    now = [0.0]
    history = PerfHistory(clock=lambda: now[0])
    executors = [_Idle("cuda:0", "cuda:0")] + [_Idle(f"cpu{k}", "cpu") for k in range(n_executors - 1)]
    for ex in executors:
        for batch in (1, 2, 4, 8, 16, 32):
            per_sample = 0.0002 if ex.device == "cuda:0" else 0.001
            history.observe_run("tail", ex.name, batch, per_sample * batch)
    for nbytes in (1 << 16, 1 << 20, 1 << 24):
        history.observe_transfer("cuda:0->cpu", nbytes, 2e-5 + nbytes / 12e9)
    stage = StagePlan("tail", ("h",), ("y",), tuple(ex.name for ex in executors))
    runtime = Runtime([stage], executors, history, ["y"], clock=time.perf_counter)  # type: ignore[arg-type]
    return runtime, stage


def measure(n_executors: int, decisions: int, warmup: int) -> dict[str, float]:
    runtime, stage = make_runtime(n_executors)
    timer = time.perf_counter_ns
    samples = []
    for i in range(decisions + warmup):
        batch = 1 + i % 32
        feeds = {"h": _OnDevice("cuda:0", batch * 200_704)}
        t0 = timer()
        placement = runtime.place(stage, batch, feeds, frozenset())
        t1 = timer()
        runtime.placer.complete(placement.executor)  # keep queues short, as the running system does
        if i % 1024 == 0:
            runtime.drain_stats()  # the handler drains them after every batch
        if i >= warmup:
            samples.append((t1 - t0) / 1e3)
    samples.sort()
    return {
        "executors": n_executors,
        "decisions": decisions,
        "median_us": round(statistics.median(samples), 3),
        "p99_us": round(samples[int(0.99 * (len(samples) - 1))], 3),
        "max_us": round(samples[-1], 3),
        "within_budget": samples[int(0.99 * (len(samples) - 1))] < BUDGET_US,
    }


def timer_overhead_us(n: int = 100_000) -> float:
    timer = time.perf_counter_ns
    gaps = []
    for _ in range(n):
        t0 = timer()
        gaps.append(timer() - t0)
    return statistics.median(gaps) / 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decisions", type=int, default=50_000)
    parser.add_argument("--warmup", type=int, default=2_000)
    parser.add_argument(
        "--out", default=str(RESULTS / "scheduler_decision_cost.json")
    )
    args = parser.parse_args(argv)
    results = [measure(n, args.decisions, args.warmup) for n in SIZES]
    report = {
        "command": " ".join(
            shlex.quote(a) for a in [sys.executable, *sys.argv]
        ),
        "cwd": os.getcwd(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "budget_us": BUDGET_US,
        "timer_overhead_us": round(timer_overhead_us(), 3),
        "path_measured": "Runtime.place: lock + quarantine check + Placer.place (free_at x N "
        "+ build_candidates(PerfHistory) + choose_executor + reserve) + statistics",
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    for r in results:
        print(
            f"{r['executors']:>3} executors: median {r['median_us']:.2f} us, "
            f"p99 {r['p99_us']:.2f} us, max {r['max_us']:.1f} us"
        )
    print(f"wrote {out}")
    return 0 if all(r["within_budget"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
