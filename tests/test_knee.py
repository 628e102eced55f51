"""Knee finder and rate sweep: pure on synthetic results, plus one short live sweep."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_loadgen import serving

from hetserve.knee import (
    Criteria,
    Sweep,
    bracket,
    find_knee,
    plot_curves,
    rising_rates,
    shortfalls,
    sustains,
    sweep_rates,
)
from hetserve.loadgen import LatencyStats, LoadResult, Target, run_open_loop


def fake(rate: float, p99: float, throughput: float | None = None, error_rate: float = 0.0) -> LoadResult:
    lat = LatencyStats(100, p99 / 3, p99 / 4, p99 / 2, p99, p99 * 1.2)
    return LoadResult(
        mode="open", target_rate=rate, concurrency=None, arrival="constant", duration_s=10.0,
        warmup_s=1.0, offered=int(rate * 10), sent=int(rate * 10), completed=int(rate * 10),
        ok=int(rate * 10), throughput_rps=rate if throughput is None else throughput,
        goodput_rps=rate if throughput is None else throughput, error_rate=error_rate, latency_ms=lat,
        latency_all_ms=lat, errors={}, send_lag_p99_ms=0.5, send_lag_max_ms=1.0, cpu_s=0.5,
        cpu_pct=5.0, peak_connections=4)


def server_with_capacity(capacity: float, calls: list[float] | None = None):
    """A synthetic server: latency climbs to 120 ms at capacity, past it the queue explodes."""
    def run_at_rate(rate: float) -> LoadResult:
        if calls is not None:
            calls.append(rate)
        if rate <= capacity:
            return fake(rate, 20 + 100 * rate / capacity)
        return fake(rate, 2000 * rate / capacity, throughput=capacity)
    return run_at_rate


def test_each_criterion_can_fail_and_bounds_are_inclusive():
    assert sustains(fake(100, 500.0, throughput=95.0, error_rate=0.01))
    assert shortfalls(fake(100, 500.1))[0].startswith("p99")
    assert shortfalls(fake(100, 10, throughput=94.9))[0].startswith("throughput")
    assert shortfalls(fake(100, 10, error_rate=0.011))[0].startswith("error rate")
    assert len(shortfalls(fake(100, 900, throughput=50, error_rate=0.5))) == 3
    assert not sustains(fake(100, 400), Criteria(p99_ms=300))


def test_throughput_is_judged_against_the_requests_really_offered():
    """Poisson arrivals at 3/s over 10 s offered only 26 requests: serving all 26 is sustained."""
    from dataclasses import replace

    short = replace(fake(3.0, 80.0, throughput=2.6), offered=26)
    assert sustains(short)
    assert shortfalls(replace(short, throughput_rps=2.3))[0].startswith("throughput")


def test_knee_is_the_highest_sustained_rate():
    run = server_with_capacity(50)
    results = [run(r) for r in (80, 10, 40, 20, 160)]
    assert find_knee(results).target_rate == 40
    assert bracket(results) == (40, 80)


def test_no_sustainable_rate():
    results = [fake(r, 900) for r in (10, 20)]
    assert find_knee(results) is None
    assert bracket(results) == (0.0, 10)
    sweep = sweep_rates(lambda rate: fake(rate, 900), 10, factor=2, max_rate=1000)
    assert sweep.knee is None and sweep.knee_rate is None
    assert [p.target_rate for p in sweep.points] == [10, 20]


def test_closed_loop_results_are_refused():
    closed = LoadResult(**{**fake(10, 10).__dict__, "mode": "closed", "target_rate": None, "concurrency": 4})
    with pytest.raises(ValueError):
        find_knee([closed])


def test_rising_rates():
    assert list(rising_rates(10, 35, step=10)) == [10, 20, 30]
    assert list(rising_rates(10, 80, factor=2)) == [10, 20, 40, 80]
    for bad in ({"factor": 2, "step": 1}, {}, {"factor": 1.0}, {"step": -1}):
        with pytest.raises(ValueError):
            list(rising_rates(10, 100, **bad))


def test_sweep_stops_after_two_failures_in_a_row_not_one():
    calls: list[float] = []
    sweep = sweep_rates(server_with_capacity(50, calls), 10, factor=2, max_rate=10_000)
    assert calls == [10, 20, 40, 80, 160]
    assert sweep.knee_rate == 40

    noisy = server_with_capacity(50)
    calls = []

    def one_bad_run(rate: float) -> LoadResult:  # a single noisy failure below capacity
        calls.append(rate)
        return fake(rate, 900) if rate == 20 else noisy(rate)

    sweep = sweep_rates(one_bad_run, 10, step=10, max_rate=10_000)
    assert calls == [10, 20, 30, 40, 50, 60, 70]
    assert sweep.knee_rate == 50


def test_bisection_converges_on_the_capacity():
    calls: list[float] = []
    sweep = sweep_rates(server_with_capacity(47.3, calls), 10, factor=2, max_rate=1000,
                        refine_steps=20, refine_tolerance=0.01)
    assert 0.99 * 47.3 <= sweep.knee_rate <= 47.3
    assert len(calls) <= 5 + 7  # log2(80-40 / 0.8) bisections after the climb
    assert [p.target_rate for p in sweep.by_rate()] == sorted(calls)


@settings(max_examples=60, deadline=None)
@given(capacity=st.floats(1, 1000), start=st.floats(1, 100), factor=st.floats(1.2, 3))
def test_bisection_brackets_any_capacity(capacity, start, factor):
    sweep = sweep_rates(server_with_capacity(capacity), start, factor=factor, max_rate=1e6,
                        refine_steps=30, refine_tolerance=0.01)
    assert sweep.knee_rate is not None and 0.99 * capacity <= sweep.knee_rate <= capacity


def test_sweep_json_round_trips():
    sweep = sweep_rates(server_with_capacity(50), 10, factor=2, max_rate=1000)
    data = json.loads(sweep.to_json())
    assert data["knee_rate"] == 40
    assert [LoadResult.from_json(json.dumps(p)) for p in data["points"]] == list(sweep.points)


def test_plot_curves_writes_a_png(tmp_path):
    curves = {name: sweep_rates(server_with_capacity(cap), 10, factor=1.5, max_rate=1000).points
              for name, cap in (("cpu only", 40), ("gpu+cpu", 90))}
    for log_y in (False, True):
        out = plot_curves(curves, tmp_path / f"curves_{log_y}.png", log_y=log_y, criteria=Criteria(),
                          title="ResNet-18")
        data = out.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_live_sweep_finds_the_capacity_of_a_one_worker_server():
    """One service slot of 20 ms: 50 req/s. At 45/s constant arrivals never queue; at 60/s the
    backlog grows and achieved throughput stays at 50."""
    with serving(delay=0.02, workers=1) as srv:
        target = Target.create(srv.base + "/predictions/m", b"x")
        sweep: Sweep = sweep_rates(lambda rate: run_open_loop(target, rate, 1.0, warmup=0.2, timeout=3.0),
                                   30, step=15, max_rate=100)
    assert [p.target_rate for p in sweep.points] == [30, 45, 60, 75]
    assert sweep.knee_rate == 45
    overloaded = sweep.points[2]
    assert overloaded.throughput_rps == pytest.approx(50, rel=0.1)
    assert any(s.startswith("throughput") for s in shortfalls(overloaded))
