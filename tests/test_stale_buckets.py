"""Every estimate the scheduler uses is re-measured when stale, per batch bucket (issue 22, item 6).

The live placement step (``Placer``: history, predicted free times, re-probes, dmda) on a fake
clock, under mixed traffic of 1-8 rows: two head executors, cpu1 twice as fast as cpu0 at every
size, but its 4-row estimate poisoned to 2 s. cpu1 keeps running 1-, 2- and 8-row heads the
whole time, so a staleness stamp per (stage, executor) looked fresh for ever and its 4-row
estimate was never re-measured; per bucket, it is.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import numpy as np

from handlers.runtime.exploration import REPROBE_AFTER_S
from handlers.runtime.perf_model import PerfHistory, batch_bucket
from handlers.runtime.placement import Placer

PER_ROW_S = {"cpu0": 0.001, "cpu1": 0.0005}
EXECUTORS = ("cpu0", "cpu1")
POISON_S = 2.0
BUCKETS = (1, 2, 4, 8)


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _calibrated(clock: FakeClock) -> PerfHistory:
    """Both executors measured at every bucket, except cpu1 at 4 rows: one 2 s run."""
    history = PerfHistory(alpha=0.3, clock=clock)
    for name in EXECUTORS:
        for bucket in BUCKETS:
            seconds = POISON_S if (name, bucket) == ("cpu1", 4) else PER_ROW_S[name] * bucket
            history.observe_run("head", name, bucket, seconds)
    return history


def _serve(history: PerfHistory, clock: FakeClock, seconds: float, seed: int = 0):
    """100 heads a second of 1-8 rows each, every run taking its executor's true time; yields
    (time, rows, placement) for each."""
    placer = Placer(history, {name: "cpu" for name in EXECUTORS}, clock)
    rng = random.Random(seed)
    end = clock.now + seconds
    while clock.now < end:
        clock.now += 0.01
        rows = rng.randint(1, 8)
        placement = placer.place("head", rows, {"x": np.zeros((rows, 4), np.float32)}, EXECUTORS)
        history.observe_run("head", placement.executor, rows, PER_ROW_S[placement.executor] * rows)
        placer.complete(placement.executor, clock.now)
        yield clock.now, rows, placement


def test_a_poisoned_bucket_is_corrected_while_its_executor_keeps_serving_other_sizes():
    clock = FakeClock()
    history = _calibrated(clock)
    start = clock.now
    log = list(_serve(history, clock, 150.0))
    per_window = Counter(
        int((t - start) // REPROBE_AFTER_S) for t, rows, p in log
        if p.executor == "cpu1" and batch_bucket(rows) != 4
    )
    # cpu1 ran other sizes in every 10 s window: a per-(stage, executor) stamp stayed fresh.
    assert min(per_window[w] for w in range(15)) > 100, per_window
    assert history.predict_run("head", "cpu1", 4) < 2 * 4 * PER_ROW_S["cpu1"]
    late = [p.executor for t, rows, p in log if t > start + 130 and batch_bucket(rows) == 4]
    assert late.count("cpu1") >= 0.9 * len(late), Counter(late)  # the faster one has them back
    # The re-probes that did it went to cpu1's 4-row bucket; the slower cpu0's confirmed
    # estimates were re-run at a wait that doubles (10, 20, 40, 80 s), not every 10 s.
    reprobes = Counter((p.executor, batch_bucket(rows)) for _, rows, p in log if p.calibrating)
    assert reprobes[("cpu1", 4)] >= 4, reprobes
    assert all(reprobes[("cpu0", b)] <= 5 for b in (1, 2, 8)), reprobes
    assert sum(reprobes.values()) <= 150 / REPROBE_AFTER_S * 3, reprobes


def test_estimates_loaded_from_disk_are_re_measured_after_a_restart(tmp_path: Path):
    """A history saved a second before the restart looks fresh by its stamps; loaded, every
    bucket still counts as unmeasured here and is re-measured at its first use."""
    clock = FakeClock()
    path = tmp_path / "m-perf.json"
    _calibrated(clock).save(path)
    clock.now += 1.0
    history = PerfHistory.load(path, alpha=0.3, clock=clock)
    assert history.predict_run("head", "cpu1", 4) == POISON_S
    loaded = [(e["stage"], e["executor"], e["bucket"]) for e in history.to_json()["runs"]]
    assert len(loaded) == len(EXECUTORS) * len(BUCKETS)
    assert all(history.confirmed_at(key) is None for key in loaded)
    # The restarted worker's calibration: one observed 1-row run per pair (assembly.calibrate).
    for name in EXECUTORS:
        history.observe_run("head", name, 1, PER_ROW_S[name])
    log = list(_serve(history, clock, 5.0))  # well inside one re-probe period
    assert all(history.confirmed_at(key) is not None for key in loaded)
    # The first two 4-row heads re-measured the two executors, one each; a loaded estimate
    # gives way to the first run here, so the poison is gone at once.
    first = [p for _, rows, p in log if batch_bucket(rows) == 4][:2]
    assert {p.executor for p in first} == set(EXECUTORS) and all(p.calibrating for p in first)
    assert history.predict_run("head", "cpu1", 4) <= 4 * PER_ROW_S["cpu1"]
    late = [p.executor for t, rows, p in log if t > clock.now - 3.0 and batch_bucket(rows) == 4]
    assert late and set(late) == {"cpu1"}, Counter(late)
