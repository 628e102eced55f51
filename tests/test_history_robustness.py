"""Performance history that cannot take a model down or starve an executor (issue 17, items 2-4).

Pure: no server. Files are written the way an outside attacker (or a crash) would leave them;
clocks are injected.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest

from handlers.artifact.history_key import history_key
from handlers.artifact.state_dir import StateDirError, resolve_state_dir
from handlers.runtime.config import ConfigError, RuntimeConfig
from handlers.runtime.exploration import (
    DECAY_HALF_LIFE_S,
    Reprobe,
    decayed_alpha,
    due_for_reprobe,
    mark_reprobes,
    next_reprobe,
)
from handlers.runtime.perf_model import HISTORY_FORMAT, HISTORY_VERSION, PerfHistory
from handlers.runtime.scheduler import Candidate, ExecutorSpec, build_candidates, choose_executor


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _history_file(path: Path, runs=(), links=()) -> Path:
    path.write_text(json.dumps({"format": HISTORY_FORMAT, "version": HISTORY_VERSION, "alpha": 0.3,
                                "runs": list(runs), "links": list(links)}))
    return path


def _run(stage="tail", executor="cpu0", mean_s=0.001, updated=1.0, bucket=1, count=3):
    return {"stage": stage, "executor": executor, "bucket": bucket, "mean_s": mean_s,
            "count": count, "updated": updated}


def _link(mean_bytes=1e6, updated=1.0):
    return {"link": "cpu->cuda:0", "mean_bytes": mean_bytes, "mean_s": 0.001,
            "mean_bytes_sq": mean_bytes**2 if mean_bytes < 1e150 else 1e300,
            "mean_bytes_s": mean_bytes * 0.001, "count": 2, "updated": updated}


# ---- item 3: any unreadable history: one warning naming file and cause, start empty ----------

@pytest.mark.parametrize("content, cause", [
    ("[" * 100_000 + "]" * 100_000, "RecursionError"),
    (None, "out of range"),  # mean_bytes 1e200: its square overflowed a float
    ("{\"format\": ", "JSONDecodeError"),
    (b"\xff\xfe", "UnicodeDecodeError"),
])
def test_an_unreadable_history_is_one_warning_naming_file_and_cause_then_empty(
        tmp_path, caplog, content, cause):
    path = tmp_path / "m-perf.json"
    if content is None:
        _history_file(path, links=[_link(mean_bytes=1e200)])
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with caplog.at_level(logging.WARNING, logger="handlers.runtime.perf_model"):
        history = PerfHistory.load(path)
    assert history.to_json()["runs"] == [] and history.to_json()["links"] == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert str(path) in warnings[0] and cause in warnings[0], warnings[0]


@pytest.mark.parametrize("entry", [_run(mean_s=1e6), _run(mean_s=-1.0), _run(mean_s=float("nan"))])
def test_run_times_out_of_bounds_are_refused(tmp_path, entry):
    path = _history_file(tmp_path / "m-perf.json", runs=[entry])
    assert PerfHistory.load(path).run_entry("tail", "cpu0", 1) is None


def test_a_bounded_history_still_loads(tmp_path):
    path = _history_file(tmp_path / "m-perf.json", runs=[_run(mean_s=0.02)], links=[_link()])
    history = PerfHistory.load(path)
    assert history.predict_run("tail", "cpu0", 1) == pytest.approx(0.02)
    assert history.predict_transfer("cpu->cuda:0", 10**6) == pytest.approx(0.001)


# ---- item 4: decay, re-probe, future stamps ---------------------------------------------------

def test_a_future_stamp_is_clamped_to_now_on_load_and_loses_to_a_fresh_measurement(tmp_path):
    clock = FakeClock()
    path = _history_file(tmp_path / "m-perf.json", runs=[_run(mean_s=0.02, updated=clock.now + 1e9)])
    loaded = PerfHistory.load(path, clock=clock)
    assert loaded.run_entry("tail", "cpu0", 1).updated == 0.0
    clock.now += 1.0
    fresh = PerfHistory(clock=clock)
    fresh.observe_run("tail", "cpu0", 1, 0.0003)
    fresh.save(path)  # merge-on-save: the newer stamp wins
    assert PerfHistory.load(path, clock=clock).predict_run("tail", "cpu0", 1) == pytest.approx(0.0003)


def test_an_observation_replaces_more_of_an_older_estimate():
    assert decayed_alpha(0.3, 0.0) == 0.3
    assert decayed_alpha(0.3, DECAY_HALF_LIFE_S) == pytest.approx(0.65)
    assert decayed_alpha(0.3, 1e9) == pytest.approx(1.0)
    clock = FakeClock()
    history = PerfHistory(alpha=0.3, clock=clock)
    history.observe_run("tail", "cpu0", 1, 0.020)
    clock.now += 10 * DECAY_HALF_LIFE_S
    history.observe_run("tail", "cpu0", 1, 0.0003)
    assert history.predict_run("tail", "cpu0", 1) < 0.0004


def test_reprobe_policy_for_estimates_not_measured_here_for_a_while():
    assert not due_for_reprobe(95.0, None, 100.0, 10.0)  # measured 5 s ago
    assert due_for_reprobe(80.0, None, 100.0, 10.0)
    assert due_for_reprobe(None, None, 100.0, 10.0)  # loaded or scaled: never measured here
    assert not due_for_reprobe(80.0, Reprobe(95.0, 10.0, 0.02), 100.0, 10.0)  # re-probed recently
    assert due_for_reprobe(None, Reprobe(85.0, 10.0, 0.02), 100.0, 10.0)
    assert not due_for_reprobe(None, Reprobe(85.0, 40.0, 0.02), 100.0, 10.0)  # a longer wait


def test_a_reprobe_that_confirms_its_estimate_doubles_the_wait_up_to_the_cap():
    first = next_reprobe(None, 0.020, 0.0, 10.0, 80.0)
    assert first == Reprobe(0.0, 10.0, 0.020)
    waits = [first.wait_s]
    last = first
    for t in range(1, 6):  # the estimate holds: each re-probe confirmed it
        last = next_reprobe(last, 0.021, 100.0 * t, 10.0, 80.0)
        waits.append(last.wait_s)
    assert waits == [10.0, 20.0, 40.0, 80.0, 80.0, 80.0]
    moved = next_reprobe(last, 0.007, 700.0, 10.0, 80.0)  # the last one moved it: back to 10 s
    assert moved.wait_s == 10.0


def test_mark_reprobes_marks_at_most_one_due_estimate_and_never_an_uncalibrated_one():
    cands = [Candidate("cpu0", 0.0, None), Candidate("cpu1", 0.0, 0.02), Candidate("cpu2", 0.0, 0.02)]
    reprobed: dict = {}
    out = mark_reprobes("tail", 4, cands, {}.get, reprobed, 100.0)
    assert [c.run_s for c in out] == [None, None, 0.02]
    assert set(reprobed) == {("tail", "cpu1", 4)}
    out = mark_reprobes("tail", 4, cands, {}.get, reprobed, 101.0)  # cpu1 waits; cpu2's turn
    assert [c.run_s for c in out] == [None, 0.02, None]
    fresh = {("tail", "cpu1", 4): 100.0, ("tail", "cpu2", 4): 100.0}.get
    assert mark_reprobes("tail", 4, cands[1:], fresh, {}, 105.0) == cands[1:]


def test_an_inflated_estimate_does_not_starve_an_executor():
    """20 ms believed against 0.3 ms real on cpu1: dmda alone never places there again (0 of 700,
    as the issue measured); re-probes bring it back within a few periods."""
    clock = FakeClock()
    history = PerfHistory(alpha=0.3, clock=clock)
    history.observe_run("tail", "cpu0", 1, 0.0004)
    history.observe_run("tail", "cpu1", 1, 0.020)  # one bad run, never repeated
    specs = [ExecutorSpec("cpu0", "cpu"), ExecutorSpec("cpu1", "cpu")]
    reprobed: dict = {}
    placed = {"cpu0": 0, "cpu1": 0}
    for _ in range(700):
        clock.now += 0.1  # 70 s of placements
        cands = build_candidates(history, "tail", 1, 0, "cpu", specs, {})
        cands = mark_reprobes("tail", 1, cands, history.confirmed_at, reprobed, clock.now)
        choice = choose_executor(clock.now, cands).executor
        placed[choice] += 1
        history.observe_run("tail", choice, 1, 0.0003 if choice == "cpu1" else 0.0004)
    assert history.predict_run("tail", "cpu1", 1) < 2 * 0.0003
    assert placed["cpu1"] > 150, placed  # corrected within 5 periods, then chosen: it is faster


# ---- item 2: state_dir ------------------------------------------------------------------------

def test_state_dir_tilde_is_expanded_under_the_user_cache(tmp_path):
    home, model = tmp_path / "home", tmp_path / "model"
    got = resolve_state_dir("~/.cache/x", model, env={}, home=home)
    assert got == (home / ".cache" / "x").resolve()
    assert resolve_state_dir(None, model, env={}, home=home) == (home / ".cache" / "hetserve").resolve()


@pytest.mark.parametrize("value, words", [
    ("state", "must be an absolute path"),
    ("./x", "must be an absolute path"),
    ("/etc/x", "outside the allowed roots"),
    ("", "non-empty"),
])
def test_state_dir_refused_with_a_reason(tmp_path, value, words):
    with pytest.raises(StateDirError, match=words) as err:
        resolve_state_dir(value, tmp_path / "model", env={}, home=tmp_path / "home")
    assert "hetserve.state_dir" in str(err.value)


def test_state_dir_inside_the_model_directory_is_refused_even_under_an_allowed_root(tmp_path):
    model = tmp_path / "home" / ".cache" / "model"
    with pytest.raises(StateDirError, match="inside the model directory"):
        resolve_state_dir(str(model / "state"), model, env={}, home=tmp_path / "home")


def test_operator_roots_allow_other_directories(tmp_path):
    env = {"HETSERVE_STATE_ROOTS": f"/nonexistent:{tmp_path / 'vol'}"}
    got = resolve_state_dir(str(tmp_path / "vol" / "a"), tmp_path / "model", env=env, home=tmp_path)
    assert got == (tmp_path / "vol" / "a").resolve()
    # The operator's own HETSERVE_STATE_DIR is a root (KServe volumes, the tuner's work dir).
    env = {"HETSERVE_STATE_DIR": str(tmp_path / "k")}
    assert resolve_state_dir(None, tmp_path / "model", env=env, home=tmp_path) == (tmp_path / "k").resolve()


def test_runtime_config_resolves_the_state_path_against_the_model_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("HETSERVE_STATE_DIR", raising=False)
    path = RuntimeConfig(state_dir="~/.cache/hetserve").state_path("m", "ab" * 32, tmp_path / "model")
    assert path.parent == (tmp_path / "home" / ".cache" / "hetserve").resolve()
    with pytest.raises(StateDirError):
        RuntimeConfig(state_dir="rel").state_path("m", "ab" * 32, tmp_path / "model")


# ---- item 8: knobs with the wrong YAML type name the knob ------------------------------------

@pytest.mark.parametrize("section, knob", [
    ({"core_groups": 2}, "hetserve.core_groups must be a string"),
    ({"state_dir": 123}, "hetserve.state_dir must be a string or null"),
    ({"ratio": "0.8"}, "hetserve.ratio must be a number or null"),
    ({"ratio": True}, "hetserve.ratio must be a number or null"),
    ({"ewma_alpha": "x"}, "hetserve.ewma_alpha must be a number"),
])
def test_a_knob_of_the_wrong_type_is_named(section, knob):
    with pytest.raises(ConfigError) as err:
        RuntimeConfig.from_model_yaml({"hetserve": section})
    assert knob in str(err.value), str(err.value)


# ---- item 5: history keyed by the served stages and the core-group shape ----------------------

def _manifest():
    from handlers.artifact.manifest import FileEntry, Manifest, Partition, TensorSpec

    def part(ratio):
        return Partition(ratio, ratio, "metis", f"stages/head_{ratio}.onnx", f"stages/tail_{ratio}.onnx",
                         (TensorSpec("cut", "float32", (None, 8)),), 32, ratio, 1 - ratio, 0.0)

    parts = (part(0.5), part(0.9))
    files = {"model.onnx": FileEntry("0" * 64, 1)}
    for p in parts:
        files[p.head] = FileEntry(hashlib.sha256(p.head.encode()).hexdigest(), 1)
        files[p.tail] = FileEntry(hashlib.sha256(p.tail.encode()).hexdigest(), 1)
    return Manifest("m", (TensorSpec("x", "float32", (None, 8)),), (TensorSpec("y", "float32", (None, 2)),),
                    "model.onnx", parts, files, default_ratio=0.5)


def test_history_key_differs_by_ratio_and_core_groups_and_is_stable():
    m = _manifest()
    base = history_key(m, None, "numa")
    assert base == history_key(m, 0.5, "numa"), "the default ratio is 0.5"
    assert len({base, history_key(m, 0.9, "numa"), history_key(m, 1.0, "numa"),
                history_key(m, 0.5, "size:1"), history_key(m, 0.5, "numa", 1)}) == 5


def test_a_ratio_change_starts_from_its_own_history_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HETSERVE_STATE_ROOTS", str(tmp_path))
    m = _manifest()
    paths = {RuntimeConfig(ratio=r, state_dir=str(tmp_path / "s")).state_path(
        "m", "ab" * 32, tmp_path / "model", history_key(m, r, "numa")) for r in (0.5, 0.9)}
    assert len(paths) == 2 and all(p.name.startswith("m-abababababab-") for p in paths)
