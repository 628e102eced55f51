"""Congestion point ("max sustained rate") of a server, from open-loop runs at rising rates.

Everything here is pure over `LoadResult`s; the sweep takes the measuring function as an argument,
so it runs the same on a live TorchServe and on synthetic results in tests.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from hetserve.loadgen import LatencyStats, LoadResult


@dataclass(frozen=True)
class Criteria:
    p99_ms: float = 500.0
    min_throughput_ratio: float = 0.95  # achieved / offered
    max_error_rate: float = 0.01
    # "all" counts timeouts and errors in the p99 (a timed-out request was slow); "ok": 2xx only
    latency: str = "all"

    def __post_init__(self) -> None:
        if self.latency not in ("all", "ok"):
            raise ValueError(f"latency must be 'all' or 'ok', got {self.latency!r}")

    def stats(self, result: LoadResult) -> LatencyStats:
        return result.latency_all_ms if self.latency == "all" else result.latency_ms


def offered_rate(result: LoadResult) -> float:
    if result.target_rate is None:
        raise ValueError("the knee needs open-loop results (a closed loop offers no fixed rate)")
    return result.target_rate


def shortfalls(result: LoadResult, criteria: Criteria = Criteria()) -> list[str]:
    """Why `result` does not count as sustained; empty when it does."""
    rate, p99 = offered_rate(result), criteria.stats(result).p99
    reasons = []
    if p99 is None or p99 > criteria.p99_ms:
        reasons.append(f"p99 {p99} ms > {criteria.p99_ms} ms")
    # Against what was really offered in the window: Poisson arrivals over a short window stray
    # well away from the nominal rate (about +-18% at 3/s over 10 s).
    realized = result.offered / result.duration_s if result.duration_s > 0 else rate
    if result.throughput_rps < criteria.min_throughput_ratio * realized:
        reasons.append(
            f"throughput {result.throughput_rps:.1f}/s < {criteria.min_throughput_ratio:.0%} "
            f"of the {realized:.1f}/s offered"
        )
    if result.error_rate > criteria.max_error_rate:
        reasons.append(f"error rate {result.error_rate:.2%} > {criteria.max_error_rate:.2%}")
    return reasons


def sustains(result: LoadResult, criteria: Criteria = Criteria()) -> bool:
    return not shortfalls(result, criteria)


def find_knee(results: Sequence[LoadResult], criteria: Criteria = Criteria()) -> LoadResult | None:
    """The highest offered rate that meets every criterion, or None."""
    return max((r for r in results if sustains(r, criteria)), key=offered_rate, default=None)


def bracket(results: Sequence[LoadResult], criteria: Criteria = Criteria()) -> tuple[float, float | None]:
    """-> (highest sustained rate or 0, lowest failing rate above it or None): where the knee lies."""
    knee = find_knee(results, criteria)
    lo = offered_rate(knee) if knee is not None else 0.0
    above = [offered_rate(r) for r in results if offered_rate(r) > lo and not sustains(r, criteria)]
    return lo, min(above, default=None)


def rising_rates(start: float, max_rate: float, factor: float | None = None,
                 step: float | None = None) -> Iterator[float]:
    """start, start*factor, ... (or start, start+step, ...) while <= max_rate."""
    if (factor is None) == (step is None):
        raise ValueError("give exactly one of factor and step")
    if start <= 0 or (factor is not None and factor <= 1) or (step is not None and step <= 0):
        raise ValueError("start must be positive and the rate must grow")
    rate, i = start, 0
    while rate <= max_rate * (1 + 1e-9):
        yield rate
        i += 1
        # from start each time rather than accumulating, so 10 * 1.5**k stays exact-ish
        rate = start * factor**i if factor is not None else start + step * i


@dataclass(frozen=True)
class Sweep:
    points: tuple[LoadResult, ...]  # in the order they were run
    knee: LoadResult | None
    criteria: Criteria

    @property
    def knee_rate(self) -> float | None:
        return offered_rate(self.knee) if self.knee is not None else None

    def by_rate(self) -> list[LoadResult]:
        return sorted(self.points, key=offered_rate)

    def to_json(self) -> str:
        return json.dumps({"knee_rate": self.knee_rate, "criteria": asdict(self.criteria),
                           "points": [json.loads(p.to_json()) for p in self.points]})


def sweep_rates(run_at_rate: Callable[[float], LoadResult], start: float, *, max_rate: float,
                factor: float | None = None, step: float | None = None, stop_after_failures: int = 2,
                refine_steps: int = 0, refine_tolerance: float = 0.05,
                criteria: Criteria = Criteria()) -> Sweep:
    """Raise the rate until `stop_after_failures` runs in a row miss the criteria (or max_rate),
    then bisect up to `refine_steps` times between the last sustained and first failing rate
    (between 0 and the first failure when none held) until they are within `refine_tolerance`."""
    if stop_after_failures < 1:
        raise ValueError("stop_after_failures must be at least 1")
    points: list[LoadResult] = []
    failures_in_a_row = 0
    for rate in rising_rates(start, max_rate, factor, step):
        points.append(run_at_rate(rate))
        failures_in_a_row = 0 if sustains(points[-1], criteria) else failures_in_a_row + 1
        if failures_in_a_row >= stop_after_failures:
            break
    for _ in range(refine_steps):
        lo, hi = bracket(points, criteria)
        if hi is None or hi - lo <= refine_tolerance * hi:
            break
        points.append(run_at_rate((lo + hi) / 2))
    return Sweep(tuple(points), find_knee(points, criteria), criteria)


def plot_curves(curves: Mapping[str, Sequence[LoadResult]], path: str | Path, *, log_y: bool = False,
                criteria: Criteria | None = None, title: str | None = None) -> Path:
    """Latency (p50 dashed, p99 solid) against offered rate, one colour per configuration, as in
    StarONNX's Fig. 7/9. With `criteria`, draws the p99 target and marks each knee."""
    # Figure without pyplot: no global backend state, renders through Agg for .png
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), layout="tight")
    ax = fig.subplots()
    which = criteria or Criteria()
    for i, (name, results) in enumerate(curves.items()):
        color = f"C{i % 10}"
        points = [r for r in sorted(results, key=offered_rate) if which.stats(r).p99 is not None]
        rates = [offered_rate(r) for r in points]
        ax.plot(rates, [which.stats(r).p99 for r in points], "-o", color=color, ms=3, label=f"{name} p99")
        ax.plot(rates, [which.stats(r).p50 for r in points], "--", color=color, alpha=0.7, label=f"{name} p50")
        knee = find_knee(results, criteria) if criteria else None
        if knee is not None:
            ax.plot([offered_rate(knee)], [which.stats(knee).p99], "*", color=color, ms=12)
    if criteria:
        ax.axhline(criteria.p99_ms, color="grey", lw=0.8, ls=":", label=f"p99 target {criteria.p99_ms:g} ms")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("offered rate (requests/s)")
    ax.set_ylabel("latency (ms)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path
