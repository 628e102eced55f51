"""The batch-size advisor's latency model: the paper's formula, the batching simulation, the
recommendation and the history-driven service curve. Pure: no server."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from handlers.hardware.topology import Core, Topology, probe, worker_share
from handlers.runtime.config import RuntimeConfig
from handlers.runtime.perf_model import PerfHistory
from hetserve.advisor import (
    Layout,
    ServiceCurve,
    batch_compute_seconds,
    capacity,
    check_rows,
    curve_from_history,
    layout_for,
    paper_latency,
    predict_knee,
    recommend,
    served_split,
    simulate,
)
from hetserve.cli import main

# 18 ms for one sample, 8 ms per extra sample: batching pays (74 ms for 8 instead of 144)
CURVE = ServiceCurve(((1, 0.018), (8, 0.074)))


def topo(n: int) -> Topology:
    return Topology(tuple(Core(cpu=i, siblings=(i,), core_id=i, socket=0, numa=0) for i in range(n)))


def test_paper_latency_is_batch_formation_plus_transfer_plus_compute():
    curve = ServiceCurve(((1, 0.010), (4, 0.025)), overhead_s=0.002, transfer_per_sample_s=0.001)
    # T = 1/20 s, N = 4: 3 * 50 ms to form, 4 ms transfer, 25 ms compute, 2 ms overhead
    assert paper_latency(20, 4, curve) == pytest.approx(0.150 + 0.004 + 0.025 + 0.002)


def test_curve_interpolates_between_points_and_extends_with_the_last_slope():
    assert CURVE.compute(1) == pytest.approx(0.018)
    assert CURVE.compute(8) == pytest.approx(0.074)
    assert CURVE.compute(4) == pytest.approx(0.018 + 3 * 0.008)
    assert CURVE.compute(10) == pytest.approx(0.074 + 2 * 0.008)
    assert ServiceCurve(((4, 0.04),)).compute(2) == pytest.approx(0.02)


@pytest.mark.parametrize("points", [(), ((0, 0.1),), ((1, -1.0),), ((2, 0.1), (2, 0.2))])
def test_bad_curves_are_refused(points):
    with pytest.raises(ValueError):
        ServiceCurve(points)


def test_lone_requests_below_capacity_see_exactly_the_service_time():
    pred = simulate(CURVE, 10, 1, 0, arrival="constant")
    assert pred.mean_ms == pytest.approx(18.0)
    assert pred.p99_ms == pytest.approx(18.0)
    assert pred.mean_batch == 1
    assert pred.utilization == pytest.approx(0.18, abs=0.01)


def test_with_a_long_delay_the_first_request_waits_the_papers_t_times_n_minus_1():
    pred = simulate(CURVE, 10, 4, 1000, arrival="constant")
    s4 = CURVE.seconds(4) * 1000
    assert pred.mean_batch == 4
    assert pred.p99_ms == pytest.approx(paper_latency(10, 4, CURVE) * 1000)  # 300 ms + S(4)
    assert pred.mean_ms == pytest.approx(s4 + 150.0)  # waits 300, 200, 100, 0 ms: mean 150


def test_max_batch_delay_caps_the_wait_and_closes_a_partial_batch():
    # next request 100 ms later, delay 50 ms: every batch closes alone after waiting 50 ms
    pred = simulate(CURVE, 10, 8, 50, arrival="constant")
    assert pred.mean_batch == 1
    assert pred.mean_ms == pytest.approx(50 + 18.0)


def test_past_capacity_is_flagged_and_the_queue_grows_with_the_horizon():
    rate = capacity(CURVE, 1) * 1.2
    short = simulate(CURVE, rate, 1, 0, arrival="constant", horizon_s=20)
    long = simulate(CURVE, rate, 1, 0, arrival="constant", horizon_s=80)
    assert not short.sustainable
    assert long.p99_ms > 2 * short.p99_ms


def test_under_load_batches_fill_from_the_queue_without_waiting():
    # Above one-at-a-time capacity (55/s) but below the batch-8 capacity (108/s), delay 0
    pred = simulate(CURVE, 80, 8, 0, arrival="constant")
    assert pred.sustainable
    assert pred.mean_batch > 1.3
    assert pred.p99_ms < 500


def test_two_workers_hold_about_twice_the_rate():
    one = predict_knee(CURVE, 1, 0, 200, workers=1)
    two = predict_knee(CURVE, 1, 0, 200, workers=2)
    assert 0 < one < capacity(CURVE, 1)
    assert two > 1.7 * one


def test_knee_is_zero_when_even_an_idle_server_misses_the_target():
    assert predict_knee(CURVE, 8, 1000, 10) == 0.0


def test_recommends_bigger_batches_as_the_rate_rises():
    low = recommend(CURVE, 5)
    high = recommend(CURVE, 90)  # beyond what batch sizes 1 and 2 can serve
    assert low.best is not None and high.best is not None
    assert high.best.batch_size > low.best.batch_size
    assert all(p.sustainable for p in high.ranked)
    assert all(p.batch_size >= 2 for p in high.ranked)
    means = [p.mean_ms for p in high.ranked]
    assert means == sorted(means)


def test_no_recommendation_when_no_batch_size_sustains_the_rate():
    advice = recommend(CURVE, 10_000)
    assert advice.best is None and advice.ranked == ()
    assert advice.to_dict()["best"] is None


@settings(max_examples=40, deadline=None)
@given(rate=st.floats(1, 200), n=st.integers(1, 16), delay=st.sampled_from([0, 2, 10, 50]),
       seed=st.integers(0, 1000))
def test_no_request_is_faster_than_its_batch_could_run(rate, n, delay, seed):
    pred = simulate(CURVE, rate, n, delay, seed=seed, max_requests=600)
    assert pred.p50_ms >= CURVE.seconds(1) * 1000 - 1e-9
    assert 1 <= pred.mean_batch <= n
    assert pred.p99_ms >= pred.p50_ms


# ---------------------------------------------------------------- from the performance history


def history_with(runs: dict[tuple[str, str, int], float]) -> PerfHistory:
    h = PerfHistory(alpha=1.0)
    for (stage, ex, batch), s in runs.items():
        h.observe_run(stage, ex, batch, s)
    return h


def test_whole_model_batch_is_split_over_the_executors():
    h = history_with({("whole", "cpu0", 1): 0.01, ("whole", "cpu0", 2): 0.018,
                      ("whole", "cpu1", 1): 0.01, ("whole", "cpu1", 2): 0.018})
    layout = Layout({"whole": ("cpu0", "cpu1")})
    assert batch_compute_seconds(h, layout, 4) == pytest.approx(0.018)  # two micro-batches of 2 at once
    assert batch_compute_seconds(h, Layout({"whole": ("cpu0",)}), 2) == pytest.approx(0.018)


def test_disjoint_head_and_tail_form_a_pipeline():
    h = history_with({("head", "cpu0", 1): 0.010, ("tail", "cpu1", 1): 0.004})
    layout = Layout({"head": ("cpu0",), "tail": ("cpu1",)}, micro_batch=1)
    # four micro-batches: four heads back to back, the last tail after them
    assert batch_compute_seconds(h, layout, 4) == pytest.approx(4 * 0.010 + 0.004)


def test_shared_executors_spread_the_total_work():
    h = history_with({(s, e, 1): t for s, t in (("head", 0.010), ("tail", 0.004)) for e in ("cpu0", "cpu1")})
    layout = Layout({"head": ("cpu0", "cpu1"), "tail": ("cpu0", "cpu1")}, micro_batch=1)
    assert batch_compute_seconds(h, layout, 4) == pytest.approx(4 * 0.014 / 2)


def test_history_without_the_stage_says_so():
    with pytest.raises(ValueError, match="no run of stage 'whole'"):
        curve_from_history(PerfHistory(), Layout({"whole": ("cpu0",)}))


def test_layout_follows_the_runtime_config():
    two = topo(2)
    assert layout_for(RuntimeConfig(core_groups="size:1"), False, two).stages == {"whole": ("cpu0", "cpu1")}
    assert layout_for(RuntimeConfig(core_groups="numa"), False, two).stages == {"whole": ("cpu0-1",)}
    split = layout_for(RuntimeConfig(core_groups="size:1", cpu_head_groups=1, micro_batch=2), True, two)
    assert split.stages == {"head": ("cpu0",), "tail": ("cpu1",)} and split.micro_batch == 2
    # a partitioned model needs two groups even under "numa" on one node
    assert layout_for(RuntimeConfig(), True, two).stages == {"head": ("cpu0", "cpu1"), "tail": ("cpu0", "cpu1")}


def test_a_history_without_its_archive_says_whether_the_model_was_split():
    whole = history_with({("whole", "cpu0", 1): 0.01})
    split = history_with({("head", "cpu0", 1): 0.01, ("tail", "cpu0", 1): 0.01})
    # a ratio left to the archive: the history shows what ran; an explicit one decides alone
    assert not served_split(RuntimeConfig(), whole) and served_split(RuntimeConfig(), split)
    assert not served_split(RuntimeConfig(ratio=1.0), split) and served_split(RuntimeConfig(ratio=0.5), whole)


def point(rate: float, mean_ms: float, p99_ms: float) -> dict:
    return {"target_rate": rate, "latency_all_ms": {"mean": mean_ms, "p99": p99_ms},
            "throughput_rps": rate, "offered": rate * 10, "duration_s": 10.0}


def test_check_recovers_a_known_overhead_and_predicts_its_own_model_exactly():
    h = history_with({("whole", "cpu0", 1): 0.018, ("whole", "cpu0", 8): 0.074})
    cfg = {"batchSize": 8, "maxBatchDelay": 10, "minWorkers": 1, "hetserve": {"ratio": 1.0, "core_groups": "size:1"}}
    true_curve = curve_from_history(h, Layout({"whole": ("cpu0",)}), max_batch=8, overhead_s=0.005)
    pts = []
    for rate in (5, 20, 40, 70):
        p = simulate(true_curve, rate, 8, 10)
        pts.append(point(rate, p.mean_ms, p.p99_ms))
    report = check_rows({"b": {"config": cfg, "points": pts, "knee_rate": 70}}, h, p99_ms=500,
                        topology=topo(1))
    assert report["fitted_overhead_ms"] == pytest.approx(5.0, abs=0.01)
    row = report["rows"]["b"]
    assert row["median_abs_mean_error_below_knee"] == pytest.approx(0.0, abs=1e-6)
    assert math.isfinite(row["predicted_knee_rps"]) and row["predicted_knee_rps"] > 70
    assert row["layout"] == {"whole": ["cpu0"]}


def test_check_needs_rows_it_can_model():
    with pytest.raises(ValueError, match="no row"):
        check_rows({"d_in_process_ort": {"best": 100.0}}, PerfHistory(), p99_ms=500)


def test_batch_choice_compares_the_measured_and_predicted_fastest_batch_size():
    h = history_with({("whole", "cpu0", 1): 0.018, ("whole", "cpu0", 8): 0.074})
    true_curve = curve_from_history(h, Layout({"whole": ("cpu0",)}), max_batch=8, overhead_s=0.003)
    rows = {}
    for n in (1, 8):
        cfg = {"batchSize": n, "maxBatchDelay": 5, "minWorkers": 1, "hetserve": {"ratio": 1.0, "core_groups": "size:1"}}
        pts = [point(r, (p := simulate(true_curve, r, n, 5)).mean_ms, p.p99_ms) for r in (10, 80)]
        rows[f"bs{n}"] = {"config": cfg, "points": pts}
    report = check_rows(rows, h, p99_ms=500, topology=topo(1))
    at_80 = next(c for c in report["batch_choice"] if c["rate"] == 80)
    assert at_80["measured_best"] == at_80["predicted_best"] == "bs8"  # batch 1 cannot hold 80/s
    assert at_80["agree"] and at_80["penalty"] == pytest.approx(1.0)


def write_history(path, stage_runs):
    h = history_with(stage_runs)
    path.write_text(json.dumps(h.to_json()))


def whole_model_history(tmp_path, layout) -> tuple:
    """(history file, advice file) for `layout`'s whole stage at batches 1 and 8."""
    runs = {("whole", e, b): s for e in layout.stages["whole"] for b, s in ((1, 0.018), (8, 0.074))}
    history, out = tmp_path / "m-abc-perf.json", tmp_path / "advice.json"
    write_history(history, runs)
    return history, out


def test_advise_command_reads_the_history_and_writes_the_advice(tmp_path, capsys):
    layout = layout_for(RuntimeConfig(core_groups="size:1"), False, worker_share(probe(), 1))
    history, out = whole_model_history(tmp_path, layout)
    code = main(["advise", "--history", str(history), "--rate", "5", "--rate", "100000",
                 "--set", "hetserve.ratio=1.0", "--set", "hetserve.core_groups=size:1", "--out", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["layout"] == {"whole": list(layout.stages["whole"])}
    assert report["advice"][0]["best"]["batch_size"] >= 1
    assert report["advice"][1]["best"] is None
    assert "no batch size sustains it" in capsys.readouterr().out


def test_check_command_matches_each_model_to_its_history(tmp_path, capsys):
    state = tmp_path / "state"
    state.mkdir()
    layout = layout_for(RuntimeConfig(core_groups="size:1"), False, worker_share(probe(), 1))
    write_history(state / "m-abc-perf.json",
                  {("whole", e, b): s for e in layout.stages["whole"] for b, s in ((1, 0.018), (8, 0.074))})
    cfg = {"batchSize": 8, "maxBatchDelay": 10, "minWorkers": 1, "hetserve": {"ratio": 1.0, "core_groups": "size:1"}}
    results = {"criteria": {"p99_ms": 500}, "models": {"m": {"rows": {
        "b": {"config": cfg, "knee_rate": 20, "points": [point(5, 30, 60), point(20, 35, 80)]},
        "d_in_process_ort": {"best": 100.0}}}}}
    src, out = tmp_path / "serving_cpu.json", tmp_path / "check.json"
    src.write_text(json.dumps(results))
    assert main(["advise", "--check", str(src), "--state-dir", str(state), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    row = report["models"]["m"]["rows"]["b"]
    assert row["measured_knee_rps"] == 20 and row["predicted_knee_rps"] > 0
    assert report["models"]["m"]["fitted_overhead_ms"] > 0
    assert "knee predicted" in capsys.readouterr().out
    assert main(["advise", "--check", str(src), "--state-dir", str(tmp_path / "empty")]) == 2


def test_a_big_batch_inflated_by_contention_is_capped_by_running_its_halves():
    # seen after an overloaded sweep: batch 8 read 352 ms while batch 4 read 52 ms
    h = history_with({("whole", "cpu0", 1): 0.014, ("whole", "cpu0", 4): 0.052, ("whole", "cpu0", 8): 0.352})
    curve = curve_from_history(h, Layout({"whole": ("cpu0",)}), max_batch=8)
    assert curve.compute(8) == pytest.approx(2 * 0.052)
    assert curve.compute(4) == pytest.approx(0.052)  # consistent entries are left alone
    assert all(curve.compute(b) <= curve.compute(b - 1) + curve.compute(1) + 1e-12 for b in range(2, 9))


def test_advise_reads_minworkers_auto_as_this_boxs_worker_count(tmp_path):
    """The shipped minWorkers is `auto`: the advice models worker 0's share of this box's
    derived count (it crashed on int('auto'))."""
    from handlers.hardware.topology import default_workers
    from partitioner.auto_workers import box

    workers = default_workers(*box())
    layout = layout_for(RuntimeConfig(), False, worker_share(probe(), workers))
    history, out = whole_model_history(tmp_path, layout)
    code = main(["advise", "--history", str(history), "--rate", "5", "--set", "minWorkers=auto",
                 "--set", "hetserve.ratio=1.0", "--set", "hetserve.core_groups=numa", "--out", str(out)])
    assert code == 0
    assert json.loads(out.read_text())["layout"] == {"whole": list(layout.stages["whole"])}
