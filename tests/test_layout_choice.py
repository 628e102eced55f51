"""The load-time layout check: split layout or whole model on one group, whichever is faster."""

from __future__ import annotations

import logging
import threading

import pytest

from handlers.runtime.config import ConfigError, RuntimeConfig
from handlers.runtime.layout_choice import CONFIGURED, WHOLE, choose, time_alternating


def test_the_whole_model_is_kept_when_its_median_batch_is_faster():
    decision = choose([0.080, 0.082, 0.079], [0.070, 0.071, 0.075], batch=4)
    assert decision.keep == WHOLE
    assert decision.configured_s == pytest.approx(0.080)
    assert decision.whole_s == pytest.approx(0.071)
    assert "keeping the whole model on one group" in decision.describe()
    assert "80.0 ms" in decision.describe() and "batch 4" in decision.describe()


def test_the_configured_layout_is_kept_when_faster_or_tied():
    assert choose([0.050, 0.051], [0.060, 0.058], batch=8).keep == CONFIGURED
    assert choose([0.050], [0.050], batch=1).keep == CONFIGURED


def test_one_slow_outlier_does_not_decide():
    # A neighbour's burst slowed one configured batch; the median ignores it.
    decision = choose([0.060, 0.400, 0.061, 0.059, 0.060], [0.065, 0.066, 0.064, 0.065, 0.066], batch=4)
    assert decision.keep == CONFIGURED
    assert decision.runs == 5


def test_missing_or_negative_times_are_refused():
    with pytest.raises(ValueError, match="at least one"):
        choose([], [0.1], batch=1)
    with pytest.raises(ValueError, match="negative"):
        choose([0.1], [-0.1], batch=1)


def test_time_alternating_takes_turns_and_times_each_call_on_the_given_clock():
    now = [0.0]
    calls = []

    def clock() -> float:
        return now[0]

    def configured() -> None:
        calls.append("c")
        now[0] += 0.010

    def whole() -> None:
        calls.append("w")
        now[0] += 0.025

    a, b = time_alternating(configured, whole, 3, clock)
    assert calls == ["c", "w"] * 3
    assert a == pytest.approx([0.010] * 3)
    assert b == pytest.approx([0.025] * 3)
    with pytest.raises(ValueError):
        time_alternating(configured, whole, 0, clock)


def test_compare_whole_must_be_a_boolean():
    assert RuntimeConfig.from_model_yaml({"hetserve": {"compare_whole": True}}).compare_whole is True
    assert RuntimeConfig().compare_whole is False
    with pytest.raises(ConfigError, match="compare_whole must be true or false"):
        RuntimeConfig.from_model_yaml({"hetserve": {"compare_whole": "yes"}})


def _executor_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.is_alive()}


def test_a_service_with_the_check_keeps_one_layout_logs_it_and_closes_the_other(tiny_model_dir, tmp_path, caplog):
    from handlers.service import InferenceService

    before = _executor_threads()
    yaml = {"batchSize": 2, "hetserve": {"compare_whole": True, "calibration_runs": 1, "state_dir": str(tmp_path),
                                         "core_groups": "size:1"}}
    with caplog.at_level(logging.INFO, logger="handlers.runtime.assembly"):
        service = InferenceService.load(tiny_model_dir, yaml)
    try:
        lines = [r.getMessage() for r in caplog.records if "layout check" in r.getMessage()]
        assert len(lines) == 1 and "at batch 2" in lines[0]
        stages = {plan.name for plan in service.runtime.stages}
        if "keeping the whole model" in lines[0]:
            assert stages == {"whole"}
            assert len(service.runtime.executors) == 1  # one group of every core
        else:
            assert stages == {"head", "tail"}
            assert len(service.runtime.executors) >= 2
        # The layout not kept was closed: of its executors' threads, only the kept ones remain.
        started = {n.removeprefix("hetserve-") for n in _executor_threads() - before}
        assert started & {"cpu0", "cpu1", "cpu0-1"} == set(service.runtime.executors)
    finally:
        service.close()


def test_an_explicit_ratio_is_served_as_asked_without_a_check(tiny_model_dir, tmp_path, caplog):
    from handlers.service import InferenceService

    yaml = {"hetserve": {"compare_whole": True, "calibration_runs": 1, "state_dir": str(tmp_path),
                         "core_groups": "size:1", "ratio": 0.8}}
    with caplog.at_level(logging.INFO, logger="handlers.runtime.assembly"):
        service = InferenceService.load(tiny_model_dir, yaml)
    try:
        assert not [r for r in caplog.records if "layout check" in r.getMessage()]
        assert {plan.name for plan in service.runtime.stages} == {"head", "tail"}
    finally:
        service.close()


_ONE_CORE_LOAD = """
import json, logging, os, sys
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # a worker's share of one core
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from handlers.service import InferenceService
service = InferenceService.load(sys.argv[1], json.loads(sys.argv[2]))
try:
    print(json.dumps({"stages": sorted(p.name for p in service.runtime.stages),
                      "executors": sorted(service.runtime.executors)}))
finally:
    service.close()
"""


@pytest.mark.parametrize("ratio", [None, 0.8])
def test_a_one_core_worker_serves_the_whole_model_unless_a_ratio_is_asked(tiny_model_dir, tmp_path, ratio):
    """TorchServe's launcher gives each of two workers on a 2-core box one core: the archive's
    default split would run head and tail in turns on it, so the whole model is served (no
    timing involved); an explicit ratio is still served as asked."""
    import json
    import subprocess
    import sys

    yaml = {"hetserve": {"compare_whole": True, "calibration_runs": 1, "state_dir": str(tmp_path),
                         "ratio": ratio}}
    done = subprocess.run([sys.executable, "-c", _ONE_CORE_LOAD, str(tiny_model_dir), json.dumps(yaml)],
                          capture_output=True, text=True, timeout=120, check=True)
    served = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(served["executors"]) == 1
    if ratio is None:
        assert served["stages"] == ["whole"]
        assert "one core in this worker's share" in done.stderr
        assert "layout check" not in done.stderr
    else:
        assert served["stages"] == ["head", "tail"]
        assert "one core in this worker's share" not in done.stderr
