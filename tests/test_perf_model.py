"""The EWMA performance history: arithmetic, bucket scaling, transfer fit, persistence."""

from __future__ import annotations

import json
import logging
import multiprocessing
from pathlib import Path

import pytest

from handlers.runtime.exploration import decayed_alpha
from handlers.runtime.perf_model import PerfHistory, PerfHistoryError, batch_bucket


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_batch_bucket_is_next_power_of_two() -> None:
    assert [batch_bucket(b) for b in (1, 2, 3, 4, 5, 8, 9, 16, 17)] == [1, 2, 4, 4, 8, 8, 16, 16, 32]
    with pytest.raises(ValueError):
        batch_bucket(0)


@pytest.mark.parametrize("alpha", [0, -0.1, 1.01, float("nan"), "0.3"])
def test_alpha_is_validated(alpha) -> None:
    with pytest.raises(ValueError):
        PerfHistory(alpha=alpha)


def test_ewma_arithmetic_count_and_clock() -> None:
    clock = FakeClock()
    h = PerfHistory(alpha=0.25, clock=clock)
    assert h.predict_run("tail", "cpu0-3", 8) is None
    assert not h.is_calibrated("tail", "cpu0-3")
    h.observe_run("tail", "cpu0-3", 8, 0.010)
    clock.advance(5)
    h.observe_run("tail", "cpu0-3", 7, 0.020)  # same bucket (8)
    clock.advance(5)
    h.observe_run("tail", "cpu0-3", 8, 0.030)
    # 0.010 -> 0.010 + a * (0.020 - 0.010) -> ... + a * (0.030 - ...), where a is 0.25 for a
    # fresh estimate and grows as it ages (5 s here: issue 17's decay toward fresh measurements).
    a = decayed_alpha(0.25, 5.0)
    assert 0.25 < a < 1.0
    first = 0.010 + a * (0.020 - 0.010)
    assert h.predict_run("tail", "cpu0-3", 6) == pytest.approx(first + a * (0.030 - first))
    entry = h.run_entry("tail", "cpu0-3", 8)
    assert entry is not None and entry.count == 3 and entry.updated == 1010.0
    assert h.is_calibrated("tail", "cpu0-3")
    assert not h.is_calibrated("tail", "cuda:0")
    assert not h.is_calibrated("head", "cpu0-3")


def test_alpha_one_keeps_only_the_last_observation() -> None:
    h = PerfHistory(alpha=1.0, clock=FakeClock())
    for seconds in (0.5, 0.1, 0.3):
        h.observe_run("head", "cuda:0", 1, seconds)
    assert h.predict_run("head", "cuda:0", 1) == 0.3


def test_unseen_bucket_scaled_from_nearest_seen_bucket() -> None:
    h = PerfHistory(clock=FakeClock())
    h.observe_run("tail", "gpu", 2, 0.002)  # 1 ms per sample at bucket 2
    h.observe_run("tail", "gpu", 32, 0.016)  # 0.5 ms per sample at bucket 32
    assert h.predict_run("tail", "gpu", 1) == pytest.approx(0.001)  # from 2
    assert h.predict_run("tail", "gpu", 4) == pytest.approx(0.004)  # from 2 (distance 1 vs 3)
    assert h.predict_run("tail", "gpu", 64) == pytest.approx(0.032)  # from 32
    # Bucket 8 is two steps from both 2 and 32: the tie goes to the smaller, slower per sample.
    assert h.predict_run("tail", "gpu", 8) == pytest.approx(0.008)
    assert h.predict_run("tail", "cpu", 8) is None


def test_bad_observations_are_refused() -> None:
    h = PerfHistory(clock=FakeClock())
    for seconds in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            h.observe_run("tail", "gpu", 1, seconds)
    with pytest.raises(ValueError):
        h.observe_run("tail", "gpu", 0, 0.1)
    with pytest.raises(ValueError):
        h.observe_transfer("cuda:0->cpu", -5, 0.1)
    assert not h.is_calibrated("tail", "gpu")


def test_transfer_fit_separates_latency_and_bandwidth() -> None:
    h = PerfHistory(alpha=0.3, clock=FakeClock())
    latency, bandwidth = 20e-6, 10e9
    for nbytes in (1_000, 1_000_000, 50_000_000, 4_000, 8_000_000) * 4:
        h.observe_transfer("cuda:0->cpu", nbytes, latency + nbytes / bandwidth)
    entry = h.link_entry("cuda:0->cpu")
    assert entry is not None and entry.count == 20
    assert entry.latency_s == pytest.approx(latency, rel=1e-6)
    assert entry.bandwidth_bytes_per_s == pytest.approx(bandwidth, rel=1e-6)
    assert h.predict_transfer("cuda:0->cpu", 200_000_000) == pytest.approx(latency + 0.02)
    assert h.predict_transfer("cuda:0->cpu", 10) == pytest.approx(latency, rel=1e-3)


def test_transfer_with_one_size_is_pure_bandwidth() -> None:
    h = PerfHistory(alpha=0.5, clock=FakeClock())
    h.observe_transfer("cuda:0->cpu", 1000, 0.001)
    h.observe_transfer("cuda:0->cpu", 1000, 0.003)
    assert h.predict_transfer("cuda:0->cpu", 1000) == pytest.approx(0.002)
    assert h.predict_transfer("cuda:0->cpu", 2000) == pytest.approx(0.004)


def test_transfer_same_device_unknown_link_and_empty() -> None:
    h = PerfHistory(clock=FakeClock())
    assert h.predict_transfer("", 10**9) == 0.0
    assert h.predict_transfer("cpu->cuda:0", 10**9) is None
    h.observe_transfer("", 100, 0.5)  # same device: ignored
    assert h.predict_transfer("", 100) == 0.0
    assert h.predict_transfer("cpu->cuda:0", 0) == 0.0


def test_json_round_trip(tmp_path: Path) -> None:
    clock = FakeClock()
    h = PerfHistory(alpha=0.4, clock=clock)
    h.observe_run("head", "cuda:0/s0", 8, 0.004)
    clock.advance(1)
    h.observe_run("tail", "cpu0-3", 3, 0.016)
    h.observe_transfer("cuda:0->cpu", 4096, 0.0003)
    path = tmp_path / "history.json"
    h.save(path)
    data = json.loads(path.read_text())
    assert data["format"] == "hetserve-perf-history" and data["version"] == 1
    loaded = PerfHistory.load(path, alpha=0.4, clock=clock)
    assert loaded.to_json() == h.to_json()
    assert loaded.predict_run("tail", "cpu0-3", 4) == 0.016
    assert loaded.predict_run("tail", "cpu0-3", 8) == pytest.approx(0.032)  # scaling survives
    assert loaded.predict_transfer("cuda:0->cpu", 4096) == pytest.approx(0.0003)
    assert loaded.run_entry("head", "cuda:0/s0", 8).updated == 1000.0
    assert not list(tmp_path.glob("history.json.*[!k]"))  # no temp files left behind


def test_save_merges_other_workers_entries(tmp_path: Path) -> None:
    path = tmp_path / "history.json"
    clock = FakeClock()
    worker_a = PerfHistory(clock=clock)
    worker_b = PerfHistory(clock=clock)
    worker_a.observe_run("tail", "cpu0", 1, 0.010)
    worker_a.observe_run("tail", "shared", 1, 0.111)  # older
    clock.advance(10)
    worker_b.observe_run("tail", "cpu1", 1, 0.020)
    worker_b.observe_run("tail", "shared", 1, 0.222)  # newer: wins
    worker_b.save(path)
    worker_a.save(path)  # saving later with an older entry must not clobber the newer one
    merged = PerfHistory.load(path, clock=clock)
    assert merged.predict_run("tail", "cpu0", 1) == 0.010
    assert merged.predict_run("tail", "cpu1", 1) == 0.020
    assert merged.predict_run("tail", "shared", 1) == 0.222
    # save leaves the in-memory history alone
    assert worker_a.predict_run("tail", "cpu1", 1) is None


def _worker_saves(path: str, executor: str, rounds: int) -> None:
    h = PerfHistory()
    for i in range(rounds):
        h.observe_run("tail", executor, 1 << (i % 4), 0.001 * (i + 1))
        h.save(path)


def test_two_processes_saving_one_file_lose_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "shared.json")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_worker_saves, args=(path, f"cpu{i}", 40)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    merged = PerfHistory.load(path)
    for executor in ("cpu0", "cpu1"):
        for batch in (1, 2, 4, 8):
            entry = merged.run_entry("tail", executor, batch)
            assert entry is not None and entry.count == 10, (executor, batch)


def test_corrupt_or_missing_file_starts_empty(tmp_path: Path, caplog) -> None:
    assert PerfHistory.load(tmp_path / "absent.json").to_json()["runs"] == []
    bad_files = {
        "garbage.json": "{not json",
        "foreign.json": json.dumps({"format": "other"}),
        "future.json": json.dumps({"format": "hetserve-perf-history", "version": 99}),
        "odd_bucket.json": json.dumps(
            {
                "format": "hetserve-perf-history",
                "version": 1,
                "runs": [
                    {"stage": "t", "executor": "e", "bucket": 3, "mean_s": 1, "count": 1,
                     "updated": 0}
                ],
                "links": [],
            }
        ),
        "binary.json": b"\xff\xfe\x00",
    }
    for name, content in bad_files.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="handlers.runtime.perf_model"):
            history = PerfHistory.load(path)
        assert history.to_json()["runs"] == [], name
        assert "starting empty" in caplog.text, name
    # A corrupt file is replaced on the next save rather than blocking it.
    path = tmp_path / "garbage.json"
    history = PerfHistory(clock=FakeClock())
    history.observe_run("tail", "gpu", 1, 0.001)
    history.save(path)
    assert PerfHistory.load(path).predict_run("tail", "gpu", 1) == 0.001


def test_from_json_rejects_bad_entries() -> None:
    good = PerfHistory(clock=FakeClock())
    good.observe_run("tail", "gpu", 4, 0.001)
    data = good.to_json()
    data["runs"][0]["count"] = 0
    with pytest.raises(PerfHistoryError):
        PerfHistory.from_json(data)
    data["runs"][0]["count"] = 1
    data["runs"][0]["mean_s"] = float("nan")
    with pytest.raises(PerfHistoryError):
        PerfHistory.from_json(data)


def test_confirmed_at_is_this_process_s_last_measurement_of_the_bucket(tmp_path: Path) -> None:
    """Stamped per (stage, executor, bucket) as observations land; never saved, merged or
    loaded: an estimate from a file is unconfirmed until this process measures it."""
    clock = FakeClock()
    h = PerfHistory(alpha=0.4, clock=clock)
    assert h.confirmed_at(("tail", "cpu0", 1)) is None
    h.observe_run("tail", "cpu0", 1, 0.01)
    clock.advance(5)
    h.observe_run("tail", "cpu0", 7, 0.05)  # bucket 8, later: bucket 1's stamp stays
    assert h.confirmed_at(("tail", "cpu0", 1)) == 1000.0
    assert h.confirmed_at(("tail", "cpu0", 8)) == 1005.0
    assert h.confirmed_at(("tail", "cpu0", 4)) is None  # predicted by scaling, never measured
    assert h.predict_run("tail", "cpu0", 4) is not None
    clock.advance(5)
    h.observe_run("tail", "cpu0", 1, 0.02)
    assert h.confirmed_at(("tail", "cpu0", 1)) == 1010.0
    other = PerfHistory(alpha=0.4, clock=FakeClock(2000.0))
    other.observe_run("tail", "cpu1", 2, 0.01)
    merged = h.merge(other)
    assert merged.run_entry("tail", "cpu1", 2) is not None
    assert merged.confirmed_at(("tail", "cpu1", 2)) is None and merged.confirmed_at(("tail", "cpu0", 1)) is None
    path = tmp_path / "history.json"
    h.save(path)
    assert "confirmed" not in path.read_text()
    loaded = PerfHistory.load(path, alpha=0.4, clock=FakeClock(1011.0))
    assert loaded.predict_run("tail", "cpu0", 8) == pytest.approx(0.05)
    assert all(loaded.confirmed_at(("tail", "cpu0", b)) is None for b in (1, 8))
