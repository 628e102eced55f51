"""The co-tenant load of issue 16's shared-GPU rows: its duty-cycle loop on a fake clock, and the
script itself on the CPU (``--device cpu``), stopped by its duration and by SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from gpu_cotenant import DutyCycle, Report, run_cycles  # noqa: E402

SCRIPT = REPO / "benchmarks" / "gpu_cotenant.py"


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.mark.parametrize("duty", [0.25, 0.6, 1.0])
def test_busy_share_follows_the_duty_cycle(duty):
    clock = FakeClock()
    report = run_cycles(DutyCycle(duty, 0.020), lambda: clock.advance(0.001), threading.Event(),
                        Report("fake", duty, 20.0, 1, 1), clock=clock, duration_s=1.0,
                        idle=clock.advance)
    assert report.periods == 50
    assert report.chunks == round(duty * 20) * 50  # whole 1 ms chunks filling each busy phase
    assert report.duty_achieved == pytest.approx(duty, abs=1e-9)


def test_a_chunk_longer_than_the_busy_phase_still_counts_as_busy():
    clock = FakeClock()
    report = run_cycles(DutyCycle(0.1, 0.010), lambda: clock.advance(0.004), threading.Event(),
                        Report("fake", 0.1, 10.0, 1, 1), clock=clock, duration_s=0.1,
                        idle=clock.advance)
    assert report.duty_achieved == pytest.approx(0.4)  # the report says what really happened


def test_stop_ends_the_loop_and_bad_cycles_are_refused():
    stop = threading.Event()
    stop.set()
    report = run_cycles(DutyCycle(0.5, 0.01), lambda: None, stop, Report("fake", 0.5, 10, 1, 1),
                        clock=FakeClock())
    assert report.periods == 0 and report.duty_achieved is None
    for duty, period in ((0.0, 0.02), (1.5, 0.02), (0.5, 0.0)):
        with pytest.raises(ValueError):
            DutyCycle(duty, period)


def test_script_runs_on_the_cpu_for_its_duration(tmp_path):
    out = tmp_path / "co.json"
    subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--duty", "0.5",
                    "--period-ms", "20", "--duration", "0.5", "--out", str(out)],
                   check=True, timeout=60, capture_output=True)
    report = json.loads(out.read_text())
    assert report["benchmark"] == "gpu_cotenant" and report["device"] == "cpu"
    assert report["duty_target"] == 0.5 and report["elapsed_s"] >= 0.5
    assert report["periods"] >= 1 and report["chunks"] >= 1
    assert 0.0 < report["duty_achieved"] <= 1.0


def test_script_stops_cleanly_on_sigterm(tmp_path):
    out, ready = tmp_path / "co.json", tmp_path / "co.ready"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--device", "cpu", "--duty", "0.3",
                             "--ready", str(ready), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "never got ready"
            time.sleep(0.05)
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    report = json.loads(out.read_text())
    assert report["periods"] >= 1 and 0.0 < report["duty_achieved"] <= 1.0
    assert "duty" in proc.stdout.read().decode()
