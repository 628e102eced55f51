"""dmda placement, the executor clock, and the pipeline simulation that checks the policy."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from handlers.runtime.perf_model import PerfHistory
from handlers.runtime.scheduler import (
    Candidate,
    ExecutorClock,
    ExecutorSpec,
    build_candidates,
    choose_executor,
)
from hetserve.simulation import POLICIES, SimConfig, format_table, simulate, sweep


class FakeClock:
    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


# ---- choose_executor ---------------------------------------------------------------------


def test_idle_gpu_beats_slow_cpu() -> None:
    placement = choose_executor(
        10.0,
        [Candidate("cuda:0", 10.0, 0.001, 0.0), Candidate("cpu0-3", 0.0, 0.004, 0.0003)],
    )
    assert placement.executor == "cuda:0"
    assert (placement.start, placement.end) == (10.0, pytest.approx(10.001))
    assert not placement.calibrating


def test_busy_gpu_sends_the_tail_to_the_cpu() -> None:
    # GPU drains at 10.004: ends 10.005; CPU starts after the copy: 10.0003 + 0.004.
    placement = choose_executor(
        10.0,
        [Candidate("cuda:0", 10.004, 0.001, 0.0), Candidate("cpu0-3", 9.0, 0.004, 0.0003)],
    )
    assert placement.executor == "cpu0-3"
    assert placement.start == pytest.approx(10.0003)
    assert placement.end == pytest.approx(10.0043)
    assert "waits 0.300 ms" in placement.reason


def test_transfer_overlaps_with_the_executor_queue() -> None:
    # The copy (2 ms) runs while the CPU drains its queue (3 ms): start = free_at, not the sum.
    placement = choose_executor(0.0, [Candidate("cpu0", 0.003, 0.001, 0.002)])
    assert placement.start == pytest.approx(0.003)
    assert placement.end == pytest.approx(0.004)


def test_uncalibrated_executor_is_chosen_first() -> None:
    placement = choose_executor(
        0.0,
        [
            Candidate("cuda:0", 0.0, 0.001, 0.0),
            Candidate("cpu4-7", 5.0, None, 0.0003),  # busy and unknown: still calibrated first
        ],
    )
    assert placement.executor == "cpu4-7"
    assert placement.calibrating and placement.start == 5.0
    assert placement.end > placement.start  # a provisional reservation, so the next one spreads


def test_among_uncalibrated_the_earliest_start_wins() -> None:
    placement = choose_executor(
        0.0, [Candidate("cpu0", 2.0, None), Candidate("cpu1", 1.0, None)]
    )
    assert placement.executor == "cpu1"


def test_ties_are_broken_by_transfer_then_name_whatever_the_order() -> None:
    cands = [
        Candidate("cpu1", 0.0, 0.002, 0.001),
        Candidate("cpu0", 0.0, 0.002, 0.001),
        Candidate("gpu", 0.001, 0.002, 0.0),  # same end (0.003), no copy
    ]
    assert choose_executor(0.0, cands).executor == "gpu"
    assert choose_executor(0.0, cands[:2]).executor == "cpu0"
    assert choose_executor(0.0, cands[1::-1]).executor == "cpu0"


def test_only_restricts_to_head_executors() -> None:
    cands = [Candidate("cuda:0/s0", 1.0, 0.004), Candidate("cuda:0/s1", 0.5, 0.004),
             Candidate("cpu0", 0.0, 0.001)]
    assert choose_executor(0.0, cands, only={"cuda:0/s0", "cuda:0/s1"}).executor == "cuda:0/s1"
    with pytest.raises(ValueError, match="no executor"):
        choose_executor(0.0, cands, only={"cuda:1"})
    with pytest.raises(ValueError):
        choose_executor(0.0, [])


candidates_strategy = st.lists(
    st.builds(
        Candidate,
        executor=st.sampled_from([f"e{i}" for i in range(20)]),
        free_at=st.floats(-1.0, 2.0),
        run_s=st.floats(0.0, 1.0),
        transfer_s=st.floats(0.0, 1.0),
    ),
    min_size=1,
    max_size=17,
    unique_by=lambda c: c.executor,
)


@given(now=st.floats(0.0, 1.0), cands=candidates_strategy, seed=st.integers(0, 1000))
def test_choice_is_the_earliest_end_and_order_independent(now, cands, seed) -> None:
    placement = choose_executor(now, cands)
    ends = [max(now, c.free_at, now + c.transfer_s) + c.run_s for c in cands]
    assert placement.end == min(ends)
    assert placement.start >= now
    shuffled = cands[:]
    random.Random(seed).shuffle(shuffled)
    assert choose_executor(now, shuffled) == placement


# ---- build_candidates ----------------------------------------------------------------------


def test_build_candidates_from_history() -> None:
    clock = FakeClock(100.0)
    history = PerfHistory(clock=clock)
    history.observe_run("tail", "cuda:0", 8, 0.001)
    history.observe_run("tail", "cpu0-3", 4, 0.002)
    history.observe_transfer("cuda:0->cpu", 1_000_000, 0.0005)
    executors = [ExecutorSpec("cuda:0", "cuda:0"), ExecutorSpec("cpu0-3", "cpu"), ExecutorSpec("cpu4-7", "cpu")]
    cands = build_candidates(
        history, "tail", 8, 1_000_000, "cuda:0", executors, {"cuda:0": 100.004}
    )
    assert cands == [
        Candidate("cuda:0", 100.004, 0.001, 0.0),
        Candidate("cpu0-3", float("-inf"), pytest.approx(0.004), pytest.approx(0.0005)),
        Candidate("cpu4-7", float("-inf"), None, pytest.approx(0.0005)),
    ]
    # cpu4-7 has never run the tail: it is calibrated before anything else.
    assert choose_executor(100.0, cands).executor == "cpu4-7"
    # With it known and slow, the GPU queue (4 ms) is still worse than the calibrated CPU.
    history.observe_run("tail", "cpu4-7", 8, 0.050)
    cands = build_candidates(
        history, "tail", 8, 1_000_000, "cuda:0", executors, {"cuda:0": 100.004}
    )
    assert choose_executor(100.0, cands).executor == "cpu0-3"


def test_unmeasured_link_counts_as_free() -> None:
    history = PerfHistory(clock=FakeClock())
    history.observe_run("tail", "cpu0", 1, 0.001)
    (cand,) = build_candidates(history, "tail", 1, 10**6, "cuda:0", [ExecutorSpec("cpu0", "cpu")], {})
    assert cand.transfer_s == 0.0


# ---- ExecutorClock -------------------------------------------------------------------------


def test_executor_clock_tracks_reservations_and_corrects_on_completion() -> None:
    clock = FakeClock(0.0)
    ex = ExecutorClock(clock=clock)
    assert ex.free_at("gpu") == 0.0
    ex.reserve("gpu", 0.0, 0.004)
    ex.reserve("gpu", 0.001, 0.005)  # queued behind: runs 0.004 -> 0.008 as predicted
    assert ex.free_at("gpu") == pytest.approx(0.008)
    assert ex.outstanding("gpu") == 2
    clock.now = 0.002
    ex.complete("gpu")  # finished 2 ms early: the queued one moves up
    assert ex.free_at("gpu") == pytest.approx(0.006)
    clock.now = 0.010
    # Late work never predicts a free time in the past.
    assert ex.free_at("gpu") == 0.010
    ex.complete("gpu", actual_end=0.010)
    assert ex.outstanding("gpu") == 0
    assert ex.snapshot() == {"gpu": 0.010}
    with pytest.raises(ValueError, match="no reservation"):
        ex.complete("gpu")
    with pytest.raises(ValueError):
        ex.reserve("gpu", 1.0, 0.5)


def test_executor_clock_respects_data_ready_times() -> None:
    clock = FakeClock(0.0)
    ex = ExecutorClock(clock=clock)
    ex.reserve("cpu0", 0.0, 0.004)
    ex.reserve("cpu0", 0.010, 0.014)  # its input arrives at 10 ms: the executor idles
    clock.now = 0.001
    ex.complete("cpu0")
    assert ex.free_at("cpu0") == pytest.approx(0.014)


# ---- simulation ----------------------------------------------------------------------------

# From light load to beyond the GPU-only saturation point (1 / (4 ms + 1 ms) = 200/s).
RATES = (25, 75, 125, 175, 200, 225)
TOLERANCE_S = 1e-4


@pytest.mark.parametrize(
    "noise", [{}, {"jitter": 0.2, "prediction_noise": 0.3}], ids=["perfect", "noisy"]
)
def test_dmda_is_never_worse_than_a_fixed_policy(noise) -> None:
    results = {(r.rate, r.policy): r for r in sweep(RATES, n_batches=2000, **noise)}
    print("\n" + format_table(list(results.values())))
    for rate in RATES:
        dmda = results[rate, "dmda"].mean_latency_s
        for fixed in ("always_gpu", "always_cpu"):
            assert dmda <= results[rate, fixed].mean_latency_s + TOLERANCE_S, (rate, fixed)
    assert any(
        results[r, "dmda"].mean_latency_s < 0.9 * results[r, "always_gpu"].mean_latency_s
        for r in RATES
    )
    assert any(
        results[r, "dmda"].mean_latency_s < 0.9 * results[r, "always_cpu"].mean_latency_s
        for r in RATES
    )
    # The offload share grows with load; fixed policies do what they say.
    shares = [results[r, "dmda"].cpu_share for r in RATES]
    assert shares == sorted(shares) and 0 < shares[0] < shares[-1] < 1
    assert all(results[r, "always_gpu"].cpu_share == 0 for r in RATES)
    assert all(results[r, "always_cpu"].cpu_share == 1 for r in RATES)


def test_simulation_throughput_and_saturation() -> None:
    light = simulate(SimConfig(rate=25, n_batches=1000), "dmda")
    assert light.throughput == pytest.approx(25, rel=0.1)
    assert light.mean_latency_s >= 0.005 - 1e-9  # head (4 ms) + fastest tail (1 ms)
    overloaded = simulate(SimConfig(rate=300, n_batches=1000), "always_gpu")
    assert overloaded.throughput == pytest.approx(200, rel=0.03)  # the GPU alone caps it
    assert simulate(SimConfig(rate=225, n_batches=1000), "dmda").throughput > 210


def test_simulation_is_deterministic_and_validates() -> None:
    config = SimConfig(rate=150, n_batches=300, jitter=0.1, prediction_noise=0.1, seed=7)
    assert simulate(config, "dmda") == simulate(config, "dmda")
    with pytest.raises(ValueError, match="'fifo'"):
        simulate(config, "fifo")
    with pytest.raises(ValueError):
        SimConfig(rate=0)
    with pytest.raises(ValueError, match="CPU group"):
        simulate(SimConfig(rate=10, cpu_groups=0), "always_cpu")
    assert set(POLICIES) == {"dmda", "always_gpu", "always_cpu"}


def test_micro_batches_placed_together_spread_over_uncalibrated_executors() -> None:
    clock = ExecutorClock(clock=lambda: 0.0)
    chosen = []
    for _ in range(4):
        cands = [Candidate(name, clock.free_at(name), None, 0.0) for name in ("cpu0", "cpu1")]
        placement = choose_executor(0.0, cands)
        clock.reserve(placement.executor, placement.start, placement.end)
        chosen.append(placement.executor)
    assert chosen == ["cpu0", "cpu1", "cpu0", "cpu1"]
