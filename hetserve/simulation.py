"""A discrete-event model of the serving pipeline, to check the placement policy offline.

Micro-batches arrive as a Poisson stream. The head always runs on the GPU (one stream, FIFO);
the tail runs on the GPU or on one of K CPU core groups, after a GPU->CPU copy that occupies no
executor. Policy ``dmda`` runs the live placement step (``handlers.runtime.placement.Placer``:
a PerfHistory learnt from the simulated run times, predicted free times, dmda's choice); the
fixed policies are the baselines it must beat.

    python -m hetserve.simulation          # prints the default sweep
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from handlers.runtime.perf_model import PerfHistory
from handlers.runtime.placement import Placer

POLICIES = ("dmda", "always_gpu", "always_cpu")
GPU = "cuda:0"

# Event kinds; at equal times completions are seen before new arrivals.
_DONE_HEAD, _DONE_TAIL, _ARRIVAL = 0, 1, 2


@dataclass(frozen=True)
class SimConfig:
    rate: float  # micro-batches per second
    n_batches: int = 2000
    cpu_groups: int = 2
    head_gpu_s: float = 0.004
    tail_gpu_s: float = 0.001
    tail_cpu_s: float = 0.004
    transfer_s: float = 0.0003  # GPU -> CPU copy of the cut tensors
    jitter: float = 0.0  # log-normal sigma of actual run and copy times around their means
    prediction_noise: float = 0.0  # log-normal sigma of dmda's error on each prediction
    batch: int = 8
    cut_bytes: int = 8 * 4 * 256 * 14 * 14
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError(f"rate must be a positive number, got {self.rate!r}")
        if self.n_batches < 1 or self.cpu_groups < 0:
            raise ValueError("need n_batches >= 1 and cpu_groups >= 0")
        times = (self.head_gpu_s, self.tail_gpu_s, self.tail_cpu_s, self.transfer_s)
        if min(times) < 0 or self.jitter < 0 or self.prediction_noise < 0:
            raise ValueError("times and noise levels must be >= 0")


@dataclass(frozen=True)
class SimResult:
    policy: str
    rate: float
    mean_latency_s: float
    p99_latency_s: float
    throughput: float  # completed micro-batches per second, first arrival to last completion
    cpu_share: float  # share of tails run on a CPU group


def simulate(config: SimConfig, policy: str) -> SimResult:
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r} (one of {', '.join(POLICIES)})")
    cpus = [f"cpu{k}" for k in range(config.cpu_groups)]
    if policy == "always_cpu" and not cpus:
        raise ValueError("always_cpu needs at least one CPU group")
    # Arrivals and actual-time draws are made up front, per micro-batch, so every policy sees
    # the same workload (common random numbers make the comparison sharp at a few thousand).
    rng = random.Random(config.seed)
    arrivals, t = [], 0.0
    for _ in range(config.n_batches):
        t += rng.expovariate(config.rate)
        arrivals.append(t)
    draws = [
        tuple(rng.lognormvariate(0.0, config.jitter) if config.jitter else 1.0 for _ in range(3))
        for _ in range(config.n_batches)
    ]
    noise_rng = random.Random(config.seed + 1)

    now = 0.0
    history = PerfHistory(alpha=0.3, clock=lambda: now)
    devices = {GPU: GPU, **{c: "cpu" for c in cpus}}
    predictor = _NoisyTails(history, config.prediction_noise, noise_rng)
    placer = Placer(predictor if config.prediction_noise else history, devices, lambda: now)
    actual_free = dict.fromkeys(devices, 0.0)
    events: list[tuple[float, int, int, str, float]] = [
        (a, _ARRIVAL, i, "", 0.0) for i, a in enumerate(arrivals)
    ]
    heapq.heapify(events)
    latencies = [0.0] * config.n_batches
    on_cpu = 0
    last_end = 0.0

    def run(executor: str, ready: float, duration: float, kind: int, i: int) -> None:
        start = max(ready, actual_free[executor])  # each executor is a FIFO
        actual_free[executor] = start + duration
        heapq.heappush(events, (start + duration, kind, i, executor, duration))

    while events:
        now, kind, i, executor, duration = heapq.heappop(events)
        head_draw, tail_draw, copy_draw = draws[i]
        if kind == _ARRIVAL:
            placer.place("head", config.batch, {"x": _OnDevice(GPU, 0)}, [GPU])
            run(GPU, now, config.head_gpu_s * head_draw, _DONE_HEAD, i)
        elif kind == _DONE_HEAD:
            placer.complete(GPU, now)
            history.observe_run("head", GPU, config.batch, duration)
            target = _place_tail(policy, now, config, history, placer)
            if target == GPU:
                ready, run_s = now, config.tail_gpu_s * tail_draw
            else:
                copy_s = config.transfer_s * copy_draw
                history.observe_transfer(f"{GPU}->cpu", config.cut_bytes, copy_s)
                ready, run_s = now + copy_s, config.tail_cpu_s * tail_draw
                on_cpu += 1
            run(target, ready, run_s, _DONE_TAIL, i)
        else:
            placer.complete(executor, now)
            history.observe_run("tail", executor, config.batch, duration)
            latencies[i] = now - arrivals[i]
            last_end = max(last_end, now)

    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]
    return SimResult(
        policy=policy,
        rate=config.rate,
        mean_latency_s=sum(latencies) / len(latencies),
        p99_latency_s=p99,
        throughput=config.n_batches / (last_end - arrivals[0]) if last_end > arrivals[0] else 0.0,
        cpu_share=on_cpu / config.n_batches,
    )


@dataclass(frozen=True)
class _OnDevice:
    """A stand-in for a tensor the previous stage left on ``device``: what placement reads."""

    device: str
    nbytes: int


class _NoisyTails:
    """The history as the placer sees it, with log-normal error on each tail run prediction."""

    def __init__(self, history: PerfHistory, sigma: float, rng: random.Random) -> None:
        self._history, self._sigma, self._rng = history, sigma, rng

    def predict_run(self, stage: str, executor: str, batch: int) -> float | None:
        run_s = self._history.predict_run(stage, executor, batch)
        if run_s is None or stage != "tail":
            return run_s
        return run_s * self._rng.lognormvariate(0.0, self._sigma)

    def predict_transfer(self, link: str, nbytes: int) -> float | None:
        return self._history.predict_transfer(link, nbytes)


def _place_tail(
    policy: str, now: float, config: SimConfig, history: PerfHistory, placer: Placer
) -> str:
    clock = placer.free_times
    if policy == "always_gpu":
        target = GPU
    elif policy == "always_cpu":
        target = min(
            (name for name in placer.devices if name != GPU),
            key=lambda name: (clock.free_at(name), int(name[3:])),
        )
    else:
        feeds = {"cut": _OnDevice(GPU, config.cut_bytes)}
        return placer.place("tail", config.batch, feeds, list(placer.devices)).executor
    # Fixed policies still book the clock so free times (and always_cpu's choice) stay true.
    run_s = history.predict_run("tail", target, config.batch) or 0.0
    start = max(now, clock.free_at(target))
    clock.reserve(target, start, start + run_s)
    return target


def sweep(rates: Sequence[float], **config: object) -> list[SimResult]:
    return [
        simulate(SimConfig(rate=rate, **config), policy)  # type: ignore[arg-type]
        for rate in rates
        for policy in POLICIES
    ]


def format_table(results: Sequence[SimResult]) -> str:
    lines = [f"{'rate/s':>7} " + "".join(f"{p:>24}" for p in POLICIES)]
    lines.append(f"{'':>7} " + "".join(f"{'mean/p99 ms (cpu%)':>24}" for _ in POLICIES))
    for rate in sorted({r.rate for r in results}):
        row = {r.policy: r for r in results if r.rate == rate}
        cells = "".join(
            f"{row[p].mean_latency_s * 1e3:>9.2f}/{row[p].p99_latency_s * 1e3:<8.2f}"
            f"({row[p].cpu_share:>4.0%})"
            for p in POLICIES
        )
        lines.append(f"{rate:>7g} {cells}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_table(sweep([25, 75, 125, 175, 200, 225])))
