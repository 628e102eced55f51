"""benchmarks/tuner_vs_grid.py's pure parts: the compared space, its grid and the pick/best
arithmetic, on plain data (the live run is the benchmark itself)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from hetserve.properties import read_properties
from hetserve.tuner import canonical, config_key, grid_points, shipped_defaults
from partitioner.auto_workers import resolve

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("tuner_vs_grid", REPO / "benchmarks" / "tuner_vs_grid.py")
tvg = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tvg)


def defaults(ratio=0.79):
    # minWorkers: auto as it resolves on the 2-core box the grids below are sized for (2 workers)
    config, _ = resolve(yaml.safe_load((REPO / "config" / "model-config.yaml").read_text()), 2, 0)
    props = read_properties(REPO / "config" / "config.properties")
    return shipped_defaults(config, ratio, props)


def test_space_varies_the_six_axes_with_the_shipped_default_first():
    d = defaults()
    space = tvg.comparison_space(d, 0.79)
    for knob in tvg.KNOBS:
        assert len(space[knob]) == 2 and space[knob][0] == d[knob], knob
    assert space["ratio"] == (0.79, 1.0)
    assert all(len(v) == 1 for k, v in space.items() if k not in tvg.KNOBS)
    grid = grid_points(space, cores=2)
    assert len(grid) == 19 and grid[0] == d  # 64 names, 19 configurations on 2 cores
    assert max(1, int(len(grid) * tvg.GOAL_TRIALS)) == 4
    quick = grid_points(tvg.comparison_space(defaults(0.5), 0.5, quick=True), cores=2)
    assert len(quick) == 2  # 2 workers of one core each: numa and size:1 group alike


def test_pick_and_best_from_plain_rows():
    d = defaults()
    grid = grid_points(tvg.comparison_space(d, 0.79), cores=2)
    rows = [{"params": p, "value": 10.0 + i} for i, p in enumerate(grid)]
    best = rows[-1]
    trials = [{"config": grid[0], "value": 10.0},
              {"config": grid[5], "value": 27.0},  # measured higher in the search than in the grid
              {"config": grid[5], "value": 27.0, "repeat_of_measured": True},
              {"config": grid[3], "value": None}]  # pruned
    s = tvg.pick_and_best(rows, trials)
    assert s["grid_best"]["params"] == best["params"] and s["grid_best"]["value"] == 28.0
    assert s["pick"]["params"] == grid[5] and s["pick"]["value_in_grid"] == 15.0
    assert s["pick_over_best_search"] == pytest.approx(27 / 28)
    assert s["pick_over_best_grid"] == pytest.approx(15 / 28)
    assert s["trials_measured"] == 2 and s["trials_ratio"] == pytest.approx(2 / 19)
    assert not s["same_configuration"]
    same = tvg.pick_and_best(rows, [{"config": best["params"], "value": 1.0}])
    assert same["same_configuration"]
    # a tuner config named differently but canonically equal to a grid row is found in the grid
    alias = {**grid[0], "maxBatchDelay": 20, "batchSize": 1}
    row = next(r for r in rows if config_key(r["params"]) == config_key(canonical(alias, tvg.comparison_space(d, 0.79), 2)))
    assert tvg.pick_and_best(rows, [{"config": row["params"], "value": 3.0}])["pick"]["value_in_grid"] == row["value"]


def test_confirmed_ratio_is_a_ratio_of_medians():
    # the 2026-12-01 rounds with a third: the pick's one p99 miss no longer sinks it
    assert tvg.confirmed_ratio([0.0, 30.8, 31.5], [32.6, 32.0, 33.0]) == pytest.approx(30.8 / 32.6)
    assert tvg.confirmed_ratio([9.0, 11.0, 30.0], [10.0, 10.0, 1.0]) == pytest.approx(11.0 / 10.0)
    assert tvg.confirmed_ratio([9.0, 11.0], [10.0, 12.0]) == pytest.approx(10.0 / 11.0)  # even: middle pair
    assert tvg.confirmed_ratio([9.0], [10.0, 12.0]) == pytest.approx(9 / 11)
    assert tvg.confirmed_ratio([], [10.0]) is None
    assert tvg.confirmed_ratio([1.0], []) is None
    assert tvg.confirmed_ratio([1.0, 2.0, 3.0], [0.0, 0.0, 5.0]) is None  # best's median is 0


def test_confirm_rounds_alternate_which_goes_first():
    orders = [tvg.confirm_order(i) for i in range(4)]
    assert orders == [("best", "pick"), ("pick", "best"), ("best", "pick"), ("pick", "best")]
    firsts = [o[0] for o in orders[:3]]
    assert firsts.count("best") == 2 and firsts.count("pick") == 1


def test_headline_is_one_for_the_same_configuration_else_the_medians():
    ratio, source = tvg.headline_ratio(True, 0.93, 0.9)  # noise between two measurements of one config
    assert ratio == 1.0 and source.startswith("same configuration")
    ratio, source = tvg.headline_ratio(False, 0.95, 0.5)
    assert ratio == 0.95 and "median" in source
    ratio, source = tvg.headline_ratio(False, None, 0.5)  # no rounds: the grid's values
    assert ratio == 0.5 and source == "grid values"
    assert tvg.headline_ratio(False, None, None) == (None, "grid values")


def test_defaults_fit_the_time_budget_and_quick_stays_short(monkeypatch):
    seen = {}
    monkeypatch.setattr(tvg, "run", lambda args: seen.setdefault("args", args))
    tvg.main([])
    full = seen.pop("args")
    assert (full.duration, full.confirm_rounds, full.model) == (6.0, 3, "resnet18")
    tvg.main(["--quick"])
    quick = seen.pop("args")
    assert quick.model == "resnet18-tiny" and quick.duration < full.duration and quick.confirm_rounds == 1
    tvg.main(["--duration", "8", "--confirm-rounds", "5"])
    assert (seen["args"].duration, seen["args"].confirm_rounds) == (8.0, 5)
