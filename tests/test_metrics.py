"""handlers.observability.metrics: what one batch's RuntimeStats become on TorchServe's metric interface."""

from __future__ import annotations

from collections import Counter

from handlers.observability.metrics import METRICS, aggregate
from handlers.observability.stats import RuntimeStats


def test_stage_times_are_histogram_observations_in_seconds_and_events_are_counters():
    stats = RuntimeStats(
        placements=Counter({("tail", "cpu1"): 2}),
        run_ms=[("head", "cpu0", 12.0), ("head", "cpu0", 30.0), ("tail", "cpu1", 5.0)],
        queue_ms=[("tail", 1.5)],
        micro_batches=3,
        timeouts=Counter({("tail", "cpu1"): 1}),
        quarantines=Counter({"cpu1": 1}),
        probes=Counter({("cpu1", "ok"): 1}),
        retries=Counter({("tail", "cpu1"): 1}),
        cpu_fallbacks=Counter({("tail", "cuda0"): 1}),
    )
    rows = aggregate(stats)
    runs = [(value, dims) for name, _, kind, value, dims in rows if name == "HetserveStageRunSeconds"]
    # One observation per run (a histogram needs each, not their mean).
    assert runs == [(0.012, {"Stage": "head", "Executor": "cpu0"}), (0.030, {"Stage": "head", "Executor": "cpu0"}),
                    (0.005, {"Stage": "tail", "Executor": "cpu1"})]
    by_name = {name: (kind, value, dims) for name, _, kind, value, dims in rows if name != "HetserveStageRunSeconds"}
    assert by_name["HetserveQueueWaitSeconds"] == ("histogram", 0.0015, {"Stage": "tail"})
    assert by_name["HetserveStageTimeouts"] == ("counter", 1.0, {"Stage": "tail", "Executor": "cpu1"})
    assert by_name["HetserveQuarantines"] == ("counter", 1.0, {"Executor": "cpu1"})
    assert by_name["HetserveProbes"] == ("counter", 1.0, {"Executor": "cpu1", "Result": "ok"})
    assert by_name["HetserveRetries"] == ("counter", 1.0, {"Stage": "tail", "Executor": "cpu1"})
    assert by_name["HetserveCpuFallbacks"] == ("counter", 1.0, {"Stage": "tail", "Executor": "cuda0"})
    assert by_name["HetserveMicroBatches"] == ("counter", 3.0, {})
    for name, unit, kind, _, dims in rows:
        assert (kind, unit, tuple(dims)) == METRICS[name]


def test_a_quiet_batch_emits_no_counter_rows():
    assert aggregate(RuntimeStats()) == []


def test_drain_hands_over_the_new_counters_and_resets_them():
    stats = RuntimeStats()
    stats.retries[("tail", "cpu1")] += 2
    stats.cpu_fallbacks[("tail", "cuda0")] += 1
    snapshot = stats.drain()
    assert snapshot.retries == Counter({("tail", "cpu1"): 2}) and snapshot.cpu_fallbacks[("tail", "cuda0")] == 1
    assert not stats.retries and not stats.cpu_fallbacks
