"""The offload bound: closed form against a brute-force search over the CPU share."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hetserve.offload import OffloadInputs, head_share_for_gain, offload_bound


def rate_at(x: OffloadInputs, share: float) -> float:
    gpu = x.gpu_head_ms + (1 - share) * x.gpu_tail_ms
    cpu = share * max(x.cpu_tail_ms / x.cpu_groups, x.transfer_ms)
    return 1e3 / max(gpu, cpu)


def test_a_ten_percent_tail_and_a_free_cpu_give_at_most_one_over_point_nine():
    bound = offload_bound(OffloadInputs(gpu_head_ms=9.0, gpu_tail_ms=1.0, cpu_tail_ms=0.0))
    assert bound.cpu_share == 1.0
    assert bound.gain == pytest.approx(10 / 9)
    assert bound.ceiling == pytest.approx(10 / 9)
    assert bound.limit == "gpu"


def test_a_slow_cpu_takes_the_share_where_both_sides_meet():
    # Whole batch 10 ms on the GPU, tail 2 ms there, 40 ms on one CPU group, 4 groups: 10 ms a
    # batch on the CPU side. f* = 10 / (10 + 2); both sides are busy 8.33 ms a batch.
    bound = offload_bound(OffloadInputs(8.0, 2.0, 40.0, cpu_groups=4))
    assert bound.cpu_share == pytest.approx(10 / 12)
    assert bound.gain == pytest.approx(10 / (10 - 2 * 10 / 12))
    assert bound.limit == "both"
    assert bound.batches_per_s == pytest.approx(rate_at(OffloadInputs(8.0, 2.0, 40.0, 4), 10 / 12))


def test_the_copy_engine_bounds_the_cpu_side_too():
    fast_cpu = offload_bound(OffloadInputs(8.0, 2.0, 0.4, cpu_groups=4))
    slow_copy = offload_bound(OffloadInputs(8.0, 2.0, 0.4, cpu_groups=4, transfer_ms=20.0))
    assert fast_cpu.gain == pytest.approx(10 / 8)
    assert 1.0 < slow_copy.gain < fast_cpu.gain
    assert slow_copy.cpu_share == pytest.approx(10 / 22)


@given(
    head=st.floats(0.01, 100), tail=st.floats(0, 100), cpu=st.floats(0, 1000),
    groups=st.integers(1, 16), transfer=st.floats(0, 50),
)
def test_the_closed_form_is_the_best_share(head, tail, cpu, groups, transfer):
    x = OffloadInputs(head, tail, cpu, groups, transfer)
    bound = offload_bound(x)
    assert 0.0 <= bound.cpu_share <= 1.0
    assert 1.0 - 1e-9 <= bound.gain <= bound.ceiling * (1 + 1e-9)
    assert bound.batches_per_s == pytest.approx(rate_at(x, bound.cpu_share), rel=1e-9)
    best = max(rate_at(x, i / 200) for i in range(201))
    assert bound.batches_per_s >= best * (1 - 1e-9)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"gpu_head_ms": -1.0, "gpu_tail_ms": 1.0, "cpu_tail_ms": 1.0}, "gpu_head_ms"),
        ({"gpu_head_ms": 1.0, "gpu_tail_ms": 1.0, "cpu_tail_ms": math.nan}, "cpu_tail_ms"),
        ({"gpu_head_ms": 0.0, "gpu_tail_ms": 0.0, "cpu_tail_ms": 1.0}, "both be 0"),
        ({"gpu_head_ms": 1.0, "gpu_tail_ms": 1.0, "cpu_tail_ms": 1.0, "cpu_groups": 0}, "cpu_groups"),
    ],
)
def test_bad_inputs_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OffloadInputs(**kwargs)


def test_the_head_share_needed_for_a_gain():
    assert head_share_for_gain(1.15) == pytest.approx(0.8696, abs=1e-4)
    with pytest.raises(ValueError, match="gain"):
        head_share_for_gain(0.9)


def test_inputs_from_two_timelines_scale_cpu_runs_to_the_batch():
    from hetserve.offload import inputs_from_runs

    gpu_tails = {"head@cuda": {"count": 4, "seconds": 0.008, "rows": 32},
                 "tail@cuda": {"count": 4, "seconds": 0.002, "rows": 32}}
    cpu_tails = {"head@cuda": {"count": 3, "seconds": 0.006, "rows": 24},
                 "tail@cpu": {"count": 3, "seconds": 0.060, "rows": 12},  # 5 ms a sample
                 "cuda:0->cpu": {"count": 3, "seconds": 0.0012, "rows": 12, "bytes": 9000}}
    x = inputs_from_runs(gpu_tails, cpu_tails, batch=8, cpu_groups=4)
    assert (x.gpu_head_ms, x.gpu_tail_ms) == pytest.approx((2.0, 0.5))
    assert x.cpu_tail_ms == pytest.approx(40.0)
    assert x.transfer_ms == pytest.approx(0.8)
    assert x.cpu_groups == 4
    with pytest.raises(ValueError, match="GPU-tail timeline has no 'tail@cuda' runs"):
        inputs_from_runs({"head@cuda": gpu_tails["head@cuda"]}, cpu_tails, 8, 4)


def test_the_script_reads_two_timeline_files(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    def timeline(runs, executors):
        return {"command": "python3 benchmarks/timeline.py ...", "settings": {"batch": 8},
                "executors": executors, "overlap": {"runs": runs}}

    (tmp_path / "timeline-m-c1.json").write_text(json.dumps(timeline(
        {"head@cuda": {"count": 2, "seconds": 0.004, "rows": 16},
         "tail@cuda": {"count": 2, "seconds": 0.001, "rows": 16}}, ["cpu0-3", "cuda0s0"])))
    (tmp_path / "timeline-m-d.json").write_text(json.dumps(timeline(
        {"head@cuda": {"count": 2, "seconds": 0.004, "rows": 16},
         "tail@cpu": {"count": 2, "seconds": 0.016, "rows": 16}}, [["cpu0-3", "cpu4-7", "cuda0s0"]])))
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "offload_bound.py"
    done = subprocess.run([sys.executable, str(script), "--model", "m", "--results", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "offload-bound-m.json").read_text())
    assert record["inputs"]["cpu_groups"] == 2  # worker 0's CPU executors
    assert record["inputs"]["cpu_tail_ms"] == pytest.approx(8.0)
    assert record["measured_head_share"] == pytest.approx(0.8)
    # Head 2 ms + tail 0.5 ms on the GPU; 4 ms a batch on the CPU side: f* = 2.5 / 4.5.
    assert record["bound"]["gain"] == pytest.approx(2.5 / (2.5 - 0.5 * 2.5 / 4.5))
